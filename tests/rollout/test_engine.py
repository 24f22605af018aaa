"""Block engine properties: greedy token identity with HF, exact lossless sampling, KV eviction, stops, constraints."""

import math

import pytest
import torch

from kernels.verify import verify_reference
from policy.tokenizer import encode_prompt
from rollout import BlockEngine
from rollout import engine as engine_mod
from rollout.auto import AutoSampler, engine_factory
from tests.conftest import PROMPTS, lively_policy


def hf_greedy(policy, prompt, n):
    out = policy.model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("sampler", "levels"),
    [
        ("ar", [0]),
        ("lossless", [0]),
        ("lossless", [0, 1, 2, 3, 4]),
        ("lossless", [0, 3]),
        ("lossless", [0, "end"]),
        ("lossless", [0, 2, "end"]),
        ("lossless", ["end"]),
    ],
)
@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_greedy_matches_hf_generate_on_ragged_batch(sampler, levels, kind):
    """T=0: every sampler's output is token-identical to HF greedy generate (fp32), with slot refills."""
    policy = lively_policy(kind)
    eng = BlockEngine(policy, sampler=sampler, levels=levels, max_batch=3)
    trajs = eng.generate(PROMPTS, max_new_tokens=24, temperature=0, eos_token_id=None)
    for p, t in zip(PROMPTS, trajs, strict=True):
        assert t.tokens == hf_greedy(policy, p, 24)
        assert t.finish_reason == "length"


def test_greedy_matches_hf_under_eager_attention():
    policy = lively_policy("moe", attn="eager")
    trajs = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=2).generate(PROMPTS, 16, 0)
    assert [t.tokens for t in trajs] == [hf_greedy(policy, p, 16) for p in PROMPTS]


def test_cache_holds_exactly_the_committed_prefix(monkeypatch):
    """At every forward, the anchor's logits (verify slot 0) equal a from-scratch forward over prompt + tokens."""
    policy = lively_policy("moe")
    checked = []
    orig_forward = engine_mod.EngineCore.forward

    def checking_forward(self, rows, ids, pos, qmask, decode=False):
        hidden = orig_forward(self, rows, ids, pos, qmask, decode)
        logits = self.head(hidden[:, :1])
        if self.slots[rows[0]] is not None and self.slots[rows[0]].traj.tokens:  # a decode step
            for r, s in enumerate(rows):
                t = self.slots[s].traj
                ref = policy.model(input_ids=torch.tensor([t.prompt_ids + t.tokens])).logits[0, -1]
                torch.testing.assert_close(logits[r, 0], ref, atol=1e-4, rtol=1e-4)
                checked.append(len(t.tokens))
        return hidden

    monkeypatch.setattr(engine_mod.EngineCore, "forward", checking_forward)
    BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=2).generate(PROMPTS, 20, temperature=1.0)
    assert len(checked) > 10


def test_oracle_drafter_accepts_whole_blocks(monkeypatch):
    """With drafts equal to the AR greedy continuation, every full step accepts all K drafts."""
    K = 4
    policy = lively_policy("moe", block_size=K)
    refs = {tuple(p): hf_greedy(policy, p, 40) for p in PROMPTS}
    orig = engine_mod.EngineCore.set_drafts

    def oracle(self, rows, proposals, accept_len, levels, ends=None):
        orig(self, rows, proposals, accept_len, levels, ends)
        for s in rows:
            t = self.slots[s].traj
            n = len(t.tokens) + int(accept_len[rows.index(s)]) + 1  # tokens committed after this step
            cont = refs[tuple(t.prompt_ids)][n : n + K]
            self.drafts[s, : len(cont)] = torch.tensor(cont)
            self.n_drafts[s] = len(cont)

    monkeypatch.setattr(engine_mod.EngineCore, "set_drafts", oracle)
    trajs = BlockEngine(policy, sampler="lossless", levels=[0], max_batch=2).generate(
        PROMPTS, 26, temperature=0, eos_token_id=None
    )
    for p, t in zip(PROMPTS, trajs, strict=True):
        assert t.tokens == refs[tuple(p)][:26]
        assert t.accept_counts[:-1] == [K] * (len(t.accept_counts) - 1)


def exact_ar_distribution(policy, prompt, n):
    """P(x_1..x_n | prompt) for every sequence, by enumeration. Returns {tuple: prob}."""
    V = policy.model.get_output_embeddings().weight.shape[0]
    seqs = torch.cartesian_prod(*[torch.arange(V)] * n) if n > 1 else torch.arange(V)[:, None]
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(input_ids=ids).logits.float(), -1)
    P = len(prompt)
    lp = sum(logp[:, P - 1 + i].gather(-1, seqs[:, i : i + 1]).squeeze(-1) for i in range(n))
    return {tuple(s): float(p) for s, p in zip(seqs.tolist(), lp.exp(), strict=True)}


def tv_threshold(probs, n, delta=1e-4):
    """E[TV] <= 0.5 * sum sqrt(p(1-p)/N); McDiarmid adds sqrt(ln(1/delta) / 2N)."""
    mean = 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in probs)
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


def empirical_tv(trajs, exact):
    counts = {}
    for t in trajs:
        counts[tuple(t.tokens)] = counts.get(tuple(t.tokens), 0) + 1
    n = len(trajs)
    keys = set(exact) | set(counts)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


@pytest.fixture(scope="module")
def small_vocab_policy():
    return lively_policy("moe", vocab=5, block_size=2, seed=3)  # V = 6 with the mask token


@pytest.mark.parametrize(
    ("draft", "levels"),
    [
        ("dirac", [0]),
        ("sampled", [0]),
        ("dirac", [0, 1, 2]),
        ("dirac", [0, "end"]),
        ("sampled", [0, "end"]),
        ("dirac", ["end"]),
    ],
)
def test_lossless_is_distributed_as_ar_sampling(small_vocab_policy, draft, levels):
    """TV distance between lossless samples of 3 tokens and the exact AR distribution is within sampling noise."""
    policy, prompt, N = small_vocab_policy, [2, 3], 6000
    exact = exact_ar_distribution(policy, prompt, 3)
    eng = BlockEngine(
        policy, sampler="lossless", levels=levels, draft=draft, draft_temperature=0.7, max_batch=N
    )
    trajs = eng.generate([prompt] * N, max_new_tokens=3, temperature=1.0, seed=11, eos_token_id=None)
    assert (
        sum(sum(t.accept_counts) for t in trajs) > N * 0.15
    )  # drafts really were accepted, not all rejected
    assert empirical_tv(trajs, exact) < tv_threshold(exact.values(), N)


def test_tv_check_has_power_against_a_biased_sampler(small_vocab_policy):
    """Negative control: substituting softmax(draft logits) for a Dirac q (a biased shortcut) fails the check."""
    policy, prompt, N = small_vocab_policy, [2, 3], 6000
    exact = exact_ar_distribution(policy, prompt, 3)

    def biased_verify(target, drafts, q, n, u, T):
        return verify_reference(target, drafts, None, n, torch.zeros_like(u), T)  # accept iff p(d) > 0

    eng = BlockEngine(policy, sampler="lossless", levels=[0], max_batch=N, verify_fn=biased_verify)
    trajs = eng.generate([prompt] * N, max_new_tokens=3, temperature=1.0, seed=11, eos_token_id=None)
    assert empirical_tv(trajs, exact) > tv_threshold(exact.values(), N)


def test_logit_mix_weight_one_is_lossless():
    policy = lively_policy("moe")
    a = BlockEngine(policy, sampler="lossless", levels=[0, 2]).generate(PROMPTS, 20, temperature=1.0, seed=5)
    b = BlockEngine(policy, sampler="logit_mix", mix_weight=1.0, levels=[0, 2]).generate(
        PROMPTS, 20, 1.0, seed=5
    )
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens and x.behavior_logprobs == y.behavior_logprobs


def test_logit_mix_records_behavior_and_ar_logprobs():
    policy = lively_policy("moe")
    trajs = BlockEngine(policy, sampler="logit_mix", mix_weight=0.3, levels=[0]).generate(
        PROMPTS, 20, 1.0, seed=2
    )
    for t in trajs:
        full = t.prompt_ids + t.tokens
        logp = torch.log_softmax(policy.model(input_ids=torch.tensor([full])).logits[0], -1)
        ar = [float(logp[len(t.prompt_ids) - 1 + i, tok]) for i, tok in enumerate(t.tokens)]
        torch.testing.assert_close(torch.tensor(t.ar_logprobs), torch.tensor(ar), atol=1e-4, rtol=1e-4)
    assert any(
        abs(a - b) > 1e-3 for t in trajs for a, b in zip(t.ar_logprobs, t.behavior_logprobs, strict=True)
    )


@pytest.mark.parametrize("sampler", ["ar", "lossless"])
def test_eos_and_stop_strings_cut_inside_chunks(sampler, tokenizer):
    """Rerunning with EOS / a stop string set to what the free run produced cuts exactly there, nothing after."""
    policy = lively_policy("moe", vocab=len(tokenizer))
    prompt = [encode_prompt(tokenizer, "count e: ")]
    eng = BlockEngine(policy, sampler=sampler, levels=[0, 2], tokenizer=tokenizer)
    free = eng.generate(prompt, 30, temperature=0, eos_token_id=None)[0].tokens
    i = len(free) // 2
    cut = eng.generate(prompt, 30, temperature=0, eos_token_id=free[i])[0]
    assert cut.tokens == free[: free.index(free[i]) + 1] and cut.finish_reason == "eos"
    stop = tokenizer.decode(free[i : i + 2])
    stopped = eng.generate(prompt, 30, temperature=0, eos_token_id=None, stop_strings=(stop,))[0]
    text = tokenizer.decode(stopped.tokens)
    assert text.endswith(stop) and stop not in text[:-1] and stopped.finish_reason == "stop_string"
    assert len(stopped.ar_logprobs) == len(stopped.tokens)


@pytest.mark.parametrize("sampler", ["ar", "lossless", "logit_mix"])
def test_banned_and_allowed_tokens_hold(sampler):
    policy = lively_policy("moe")
    free = BlockEngine(policy, sampler=sampler, levels=[0, 2]).generate(PROMPTS, 20, 1.0, seed=1)
    common = sorted({t for tr in free for t in tr.tokens})[:6]
    eng = BlockEngine(policy, sampler=sampler, levels=[0, 2])
    banned = eng.generate(PROMPTS, 20, 1.0, seed=1, banned_token_ids=tuple(common))
    assert not {t for tr in banned for t in tr.tokens} & set(common)
    allowed = eng.generate(PROMPTS, 20, 1.0, seed=1, allowed_token_ids=(3, 4, 5))
    assert {t for tr in allowed for t in tr.tokens} <= {3, 4, 5}


def test_results_do_not_depend_on_batch_size():
    """Per-row generators: the same seed gives the same trajectories at any max_batch."""
    policy = lively_policy("llama")
    a = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=1).generate(PROMPTS, 16, 1.0, seed=9)
    b = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=4).generate(PROMPTS, 16, 1.0, seed=9)
    assert [t.tokens for t in a] == [t.tokens for t in b]


def test_bad_arguments():
    policy = lively_policy("moe")
    with pytest.raises(ValueError, match="sampler"):
        BlockEngine(policy, sampler="fast")
    with pytest.raises(ValueError, match="levels"):
        BlockEngine(policy, levels=[1, 2])  # no level 0 and no end: a rejected draft would have no proposal
    with pytest.raises(ValueError, match=r"levels\[1\]"):
        BlockEngine(policy, levels=[0, "last"])
    BlockEngine(policy, levels=[2, "end"])  # the draft's end stands in for 0
    with pytest.raises(ValueError, match="prompt"):
        BlockEngine(policy).generate([[]])
    with pytest.raises(ValueError, match="temperature"):
        BlockEngine(policy).generate([[2]], temperature=-1)


def test_auto_never_reuses_a_random_stream_across_repeated_prompts():
    """GRPO repeats each prompt G times: auto's pilot/main split must keep every sample's seed distinct."""
    policy = lively_policy("moe")
    eng = AutoSampler(engine_factory(policy), policy.block_size, max_batch=2)
    trajs = eng.generate([[2, 5]] * 6, max_new_tokens=12, temperature=1.0, seed=3)
    assert len({tuple(t.tokens) for t in trajs}) > 3


def test_auto_times_each_power_of_two_batch_once():
    """A multi-turn job's calls shrink as its episodes end (16, 9, 5, 3 rows ...): auto times its options once per
    power-of-two batch up to max_batch, not once per call size."""
    policy = lively_policy("moe")
    eng = AutoSampler(engine_factory(policy), policy.block_size, max_batch=8)
    for n in (7, 5, 3, 2, 6, 1):
        eng.generate([[2, 5 + i] for i in range(n)], max_new_tokens=4, temperature=1.0, seed=n)
    assert eng.calibrated == {8, 4, 2, 1}


@pytest.mark.parametrize("sampler", ["ar", "lossless"])
def test_top_k_1_and_tiny_top_p_sample_the_argmax(sampler):
    """Processors shape the target itself: top_k=1 (or a tiny top_p) at T=1 must reproduce greedy decoding."""
    policy = lively_policy("moe")
    eng = BlockEngine(policy, sampler=sampler, levels=[0, 2])
    greedy = [t.tokens for t in eng.generate(PROMPTS, 16, temperature=0)]
    assert [t.tokens for t in eng.generate(PROMPTS, 16, temperature=1.0, top_k=1, seed=4)] == greedy
    assert [t.tokens for t in eng.generate(PROMPTS, 16, temperature=1.0, top_p=1e-6, seed=4)] == greedy


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_on_cuda_greedy_matches_hf_and_bf16_samples_are_fp32(kind):
    """On CUDA (the Triton verify kernel): fp32 greedy is token-identical to HF generate on the GPU; in bf16 the
    engine samples from fp32 logits (its log-probs are fp32 and finite)."""
    policy = lively_policy(kind).cuda()
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=3)
    assert eng.device.type == "cuda"
    for p, t in zip(
        PROMPTS, eng.generate(PROMPTS, max_new_tokens=24, temperature=0, eos_token_id=None), strict=True
    ):
        out = policy.model.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert t.tokens == out[0, len(p) :].tolist()
    bf16 = BlockEngine(lively_policy(kind).to("cuda", torch.bfloat16), sampler="lossless", levels=[0, 2])
    trajs = bf16.generate(PROMPTS, max_new_tokens=24, temperature=1.0, seed=0, eos_token_id=None)
    assert all(
        len(t.tokens) == 24 and all(math.isfinite(lp) and lp <= 0 for lp in t.ar_logprobs) for t in trajs
    )


@pytest.mark.parametrize(
    ("sampler", "draft", "has_logits", "has_probs"),
    [
        ("lossless", "dirac", False, False),
        ("lossless", "sampled", False, True),
        ("logit_mix", "dirac", True, False),
    ],
)
def test_per_row_vocab_state_only_where_a_sampler_reads_it(sampler, draft, has_logits, has_probs):
    """Dirac drafts keep only their ids: no [B, K, V] fp32 draft logits unless logit mixing reads them, no draft
    distribution unless drafts are sampled."""

    eng = BlockEngine(lively_policy(), sampler=sampler, levels=[0, 2], max_batch=3, draft=draft)
    run = engine_mod.EngineCore(eng)
    assert (run.draft_logits is not None) == has_logits and (run.draft_probs is not None) == has_probs
    if has_logits:  # the one [B, K, V] state logit mixing needs, in bf16 (half of fp32)
        assert run.draft_logits.dtype == torch.bfloat16
    assert run.drafts.shape == (3, 4) and run.drafts.dtype == torch.long

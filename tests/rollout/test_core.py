"""EngineCore, step by step: each step lays out only what its drafts reach, makes one host sync, verifies rows with
different settings together, frees cancelled slots and records the behaviour distribution's alternatives."""

import itertools

import pytest
import torch

from rollout import BlockEngine
from rollout import engine as engine_mod
from rollout.types import Request, SamplingParams
from tests.conftest import PROMPTS, lively_policy


@pytest.mark.parametrize("levels", [[0, 2], [0, "end"], ["end"], [2, "end"]])
def test_each_step_computes_only_what_its_drafts_reach(monkeypatch, levels):
    """A pass verifies 1 + (its longest draft) slots and evaluates only the fixed levels those drafts reach; with
    `end`, every row also drafts from its own draft's end, so a row that accepted its whole draft (or had none)
    drafts a full K next, whatever its batch mates carry. The host's draft counts, which lay the step out, are
    the device's."""
    K = 4
    policy = lively_policy("moe", block_size=K)
    seen = []
    orig = engine_mod.EngineCore.decode_step

    def checking(self, rows):
        counts = [self.slots[s].n_drafts for s in rows]
        assert counts == self.n_drafts[self.index(rows)].tolist()
        orig(self, rows)
        n = max(counts)
        fixed = [p for p in levels if p != "end" and p <= n]
        assert (self._layout.verify_len, list(self._layout.levels), self._layout.end) == (
            n + 1,
            fixed,
            "end" in levels,
        )
        seen.extend(counts)

    monkeypatch.setattr(engine_mod.EngineCore, "decode_step", checking)
    trajs = BlockEngine(policy, sampler="lossless", levels=levels, max_batch=3).generate(PROMPTS, 40, 1.0)
    assert len(set(seen)) > 1  # drafts of several lengths were carried
    fixed, checked = [p for p in levels if p != "end"], 0
    for t in trajs:  # each next draft count follows the rule, from the row's own counts only
        steps = list(zip(t.accept_counts, t.draft_counts, strict=True))
        for (na, n), (_, nxt) in itertools.pairwise(steps):
            p = max((p for p in fixed if p <= na), default=None)
            want = K if ("end" in levels and na == n) else (0 if p is None else K - na + p)
            assert nxt == want, (levels, na, n, nxt)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("levels", [[0, 2], [0, "end"], ["end"]])
def test_a_trimmed_step_samples_what_the_full_step_samples(levels):
    """Laying a step out for its drafts only (the default) and at the full K+1 verify slots with every level
    (`full_layout`, the probes' layout) give the same tokens at T=1, row by row, on a ragged batch of 3: the
    trimmed queries were never seen, and each row's uniforms keep their slots."""
    policy = lively_policy("moe", block_size=4)
    eng = BlockEngine(policy, sampler="lossless", levels=levels, max_batch=3)
    out = []
    for full in (False, True):
        core = engine_mod.EngineCore(eng)
        core.full_layout = full
        ids = [core.add(Request(p, SamplingParams(30, 1.0, seed=5), stream=i)) for i, p in enumerate(PROMPTS)]
        done = {}
        while core.has_work:
            done |= {ev.request_id: ev.finished for ev in core.step() if ev.finished is not None}
        out.append([(done[i].tokens, done[i].draft_counts) for i in ids])
    assert [t for t, _ in out[0]] == [t for t, _ in out[1]]
    assert out[0] == out[1]  # the same drafts were offered too: only the layout differed


@pytest.mark.parametrize("levels", [[0, 2], ["end"], [2, "end"], [0, "end"]])
def test_a_step_after_dropped_drafts_verifies_none_and_drafts_a_full_block(levels):
    """The calibration's draft-less step (`drop_drafts`): one verify slot, one token per row, and each row drafts
    a full K from its level-0 or end block, as after a rejection under [end]."""
    policy = lively_policy("moe", block_size=4)
    eng = BlockEngine(policy, sampler="lossless", levels=levels, max_batch=3)
    core = _never_stopping(eng, PROMPTS[:3])
    rows = [0, 1, 2]
    with torch.inference_mode():
        core.admit()
        core.decode_step(rows)  # rows now carry drafts
        core.drop_drafts(rows)
        before = [len(core.slots[s].traj.tokens) for s in rows]
        core.decode_step(rows)
    lay = core._layout
    assert lay.verify_len == 1 and len(lay.levels) + lay.end == (0 in levels) + ("end" in levels)
    assert [len(core.slots[s].traj.tokens) - b for s, b in zip(rows, before, strict=True)] == [1, 1, 1]
    assert [core.slots[s].traj.draft_counts[-1] for s in rows] == [0, 0, 0]
    assert [core.slots[s].n_drafts for s in rows] == [eng.K] * 3 == core.n_drafts.tolist()


def test_the_draftless_probe_times_steps_without_drafts(monkeypatch):
    """`time_decode_steps(draftless=True)` times steps laid out for no draft (the cost model's least step); the
    default probe times the full layout."""
    eng = BlockEngine(lively_policy("moe", block_size=4), sampler="lossless", levels=[0, "end"], max_batch=2)
    seen = []
    step = engine_mod.EngineCore.decode_step

    def recording(self, rows):
        step(self, rows)
        seen.append((self._layout.verify_len, len(self._layout.levels) + self._layout.end))

    monkeypatch.setattr(engine_mod.EngineCore, "decode_step", recording)
    eng.time_decode_steps(PROMPTS[:2], 3, draftless=True)
    assert seen == [(1, 2)] * 3
    seen.clear()
    eng.time_decode_steps(PROMPTS[:2], 3)
    assert seen == [(eng.K + 1, 2)] * 3


def _never_stopping(eng, prompts, **params):
    """A core holding `prompts` as requests that never stop, not yet admitted."""
    core = engine_mod.EngineCore(eng, len(prompts))
    for i, p in enumerate(prompts):
        core.add(Request(p, SamplingParams(max_new_tokens=1 << 20, eos_token_id=None, **params), i))
    return core


def _decode_syncs(eng, prompts, steps=6, **params):
    """Host syncs of each of `steps` decode steps after a prefill of `prompts` (none of which finishes)."""
    from common.host_sync import HostSyncs

    run = _never_stopping(eng, prompts, **params)
    counts = []
    with torch.inference_mode():
        run.admit()
        for _ in range(steps):
            with HostSyncs() as syncs:
                run.decode_step(list(range(len(prompts))))
            counts.append((syncs.count, syncs.report()))
    return counts


@pytest.mark.parametrize(
    ("sampler", "draft", "params"),
    [
        ("ar", "dirac", {}),
        ("lossless", "dirac", {}),
        ("lossless", "sampled", {"top_p": 0.9, "top_k": 20}),
        ("logit_mix", "dirac", {"temperature": 0.0}),
    ],
)
@pytest.mark.parametrize("levels", [[0, 2], [0, "end"]])
@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_a_decode_step_makes_one_host_sync(kind, sampler, draft, params, levels):
    """Every decode step, on a ragged batch, reads the device exactly once: the packed committed tokens. Layout
    (the cache extent comes from host-side lengths), uniforms (per-row generators on the device) and slot indices
    (cached) read nothing. Counted at the torch-function and dispatcher levels (`common.host_sync`), so the CPU
    sees what would be a sync on a GPU."""
    policy = lively_policy(kind)
    if kind == "moe":
        policy.model.set_experts_implementation("grouped_mm")
    eng = BlockEngine(policy, sampler=sampler, levels=levels, max_batch=4, draft=draft)
    for count, report in _decode_syncs(eng, PROMPTS[:3], **params):
        assert count == 1, report
        assert "emit" in report


def test_the_sync_counter_sees_the_models_own_syncs():
    """The counter is not blind to model code: HF's eager MoE experts loop over the experts that were hit
    (`nonzero`, a host read per layer), which the grouped_mm kernel avoids."""
    policy = lively_policy("moe")
    policy.model.set_experts_implementation("eager")
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=4)
    count, report = _decode_syncs(eng, PROMPTS[:3], steps=1)[0]
    assert count > policy.config.num_hidden_layers and "nonzero" in report


@pytest.mark.gpu
@pytest.mark.parametrize("levels", [[0, 2], ["end"]])
def test_on_cuda_a_decode_step_makes_one_host_sync(levels):
    """The same budget measured by CUDA itself (`torch.cuda.set_sync_debug_mode`: a warning per synchronizing
    call), with the Triton verify kernel."""
    import warnings

    policy = lively_policy("llama").cuda()
    eng = BlockEngine(policy, sampler="lossless", levels=levels, max_batch=4)
    run = _never_stopping(eng, PROMPTS[:3])
    with torch.inference_mode():
        run.admit()
        run.decode_step([0, 1, 2])  # warm: kernels compiled, generators created
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(4):
                    run.decode_step([0, 1, 2])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 4, [str(w.message) for w in syncs]


@pytest.mark.gpu
def test_on_cuda_decode_masks_keep_sdpa_fused_kernels():
    """The decode-step and prefill masks (bool [R, 1, Q, extent]) are ones sdpa's fused kernels take: with the math
    backend excluded, sdpa raises rather than fall back, and the bf16 engine still decodes, token-identical to the
    unrestricted run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    policy = lively_policy("llama").to("cuda", torch.bfloat16)
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=3)
    free = eng.generate(PROMPTS, max_new_tokens=16, temperature=0, eos_token_id=None)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        got = eng.generate(PROMPTS, max_new_tokens=16, temperature=0, eos_token_id=None)
    assert [t.tokens for t in got] == [t.tokens for t in free]


# ------------------------------------------------------------------------------------------ step-level core
def _alone(eng, req):
    """The request's trajectory when it has the engine to itself."""
    core = engine_mod.EngineCore(eng, 1)
    core.add(req)
    while core.has_work:
        for ev in core.step():
            if ev.finished is not None:
                return ev.finished
    raise AssertionError("never finished")


MIXED = [
    SamplingParams(24, temperature=0.0, eos_token_id=None),
    SamplingParams(24, temperature=1.0, seed=3, eos_token_id=None),
    SamplingParams(24, temperature=0.7, top_k=5, seed=4, eos_token_id=None),
    SamplingParams(24, temperature=1.0, top_p=0.8, banned_token_ids=(5, 6, 7), seed=5, eos_token_id=None),
]


@pytest.mark.parametrize(
    ("sampler", "draft"),
    [("ar", "dirac"), ("lossless", "dirac"), ("lossless", "sampled"), ("logit_mix", "dirac")],
)
def test_rows_with_different_sampling_settings_share_a_batch(sampler, draft):
    """Requests that differ in temperature, top-k, top-p and banned tokens run in one batch, each exactly as it
    would alone; requests also join a running batch between steps."""
    eng = BlockEngine(lively_policy(), sampler=sampler, levels=[0, 2], max_batch=4, draft=draft)
    reqs = [
        Request(p, params, stream=i, top_logprobs=i % 3)  # some rows want alternatives, some not
        for i, (p, params) in enumerate(zip(PROMPTS, MIXED, strict=True))
    ]
    core = engine_mod.EngineCore(eng)
    ids = [core.add(r) for r in reqs[:2]]
    got, streamed = {}, {}
    for n in range(200):
        if n == 3:  # two more join a batch that is already decoding
            ids += [core.add(r) for r in reqs[2:]]
        for ev in core.step():
            streamed.setdefault(ev.request_id, []).extend(ev.tokens)
            if ev.finished is not None:
                got[ev.request_id] = ev.finished
        if not core.has_work:
            break
    for rid, req in zip(ids, reqs, strict=True):
        t, alone = got[rid], _alone(eng, req)
        assert t.tokens == alone.tokens
        assert t.behavior_logprobs == pytest.approx(alone.behavior_logprobs, abs=1e-5)
        if req.top_logprobs:
            assert [[i for i, _ in a] for a in t.top_logprobs] == [
                [i for i, _ in a] for a in alone.top_logprobs
            ]
        else:
            assert t.top_logprobs is None
        assert streamed[rid] == t.tokens  # the step events add up to the trajectory
        assert not set(t.tokens) & set(req.params.banned_token_ids)


def test_cancel_frees_the_slot_for_the_next_request():
    eng = BlockEngine(lively_policy(), sampler="lossless", levels=[0, 2], max_batch=1)
    core = engine_mod.EngineCore(eng)
    long = core.add(Request(PROMPTS[0], SamplingParams(10_000, eos_token_id=None)))
    nxt = core.add(Request(PROMPTS[1], SamplingParams(8, eos_token_id=None)))
    core.step()
    assert core.num_active == 1 and core.num_queued == 1
    cut = core.cancel(long)
    assert cut.finish_reason == "cancelled" and 0 < len(cut.tokens) < 10_000
    assert core.cancel(long) is None  # gone
    done = {}
    while core.has_work:
        done |= {ev.request_id: ev.finished for ev in core.step() if ev.finished is not None}
    assert list(done) == [nxt] and done[nxt].num_tokens == 8
    queued = core.add(Request(PROMPTS[2], SamplingParams(4)))
    assert core.cancel(queued).finish_reason == "cancelled" and not core.has_work


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_top_logprobs_are_the_behaviour_distributions_best(temperature):
    """Alternatives come best first, hold the emitted token whenever it ranks among them with the same log-prob, and
    at T = 0 the emitted token is the best one."""
    eng = BlockEngine(lively_policy(), sampler="lossless", levels=[0, 2], max_batch=2)
    params = SamplingParams(20, temperature=temperature, seed=2, eos_token_id=None)
    t = _alone(eng, Request(PROMPTS[0], params, top_logprobs=3))
    assert len(t.top_logprobs) == t.num_tokens
    for tok, lp, alts in zip(t.tokens, t.behavior_logprobs, t.top_logprobs, strict=True):
        vals = [v for _, v in alts]
        assert len(alts) == 3 and vals == sorted(vals, reverse=True)
        if temperature == 0:
            assert alts[0][0] == tok
        elif tok in dict(alts):
            assert dict(alts)[tok] == pytest.approx(lp, abs=1e-5)
    assert (
        _alone(eng, Request(PROMPTS[0], params)).tokens == t.tokens
    )  # asking for alternatives changes nothing

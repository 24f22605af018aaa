"""The compiled decode step (policy/compiled.py) on the CPU: the tokens of the eager step and of HF, logits within a
stated bound of an eager from-scratch forward, no recompiles in steady state, exact sampling compiled, and an eager
fallback with one logged reason where the body does not compile."""

import gc
import logging

import pytest
import torch

from policy.compiled import compile_enabled, graphs_compiled
from rollout import BlockEngine
from rollout import engine as engine_mod
from rollout.cache import KVPool, RaggedKVCache
from tests.conftest import PROMPTS, lively_policy
from tests.rollout.test_engine import empirical_tv, exact_ar_distribution, hf_greedy, tv_threshold


@pytest.fixture(scope="module")
def policy():
    """The bench tests' model shape (V = 100 + mask): a session that ran them reuses their kernels."""
    torch._dynamo.reset()  # this module counts its own compiles
    return lively_policy("moe", vocab=100)


def test_auto_compiles_on_cuda_only():
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile must be"):
        compile_enabled("yes", torch.device("cpu"))


@pytest.mark.parametrize(("sampler", "levels"), [("lossless", ["end"]), ("lossless", [0, 2]), ("ar", [0])])
def test_compiled_greedy_equals_eager_and_hf(policy, sampler, levels):
    """T = 0 on a ragged batch with slot refills (rows 3, 2, 1): the compiled step's tokens are the eager step's
    and HF greedy's."""
    eager = BlockEngine(policy, sampler=sampler, levels=levels, max_batch=3)
    compiled = BlockEngine(policy, sampler=sampler, levels=levels, max_batch=3, compile="on")
    want = eager.generate(PROMPTS, 24, temperature=0, eos_token_id=None)
    got = compiled.generate(PROMPTS, 24, temperature=0, eos_token_id=None)
    assert [t.tokens for t in got] == [t.tokens for t in want] == [hf_greedy(policy, p, 24) for p in PROMPTS]
    assert compiled.body.fallback is None and compiled.body.steps > 0  # it really ran compiled


def test_compile_time_is_measured(policy):
    """The seconds spent compiling are counted (the bench's `compile_s`, the server's start-up log)."""
    body = BlockEngine(policy, sampler="lossless", levels=["end"], compile="on").body
    assert body.graphs > 0 and body.compile_seconds > 0


def test_no_recompiles_in_steady_state(policy):
    """Once a step's variants have compiled (one row or several; one query or several), calls with other row
    counts (one-slot engines too), prompt lengths, cache extents, temperatures and draft lengths compile nothing
    (torch's own counter)."""
    for sampler in ("lossless", "ar"):
        BlockEngine(policy, sampler=sampler, levels=["end"], max_batch=3, compile="on").generate(
            PROMPTS, 24, temperature=0, eos_token_id=None
        )
    before = graphs_compiled()
    prompts = [[2, 3], [2, 5, 7, 8, 9, 10, 11, 12, 13], [4, 4], [5], [6, 7, 8]]
    for sampler, levels, batch in [
        ("lossless", ["end"], 1),
        ("lossless", [0, 2], 4),
        ("ar", [0], 5),
        ("ar", [0], 1),
    ]:
        eng = BlockEngine(policy, sampler=sampler, levels=levels, max_batch=batch, compile="on")
        trajs = eng.generate(prompts, 60, temperature=1.0, seed=3, eos_token_id=None)
        assert all(len(t.tokens) == 60 for t in trajs)
    assert graphs_compiled() == before


def test_compiled_logits_are_within_bound_of_an_eager_forward(policy, monkeypatch):
    """At every compiled decode step, the anchor's logits equal a from-scratch eager forward over prompt + tokens
    within 1e-4 (fp32): not bit-identical, because inductor fuses the norms and reorders their reductions."""
    checked = []
    orig = engine_mod.EngineCore.forward

    def checking(self, rows, ids, pos, qmask, decode=False):
        hidden = orig(self, rows, ids, pos, qmask, decode)
        if decode:
            logits = self.head(hidden[:, :1])
            for r, s in enumerate(rows):
                t = self.slots[s].traj
                ref = policy.model(input_ids=torch.tensor([t.prompt_ids + t.tokens])).logits[0, -1]
                torch.testing.assert_close(logits[r, 0], ref, atol=1e-4, rtol=1e-4)
                checked.append(len(t.tokens))
        return hidden

    monkeypatch.setattr(engine_mod.EngineCore, "forward", checking)
    eng = BlockEngine(policy, sampler="lossless", levels=["end"], max_batch=3, compile="on")
    eng.generate(PROMPTS, 20, temperature=1.0)
    assert len(checked) > 10


@pytest.mark.parametrize(("draft", "levels"), [("dirac", ["end"]), ("sampled", [0, "end"])])
def test_compiled_lossless_is_distributed_as_ar_sampling(draft, levels):
    """The TV test of tests/rollout/test_engine.py, with the decode step compiled."""
    policy, prompt, N = lively_policy("moe", vocab=5, block_size=2, seed=3), [2, 3], 6000
    exact = exact_ar_distribution(policy, prompt, 3)
    eng = BlockEngine(
        policy,
        sampler="lossless",
        levels=levels,
        draft=draft,
        draft_temperature=0.7,
        max_batch=N,
        compile="on",
    )
    trajs = eng.generate([prompt] * N, max_new_tokens=3, temperature=1.0, seed=11, eos_token_id=None)
    assert eng.body.fallback is None and eng.body.steps > 0
    assert sum(sum(t.accept_counts) for t in trajs) > N * 0.15
    assert empirical_tv(trajs, exact) < tv_threshold(exact.values(), N)


def test_a_body_that_does_not_compile_runs_eager_with_one_logged_reason(caplog):
    """No working C++ compiler for inductor (a machine without one): the first compiled step fails, the engine
    logs why once and decodes eager, with the eager step's tokens."""
    policy = lively_policy("llama", seed=5)
    want = BlockEngine(policy, sampler="lossless", levels=["end"], max_batch=2).generate(PROMPTS, 16, 0)
    eng = BlockEngine(policy, sampler="lossless", levels=["end"], max_batch=2, compile="on")
    broken = {"cpp.cxx": (None, "/nonexistent/c++"), "force_disable_caches": True}
    with torch._inductor.config.patch(broken), caplog.at_level(logging.WARNING, logger="policy.compiled"):
        got = eng.generate(PROMPTS, 16, 0)
        again = eng.generate(PROMPTS, 16, 0)
    assert [t.tokens for t in got] == [t.tokens for t in again] == [t.tokens for t in want]
    assert eng.body.fallback is not None
    said = [r for r in caplog.records if "does not compile" in r.getMessage()]
    assert len(said) == 1 and "llama" in said[0].getMessage()


def test_the_cuda_graph_layout_runs_on_the_cpu(policy, monkeypatch):
    """The layout CUDA graphs get (extents padded to a multiple of 256, verify lengths rounded up to powers of two,
    KV buffers from the policy's pool), run here through the CPU's compiled body: greedy output is unchanged, and a
    second call decodes in the first call's buffers (the addresses a captured graph holds)."""
    eager = BlockEngine(policy, sampler="lossless", levels=["end"], max_batch=3)
    want = eager.generate(PROMPTS, 40, temperature=0, eos_token_id=None)
    eng = BlockEngine(policy, sampler="lossless", levels=["end"], max_batch=3, compile="on")
    eng.cuda_graphs = True  # what a CUDA device sets
    seen, buffers = [], []
    orig = engine_mod.EngineCore.forward

    def recording(self, rows, ids, pos, qmask, decode=False):
        hidden = orig(self, rows, ids, pos, qmask, decode)
        if decode:
            seen.append((self.cache.state.extent, self._layout.verify_len))
            buffers.append(self.cache.layers[0].keys.data_ptr())
        return hidden

    monkeypatch.setattr(engine_mod.EngineCore, "forward", recording)
    got = eng.generate(PROMPTS, 40, temperature=0, eos_token_id=None)
    assert [t.tokens for t in got] == [t.tokens for t in want]
    first = set(buffers)
    eng.generate(PROMPTS, 40, temperature=0, eos_token_id=None)
    assert set(buffers) == first and len(first) == 1  # the pool's buffers, both calls
    assert all(extent % 256 == 0 for extent, _ in seen)
    assert {n - 1 for _, n in seen} <= {0, 1, 2, 4} and len({n for _, n in seen}) > 1  # K = 4


def test_kv_pool_reuses_buffers_of_caches_that_are_gone():
    """A cache gets a finished cache's buffers of its batch size (the largest, after growth); caches alive at the
    same time never share."""
    pool = KVPool()

    def cache(batch):
        c = RaggedKVCache(2, batch, capacity=8, pool=pool)
        for layer in c.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(torch.zeros(batch, 2, 1, 4), torch.zeros(batch, 2, 1, 4))
        return c

    a, b = cache(3), cache(3)
    ptrs = {c.layers[0].keys.data_ptr() for c in (a, b)}
    assert len(ptrs) == 2
    a.layers[0].ensure_capacity(20)
    a.layers[1].ensure_capacity(20)
    grown = a.layers[0].keys.data_ptr()
    del a
    gc.collect()
    c = cache(3)
    assert c.layers[0].keys.data_ptr() == grown and c.layers[0].capacity >= 20
    assert cache(2).layers[0].keys.shape[0] == 2  # another batch size: its own buffers


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["lossless"])  # (ar's CUDA graphs: gpu_check.sh's bench_compiled stage)
def test_on_cuda_graphs_greedy_equals_eager_and_settles(sampler):
    """On CUDA the compiled step is also a CUDA graph (reduce-overhead; the KV cache a static buffer, extents and
    verify lengths bucketed): the eager step's greedy tokens, no fallback, and no new dynamo graph on a second call
    of other shapes."""
    policy = lively_policy("moe", vocab=100).cuda()
    eager = BlockEngine(policy, sampler=sampler, levels=["end"], max_batch=3)
    compiled = BlockEngine(policy, sampler=sampler, levels=["end"], max_batch=3, compile="auto")
    assert compiled.cuda_graphs
    want = eager.generate(PROMPTS, 40, temperature=0, eos_token_id=None)
    got = compiled.generate(PROMPTS, 40, temperature=0, eos_token_id=None)
    assert [t.tokens for t in got] == [t.tokens for t in want]
    assert compiled.body.fallback is None and compiled.body.steps > 0
    before = graphs_compiled()
    compiled.generate([[2, 3], [2, 5, 7, 8, 9, 10, 11], [4]], 60, temperature=1.0, seed=1, eos_token_id=None)
    assert graphs_compiled() == before
    # the steps really ran as CUDA graphs: inductor skipped none (a CPU tensor, an unmarked mutated input)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0

"""`blockrl serve` through the real `openai` client against a live server on loopback: completions and chat, streaming,
n > 1, log-probs, seeded reproducibility alone and under load, greedy output equal to HF greedy, stops, bad requests,
client disconnects, weight updates, metrics, a bounded load test, and the CLI."""

import asyncio
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from common.paths import SHIPPED_BPE_CHECKPOINT
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from rollout.serve.config import ServeConfig
from rollout.serve.run import ServerProcess, ServerThread

CKPT = str(SHIPPED_BPE_CHECKPOINT)
MODEL = "tiny-moe-bpe"
LONG = "zq xv"  # a prompt this checkpoint never ends (seeds 0..5 all run to the length limit)
CHAT = [{"role": "user", "content": "Spell backward: hello"}]


def _cfg(**kw) -> ServeConfig:
    kw = {"auto_calibration": "first_use", **kw}  # no start-up timing in tests
    return ServeConfig(checkpoint=CKPT, port=0, device="cpu", sampler="lossless", max_batch=8, **kw)


@pytest.fixture(scope="module")
def served():
    policy = HybridPolicy.from_pretrained(CKPT).eval()
    tok = load_tokenizer(CKPT)
    server = ServerThread(_cfg(), policy, tok)
    with server as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0), server.app, policy, tok, url


def _hf_greedy(policy, tok, ids, n):
    out = policy.model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=list(policy.eos_ids(tok)),
    )
    toks = out[0, len(ids) :].tolist()
    eos = set(policy.eos_ids(tok))
    ends = [i for i, t in enumerate(toks) if t in eos]
    return toks[: ends[0] + 1] if ends else toks


def test_models_and_health(served):
    client, _, _, _, url = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["policy_version"] == 0


@pytest.mark.parametrize("sampler", ["ar", "lossless"])
def test_greedy_completion_equals_hf_greedy(served, sampler):
    """Token ids in, token ids out: greedy output is HF's greedy output, for both exact samplers."""
    client, _, policy, tok, _ = served
    for ids in (tok("Spell backward: hello\n")["input_ids"], tok("1+2=")["input_ids"]):
        r = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=40, temperature=0, extra_body={"sampler": sampler}
        )
        c = r.choices[0]
        assert c.token_ids == _hf_greedy(policy, tok, ids, 40)
        assert c.prompt_token_ids == ids
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.blockrl["sampler"].startswith(sampler) and r.usage.completion_tokens == len(c.token_ids)


def test_chat_stream_and_non_stream_agree(served):
    """A seeded chat request streams the same tokens and text it returns whole; the chunks add up exactly."""
    client, *_ = served
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, seed=7)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=40,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    ids = [t for ch in chunks if ch.choices for t in (ch.choices[0].model_extra.get("token_ids") or [])]
    final = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(final) == 1 and final[0].finish_reason == whole.choices[0].finish_reason
    assert text == whole.choices[0].message.content and ids == whole.choices[0].token_ids
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_n_choices_are_distinct_and_reproducible(served):
    client, *_ = served
    a = client.completions.create(model=MODEL, prompt=LONG, max_tokens=12, n=4, seed=11)
    b = client.completions.create(model=MODEL, prompt=LONG, max_tokens=12, n=4, seed=11)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in a.choices}) > 1  # each choice its own random stream
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]


def test_logprobs_are_the_policys(served):
    """Lossless at T = 1: each token's log-prob is the AR policy's log-softmax at that position (an HF forward over
    prompt + completion), and so are the alternatives, best first."""
    client, _, policy, _, _ = served
    r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=10, seed=1, logprobs=3)
    c = r.choices[0]
    with torch.no_grad():
        ref = torch.log_softmax(
            policy.model(torch.tensor([c.prompt_token_ids + c.token_ids])).logits[0].float(), -1
        )
    P = len(c.prompt_token_ids)
    want = [float(ref[P - 1 + i, t]) for i, t in enumerate(c.token_ids)]
    assert c.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert c.blockrl["ar_logprobs"] == pytest.approx(want, abs=1e-4)
    best = ref[P - 1].topk(3).values.tolist()
    assert sorted(c.logprobs.top_logprobs[0].values(), reverse=True) == pytest.approx(best, abs=1e-4)
    assert len(c.logprobs.tokens) == len(c.token_ids) and all(len(t) <= 3 for t in c.logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == len(chat.choices[0].token_ids)
    for e in content:  # greedy: the chosen token is the best alternative, with the model's log-prob
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.logprob < 0


def test_a_seeded_request_is_the_same_alone_and_under_load(served):
    client, *_ = served

    def ask(seed, prompt=LONG):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, seed=seed, temperature=1.0)
        return r.choices[0].token_ids

    alone = ask(123)
    with ThreadPoolExecutor(12) as pool:
        others = [pool.submit(ask, s, f"{LONG} {s}") for s in range(11)]
        loaded = pool.submit(ask, 123)
        assert loaded.result() == alone
        assert all(len(f.result()) > 0 for f in others)


def test_a_seeded_auto_request_is_the_same_under_load(served):
    """auto picks by load; with a seed it runs lossless, so the seed fixes the tokens under any load."""
    client, *_ = served

    def ask(seed, prompt=LONG, sampler="auto"):
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, seed=seed, extra_body={"sampler": sampler}
        )
        return r.choices[0].token_ids, r.choices[0].blockrl["sampler"]

    alone, name = ask(321)
    assert name.startswith("lossless")
    with ThreadPoolExecutor(9) as pool:
        for f in [pool.submit(ask, None, f"{LONG} {s}", "auto") for s in range(4)]:  # unseeded auto traffic
            f.result()
        others = [pool.submit(ask, s, f"{LONG} {s}", "ar") for s in range(4)]
        assert pool.submit(ask, 321).result() == (alone, name)
        assert all(f.result()[0] for f in others)


def test_stop_sequences_end_the_text_before_them(served):
    client, *_ = served
    free = client.completions.create(model=MODEL, prompt=LONG, max_tokens=60, seed=3).choices[0].text
    stop = free[20:22]
    r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=60, seed=3, stop=[stop])
    c = r.choices[0]
    assert c.finish_reason == "stop" and stop not in c.text and free.startswith(c.text)
    assert len(c.text) == free.find(stop)


def test_streamed_choices_and_stops_match_the_whole_response(served):
    """n = 3 streamed with a stop string: per choice, the streamed text (held back where it could still be a stop)
    and ids equal the non-streamed response's."""
    client, *_ = served
    free = client.completions.create(model=MODEL, prompt=LONG, max_tokens=40, seed=5).choices[0].text
    kw = dict(model=MODEL, prompt=LONG, max_tokens=40, seed=5, n=3, stop=[free[15:18]])
    whole = client.completions.create(**kw)
    text, ids, ends = {}, {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            ids[c.index] = ids.get(c.index, []) + (c.model_extra.get("token_ids") or [])
            if c.finish_reason:
                ends[c.index] = c.finish_reason
    for c in whole.choices:
        assert text[c.index] == c.text and ids[c.index] == c.token_ids and ends[c.index] == c.finish_reason
    assert whole.choices[0].finish_reason == "stop"


def test_any_integer_seed(served):
    client, *_ = served
    a, b = (
        client.completions.create(model=MODEL, prompt=LONG, max_tokens=6, seed=2**62 + 7) for _ in range(2)
    )
    assert a.choices[0].token_ids == b.choices[0].token_ids
    assert client.completions.create(model=MODEL, prompt=LONG, max_tokens=6, seed=-5).choices[0].token_ids


def test_bad_requests_get_openai_errors_and_the_server_goes_on(served):
    client, _, _, _, url = served
    raw = httpx.post(url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    cases = [
        (dict(model="other", prompt="x"), "model"),
        (dict(model=MODEL, prompt="x", max_tokens=0), "max_tokens"),
        (dict(model=MODEL, prompt="x", max_tokens=-3), "max_tokens"),
        (dict(model=MODEL, prompt="x", n=10_000), "n"),
        (dict(model=MODEL, prompt=[5] * 5000), "prompt"),
        (dict(model=MODEL, prompt="x", max_tokens=2000), "max_tokens"),
        (dict(model=MODEL, prompt=[10**9]), "prompt"),
        (dict(model=MODEL, prompt="x", extra_body={"sampler": "beam"}), "sampler"),
        (dict(model=MODEL, prompt="x", temperature=-1), "temperature"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs)
        err = e.value.body
        assert err["param"] == param, err
        assert err["type"] == "invalid_request_error" and err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    assert e.value.body["param"] == "messages"
    assert client.completions.create(model=MODEL, prompt="1+1=", max_tokens=4).choices[0].token_ids


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    client, app, *_ = served
    metrics, sched = app.state.metrics, app.state.scheduler
    before = metrics.cancelled.value
    stream = client.completions.create(model=MODEL, prompt=LONG, max_tokens=600, seed=0, stream=True)
    got = 0
    for chunk in stream:
        got += len(chunk.choices[0].model_extra.get("token_ids") or [])
        if got >= 5:
            break
    stream.close()
    assert _wait(lambda: metrics.cancelled.value == before + 1)
    assert _wait(lambda: all(c.num_active == 0 for c in sched.cores.values()))
    # the freed slot serves the next request
    assert client.completions.create(model=MODEL, prompt="1+1=", max_tokens=4).choices[0].token_ids


def test_metrics_in_prometheus_text(served):
    client, _, _, _, url = served
    client.completions.create(model=MODEL, prompt=LONG, max_tokens=8)
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    for name in (
        "blockrl_requests_total",
        "blockrl_generated_tokens_total",
        "blockrl_tokens_per_second",
        "blockrl_tokens_per_forward",
        "blockrl_queue_depth",
        "blockrl_batch_occupancy",
        "blockrl_request_latency_seconds_bucket",
    ):
        assert name in text, name
    tpf = float(
        next(ln.split()[1] for ln in text.splitlines() if ln.startswith("blockrl_tokens_per_forward "))
    )
    assert tpf > 1.0  # lossless block decoding commits several tokens per row forward


def test_per_request_samplers(served):
    client, *_ = served
    names = {}
    for s in ("ar", "lossless", "logit_mix", "auto"):
        r = client.completions.create(
            model=MODEL, prompt=LONG, max_tokens=16, seed=2, extra_body={"sampler": s}
        )
        names[s] = r.choices[0].blockrl["sampler"]
    assert names["ar"] == "ar" and names["lossless"].startswith("lossless")
    assert names["logit_mix"].startswith("logit_mix")
    assert names["auto"].split("[")[0] in ("ar", "lossless")  # auto picks an exact sampler


def test_bounded_load_64_concurrent_streams(served, tmp_path):
    """64 concurrent streams, fixed count, time limit: none lost, none duplicated, each stream's chunks add up
    to its tokens exactly; p50/p99 latency and tokens/s reported."""
    _, _, _, _, url = served

    async def one(client, i):
        t0 = time.perf_counter()
        ids, finishes = [], []
        stream = await client.completions.create(
            model=MODEL, prompt=f"{LONG} {i}", max_tokens=24, seed=i, stream=True
        )
        async for chunk in stream:
            c = chunk.choices[0]
            ids += c.model_extra.get("token_ids") or []
            if c.finish_reason:
                finishes.append(c)
        return i, chunk.id, ids, finishes, time.perf_counter() - t0

    async def main():
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        t0 = time.perf_counter()
        out = await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), timeout=300)
        return out, time.perf_counter() - t0

    out, seconds = asyncio.run(main())
    assert sorted(i for i, *_ in out) == list(range(64))  # none lost
    assert len({rid for _, rid, *_ in out}) == 64  # one response per request
    for _, _, ids, finishes, _ in out:
        assert len(finishes) == 1  # exactly one end per stream
        ext = finishes[0].model_extra["blockrl"]
        assert 0 < len(ids) <= 24 and len(ids) == len(ext["behavior_logprobs"])  # every token once, in chunks

    async def replay():  # the same seeded requests, not streamed: the streamed ids must be these, in order
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt=f"{LONG} {i}", max_tokens=24, seed=i)
                for i in range(64)
            )
        )

    whole = asyncio.run(replay())
    for (i, _, ids, _, _), r in zip(sorted(out), whole, strict=True):
        assert ids == r.choices[0].token_ids, f"stream {i}"
    lat = sorted(x[-1] for x in out)
    tokens = sum(len(x[2]) for x in out)
    report = {
        "streams": 64,
        "p50_s": statistics.median(lat),
        "p99_s": lat[int(0.99 * (len(lat) - 1))],
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }
    (tmp_path / "load.json").write_text(json.dumps(report))
    print("load test:", report)


def test_hf_backend_serves_the_same_api():
    """HF generate behind the same API (the benchmark's baseline): greedy output equal to the engine's."""
    policy = HybridPolicy.from_pretrained(CKPT).eval()
    tok = load_tokenizer(CKPT)
    ids = tok("Spell backward: hello\n")["input_ids"]
    with ServerThread(_cfg(backend="hf"), policy, tok) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0)
        assert r.choices[0].token_ids == _hf_greedy(policy, tok, ids, 30)
        assert r.choices[0].blockrl["sampler"] == "hf"


# ------------------------------------------------------------------------------------------ weight updates
@pytest.fixture
def updatable(tmp_path, monkeypatch):
    """A server that accepts weight updates, and a checkpoint with different weights to load."""
    monkeypatch.setenv("BLOCKRL_TEST_ADMIN", "s3cret")
    policy = HybridPolicy.from_pretrained(CKPT).eval()
    tok = load_tokenizer(CKPT)
    other = HybridPolicy.from_pretrained(CKPT)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "v1", tok)
    server = ServerThread(_cfg(admin_token_env="BLOCKRL_TEST_ADMIN"), policy, tok)
    with server as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0), url, other, tok, tmp_path / "v1"


def server_metrics(url):
    """() -> the server's unlabelled metrics, read from /metrics."""

    def read():
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
        lines = [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#") and "{" not in ln]
        return {ln[0]: float(ln[1]) for ln in lines}

    return read


def _update(url, path, token="s3cret", **body):
    return httpx.post(
        url + "/weights",
        json={"checkpoint": str(path), **body},
        headers={"authorization": f"Bearer {token}"},
        timeout=120,
    )


def test_weight_update_needs_the_token_and_serves_the_new_weights(updatable):
    client, url, other, tok, path = updatable
    assert _update(url, path, token="wrong").status_code == 401
    assert _update(url, path / "missing").status_code == 400
    r = _update(url, path)
    assert r.status_code == 200 and r.json()["policy_version"] == 1
    ids = tok("Spell backward: hello\n")["input_ids"]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0)
    assert out.choices[0].token_ids == _hf_greedy(other.eval(), tok, ids, 30)  # the new weights serve
    assert out.policy_version == 1 and out.choices[0].blockrl["policy_version"] == 1


@pytest.mark.parametrize(
    ("update_mode", "request_mode", "mode"),
    [
        ("finish", None, "finish"),
        ("cancel", None, "cancel"),
        (None, "cancel", "cancel"),
        ("finish", "cancel", "finish"),
    ],
)
def test_in_flight_requests_at_a_weight_update(updatable, update_mode, request_mode, mode):
    """finish: a request in flight ends on its version; cancel: it stops at once with finish_reason abort. The
    update's mode decides when it names one, else the request's own. Either way the update lands and later
    requests say the new version."""
    client, url, _, _, path = updatable
    result = {}
    extra = {"on_weight_update": request_mode} if request_mode else None

    def long_request():
        result["r"] = client.completions.create(
            model=MODEL, prompt=LONG, max_tokens=1000, seed=0, extra_body=extra
        )

    th = threading.Thread(target=long_request)
    th.start()
    metrics = server_metrics(url)
    assert _wait(lambda: metrics()["blockrl_active_rows"] > 0)  # the request is decoding
    body = {"on_weight_update": update_mode} if update_mode else {}
    assert _update(url, path, **body).json()["policy_version"] == 1
    th.join(timeout=120)
    c = result["r"].choices[0]
    assert c.blockrl["policy_version"] == 0
    if mode == "finish":
        assert c.finish_reason == "length" and len(c.token_ids) == 1000
    else:
        assert c.finish_reason == "abort" and len(c.token_ids) < 1000
    after = client.completions.create(model=MODEL, prompt=LONG, max_tokens=4)
    assert after.choices[0].blockrl["policy_version"] == 1


# ------------------------------------------------------------------------------------------ the command
def test_blockrl_serve_command(tmp_path):
    """`blockrl serve` binds loopback, prints its URL, answers, and stops on SIGTERM (ended by its own pid)."""
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    server = ServerProcess(_cfg(), tmp_path / "serve.log", env=env)
    with server as url:
        assert url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="1+1=", max_tokens=4).choices[0].token_ids
    assert server.proc.returncode is not None  # stopped


def test_the_readme_serve_example_runs_and_answers(served):
    """The README's client example, run as written against this server (its URL swapped in): a well-formed answer
    from the shipped model, decoded at more than one token per forward."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "chat.completions.create" in b
    )
    *_, url = served
    scope: dict = {}
    exec(block.replace("http://127.0.0.1:8000/v1", url), scope)
    choice = scope["r"].choices[0]
    assert re.search(r"<answer>[a-z]+</answer>", choice.message.content), choice.message.content
    assert choice.token_ids and choice.blockrl["tokens_per_forward"] > 1


def test_plain_model_serves_lossless_with_history_drafts():
    """A checkpoint that was never converted serves lossless (history drafts: no drafter): greedy equals HF greedy on
    a multi-turn chat whose last turn repeats the first, the repeat is drafted from the conversation itself, and
    logit_mix (which needs the drafter's logits) is refused by name."""
    policy = HybridPolicy.from_pretrained(CKPT).eval()
    policy.mask_token_id = None  # as a plain HF checkpoint loads
    tok = load_tokenizer(CKPT)
    with ServerThread(_cfg(), policy, tok) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        first = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
        answer = first.choices[0].message.content
        chat = [*CHAT, {"role": "assistant", "content": answer}, *CHAT]
        ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=40, temperature=0)
        c = r.choices[0]
        assert c.token_ids == _hf_greedy(policy, tok, ids, 40)
        assert c.blockrl["sampler"] == "lossless[history]" and c.blockrl["tokens_per_forward"] > 1.5
        with pytest.raises(openai.BadRequestError, match="sampler"):
            client.completions.create(
                model=MODEL, prompt=ids, max_tokens=4, extra_body={"sampler": "logit_mix"}
            )

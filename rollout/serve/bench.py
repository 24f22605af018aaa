"""`blockrl serve-bench`: the server's throughput against HF `generate` behind the same OpenAI API, at several
client concurrencies, measured side by side in one run.

Two `blockrl serve` processes on loopback, one per backend (`engine`, `hf`), both alive for the whole run. For each
concurrency c and repeat, every arm (the HF server, and the engine server with each sampler named per request)
serves the same `requests` completions from c closed-loop clients (each sends its next request when the last one
returns), in an order that alternates between repeats. Per run: wall seconds, completion tokens/s, p50/p99 request
latency, tokens per forward. The summary takes medians over repeats and each arm's ratio to HF at that c.

`lossless+history` is a third server, the engine with history drafts beside its diffusion drafts (`drafts: both`;
history alone on a plain checkpoint). `turns > 1` makes every request a conversation of that many turns: each turn
asks the first turn's question again with the earlier answers in context (a chat whose turns repeat earlier text,
as agents' do), through the chat endpoint on a chat-format checkpoint and as one growing text prompt otherwise.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from common.config import Section, ShippedPath
from envs import splits
from envs.tasks import TaskName
from rollout.serve.config import ServeConfig
from rollout.serve.run import ServerProcess
from rollout.types import Levels

Arm = Literal[
    "hf", "ar", "lossless", "logit_mix", "auto", "lossless+history", "ar+compiled", "lossless+compiled"
]
HISTORY_ARM = "lossless+history"
COMPILED = "+compiled"  # an arm on the engine server with the decode step compiled (`compile: on`)


class ServeBenchConfig(Section):
    """Throughput of `blockrl serve` vs HF generate behind the same API."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """converted checkpoint both servers load."""
    run_dir: str = "runs/serve_bench"
    """results.json, serve_bench.png and the servers' logs."""
    arms: list[Arm] = Field(default_factory=lambda: ["hf", "ar", "lossless"])
    """hf = the HF-generate server; the others = the engine server with that sampler per request;
    lossless+history = lossless on an engine server that also drafts from history (`drafts: both`); ar+compiled,
    lossless+compiled = on an engine server whose decode step is compiled (`compile: on`; its graphs compile in
    the warm-up). HF's own static-cache fast path is not an arm: it compiles one graph per batch shape, and a
    server's batches change shape every step (`blockrl bench --set hf_compiled=true` measures it)."""
    concurrency: list[int] = Field(default_factory=lambda: [1, 8, 32])
    """concurrent clients."""
    requests: int = Field(32, ge=1)
    """completions (conversations, with turns > 1) per arm, concurrency and repeat."""
    turns: int = Field(1, ge=1)
    """turns per conversation: each asks the first turn's question again, the earlier answers in context."""
    repeats: int = Field(2, ge=1)
    """runs per arm and concurrency (order alternates)."""
    max_tokens: int = Field(96, ge=1)
    """completion budget per request."""
    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature."""
    levels: Levels = Field(default_factory=lambda: ["end"])
    """proposal levels of the engine server (configs/serve.yaml's)."""
    max_batch: int = Field(32, ge=1)
    """rows per batch, both servers."""
    server_threads: int = Field(1, ge=0)
    """torch threads per server process (0 = torch's default)."""
    device: str = "auto"
    """device of both servers."""
    tasks: list[TaskName] = Field(default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"])
    """built-in tasks the prompts come from (the bench split)."""
    seed: int = 0
    """prompt draw and per-request seeds."""


@dataclass
class LoadRun:
    arm: str
    concurrency: int
    repeat: int
    seconds: float
    tokens: int
    tokens_per_s: float
    p50_s: float
    p99_s: float
    tokens_per_forward: float
    failed: int
    completions: int = 0  # requests answered (conversations x turns)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def drive(
    url: str, model: str, prompts: list[str], concurrency: int, cfg: ServeBenchConfig, sampler, chat
):
    """`len(prompts)` conversations of `cfg.turns` turns (one completion each with turns = 1) from `concurrency`
    closed-loop clients -> (wall s, [(latency, tokens, tpf)] per turn, 0); any failed request stops the
    benchmark. `chat` = send messages to the chat endpoint (the prompts are then the users' messages)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    todo = list(enumerate(prompts))[::-1]
    done: list[tuple[float, int, float]] = []
    failed: list[str] = []

    async def turn(i: int, t: int, context: str, messages: list[dict]):
        kw = dict(
            model=model,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            seed=None if sampler == "auto" else cfg.seed + i + 7919 * t,  # a seed pins auto to lossless
            extra_body={"sampler": sampler} if sampler else None,
        )
        if chat:
            r = await client.chat.completions.create(messages=messages, **kw)
            return r.choices[0], r.choices[0].message.content or ""
        r = await client.completions.create(prompt=context, **kw)
        return r.choices[0], r.choices[0].text

    async def worker():
        while todo:
            i, prompt = todo.pop()
            context, messages = "", []
            for t in range(cfg.turns):
                context += prompt
                messages.append({"role": "user", "content": prompt})
                t0 = time.perf_counter()
                try:
                    c, text = await turn(i, t, context, messages)
                except openai.APIError as e:
                    failed.append(f"request {i} turn {t + 1}: {e}")
                    break
                done.append((time.perf_counter() - t0, len(c.token_ids), c.blockrl["tokens_per_forward"]))
                context += text + "\n"
                messages.append({"role": "assistant", "content": text})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    await client.close()
    if failed:  # a benchmark with failed requests measures nothing: stop, naming the first
        raise RuntimeError(f"{len(failed)} of {len(prompts)} requests failed at {url}; first: {failed[0]}")
    return seconds, done, 0


def run_serve_bench(cfg: ServeBenchConfig, log=print) -> dict:
    import logging

    from policy.metadata import checkpoint_is_converted, checkpoint_prompt_format, load_tokenizer
    from policy.tokenizer import encode_prompt

    for name in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.checkpoint)
    fmt = checkpoint_prompt_format(cfg.checkpoint)
    # fresh prompts for every (concurrency, repeat) and the warm-up: no run drafts from an earlier run's answers to
    # the same questions (a history server keeps them); every arm of one (concurrency, repeat) gets the same ones
    runs_n = len(cfg.concurrency) * cfg.repeats + 1
    n = cfg.requests * runs_n
    pool = splits.bench_prompts(cfg.tasks, -(-n // len(cfg.tasks)), cfg.seed)[:n]
    # conversations on a chat-format checkpoint go through the chat endpoint (the server renders the template);
    # single completions take the training format's text (a chat checkpoint's template rendered here)
    chat = fmt == "chat" and cfg.turns > 1
    texts = [
        tok.decode(encode_prompt(tok, s.prompt, fmt)) if fmt == "chat" and not chat else s.prompt
        for s in pool
    ]
    sets = [texts[k * cfg.requests : (k + 1) * cfg.requests] for k in range(runs_n)]
    base = dict(
        checkpoint=cfg.checkpoint,
        port=0,
        device=cfg.device,
        levels=cfg.levels,
        max_batch=cfg.max_batch,
        threads=cfg.server_threads,
        max_n=1,
        default_max_tokens=cfg.max_tokens,
        auto_calibration="start" if "auto" in cfg.arms else "first_use",  # never timed inside a measured run
    )
    model = Path(cfg.checkpoint).name
    runs: list[LoadRun] = []
    servers = {"engine": ServeConfig(backend="engine", sampler="lossless", compile="off", **base)}
    if any(a.endswith(COMPILED) for a in cfg.arms):
        servers["compiled"] = ServeConfig(backend="engine", sampler="lossless", compile="on", **base)
    if "hf" in cfg.arms:
        servers["hf"] = ServeConfig(backend="hf", sampler="ar", **base)
    if HISTORY_ARM in cfg.arms:  # both draft sources (history alone on a plain checkpoint)
        drafts = "both" if checkpoint_is_converted(cfg.checkpoint) else "history"
        servers[HISTORY_ARM] = ServeConfig(backend="engine", sampler="lossless", drafts=drafts, **base)
    with ExitStack() as stack:
        urls = {
            name: stack.enter_context(ServerProcess(sc, run_dir / f"{name.replace('+', '_')}.log"))
            for name, sc in servers.items()
        }

        def url_of(arm: str) -> str:
            return urls[server_of(arm)]

        for (
            arm
        ) in cfg.arms:  # warm: first requests load kernels, calibrate auto, compile (one row and several)
            asyncio.run(drive(url_of(arm), model, sets[-1][:2], 1, cfg, _sampler(arm), chat))
            asyncio.run(drive(url_of(arm), model, sets[-1][:4], 2, cfg, _sampler(arm), chat))
        for ci, c in enumerate(cfg.concurrency):
            for rep in range(cfg.repeats):
                prompts = sets[ci * cfg.repeats + rep]
                order = cfg.arms if rep % 2 == 0 else cfg.arms[::-1]
                for arm in order:
                    seconds, done, failed = asyncio.run(
                        drive(url_of(arm), model, prompts, c, cfg, _sampler(arm), chat)
                    )
                    lat = [d[0] for d in done] or [0.0]
                    tokens = sum(d[1] for d in done)
                    tpf = sum(d[2] * d[1] for d in done) / max(1, tokens)
                    r = LoadRun(
                        arm, c, rep, seconds, tokens, tokens / seconds, statistics.median(lat),
                        percentile(lat, 0.99), tpf, failed, len(done),
                    )  # fmt: skip
                    runs.append(r)
                    log(
                        f"c={c:<3} {arm:<16} {r.tokens_per_s:8.0f} tok/s  p50 {r.p50_s:6.2f}s  "
                        f"p99 {r.p99_s:6.2f}s  tokens/forward {tpf:4.2f}  failed {failed}"
                    )
    out = {
        "config": cfg.model_dump(mode="json"),
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs),
    }
    from rollout.bench.report import device_name

    out["device"] = device_name()
    (run_dir / "results.json").write_text(json.dumps(out, indent=1))
    return out


def server_of(arm: str) -> str:
    """Which of the bench's servers an arm's requests go to."""
    if arm.endswith(COMPILED):
        return "compiled"
    return arm if arm in ("hf", HISTORY_ARM) else "engine"


def _sampler(arm: str) -> str | None:
    """The sampler an arm asks for per request (None: the HF server's own)."""
    return None if arm == "hf" else arm.removesuffix("+history").removesuffix(COMPILED)


def summarize(runs: list[LoadRun]) -> list[dict]:
    """Per (concurrency, arm): medians over repeats, and the ratio of median tokens/s to the HF arm's."""
    rows = []
    for c in sorted({r.concurrency for r in runs}):
        by = {}
        for r in runs:
            if r.concurrency == c:
                by.setdefault(r.arm, []).append(r)
        hf = statistics.median(r.tokens_per_s for r in by["hf"]) if "hf" in by else None
        for arm, rs in by.items():
            tps = statistics.median(r.tokens_per_s for r in rs)
            rows.append(
                {
                    "concurrency": c,
                    "arm": arm,
                    "tokens_per_s": tps,
                    "p50_s": statistics.median(r.p50_s for r in rs),
                    "p99_s": statistics.median(r.p99_s for r in rs),
                    "tokens_per_forward": statistics.median(r.tokens_per_forward for r in rs),
                    "vs_hf": tps / hf if hf else None,
                    "failed": sum(r.failed for r in rs),
                }
            )
    return rows


def format_summary(out: dict) -> str:
    lines = [f"blockrl serve-bench on {out['device']} (median over repeats; vs_hf = tokens/s ratio)"]
    lines.append(
        f"{'clients':>7} {'arm':<16} {'tok/s':>8} {'vs hf':>6} {'p50 s':>7} {'p99 s':>7} {'tok/fwd':>7}"
    )
    for r in out["summary"]:
        ratio = f"{r['vs_hf']:.2f}x" if r["vs_hf"] is not None else "-"
        lines.append(
            f"{r['concurrency']:>7} {r['arm']:<16} {r['tokens_per_s']:>8.0f} {ratio:>6} {r['p50_s']:>7.2f} "
            f"{r['p99_s']:>7.2f} {r['tokens_per_forward']:>7.2f}"
        )
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    from common.plots import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for arm in dict.fromkeys(r["arm"] for r in out["summary"]):
        rows = [r for r in out["summary"] if r["arm"] == arm]
        xs = [r["concurrency"] for r in rows]
        a.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=arm)
        b.plot(xs, [r["p50_s"] for r in rows], marker="o", label=f"{arm} p50")
    for ax, title in ((a, "completion tokens/s"), (b, "p50 request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"blockrl serve vs HF generate behind the same API ({out['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

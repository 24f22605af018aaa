"""`blockrl regress`: the nightly reward-regression job. A fixed, seeded eval suite (tasks x prompts x samples) is
decoded in-process by `BlockEngine` with every configured sampler, and compared with a stored baseline JSON.

Per sampler it measures the solve rate (Wilson 95%), the mean reward (prompt-level bootstrap 95%), pass@k (unbiased,
from n samples per prompt), per-task solve rates, tokens per forward, the accept rate and acceptance by draft
position, and tok/s with its ratio against the engine's AR path. Throughput is timed in the same run: `repeats`
passes over the whole suite, alternating the samplers (order reversed every other pass) so a slow phase of a busy
machine hits them alike; the ratio is the median of per-pass ratios. Every pass uses the same seeds and produces the
same tokens; quality comes from the first. The gates and their statistics are in `trainers/regress/stats.py`.

Decision: the suite is reproducible bit for bit on one machine (engine rows draw from generators seeded by
(seed, prompt index)), so an unchanged checkpoint reproduces its baseline exactly there; on other hardware it is a
fresh sample, and the quality gates keep the whole-run false-alarm rate below `tolerance.alpha`. results.json (and
so the baseline) stores every sample's solved bit, so the quality tests pair sample i of the baseline with sample i
now: same prompt, same seed (exact McNemar / sign tests, Holm over the run; see trainers/regress/stats.py).

    blockrl regress                                  # configs/regress.yaml vs configs/regress_baseline.json
    blockrl regress --set checkpoint=runs/grpo-tiny/checkpoint # exit 1 and the failing metrics on a regression
    blockrl regress --update-baseline                # rewrite the baseline from this run

The run dir gets config.yaml, results.json (the baseline format), completions.jsonl, report.md and PNG plots.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError
from tqdm.auto import tqdm

from common.checkpoint import require_checkpoint
from common.config import ConfigError, dump_config
from common.records import BadRows, RecordError
from envs import splits
from envs.prompt_file import PromptRow, read_prompt_rows
from envs.rewards import RewardFunctions, RewardSpec
from envs.tasks import BUILTIN_REWARD
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from rollout.auto import build_engine
from rollout.cost_model import AcceptanceStats
from rollout.types import Trajectory
from trainers.lm.evaluate import wilson
from trainers.regress.config import FORMAT, RegressConfig, SamplerSpec
from trainers.regress.stats import (
    Check,
    bits_string,
    bootstrap_mean_ci,
    compare,
    floor_check,
    median,
    pass_at_k,
)

log = logging.getLogger(__name__)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskRate(_Record):
    solved: int
    n: int
    rate: float
    ci95: tuple[float, float]


Bits = Annotated[str, StringConstraints(pattern=r"^[01]*$")]
"""One '0'/'1' per sample of a task, prompt-major: sample j of prompt i at i * samples_per_prompt + j."""


class SamplerMetrics(_Record):
    """Everything measured for one sampler; also the per-sampler entry of the baseline file."""

    sampler: str
    block_size: int  # K (0 for ar)
    n_prompts: int
    n_samples: int
    solved: int
    solve_rate: float
    solve_ci95: tuple[float, float]  # Wilson
    reward_mean: float
    reward_std: float
    reward_ci95: tuple[float, float]  # prompt-level bootstrap
    pass_at_k: dict[str, float]  # "k" -> unbiased pass@k averaged over prompts
    pass_at_k_std: dict[str, float]  # its std over prompts
    per_task: dict[str, TaskRate]
    mean_length: float
    tokens_per_forward: float
    accept_rate: float  # accepted drafts / offered drafts (0 for ar)
    accept_by_position: list[float]  # P(draft i accepted | 1..i-1 accepted), i = 1..K
    tok_per_s: float  # median over passes
    tok_per_s_runs: list[float]
    speedup_vs_ar: float  # median over passes of tok/s / AR tok/s in the same pass
    speedup_runs: list[float]
    rewards_binary: bool = False  # every reward 0 or 1: reward_mean is the solve rate again (not gated)
    reward_failures: int = 0  # samples with a failed reward term (on_reward_error: record; counted 0)
    # task -> solved bit per sample, suite order (None: unpaired tests)
    solved_bits: dict[str, Bits] | None = None


class RegressResults(_Record):
    """results.json of a run, and the baseline file."""

    format: Literal["blockrl.regress/1"] = FORMAT
    created: str
    suite: dict
    meta: dict
    samplers: dict[str, SamplerMetrics]


@dataclass
class Outcome:
    results: RegressResults
    baseline: RegressResults | None
    checks: list[Check]
    run_dir: Path
    baseline_path: Path
    updated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.failed]


# ------------------------------------------------------------------------------------------------ baseline I/O
def load_baseline(path: str | Path) -> RegressResults:
    """The baseline file, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    hint = "create it with `blockrl regress --update-baseline`"
    if not path.is_file():
        raise ConfigError(f"baseline {path}: file not found ({hint})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"baseline {path}: not valid JSON ({e}); fix it or {hint}") from None
    try:
        return RegressResults.model_validate(data)
    except ValidationError as e:
        lines = [f"baseline {path}: malformed ({hint}):"]
        for err in e.errors()[:8]:
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {loc}: {'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def check_suite(baseline: RegressResults, now: dict, path: str | Path) -> list[str]:
    """Raise ConfigError if the baseline was made with another suite (`now`, RegressConfig.suite); return notes on
    samplers it has extra."""
    base = baseline.suite
    # suite() leaves fields at their defaults out: compare over both sides' keys, a missing one at its default
    defaults = {"rewards": [], "solve_threshold": 1.0}
    keys = [k for k in dict.fromkeys([*now, *base]) if k != "samplers"]
    diff = [
        f"{k}: baseline {base.get(k, defaults.get(k))!r} vs config {now.get(k, defaults.get(k))!r}"
        for k in keys
        if base.get(k, defaults.get(k)) != now.get(k, defaults.get(k))
    ]
    base_samplers = base.get("samplers", {})
    for name, spec in now["samplers"].items():
        if name not in baseline.samplers:
            diff.append(f"samplers: no baseline for {name!r}")
        elif base_samplers.get(name) != spec:
            diff.append(f"samplers.{name}: baseline {base_samplers.get(name)} vs config {spec}")
    if diff:
        raise ConfigError(
            f"baseline {path} was made with a different suite; re-run with --update-baseline to "
            "replace it:\n  " + "\n  ".join(diff)
        )
    extra = [s for s in baseline.samplers if s not in now["samplers"]]
    return [f"baseline sampler {s!r} is not in this config (not compared)" for s in extra]


def write_json_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ measurement
@dataclass
class Suite:
    """The eval suite: its prompt rows (built-in task samples, or the prompts file) and what scores them."""

    rows: list[PromptRow]
    rewards: RewardFunctions
    threshold: float = 1.0
    sha256: str | None = None  # a prompts file's rows, hashed (None: built-in tasks)

    @property
    def tasks(self) -> list[str]:
        """Row labels in first-seen order (the per-task rates)."""
        return list(dict.fromkeys(r.task for r in self.rows))

    def score(self, texts: list[str], trajs: list[Trajectory], n: int) -> tuple[np.ndarray, int]:
        """([P, n] rewards, failures) of the samples, sample j of row i at i * n + j; a sample no function scores
        is an error naming its row (a reward of 0 there would be made up)."""
        rows = [self.rows[i // n] for i in range(len(texts))]
        out = self.rewards(
            [r.prompt for r in rows],
            [r.completion(x) for r, x in zip(rows, texts, strict=True)],
            [t.tokens for t in trajs],
            [r.columns for r in rows],
            [r.where for r in rows],
        )
        for r, s, f in zip(rows, out.scored, out.failed, strict=True):
            if not s and not f:
                raise ConfigError(
                    f"rewards: no reward function scored {r.where} (task {r.task!r}); give `rewards` that score "
                    "every row (the default, the built-in verifier, scores built-in tasks only)"
                )
        return np.array(out.rewards).reshape(-1, n), out.failures


def load_suite(cfg: RegressConfig) -> Suite:
    rewards = RewardFunctions(cfg.rewards or [RewardSpec(function=BUILTIN_REWARD)], cfg.on_reward_error)
    if cfg.prompts_file is None:
        samples = splits.task_prompts(cfg.tasks, cfg.prompts_per_task, cfg.prompt_seed)
        rows = [PromptRow.from_task(s, f"{s.task} prompt {i}") for i, s in enumerate(samples)]
        return Suite(rows, rewards, cfg.solve_threshold)
    try:
        rows = read_prompt_rows([cfg.prompts_file], BadRows("error"), cfg.num_prompts)
    except RecordError as e:
        raise ConfigError(f"prompts_file: {e}") from None
    rewards.check_columns({k for r in rows for k in r.columns}, cfg.prompts_file)
    data = json.dumps([[r.prompt, r.columns] for r in rows], sort_keys=True, default=str)
    return Suite(rows, rewards, cfg.solve_threshold, hashlib.sha256(data.encode()).hexdigest()[:16])


def summarize(
    spec: SamplerSpec, K: int, trajs: list[Trajectory], rewards: np.ndarray, suite: Suite, cfg: RegressConfig
) -> dict:
    """Quality and acceptance of one sampler's pass; `rewards` is [P, n]."""
    solved = rewards >= suite.threshold  # [P, n]
    k, N = int(solved.sum()), solved.size
    per_prompt = solved.sum(axis=1)  # [P]
    pk = {str(kk): [pass_at_k(cfg.samples_per_prompt, int(c), kk) for c in per_prompt] for kk in cfg.pass_k}
    per_task, bits = {}, {}
    for task in suite.tasks:
        rows = [i for i, r in enumerate(suite.rows) if r.task == task]
        tk, tn = int(solved[rows].sum()), solved[rows].size
        per_task[task] = TaskRate(solved=tk, n=tn, rate=tk / tn, ci95=wilson(tk, tn))
        bits[task] = bits_string(solved[rows])
    n_tok = sum(t.num_tokens for t in trajs)
    acc = AcceptanceStats(K) if K else None
    accepted = offered = 0
    for t in trajs:
        accepted, offered = accepted + sum(t.accept_counts), offered + sum(t.draft_counts)
        if acc is not None and t.accept_counts:
            acc.observe(t.accept_counts, t.draft_counts)
    return dict(
        sampler=spec.sampler,
        block_size=K,
        n_prompts=len(suite.rows),
        n_samples=N,
        solved=k,
        solve_rate=k / N,
        solve_ci95=wilson(k, N),
        reward_mean=float(rewards.mean()),
        reward_std=float(rewards.std(ddof=1)) if N > 1 else 0.0,
        reward_ci95=bootstrap_mean_ci(rewards, seed=cfg.seed),
        pass_at_k={kk: float(np.mean(v)) for kk, v in pk.items()},
        pass_at_k_std={kk: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for kk, v in pk.items()},
        per_task=per_task,
        mean_length=n_tok / len(trajs),
        tokens_per_forward=n_tok / max(1, sum(t.num_forwards for t in trajs)),
        accept_rate=accepted / offered if offered else 0.0,
        accept_by_position=acc.acceptance_by_position() if acc is not None else [],
        rewards_binary=bool(np.isin(rewards, (0.0, 1.0)).all()),
        solved_bits=bits,
    )


def measure(cfg: RegressConfig, policy, tok, suite: Suite) -> tuple[dict, list[dict]]:
    """{name: SamplerMetrics} and one completion record per (sampler, sample)."""
    n = cfg.samples_per_prompt

    def sample_ids(spec: SamplerSpec) -> list[list[int]]:  # sample j of prompt i has index i * n + j
        fmt = policy.resolve_prompt_format(spec.prompt_format)
        return [r.encode(tok, fmt) for r in suite.rows for _ in range(n)]

    ids = {s.name: sample_ids(s) for s in cfg.samplers}
    engines = {s.name: build_engine(policy, s.engine_settings(cfg.max_batch), tok) for s in cfg.samplers}
    for name, eng in engines.items():  # untimed warm-up (auto calibrates its cost model here)
        eng.generate(
            ids[name][: cfg.max_batch], max_new_tokens=16, temperature=cfg.temperature, seed=cfg.seed
        )
    first: dict[str, list[Trajectory]] = {}
    tps: dict[str, list[float]] = {s.name: [] for s in cfg.samplers}
    bar = tqdm(total=cfg.repeats * len(cfg.samplers), desc="regress", unit="pass")
    for rep in range(cfg.repeats):
        order = cfg.samplers if rep % 2 == 0 else cfg.samplers[::-1]
        for spec in order:
            t0 = time.perf_counter()
            trajs = engines[spec.name].generate(
                ids[spec.name], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
            )
            dt = time.perf_counter() - t0
            tps[spec.name].append(sum(t.num_tokens for t in trajs) / dt)
            first.setdefault(spec.name, trajs)
            bar.set_postfix_str(f"{spec.name} {tps[spec.name][-1]:.0f} tok/s")
            bar.update()
    bar.close()
    ar = tps[cfg.ar_name]
    metrics, records = {}, []
    for spec in cfg.samplers:
        trajs = first[spec.name]
        texts = tok.batch_decode([t.tokens for t in trajs], skip_special_tokens=True)
        rewards, failures = suite.score(texts, trajs, n)
        ratios = [a / b for a, b in zip(tps[spec.name], ar, strict=True)]
        metrics[spec.name] = SamplerMetrics(
            **summarize(spec, engines[spec.name].K, trajs, rewards, suite, cfg),
            reward_failures=failures,
            tok_per_s=median(tps[spec.name]),
            tok_per_s_runs=tps[spec.name],
            speedup_vs_ar=median(ratios),
            speedup_runs=ratios,
        )
        records += [
            {
                "sampler": spec.name,
                "task": suite.rows[i // n].task,
                "prompt": suite.rows[i // n].prompt,
                "sample": i % n,
                "completion": x,
                "reward": float(rewards.flat[i]),
                "tokens": trajs[i].num_tokens,
                "forwards": trajs[i].num_forwards,
            }
            for i, x in enumerate(texts)
        ]
    return metrics, records


def speedup_floor(cfg: RegressConfig, metrics: dict[str, SamplerMetrics]) -> list[Check]:
    """Never slower than AR: every gated non-ar row's speed-up vs the engine AR path against the floor."""
    floor = cfg.tolerance.min_speedup
    if floor is None:
        return []
    return [
        floor_check(s.name, "speedup_vs_ar>=floor", floor, metrics[s.name].speedup_vs_ar)
        for s in cfg.samplers
        if s.sampler != "ar" and s.gate_speedup
    ]


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of the checkpoint's weight files."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the job
def run_regress(cfg: RegressConfig, update_baseline: bool = False) -> Outcome:
    """Measure the suite, compare with the baseline (unless updating it), write the run dir; never exits."""
    from rollout.bench.report import device_name
    from trainers.regress.report import log_wandb, write_report

    baseline, notes = None, []
    suite = load_suite(cfg)  # a bad prompts file or reward reference fails here, before any decoding
    if not update_baseline:  # fail fast, before minutes of decoding
        baseline = load_baseline(cfg.baseline)
        notes += check_suite(baseline, cfg.suite(suite.sha256), cfg.baseline)
    require_checkpoint(cfg.checkpoint)
    run_dir = Path(cfg.run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    torch.set_num_threads(cfg.threads)
    policy = HybridPolicy.from_pretrained(cfg.checkpoint, dtype=cfg.torch_dtype).to(cfg.torch_device()).eval()
    for i, s in enumerate(cfg.samplers):
        s.engine_settings(cfg.max_batch).check_checkpoint(
            policy.is_converted, policy.block_size, f"samplers[{i}] ({s.name})."
        )
    tok = load_tokenizer(cfg.checkpoint)
    log.info(
        "regress: %s, %d prompts x %d samples, samplers %s",
        cfg.checkpoint,
        len(suite.rows),
        cfg.samples_per_prompt,
        [s.name for s in cfg.samplers],
    )
    metrics, records = measure(cfg, policy, tok, suite)
    meta = {
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": checkpoint_fingerprint(cfg.checkpoint),
        "device": device_name(),
        "dtype": cfg.dtype,
        "threads": cfg.threads,
        "torch": torch.__version__,
    }
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results = RegressResults(created=created, suite=cfg.suite(suite.sha256), meta=meta, samplers=metrics)
    text = results.model_dump_json(indent=1)
    write_json_atomic(run_dir / "results.json", text)
    with (run_dir / "completions.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    checks = compare(baseline.samplers, metrics, cfg.tolerance) if baseline is not None else []
    if not update_baseline:  # an update records the speed-ups; the floor gates runs against a baseline
        checks += speedup_floor(cfg, metrics)
    if baseline is not None and baseline.meta.get("device") != meta["device"]:
        notes.append(f"baseline device {baseline.meta.get('device')!r} differs: tok/s are not comparable")
    out = Outcome(results, baseline, checks, run_dir, Path(cfg.baseline), update_baseline, notes)
    if update_baseline:
        write_json_atomic(Path(cfg.baseline), text)
    write_report(out, cfg)
    if cfg.wandb != "disabled":
        log_wandb(out, cfg)
    return out

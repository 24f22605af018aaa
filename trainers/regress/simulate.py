"""A seeded simulation of `blockrl regress`'s quality gates: the false-alarm rate and the power of a suite, for the
table in docs/regress/README.md.

    python -m trainers.regress.simulate   # configs/regress.yaml + its baseline, 20,000 simulated runs per cell
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import numpy as np

from common.config import load_config
from trainers.regress.config import RegressConfig
from trainers.regress.job import load_baseline
from trainers.regress.stats import ToleranceConfig, bit_gates, gate_decisions


def simulate_alarm_rate(
    p_base,
    p_now,
    samples_per_prompt: int,
    task_sizes: Mapping[str, int],
    pass_k: Sequence[int],
    tol: ToleranceConfig,
    runs: int = 2000,
    coupling: float = 0.0,
    paired: bool = True,
    seed: int = 0,
) -> float:
    """Fraction of `runs` simulated nightly runs in which at least one quality gate fails (0/1 rewards).

    p_base, p_now [S, P]: success probability of each prompt's samples under each of S samplers, for the baseline
    and the checkpoint under test (p_now = p_base: the false-alarm rate; lower: the power). Sample j of prompt i
    draws U; the baseline solved it iff U < p_base. The current run reuses U with probability `coupling` (same
    seed, same machine: only samples with U between the two probabilities change) and draws a fresh U' otherwise
    (another machine, or a decode that diverged), solving iff U' < p_now. coupling 0 is the worst case for the
    paired tests. All S samplers' gates form one Holm family, as in `compare`.
    """
    p_base, p_now = np.atleast_2d(p_base).astype(np.float32), np.atleast_2d(p_now).astype(np.float32)
    rng = np.random.default_rng(seed)
    shape = (runs, *p_base.shape, samples_per_prompt)  # [R, S, P, n]
    u = rng.random(shape, dtype=np.float32)
    v = rng.random(shape, dtype=np.float32)
    if coupling > 0:
        v = np.where(rng.random(shape, dtype=np.float32) < coupling, u, v)
    base, now = u < p_base[..., None], v < p_now[..., None]
    sizes = task_sizes if tol.per_task else {}
    gates = [bit_gates(base[:, s], now[:, s], sizes, pass_k, paired) for s in range(p_base.shape[0])]
    p = np.concatenate([g.p_value for g in gates], axis=-1)  # [R, m]
    drop = np.concatenate([g.baseline - g.now for g in gates], axis=-1)
    failed, _, _ = gate_decisions(p, drop, tol)
    return float(failed.any(-1).mean())


def drop_scenarios(per_task: Mapping[str, Sequence[float]], prompts_per_task: int, drop: float) -> dict:
    """{name: (p_base, p_now)} [S, P] for a solve-rate drop of `drop` points:
    - "flat 75%, all samplers": every sample 0.75 -> 0.75 - drop (a checkpoint regression reaches every sampler).
      The hardest case for pairing: no prompt is easier than another.
    - "flat 75%, one sampler": the same drop on the first sampler only (a sampler bug), the others unchanged.
    - "baseline tasks, all samplers": each sampler's per-task rates of the baseline, every prompt of a task at its
      task's rate, scaled by (mean - drop) / mean."""
    rates = np.array([list(r) for r in per_task.values()], dtype=float)  # [S, T]
    task_p = np.repeat(rates, prompts_per_task, axis=1)  # [S, P]
    flat = np.full_like(task_p, 0.75)
    one = flat.copy()
    one[0] -= drop
    scale = np.clip((task_p.mean(1, keepdims=True) - drop) / task_p.mean(1, keepdims=True), 0.0, 1.0)
    return {
        "flat 75%, all samplers": (flat, flat - drop),
        "flat 75%, one sampler": (flat, one),
        "baseline tasks, all samplers": (task_p, task_p * scale),
    }


def main(argv: list[str] | None = None) -> None:
    """Print the false-alarm / power table of a suite config and its baseline (the numbers in docs/regress)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", default="regress", help="suite config (preset name or file)")
    ap.add_argument("--runs", type=int, default=20000, help="simulated runs per cell")
    ap.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.05, 0.10, 0.15, 0.20])
    ap.add_argument("--coupling", type=float, nargs="+", default=[0.0, 0.5])
    args = ap.parse_args(argv)
    cfg = load_config(RegressConfig, args.config, [])
    base = load_baseline(cfg.baseline).samplers
    per_task = {s.name: [base[s.name].per_task[t].rate for t in cfg.tasks] for s in cfg.samplers}
    sizes = {t: cfg.prompts_per_task for t in cfg.tasks}
    print(
        f"{len(cfg.samplers)} samplers x {len(cfg.tasks)} tasks x {cfg.prompts_per_task} prompts x "
        f"{cfg.samples_per_prompt} samples, alpha {cfg.tolerance.alpha}, min_effect {cfg.tolerance.min_effect}, "
        f"{args.runs} simulated runs per cell (seed 0). P(at least one quality gate fails), paired tests "
        "(unpaired fallback in brackets); drop 0 is the false-alarm rate.\n"
    )
    print("| rates | coupling | " + " | ".join(f"drop {d:.2f}" for d in args.drops) + " |")
    print("|---|---|" + "---|" * len(args.drops))
    for coupling in args.coupling:
        for name in drop_scenarios(per_task, cfg.prompts_per_task, 0.0):
            cells = []
            for d in args.drops:
                pb, pn = drop_scenarios(per_task, cfg.prompts_per_task, d)[name]
                r = [
                    simulate_alarm_rate(
                        pb,
                        pn,
                        cfg.samples_per_prompt,
                        sizes,
                        cfg.pass_k,
                        cfg.tolerance,
                        args.runs,
                        coupling,
                        paired,
                    )
                    for paired in (True, False)
                ]
                cells.append(f"{r[0]:.3f} ({r[1]:.3f})")
            print(f"| {name} | {coupling:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

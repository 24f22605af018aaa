"""The `blockrl` command line: one subcommand per job, each taking `--config FILE` plus `--set a.b=c` overrides.

Bad configuration (unknown key, wrong type, out-of-range value, missing file) prints the field path and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.checkpoint import require_checkpoint
from common.config import ConfigError, load_config
from common.paths import SHIPPED_CHECKPOINT


def _quiet_env() -> None:
    """Keep third-party side effects inside the project and off the network."""
    root = Path.cwd()
    os.environ.setdefault("MPLCONFIGDIR", str(root / ".mplconfig"))
    os.environ.setdefault("HF_HOME", str(root / ".hf_home"))
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", str(root / ".inductor_cache")
    )  # compiled kernels (compile: on)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def cmd_pretrain(args) -> int:
    from trainers.lm.train import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    result = pretrain(cfg, resume=args.resume)
    if line := format_eval(result, cfg.run_dir):
        print(line)
    return 0


def cmd_convert(args) -> int:
    from trainers.lm.train import ConvertConfig, convert

    cfg = load_config(ConvertConfig, args.config, args.overrides)
    result = convert(cfg, resume=args.resume)
    if line := format_eval(result, cfg.run_dir):
        print(line)
    return 0


def cmd_demo(args) -> int:
    """GRPO on the shipped checkpoint with lossless rollouts on 2 Ray workers; before/after and speed summary."""
    from trainers.rl.demo import run_demo

    require_checkpoint(args.checkpoint)
    return run_demo(args.run_dir, args.checkpoint, args.steps, args.overrides)


def cmd_train(args) -> int:
    from rollout.pool import WorkerLostError
    from trainers.rl.group import LearnerGroupError
    from trainers.rl.run import TrainConfig, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    require_checkpoint(cfg.checkpoint)
    try:
        history = train(cfg, resume=args.resume)
    except LearnerGroupError as e:  # a lost learner rank: the message names it and the resume command
        print(f"blockrl train: {e}", file=sys.stderr)
        return 1
    except WorkerLostError as e:  # colocated: a rank lost during rollouts
        resume = f"blockrl train --config {Path(cfg.run_dir) / 'config.yaml'} --resume"
        print(f"blockrl train: {e}; the group stops; resume with: {resume}", file=sys.stderr)
        return 1
    if history:
        first, last = history[0], history[-1]
        print(
            f"reward {first['reward/mean']:.2f} -> {last['reward/mean']:.2f} over steps {first['step']}..{last['step']}"
            f" | tokens/forward {first['rollout/tokens_per_forward']:.1f} -> {last['rollout/tokens_per_forward']:.1f}"
            f" | metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}"
        )
    return 0


def cmd_bench(args) -> int:
    from rollout.bench.config import BenchConfig
    from rollout.bench.report import plot, print_checkpoints, print_profile, print_table, write_json
    from rollout.bench.run import run_bench

    cfg = load_config(BenchConfig, args.config, args.overrides)
    if args.profile:
        cfg = cfg.model_copy(update={"profile": True})
    require_checkpoint(cfg.checkpoint)
    for path in cfg.compare:
        require_checkpoint(path, "compare")
    run_dir = Path(cfg.run_dir)
    json_path = Path(args.json) if args.json else run_dir / "results.json"
    # after each batch size, the rows so far (marked partial), so a run cut short still leaves numbers
    results = run_bench(cfg, on_batch=lambda rows, done: write_json(rows, json_path, cfg, done))
    write_json(results, json_path, cfg)
    plot(results, run_dir / "bench.png")
    print_table(results)
    print_profile(results)
    print_checkpoints(results)
    print(f"results: {json_path}  plot: {run_dir / 'bench.png'}")
    return 0


def cmd_trl_bench(args) -> int:
    """TRL GRPOTrainer step time: its default HF generate vs blockrl's rollout_func, alternated in one run."""
    from trainers.trl.bench import TRLBenchConfig, format_summary, run_trl_bench, write_report

    cfg = load_config(TRLBenchConfig, args.config, args.overrides)
    require_checkpoint(cfg.checkpoint)
    result = run_trl_bench(cfg)
    json_path = Path(args.json) if args.json else Path(cfg.run_dir) / "results.json"
    write_report(result, json_path, Path(cfg.run_dir) / "trl_bench.png")
    print(format_summary(result))
    print(f"results: {json_path}  plot: {Path(cfg.run_dir) / 'trl_bench.png'}")
    return 0


def _json_bench(args, config_cls, run, format_summary) -> int:
    """A benchmark whose result is one JSON file (`--json`, else <run_dir>/results.json) and a printed summary."""
    from trainers.rl.bench import write_json

    cfg = load_config(config_cls, args.config, args.overrides)
    require_checkpoint(cfg.checkpoint)
    result = run(cfg)
    json_path = Path(args.json) if args.json else Path(cfg.run_dir) / "results.json"
    write_json(result, json_path)
    print(format_summary(result))
    print(f"results: {json_path}")
    return 0


def cmd_learner_bench(args) -> int:
    """Learner step time per freshness arm (lambda_diff / diffusion layout), alternated in one run."""
    from trainers.rl.bench import LearnerBenchConfig, format_summary, run_learner_bench

    return _json_bench(args, LearnerBenchConfig, run_learner_bench, format_summary)


def cmd_sync_bench(args) -> int:
    """Weight sync to the rollout workers: collective vs object store, shipped and random-init 300M models."""
    from trainers.rl.sync_bench import SyncBenchConfig, format_summary, run_sync_bench

    return _json_bench(args, SyncBenchConfig, run_sync_bench, format_summary)


def cmd_rollout(args) -> int:
    """N trajectories on Ray workers -> sharded Parquet in out_dir; a re-run resumes (skips finished shards)."""
    from rollout.batch.job import RolloutJobConfig, run_job

    s = run_job(load_config(RolloutJobConfig, args.config, args.overrides))
    reward = "n/a" if s.reward_mean is None else f"{s.reward_mean:.3f}"
    print(
        f"{s.num_samples} samples in {s.num_shards} shards ({s.generated_shards} generated now) | "
        f"{s.tokens} tokens in {s.seconds:.1f}s = {s.tokens_per_s:,.0f} tok/s | tokens/forward "
        f"{s.tokens_per_forward:.2f} | reward {reward} | {s.out_dir}"
    )
    return 0


def cmd_serve(args) -> int:
    """OpenAI-compatible server (completions, chat, streaming, weight updates) with continuous batching."""
    from rollout.serve.config import ServeConfig
    from rollout.serve.run import run_server

    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.insert(0, f"checkpoint={args.checkpoint}")
    if args.port is not None:
        overrides.insert(0, f"port={args.port}")
    cfg = load_config(ServeConfig, args.config, overrides)
    require_checkpoint(cfg.checkpoint)
    run_server(cfg)
    return 0


def cmd_serve_bench(args) -> int:
    """Server throughput vs HF generate behind the same API, at several client concurrencies, one run."""
    from rollout.serve.bench import ServeBenchConfig, format_summary, plot, run_serve_bench

    cfg = load_config(ServeBenchConfig, args.config, args.overrides)
    require_checkpoint(cfg.checkpoint)
    out = run_serve_bench(cfg)
    run_dir = Path(cfg.run_dir)
    if args.json:
        Path(args.json).write_text((run_dir / "results.json").read_text())
    plot(out, run_dir / "serve_bench.png")
    print(format_summary(out))
    print(f"results: {args.json or run_dir / 'results.json'}  plot: {run_dir / 'serve_bench.png'}")
    return 0


def cmd_regress(args) -> int:
    """Nightly reward regression: seeded suite per sampler vs a stored baseline; exit 1 naming failing metrics."""
    from trainers.regress.config import RegressConfig
    from trainers.regress.job import run_regress
    from trainers.regress.report import format_console

    out = run_regress(load_config(RegressConfig, args.config, args.overrides), args.update_baseline)
    print(format_console(out))
    return 1 if out.failed else 0


def cmd_export_tasks(args) -> int:
    """The built-in task corpus as a user data file (JSONL), e.g. chat-formatted for a model with a chat template."""
    from common.metrics import append_jsonl
    from trainers.lm.data import task_rows

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    rows = task_rows(args.tasks.split(","), args.per_task, args.shape, heldout=args.heldout, seed=args.seed)
    for r in rows:
        append_jsonl(out, r)
    print(f"{len(rows)} {args.shape} rows -> {out}")
    return 0


def format_eval(result: dict, run_dir: str) -> str:
    if not result:  # a non-zero rank of a data-parallel run
        return ""
    if result.get("stopped"):
        return f"stopped after step {result['step']} (stop_after) | {run_dir}"
    line = f"held-out AR loss {result['heldout_ar_loss']:.3f}"
    if "solve" in result:
        s = result["solve"]
        tasks = ", ".join(f"{t} {v['rate']:.0%}" for t, v in s["per_task"].items())
        line += f" | solve@T={s['temperature']:g} {s['overall']['rate']:.1%} ({tasks})"
    if "slot_accuracy" in result:
        acc = result["slot_accuracy"]
        line += (
            f" | diffusion top-1 slot0 {acc[0]:.2f}, slots1..K mean {result['mean_draft_slot_accuracy']:.2f}"
        )
    return line + f" | {run_dir}"


RESUME = ("--resume", {"action": "store_true", "help": "continue from <run_dir>/checkpoint if present"})
JSON = ("--json", {"default": None, "help": "write results JSON here (default: <run_dir>/results.json)"})
PROFILE = ("--profile", {"action": "store_true", "help": "also time each engine row's decode step by phase"})


@dataclass(frozen=True)
class Command:
    """One subcommand: its entry function, its default preset (None: --config defaults to the config's own
    defaults) and its extra flags."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    preset: str | None = None
    flags: tuple[tuple[str, dict], ...] = ()
    takes_config: bool = True
    set_help: str | None = None  # --set without --config: what it overrides
    config: str | None = (
        None  # "module:Class" of its config, whose fields `--help` lists (imported only then)
    )


# Every subcommand, in `blockrl --help` order: the one place a job is wired to the command line.
COMMANDS = (
    Command(
        "demo",
        "GRPO on the shipped checkpoint: lossless rollouts on 2 Ray workers, before/after summary",
        cmd_demo,
        takes_config=False,
        set_help="override a field of the GRPO config (configs/grpo_demo.yaml)",
        flags=(
            ("--run-dir", {"default": "runs/demo", "help": "where the demo writes its runs"}),
            ("--checkpoint", {"default": str(SHIPPED_CHECKPOINT), "help": "converted checkpoint to train"}),
            ("--steps", {"type": int, "default": 15, "help": "GRPO steps (default 15)"}),
        ),
        config="trainers.rl.run:TrainConfig",
    ),
    Command(
        "train",
        "GRPO or PPO on the hybrid policy with block-decoded rollouts on Ray workers",
        cmd_train,
        "grpo_tiny",
        (RESUME,),
        config="trainers.rl.run:TrainConfig",
    ),
    Command(
        "bench",
        "HF generate vs engine ar / lossless / logit_mix / auto, side by side",
        cmd_bench,
        "bench",
        (JSON, PROFILE),
        config="rollout.bench.config:BenchConfig",
    ),
    Command(
        "export-tasks",
        "write the built-in task corpus as a JSONL data file (text, prompt_completion or messages rows)",
        cmd_export_tasks,
        takes_config=False,
        flags=(
            ("--out", {"required": True, "help": "JSONL file to write"}),
            ("--shape", {"default": "messages", "choices": ["text", "prompt_completion", "messages"]}),
            ("--tasks", {"default": "spell_backward,letter_counting,chain_sum", "help": "comma-separated"}),
            ("--per-task", {"type": int, "default": 1000, "help": "rows per task"}),
            (
                "--heldout",
                {"action": "store_true", "help": "the held-out prompts instead of the training draw"},
            ),
            ("--seed", {"type": int, "default": 1234, "help": "corpus seed"}),
        ),
    ),
    Command(
        "trl-bench",
        "TRL GRPOTrainer step time: HF generate vs blockrl rollout_func",
        cmd_trl_bench,
        None,
        (JSON,),
        config="trainers.trl.bench:TRLBenchConfig",
    ),
    Command(
        "learner-bench",
        "learner step time per freshness arm: lambda_diff=0 vs the full diffusion term vs draft blocks",
        cmd_learner_bench,
        None,
        (JSON,),
        config="trainers.rl.bench:LearnerBenchConfig",
    ),
    Command(
        "sync-bench",
        "weight sync to the rollout workers: by collective vs through the object store (GB/s)",
        cmd_sync_bench,
        None,
        (JSON,),
        config="trainers.rl.sync_bench:SyncBenchConfig",
    ),
    Command(
        "rollout",
        "N trajectories on Ray workers -> sharded Parquet (resumable)",
        cmd_rollout,
        "rollout",
        config="rollout.batch.config:RolloutJobConfig",
    ),
    Command(
        "regress",
        "nightly reward regression vs a stored baseline (exit 1 on a regression)",
        cmd_regress,
        "regress",
        (("--update-baseline", {"action": "store_true", "help": "rewrite the baseline file from this run"}),),
        config="trainers.regress.config:RegressConfig",
    ),
    Command(
        "serve",
        "OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching",
        cmd_serve,
        "serve",
        (
            (
                "--checkpoint",
                {"default": None, "help": "converted checkpoint to serve (overrides the config)"},
            ),
            (
                "--port",
                {"type": int, "default": None, "help": "TCP port (overrides the config; 0 = any free)"},
            ),
        ),
        config="rollout.serve.config:ServeConfig",
    ),
    Command(
        "serve-bench",
        "blockrl serve vs HF generate behind the same API at 1, 8, 32 concurrent clients",
        cmd_serve_bench,
        None,
        (JSON,),
        config="rollout.serve.bench:ServeBenchConfig",
    ),
    Command(
        "pretrain",
        "AR pretraining from scratch on the task corpus",
        cmd_pretrain,
        "tiny_pretrain",
        (RESUME,),
        config="trainers.lm.train:PretrainConfig",
    ),
    Command(
        "convert",
        "TiDAR conversion (mid-training) of an AR checkpoint directory",
        cmd_convert,
        "tiny_convert",
        (RESUME,),
        config="trainers.lm.train:ConvertConfig",
    ),
)


class _FieldsHelp(argparse.Action):
    """`blockrl CMD --help`: the flags, then every field of CMD's config with its type, default and docstring
    (the config class is imported only when help is asked for)."""

    def __init__(self, *args, config: str, **kw):
        super().__init__(*args, **kw)
        self.config = config

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib

        from common.config import format_fields

        module, cls = self.config.split(":")
        fields = format_fields(getattr(importlib.import_module(module), cls))
        preset = parser.get_default("config")
        note = (
            f"\n\ndefaults are the config class's; the preset (configs/{preset}.yaml) sets some"
            if preset
            else ""
        )
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = fields + note
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockrl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, add_help=c.config is None)
        if c.config is not None:
            p.add_argument(
                "-h", "--help", action=_FieldsHelp, nargs=0, config=c.config, help="show this help"
            )
        if c.takes_config:
            default = c.preset or "defaults"
            p.add_argument(
                "--config", default=c.preset, help=f"YAML file or preset in configs/ (default: {default})"
            )
            _add_set_arg(p, "override a config field, e.g. --set optim.lr=0.001 (repeatable)")
        elif c.set_help:
            _add_set_arg(p, c.set_help)
        for flag, kwargs in c.flags:
            p.add_argument(flag, **kwargs)
        p.set_defaults(func=c.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_env()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"blockrl {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

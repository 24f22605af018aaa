#!/usr/bin/env bash
# The one thing to run on a CUDA machine (docs/benchmarks.md records its results, with the device named).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT (the device tool's folder) or runs/gpu_check
#
# 1. installs what is missing: wheels carried in .whl/ (pip download ... -d .whl, see the device README) go to
#    /tmp/site, which is put first on PYTHONPATH; nothing is fetched;
# 2. runs the `gpu`-marked tests (Triton verify kernel vs its reference on CUDA, FlexAttention training vs the dense
#    mask, engine greedy vs HF generate on the GPU, bf16 sampling, one host sync per decode step counted by CUDA's
#    sync debug mode, decode masks on sdpa's fused kernels with the math backend excluded);
# 3. `blockrl bench` in bf16 at B = 1, 4, 16, 64 on the shipped checkpoint, and on a random-init MoE of realistic
#    shape (hidden 1024, 16 layers, 16 experts top-2, vocabulary 32,768; speed and memory only: it has no drafter);
# 4. 3 RL steps with rollout workers on the GPU in a placement group with the learner's bundle (needs ray; skipped, and said so, where it is not installed);
# 4b. 2 colocated RL steps on one GPU in one process (scripts/gpu_colocate.py: learner and bf16 rollout copy take
#     turns, weights moved in process, peak memory per phase), and weight sync over NCCL between two GPUs
#     (scripts/gpu_sync.py; skipped, and said so, on a one-GPU machine);
# 5. writes summary.json and summary.md to OUT_DIR, beside the steps' logs (7 files: the device tool returns 8).
# The steps' time limits add up to 470 s, so the whole fits in 8 minutes on one H100 or H200. Run directories and
# caches live in WORK (/tmp/gpu_check); only the summaries and logs go to OUT_DIR.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
WORK=/tmp/gpu_check
mkdir -p "$OUT_DIR" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false MPLCONFIGDIR="$WORK/.mpl" HF_HOME="$WORK/.hf" WANDB_MODE=disabled
PY=python3
status() { echo "$1=$2" >> "$WORK/steps.txt"; }
: > "$WORK/steps.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/device.txt" 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    >> "$WORK/device.txt" 2>&1

# 2. gpu tests
timeout 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/policy/test_flex.py \
    tests/rollout/test_engine.py > "$OUT_DIR/gpu_tests.log" 2>&1
status gpu_tests $?

# 3a. bench, shipped checkpoint, bf16
BENCH=(--set device=cuda --set dtype=bfloat16 --set "batch_sizes=[1,4,16,64]" --set repeats=2 --set "compare=[]"
       --set "sweep.prompt_formats=[]" --set threads=4)
timeout 90 $PY -m trainers.cli bench "${BENCH[@]}" --set run_dir="$WORK/bench_shipped" \
    --json "$WORK/bench_shipped.json" > "$OUT_DIR/bench_shipped.log" 2>&1
status bench_shipped $?

# 3b. bench, random-init MoE of realistic shape (about 0.4B parameters), bf16: speed and memory only
MOE="{arch: qwen3_moe, hidden_size: 1024, num_layers: 16, num_heads: 16, num_kv_heads: 4, moe_intermediate_size: 512,"
MOE="$MOE num_experts: 16, experts_per_token: 2, max_positions: 2048}"
timeout 100 $PY -m trainers.cli bench "${BENCH[@]}" --set "model=$MOE" --set model_vocab=32768 --set repeats=1 \
    --set "levels=[[0,4,8]]" --set max_new_tokens=64 --set run_dir="$WORK/bench_moe" \
    --json "$WORK/bench_moe.json" > "$OUT_DIR/bench_moe.log" 2>&1
status bench_moe $?

# 4. 3 RL steps, rollout workers and learner on the GPU
if $PY -c "import ray, gymnasium" 2>/dev/null; then
    timeout 120 $PY -m trainers.cli train --set run_dir="$WORK/rl" --set steps=3 --set wandb=disabled \
        --set rollout.workers=2 --set rollout.gpus_per_worker=0.25 --set rollout.device=cuda \
        --set rollout.placement=strict_pack --set learner.gpus=0.5 \
        --set rollout.dtype=bfloat16 --set learner.device=cuda --set learner.autocast=bfloat16 \
        > "$OUT_DIR/rl.log" 2>&1
    status rl_steps $?
else
    status rl_steps "skipped: ray/gymnasium not installed here"
fi

# 4b. colocated steps on one GPU, in process (no Ray needed); NCCL weight sync where there are 2 GPUs
timeout 60 $PY scripts/gpu_colocate.py --steps 2 --out "$WORK/colocate.json" > "$OUT_DIR/colocate.log" 2>&1
status colocate $?
timeout 30 $PY scripts/gpu_sync.py --out "$WORK/sync.json" >> "$OUT_DIR/colocate.log" 2>&1
status nccl_sync $?

# 5. summary
$PY - "$WORK" "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
work, dest = Path(sys.argv[1]), Path(sys.argv[2])
steps = dict(line.strip().split("=", 1) for line in (work / "steps.txt").read_text().splitlines() if "=" in line)
summary = {"device": (work / "device.txt").read_text().strip(), "steps": steps, "bench": {}}
md = ["# gpu_check", "", "device: " + summary["device"].replace("\n", "; "), ""]
md += [f"- {k}: {'ok' if v == '0' else v}" for k, v in steps.items()]
for name in ("bench_shipped", "bench_moe"):
    p = work / f"{name}.json"
    if not p.is_file():
        continue
    runs = [r for r in json.loads(p.read_text())["runs"] if not r["sweep"]]
    summary["bench"][name] = runs
    md += ["", f"## {name}", "", "| B | sampler | levels | tok/s | vs HF | vs ar | TPF | peak MB |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['batch_size']} | {r['sampler']} | {r['levels']} | {r['tokens_per_s']:.0f} | "
           f"{r['speedup_vs_hf']:.2f}x | {r['speedup_vs_ar']:.2f}x | {r['tokens_per_forward']:.2f} | "
           f"{r['peak_mem_mb']:.0f} |" for r in runs]
col = work / "colocate.json"
if col.is_file():
    recs = json.loads(col.read_text())["steps"]
    summary["colocate"] = recs
    md += ["", "## Colocated steps (one GPU, in process)", "",
           "| step | sync s | rollout s | train s | TPF | GB sync / rollout / train | moments at rollout | copy at train |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['step']} | {r['sync_s']:.2f} | {r['rollout_s']:.2f} | {r['train_s']:.2f} | "
           f"{r['tokens_per_forward']:.2f} | {r.get('memory/sync_gb', 0):.2f} / {r.get('memory/rollout_gb', 0):.2f} / "
           f"{r.get('memory/train_gb', 0):.2f} | {r['adam_moments_during_rollout']} | {r['rollout_copy_after_train']} |"
           for r in recs]
sync = work / "sync.json"
if sync.is_file():
    summary["nccl_sync"] = json.loads(sync.read_text())
    md += ["", "NCCL weight sync: " + json.dumps(summary["nccl_sync"])]
rl = work / "rl" / "metrics.jsonl"
if rl.is_file():
    recs = [json.loads(x) for x in rl.read_text().splitlines()]
    summary["rl"] = recs
    md += ["", "## RL steps", ""]
    md += [f"- step {r['step']}: {r.get('time/step_s', 0):.1f} s, reward {r.get('reward/mean', 0):.3f}, "
           f"TPF {r.get('rollout/tokens_per_forward', 0):.2f}" for r in recs]
(dest / "summary.json").write_text(json.dumps(summary, indent=1))
(dest / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF

#!/usr/bin/env bash
# The one thing to run on a CUDA machine (docs/benchmarks.md records its results, with the device named).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT (the device tool's folder) or runs/gpu_check
#
# It runs with the device's own torch/triton/transformers: the package is not installed there (PYTHONPATH=$PWD), so
# pyproject's pins do not apply; the preflight prints the versions it found into the summary. PY=... overrides the
# interpreter (default python3).
#
# 0. installs what is missing: the wheels in .whl/ (`bash scripts/fetch_device_wheels.sh` here, from the list in
#    scripts/device_wheels.txt; the device tool carries the folder with carry: [".whl"]) go to
#    /tmp/site, which is put first on PYTHONPATH; nothing is fetched. The bench and the engine need pydantic and
#    gymnasium (and their dependencies), which the device machine lacks;
# 1. preflight: CUDA must be there (torch.cuda.is_available(), >= 1 device, a matmul on it), the versions and the
#    device name go into the summary, and every module the later stages need is imported. Without CUDA every later
#    stage is skipped, and said so (without this, every `gpu` test skips, pytest exits 0 and nothing was checked);
#    a stage whose modules failed to import is skipped, naming them;
# 2. runs the `gpu`-marked tests (Triton verify kernel vs its reference on CUDA, FlexAttention training vs the dense
#    mask, engine greedy vs HF generate on the GPU, bf16 sampling, one host sync per decode step counted by CUDA's
#    sync debug mode, decode masks on sdpa's fused kernels with the math backend excluded: tests/kernels,
#    tests/policy/test_flex.py, tests/rollout/test_engine.py, tests/rollout/test_core.py, and the compiled step as
#    CUDA graphs: greedy == eager, no new graph on other shapes, tests/rollout/test_compile.py). "ok" needs at least
#    one test passed: all skipped, or none collected (exit 5), is a failure;
# 3. `blockrl bench` in bf16 at B = 1, 4, 16, 64 (n = B prompts, 64 new tokens, hf/ar/lossless[0,4,8]/logit_mix/auto)
#    on the shipped checkpoint, and on a random-init MoE of realistic shape (hidden 1024, 16 layers, 16 experts
#    top-2, vocabulary 32,768; speed and memory only: it has no drafter). The JSON is rewritten after each batch
#    size ("partial": true), so a bench cut at its time box still reports the batch sizes it finished; and the
#    compiled rows at B = 1, 16, 64: the engine's ar and lossless[end] with the decode step as CUDA graphs
#    (compiled=true) beside HF generate with a static cache and torch.compile (hf_compiled=true), each row's
#    compile seconds, and every row against the fastest AR row (`vs best AR`);
# 4. 3 RL steps with rollout workers on the GPU in a placement group with the learner's bundle (needs ray, whose
#    wheel is too big to travel to the device machine: skipped, and said so, where it is not installed; 30 s);
# 4b. 2 colocated RL steps on one GPU in one process (scripts/gpu_colocate.py: learner and bf16 rollout copy take
#     turns, weights moved in process, peak memory per phase), and weight sync over NCCL between two GPUs
#     (scripts/gpu_sync.py; skipped, and said so, on a one-GPU machine);
# 5. writes summary.json and summary.md to OUT_DIR, beside the stages' logs (at most 8 files: what the device tool
#    returns). The summary is rewritten after every stage, so a run killed from outside still leaves one.
# Every stage is time-boxed: its cap (below; the stages that can run on one GPU add up to 455 s; Ray's and NCCL's
# are skipped there) or what is left of one 460 s budget, whichever is
# less; the final summary has 15 s more, so the whole ends within 8 minutes on one H100 or H200. Run directories and
# caches live in WORK (/tmp/gpu_check, emptied first); only the summaries and logs go to OUT_DIR. Exit status 0 only
# when the summary's result is ok.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
WORK=/tmp/gpu_check
BUDGET=460
DEADLINE=$((SECONDS + BUDGET))
PY="${PY:-python3}"
STAGES=(preflight gpu_tests bench_shipped bench_compiled bench_moe rl_steps colocate nccl_sync)
rm -rf "$WORK"
mkdir -p "$OUT_DIR" "$WORK"
: > "$WORK/steps.txt"
status() { echo "$1=$2" >> "$WORK/steps.txt"; }

# run NAME CAP LOG CMD...: CMD time-boxed at min(CAP, what is left of the budget), output appended to LOG; sets RC
# (124/137: stopped at its limit) and LIM. Returns 1, with the stage recorded as skipped, when too little is left.
run() {
    local name=$1 cap=$2 log=$3 left
    shift 3
    left=$((DEADLINE - SECONDS - 5))  # 5: timeout's kill grace
    LIM=$((cap < left ? cap : left))
    if [ "$LIM" -lt 10 ]; then
        status "$name" "skipped: out of time (the ${BUDGET} s budget is spent)"
        return 1
    fi
    timeout -k 5 "$LIM" "$@" >> "$log" 2>&1
    RC=$?
}

# verdict RC: ok, stopped at the time limit, or failed with its exit code
verdict() {
    case $1 in
        0) echo ok ;;
        124 | 137) echo "timeout: stopped at its ${LIM} s limit" ;;
        *) echo "failed (exit $1)" ;;
    esac
}

# blocked MODULE...: why a stage cannot run (empty: it can): no CUDA, or a module it needs failed to import
blocked() {
    [ "$CUDA_OK" = 1 ] || { echo "skipped: $NO_GPU_WHY"; return; }
    local m bad=()
    for m in "$@"; do grep -qxF "$m" "$WORK/import_failed.txt" && bad+=("$m"); done
    [ ${#bad[@]} -eq 0 ] || echo "skipped: cannot import ${bad[*]} (see the preflight)"
}

summarize() {  # summarize running|final: summary.json and summary.md from the stages recorded so far
    timeout 15 "$PY" - "$WORK" "$OUT_DIR" "$1" "${STAGES[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
work, dest, phase, stages = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
def read(p):
    return p.read_text().strip() if p.is_file() else ""
steps = dict(ln.split("=", 1) for ln in read(work / "steps.txt").splitlines() if "=" in ln)
pre = json.loads(read(work / "preflight.json") or "{}")
bad = [(k, v) for k, v in steps.items() if v.startswith(("failed", "timeout"))]
if phase != "final":
    after = next((s for s in reversed(stages) if s in steps), "the start")
    result = f"INCOMPLETE: the script stopped after {after} (killed from outside?)"
elif not steps.get("preflight", "").startswith("ok"):
    result = (f"FAILED: the preflight did not pass ({steps.get('preflight', 'not recorded')}); the stages that need "
              "what it lacked were skipped")
elif bad:
    result = "FAILED: " + ", ".join(k for k, _ in bad)
else:
    result = "ok: every stage passed or was skipped for the reason given"
summary = {"result": result, "device": read(work / "device.txt"), "preflight": pre, "stages": {}, "bench": {}}
versions = ", ".join(f"{k} {pre[k]}" for k in ("python", "torch", "torch_cuda", "triton", "transformers",
                                               "pydantic", "gymnasium") if k in pre)
md = ["# gpu_check", "", f"result: {result}", "",
      "device: " + (pre.get("device") or "none") + " | nvidia-smi: " + summary["device"].replace("\n", "; "),
      f"versions found: {versions or 'unknown (the preflight did not finish)'}",
      f"CUDA available: {pre.get('cuda_available')}, devices: {pre.get('device_count')}", ""]
fails = pre.get("failed_imports", {})
optional = set(pre.get("optional", []))
md += ["imports that failed: " + ("none" if not fails else "; ".join(
    f"{k} ({v}{', optional' if k in optional else ''})" for k, v in fails.items())), ""]
BENCHES = ("bench_shipped", "bench_compiled", "bench_moe")
for name in BENCHES:
    body = json.loads(read(work / f"{name}.json") or "null")
    if body and body.get("partial") and name in steps:
        steps[name] += f"; partial JSON: batch sizes {body['batch_sizes_done']} done"
for s in [k for k in steps if k not in stages] + stages:  # wheels first, where there were any
    summary["stages"][s] = steps.get(s, "not reached")
md += ["## stages", ""] + [f"- {k}: {v}" for k, v in summary["stages"].items()]
for name in BENCHES:
    body = json.loads(read(work / f"{name}.json") or "null")
    if not body:
        continue
    runs = sorted((r for r in body["runs"] if not r["sweep"]), key=lambda r: r["batch_size"])
    summary["bench"][name] = {"partial": body.get("partial"), "batch_sizes_done": body.get("batch_sizes_done"),
                              "runs": runs}
    md += ["", f"## {name}" + (" (partial)" if body.get("partial") else ""), "",
           "| B | sampler | levels | tok/s | vs HF | vs ar | vs best AR | TPF | peak MB | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['batch_size']} | {r['sampler']}{'+compiled' if r.get('compiled') else ''} | {r['levels']} | "
           f"{r['tokens_per_s']:.0f} | {r['speedup_vs_hf']:.2f}x | {r['speedup_vs_ar']:.2f}x | "
           f"{r.get('speedup_vs_best_ar', 0):.2f}x | {r['tokens_per_forward']:.2f} | {r['peak_mem_mb']:.0f} | "
           f"{r.get('compile_s', 0):.0f} |" for r in runs]
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
if phase == "final":
    print("\n".join(md))
    sys.exit(0 if result.startswith("ok") else 1)
PYEOF
}
summarize running

# 0. carried wheels
if ls .whl/*.whl >/dev/null 2>&1; then
    if run wheels 30 "$WORK/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl; then
        if [ "$RC" = 0 ]; then export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"; fi
        status wheels "$(verdict "$RC"): $(ls .whl/*.whl | wc -l) wheels $(tail -n 1 "$WORK/wheels.log")"
    fi
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false MPLCONFIGDIR="$WORK/.mpl" HF_HOME="$WORK/.hf" WANDB_MODE=disabled

# 1. preflight
run nvidia_smi 10 "$WORK/device.txt" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CUDA_OK=0 NGPU=0 NO_GPU_WHY="the preflight did not finish"
: > "$WORK/import_failed.txt"
if run preflight 45 "$OUT_DIR/preflight.log" "$PY" - "$WORK" <<'PYEOF'; then
import importlib, json, shlex, sys, traceback
from pathlib import Path
work = Path(sys.argv[1])
# what the later stages import (the gpu tests, the bench, gpu_colocate.py, gpu_sync.py)
REQUIRED = ["pytest", "triton", "transformers", "yaml", "pydantic", "gymnasium", "kernels.verify", "policy.hybrid",
            "policy.flex", "rollout.engine", "rollout.auto", "rollout.bench.run", "rollout.bench.report",
            "trainers.cli", "trainers.rl.colocate", "trainers.rl.learner", "rollout.worker", "rollout.weight_sync"]
OPTIONAL = ["ray", "pytest_timeout"]  # the RL stage (ray's wheel is too big to travel); per-test time limits
info = {"python": sys.version.split()[0]}
failed = {}
try:
    import torch
    info |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    info["device_count"] = torch.cuda.device_count() if info["cuda_available"] else 0
    if info["device_count"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        x = torch.randn(256, 256, device="cuda")
        info["cuda_smoke"] = float((x @ x).sum().item()) == float((x @ x).sum().item())  # runs, and is repeatable
except Exception as e:
    failed["torch"] = f"{type(e).__name__}: {e}"
    info.setdefault("cuda_available", False)
    info["device_count"] = 0
for m in REQUIRED + OPTIONAL:
    try:
        mod = importlib.import_module(m)
    except Exception as e:  # not installed, or failing at import time
        failed[m] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if m in REQUIRED:
            traceback.print_exc()
        continue
    if m in ("triton", "transformers", "pydantic", "gymnasium"):
        info[m] = getattr(mod, "__version__", "?")
info["failed_imports"], info["optional"] = failed, OPTIONAL
cuda_ok = info["cuda_available"] and info["device_count"] >= 1 and info.get("cuda_smoke", False)
if not cuda_ok:
    why = "no usable CUDA: " + (failed.get("torch") or (
        f"torch.cuda.is_available() is {info['cuda_available']}, {info['device_count']} devices"))
else:
    why = ""
(work / "preflight.json").write_text(json.dumps(info, indent=1))
(work / "import_failed.txt").write_text("".join(m + "\n" for m in failed))
(work / "preflight.env").write_text(f"CUDA_OK={int(bool(cuda_ok))}\nNGPU={info['device_count']}\n"
                                    f"NO_GPU_WHY={shlex.quote(why)}\n")
print(json.dumps(info, indent=1))
missing = [m for m in failed if m not in OPTIONAL]
sys.exit(0 if cuda_ok and not missing else 1)
PYEOF
    if [ -f "$WORK/preflight.env" ]; then
        . "$WORK/preflight.env"
    else
        NO_GPU_WHY="the preflight did not finish: $(verdict "$RC")"
    fi
    if [ "$RC" = 0 ]; then
        status preflight ok
    elif [ "$CUDA_OK" != 1 ]; then
        status preflight "failed: $NO_GPU_WHY"
    elif [ "$RC" = 1 ]; then
        status preflight \
            "failed: cannot import $(grep -vxE 'ray|pytest_timeout' "$WORK/import_failed.txt" | paste -sd' ')"
    else
        status preflight "$(verdict "$RC")"
    fi
fi
summarize running

# 2. gpu tests: "ok" only when some test passed (with no CUDA every one of them skips and pytest exits 0). The
# counts come from the JUnit XML, not the log, whose last line depends on pyproject's -q.
why=$(blocked pytest)
if [ -n "$why" ]; then
    status gpu_tests "$why"
else
    PER_TEST=()
    grep -qxF pytest_timeout "$WORK/import_failed.txt" || PER_TEST=(--timeout 60)
    if run gpu_tests 130 "$OUT_DIR/gpu_tests.log" "$PY" -m pytest -rfEs -m gpu -p no:cacheprovider \
        --junitxml "$WORK/gpu_tests.xml" --continue-on-collection-errors "${PER_TEST[@]}" tests/kernels \
        tests/policy/test_flex.py tests/rollout/test_engine.py tests/rollout/test_core.py \
        tests/rollout/test_compile.py; then
        read -r passed counts < <("$PY" - "$WORK/gpu_tests.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    n = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError) as e:
    print(0, f"no JUnit XML ({type(e).__name__})")
else:
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    print(passed, f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
PYEOF
        )
        if [ "$RC" = 0 ] && [ "${passed:-0}" -gt 0 ]; then
            status gpu_tests "ok: $counts"
        elif [ "$RC" = 0 ]; then
            status gpu_tests "failed: no test ran ($counts)"
        elif [ "$RC" = 5 ]; then
            status gpu_tests "failed: no tests collected (pytest exit 5)"
        else
            status gpu_tests "$(verdict "$RC"): $counts"
        fi
    fi
fi
summarize running

# 3a. bench, shipped checkpoint, bf16 (n = B prompts: one batch per run, so four batch sizes fit the time box)
BENCH_NEEDS=(pydantic gymnasium rollout.bench.run rollout.bench.report trainers.cli)
BENCH=(--set device=cuda --set dtype=bfloat16 --set "batch_sizes=[1,4,16,64]" --set repeats=2 --set "compare=[]"
       --set "sweep.prompt_formats=[]" --set threads=4 --set prompts_per_row=1 --set min_prompts=1
       --set max_new_tokens=64 --set "levels=[[0,4,8]]")
why=$(blocked "${BENCH_NEEDS[@]}")
if [ -n "$why" ]; then
    status bench_shipped "$why"
elif run bench_shipped 60 "$OUT_DIR/bench_shipped.log" "$PY" -m trainers.cli bench "${BENCH[@]}" \
    --set run_dir="$WORK/bench_shipped" --json "$WORK/bench_shipped.json"; then
    status bench_shipped "$(verdict "$RC")"
fi
summarize running

# 3b. the compiled rows: the engine's decode step as CUDA graphs (ar and lossless[end]) beside HF generate with a
# static cache and torch.compile, at B = 1, 16, 64 (each row compiles in its untimed warm-up; `compile_s`)
why=$(blocked "${BENCH_NEEDS[@]}")
if [ -n "$why" ]; then
    status bench_compiled "$why"
elif run bench_compiled 95 "$OUT_DIR/bench_compiled.log" "$PY" -m trainers.cli bench "${BENCH[@]}" \
    --set "batch_sizes=[1,16,64]" --set "levels=[[end]]" --set logit_mix=false --set compiled=true \
    --set hf_compiled=true --set repeats=1 --set run_dir="$WORK/bench_compiled" \
    --json "$WORK/bench_compiled.json"; then
    status bench_compiled "$(verdict "$RC")"
fi
summarize running

# 3c. bench, random-init MoE of realistic shape (about 0.4B parameters), bf16: speed and memory only
MOE="{arch: qwen3_moe, hidden_size: 1024, num_layers: 16, num_heads: 16, num_kv_heads: 4, moe_intermediate_size: 512,"
MOE="$MOE num_experts: 16, experts_per_token: 2, max_positions: 2048}"
why=$(blocked "${BENCH_NEEDS[@]}")
if [ -n "$why" ]; then
    status bench_moe "$why"
elif run bench_moe 45 "$OUT_DIR/bench_moe.log" "$PY" -m trainers.cli bench "${BENCH[@]}" --set "model=$MOE" \
    --set model_vocab=32768 --set repeats=1 --set run_dir="$WORK/bench_moe" --json "$WORK/bench_moe.json"; then
    status bench_moe "$(verdict "$RC")"
fi
summarize running

# 4. 3 RL steps, rollout workers and learner on the GPU
why=$(blocked ray gymnasium trainers.cli)
if [ -n "$why" ]; then
    status rl_steps "$why"
elif run rl_steps 30 "$OUT_DIR/rl.log" "$PY" -m trainers.cli train --set run_dir="$WORK/rl" --set steps=3 \
    --set wandb=disabled --set rollout.workers=2 --set rollout.gpus_per_worker=0.25 --set rollout.device=cuda \
    --set rollout.placement=strict_pack --set learner.gpus=0.5 \
    --set rollout.dtype=bfloat16 --set learner.device=cuda --set learner.autocast=bfloat16; then
    status rl_steps "$(verdict "$RC")"
fi
summarize running

# 4b. colocated steps on one GPU, in process (no Ray needed); NCCL weight sync where there are 2 GPUs
why=$(blocked trainers.rl.colocate trainers.rl.learner rollout.worker policy.hybrid)
if [ -n "$why" ]; then
    status colocate "$why"
elif run colocate 40 "$OUT_DIR/colocate.log" "$PY" scripts/gpu_colocate.py --steps 2 --out "$WORK/colocate.json"; then
    status colocate "$(verdict "$RC")"
fi
why=$(blocked rollout.weight_sync rollout.worker policy.hybrid)
if [ -z "$why" ] && [ "$NGPU" -lt 2 ]; then
    why="skipped: one GPU (NCCL needs a GPU per process; this machine has $NGPU)"
fi
if [ -n "$why" ]; then
    status nccl_sync "$why"
elif run nccl_sync 25 "$OUT_DIR/colocate.log" "$PY" scripts/gpu_sync.py --out "$WORK/sync.json"; then
    status nccl_sync "$(verdict "$RC")"
fi

# 5. summary; the exit status is 0 only when the result is ok
summarize final

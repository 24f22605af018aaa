"""Shipped files (presets, the default checkpoint, the regress baseline) resolve wherever blockrl is installed or
run from: unit checks of the resolver, and a non-editable `pip install .` into a fresh venv exercised from another
directory (`blockrl bench --help` and a tiny bench run on the shipped checkpoint)."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from common.config import load_config
from common.paths import INSTALL_ROOT, SHIPPED_CHECKPOINT, resolve_shipped
from trainers.regress.config import RegressConfig

REPO = Path(__file__).resolve().parents[2]


def test_relative_shipped_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_shipped("checkpoints/tiny-moe") == str(SHIPPED_CHECKPOINT)
    assert resolve_shipped("no/such/dir") == "no/such/dir"  # unknown paths are left for the caller to report
    cfg = load_config(RegressConfig, "regress", [])  # a preset by name, from elsewhere
    assert Path(cfg.baseline).is_file() and Path(cfg.checkpoint) == SHIPPED_CHECKPOINT
    assert SHIPPED_CHECKPOINT.parent == INSTALL_ROOT / "checkpoints"
    (tmp_path / "checkpoints" / "tiny-moe").mkdir(parents=True)
    assert resolve_shipped("checkpoints/tiny-moe") == "checkpoints/tiny-moe"  # a local path wins


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # the dependencies come from this environment (no network); blockrl itself only from the new install
    site = subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    Path(site.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    build = {**os.environ, "PIP_NO_INDEX": "1", "TMPDIR": str(tmp_path)}
    # the wheel is built by this environment's setuptools (a fresh venv's bundled one cannot build wheels offline)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        env=build,
        check=True,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("blockrl-*.whl"))
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env=build, check=True, cwd=tmp_path
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "HF_HOME": str(tmp_path / "hf")}
    run_env.pop("PYTHONPATH", None)
    where = subprocess.check_output(
        [py, "-c", "import common.paths as p; print(p.SHIPPED_CHECKPOINT)"],
        text=True,
        cwd=elsewhere,
        env=run_env,
    ).strip()
    assert Path(where).is_dir() and REPO not in Path(where).parents  # the installed copy, not this checkout
    blockrl = env_dir / "bin" / "blockrl"
    help_ = subprocess.run(
        [blockrl, "bench", "--help"], cwd=elsewhere, env=run_env, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--config" in help_.stdout
    tiny = [
        "--set",
        "batch_sizes=[1]",
        "--set",
        "repeats=1",
        "--set",
        "max_new_tokens=8",
        "--set",
        "min_prompts=1",
        "--set",
        "prompts_per_row=1",
        "--set",
        "levels=[[0]]",
        "--set",
        "mix_levels=[0]",
        "--set",
        "threads=1",
    ]
    out = subprocess.run(
        [blockrl, "bench", "--config", "bench", *tiny, "--json", "b.json"],
        cwd=elsewhere,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads((elsewhere / "b.json").read_text())["runs"]
    assert {r["sampler"] for r in runs} >= {"hf", "ar", "lossless"}

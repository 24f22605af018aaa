"""`blockrl serve` while it starts: /health answers 503 "starting" from the moment the socket is bound, SIGTERM and
Ctrl-C stop it at any moment (auto's calibration included), and auto's calibration is cached per checkpoint,
machine and settings. Each server is a child process on loopback, stopped by its own pid."""

import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from common.paths import SHIPPED_BPE_CHECKPOINT
from rollout.cost_model import CostModel
from rollout.serve.calibration import cache_path, calibration_key, read_calibration, write_calibration
from rollout.serve.config import ServeConfig
from rollout.serve.run import ServerProcess
from rollout.types import Option

CKPT = str(SHIPPED_BPE_CHECKPOINT)
MODEL = "tiny-moe-bpe"
OPTIONS = [Option("ar"), Option("lossless", (0,))]


def _cfg(cache: Path, **kw) -> ServeConfig:
    """auto, timed at start-up: every option at batch 1 and 2 (seconds on 2 cores), cached under `cache`. One torch
    thread: two on two busy cores wait on each other at every op, and the timing takes minutes."""
    kw = {"max_batch": 2, "threads": 1, **kw}
    return ServeConfig(
        checkpoint=CKPT,
        port=0,
        device="cpu",
        sampler="auto",
        auto_calibration="start",
        calibration_cache=str(cache),
        **kw,
    )


def _server(cfg: ServeConfig, log: Path, wait_ready: bool = False) -> ServerProcess:
    env = {**os.environ, "MPLCONFIGDIR": str(log.parent), "HF_HOME": str(log.parent / "hf")}
    env.pop(
        "TRITON_INTERPRET", None
    )  # as a real server runs: the interpreted verify kernel makes timing minutes
    return ServerProcess(cfg, log, env=env, timeout_s=120, wait_ready=wait_ready)


def _phases(log: Path) -> dict[str, float]:
    """The start-up lines of a server's log: phase -> seconds."""
    return {m[1]: float(m[2]) for m in re.finditer(r"start-up: (\w+) ([\d.]+)s", log.read_text())}


def _wait_phase(base: str, phase: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=5) as http:
        while time.monotonic() < deadline:
            body = http.get("/health").json()
            if body.get("phase") == phase:
                return body
            time.sleep(0.05)
    raise AssertionError(f"the server never reached phase {phase!r}")


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    """A first start: what /health and an inference endpoint answered while it started, then ready (200)."""
    root = tmp_path_factory.mktemp("serve_start")
    cache, log = root / "cache", root / "first.log"
    seen: list[tuple[int, dict]] = []
    with _server(_cfg(cache), log) as url, httpx.Client(base_url=url.removesuffix("/v1"), timeout=10) as http:
        early = http.post("/v1/completions", json={"model": MODEL, "prompt": "1+1="})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = http.get("/health")
            seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                break
            time.sleep(0.1)
    return {"cache": cache, "log": log, "seen": seen, "early": early}


def test_health_is_503_starting_until_ready_then_200(first_start):
    seen, early = first_start["seen"], first_start["early"]
    assert seen[0][0] == 503 and seen[-1][0] == 200
    starting = [body for status, body in seen if status == 503]
    assert all(b["status"] == "starting" and b["phase"] in ("loading", "calibrating") for b in starting)
    assert any(b["phase"] == "calibrating" for b in starting)
    assert seen[-1][1]["status"] == "ok"
    # inference endpoints refuse while starting, as OpenAI errors a client can retry
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    assert early.json()["error"]["code"] == "server_starting"


def test_start_up_logs_each_phase_and_writes_the_cache(first_start):
    text = first_start["log"].read_text()
    assert set(_phases(first_start["log"])) == {"bind", "load", "calibrate", "ready"}
    (written,) = list(first_start["cache"].glob("*.json"))
    assert f"auto: calibrated and wrote {written}" in text


def test_a_restart_with_the_same_settings_uses_the_cache(first_start, tmp_path):
    cache, log = first_start["cache"], tmp_path / "second.log"
    with _server(_cfg(cache), log, wait_ready=True) as url:
        r = httpx.post(
            f"{url}/completions", json={"model": MODEL, "prompt": "1+1=", "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"]
    (written,) = list(cache.glob("*.json"))
    assert f"auto: used cache {written}" in log.read_text()
    first, second = _phases(first_start["log"]), _phases(log)
    assert "calibrate" not in second and second["cache"] < first["calibrate"]
    assert second["ready"] < first["ready"]


def test_sigterm_during_calibration_stops_the_server_and_a_changed_setting_is_not_cached(
    first_start, tmp_path
):
    """max_batch 8 (the cache holds max_batch 2): calibrates anew, and SIGTERM ends it within seconds."""
    log = tmp_path / "changed.log"
    server = _server(_cfg(first_start["cache"], max_batch=8), log)
    with server as url:
        _wait_phase(url.removesuffix("/v1"), "calibrating")
        t0 = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=30)
        seconds = time.monotonic() - t0
    assert server.proc.returncode == -signal.SIGTERM and seconds < 10, seconds
    text = log.read_text()
    assert "not in the cache" in text and "used cache" not in text
    assert "start-up: stopped while calibrating" in text


def test_ctrl_c_while_loading_stops_the_server(tmp_path):
    """SIGINT as soon as the URL is printed (the model is loading): a clean exit within seconds."""
    server = _server(_cfg(tmp_path / "cache", max_batch=8), tmp_path / "sigint.log")
    with server:
        t0 = time.monotonic()
        os.kill(server.proc.pid, signal.SIGINT)
        server.proc.wait(timeout=30)
        seconds = time.monotonic() - t0
    assert server.proc.returncode == 0 and seconds < 10, seconds
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing half-timed was cached


# ------------------------------------------------------------------------------------------ the cache, in-process
def test_the_cache_key_changes_with_checkpoint_machine_and_settings(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(CKPT, ckpt)
    cfg = _cfg(tmp_path / "cache").model_copy(update={"checkpoint": str(ckpt)})
    cpu = torch.device("cpu")

    def key(c=cfg, options=OPTIONS, sizes=(1, 2)):
        return calibration_key(c, cpu, options, 16, list(sizes))

    base = key()
    assert key() == base
    assert key(sizes=(1, 2, 4)) != base  # max_batch
    assert key(options=OPTIONS[:1]) != base  # levels / draft source
    assert key(cfg.model_copy(update={"dtype": "bfloat16"})) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key() != base
    finally:
        torch.set_num_threads(threads)
    weights = ckpt / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert key() != base  # the weights were rewritten


def test_a_cached_calibration_is_read_only_under_an_equal_key(tmp_path):
    cfg, cpu = _cfg(tmp_path), torch.device("cpu")
    key = calibration_key(cfg, cpu, OPTIONS, 16, [1, 2])
    timed = CostModel(16)
    for name in ("ar", "lossless[0]"):
        for b in (1, 2):
            timed.step_seconds[(name, b)], timed.prefill_seconds[(name, b)] = 0.01 * b, 0.02 * b
    timed.draftless_seconds["lossless[0]"] = 0.005
    path = cache_path(str(tmp_path), key)
    write_calibration(path, key, timed)

    loaded = CostModel(16)
    assert read_calibration(path, key, loaded, [1, 2])
    assert (loaded.step_seconds, loaded.prefill_seconds) == (timed.step_seconds, timed.prefill_seconds)
    assert loaded.draftless_seconds == timed.draftless_seconds

    other = calibration_key(cfg, cpu, OPTIONS, 16, [1, 2, 4])
    assert cache_path(str(tmp_path), other) != path
    untouched = CostModel(16)
    assert not read_calibration(path, other, untouched, [1, 2, 4]) and not untouched.step_seconds
    assert not read_calibration(path, key, untouched, [1, 2, 4])  # a size it never timed
    path.write_text("{not json")
    assert not read_calibration(path, key, untouched, [1, 2]) and not untouched.step_seconds

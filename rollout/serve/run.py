"""Running `blockrl serve`: in the foreground (the command), on a background thread of this process (tests), or in
a child process (the benchmark's servers, the command's test). All bind the socket themselves, so port 0 gets a
free port and the URL says which."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI

from policy.hybrid import HybridPolicy
from rollout.serve.app import create_app
from rollout.serve.config import ServeConfig


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _server(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )


def run_server(cfg: ServeConfig) -> None:
    """`blockrl serve`: load, bind, serve until interrupted."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = create_app(cfg)
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    print(
        f"blockrl serve: {cfg.model_name or Path(cfg.checkpoint).name} on http://{host}:{port}/v1", flush=True
    )
    _server(app).run(sockets=[sock])


class ServerThread:
    """A server on a background thread of this process, for tests and the benchmark:

    with ServerThread(cfg, policy, tokenizer) as url:   # url = http://127.0.0.1:PORT/v1
        ...
    """

    def __init__(self, cfg: ServeConfig, policy: HybridPolicy | None = None, tokenizer=None):
        self.app = create_app(cfg, policy, tokenizer)
        self.cfg = cfg
        self.server = _server(self.app)

    def __enter__(self) -> str:
        sock = _bind(self.cfg.host, self.cfg.port)
        host, port = sock.getsockname()[:2]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """`blockrl serve` in a child process (the benchmark's servers, the CLI test): started with this config, its
    URL read from its first line of output, stopped with SIGTERM to its own pid.

    with ServerProcess(cfg, log_path) as url:
        ...
    """

    def __init__(self, cfg: ServeConfig, log_path: Path, env: dict | None = None, timeout_s: float = 180.0):
        self.cfg, self.log_path, self.env, self.timeout_s = cfg, Path(log_path), env, timeout_s

    def __enter__(self) -> str:
        import yaml

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config = self.log_path.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json")))
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainers.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=self.env,
        )
        deadline = time.monotonic() + self.timeout_s
        url = None
        while url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "http://" in line:
                url = line.strip().split(" on ")[-1]
            elif not line and self.proc.poll() is not None:
                break
        while url is not None and time.monotonic() < deadline and self.proc.poll() is None:
            try:  # bound, but serving only once start-up (loading, auto's calibration) is done
                if httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"blockrl serve did not start within {self.timeout_s:.0f}s (log: {self.log_path})")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()

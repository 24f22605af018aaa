"""Running `blockrl serve`: in the foreground (the command), on a background thread of this process (tests), or in
a child process (the benchmark's servers, the command's test). All bind the socket themselves, so port 0 gets a
free port and the URL says which.

The socket is bound and served first; the model loads and auto calibrates afterwards, on a start-up thread
(`ServeApp`). Until then `/health` answers 503 `{"status": "starting", "phase": "loading" | "calibrating"}` and every
other endpoint 503 with an OpenAI-style error (code `server_starting`), and SIGTERM / Ctrl-C stop the server at once:
uvicorn's signal handlers run on a free event loop, and calibration stops at its next timed probe. auto's timings
are cached per checkpoint, machine and settings (`calibration_cache`), so a restart does not time them again. Each
start-up phase logs one line with its seconds (bind, load, calibrate or cache, ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from starlette.responses import JSONResponse

from common.config import ConfigError
from policy.hybrid import HybridPolicy
from rollout.cost_model import CalibrationStopped
from rollout.serve import protocol as P
from rollout.serve.app import create_app, load_served_policy, served_name
from rollout.serve.config import ServeConfig

log = logging.getLogger(__name__)
# at shutdown, how long to wait for a start-up still loading or calibrating (after that it is abandoned)
STOP_WAIT_S = 3.0


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue from here on, before uvicorn accepts them (never refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # uvicorn's default backlog
    return sock


def _server(app) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )


class ServeApp:
    """The ASGI app uvicorn serves from the moment the socket is bound. Its lifespan starts a start-up thread
    (load the policy, build the FastAPI app of rollout/serve/app.py, calibrate auto or load its cached timings,
    start the engine thread) and returns at once; requests are answered here, 503, until that thread hands over the
    app, and go to it after. At shutdown it stops the start-up where it is (calibration at its next probe) or the
    engine thread.

    phase: loading | calibrating | ready | failed | stopped
    """

    def __init__(
        self,
        cfg: ServeConfig,
        policy: HybridPolicy | None = None,
        tokenizer=None,
        on_started: Callable[[], None] | None = None,
        on_fail: Callable[[], None] | None = None,
    ):
        """on_started: called once uvicorn runs (its signal handlers in place); on_fail: if the start-up fails."""
        self.cfg, self.policy, self.tokenizer = cfg, policy, tokenizer
        self.on_started, self.on_fail = on_started, on_fail
        self.name = served_name(cfg)
        self.phase = "loading"
        self.app: FastAPI | None = None  # set once ready
        self.error: BaseException | None = None
        self.ready = threading.Event()  # set once ready, failed or stopped
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the hand-over (scheduler started, app set) against a stop
        self._thread = threading.Thread(target=self._start_up, name="blockrl-start-up", daemon=True)

    # ------------------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: not served here
            return
        seconds = round(time.perf_counter() - self.t0, 1)
        status = {"failed": "failed", "stopped": "stopping"}.get(self.phase, "starting")
        if scope["path"] == "/health":
            body = {"status": status, "phase": self.phase, "model": self.name, "seconds": seconds}
            body |= {"error": str(self.error)} if self.error else {}
        elif self.error:
            body = P.APIError(
                f"the server failed to start: {self.error}", code="server_failed", status=503
            ).body()
        else:
            message = f"the server is {status} ({self.phase}, {seconds}s); retry once GET /health answers 200"
            body = P.APIError(message, code="server_starting", status=503).body()
        await JSONResponse(body, status_code=503, headers={"retry-after": "1"})(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.on_started is not None:
                    self.on_started()
                self._thread.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.stop)  # waits for threads: off the event loop
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------------------------------ start-up thread
    def _start_up(self) -> None:
        """The start-up thread: load, calibrate (or read the cache), start the engine thread, hand over the app.
        Each phase logs one line with its seconds."""
        cfg = self.cfg
        try:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)  # this thread times auto: its thread count is the engine's
            t = time.perf_counter()
            policy, tokenizer = self.policy, self.tokenizer
            if policy is None:
                policy, tokenizer = load_served_policy(cfg)
            app = create_app(cfg, policy, tokenizer)
            load = time.perf_counter() - t
            log.info("start-up: load %.2fs (%s on %s, %s)", load, self.name, cfg.device, cfg.dtype)
            if self._stop.is_set():
                log.info("start-up: stopped after loading, %.1fs after bind", time.perf_counter() - self.t0)
                return
            phase, calib = self._calibrate(app.state.scheduler)
            with self._lock:
                if self._stop.is_set():
                    return
                app.state.scheduler.start()
                self.app, self.phase = app, "ready"
            log.info(
                "start-up: ready %.2fs after bind (load %.2fs, %s %.2fs): serving %s (%s, max_batch %d)",
                time.perf_counter() - self.t0,
                load,
                phase,
                calib,
                self.name,
                cfg.sampler,
                cfg.max_batch,
            )
        except CalibrationStopped:
            log.info("start-up: stopped while calibrating, %.1fs after bind", time.perf_counter() - self.t0)
        except Exception as e:
            log.exception("start-up failed while %s", self.phase)
            self.error, self.phase = e, "failed"
            if self.on_fail is not None:
                self.on_fail()
        finally:
            self.ready.set()

    def _calibrate(self, scheduler) -> tuple[str, float]:
        """auto's timings from the cache, else timed now (`auto_calibration: start`), else later: the phase that
        ran ("cache" or "calibrate") and its seconds."""
        t = time.perf_counter()
        cached = scheduler.load_calibration()
        if cached is not None:
            detail = f"auto: used cache {cached}"
        elif scheduler.calibrates_at_start:
            self.phase = "calibrating"
            wrote = scheduler.calibrate(stop=self._stop.is_set)
            detail = f"auto: calibrated and {f'wrote {wrote}' if wrote is not None else 'wrote no cache'}"
        else:
            detail = "skipped: " + ("backend hf" if scheduler.auto is None else "auto_calibration first_use")
        phase, seconds = "cache" if cached is not None else "calibrate", time.perf_counter() - t
        log.info("start-up: %s %.2fs (%s)", phase, seconds, detail)
        return phase, seconds

    def stop(self) -> None:
        """Stop the start-up where it is, or the engine thread once serving. A start-up busy in something that
        cannot stop (loading the weights) is waited for `STOP_WAIT_S`, then abandoned: it is a daemon thread, and it
        starts nothing once stopped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_WAIT_S)
            if self._thread.is_alive():
                log.warning("start-up still %s after %.0fs: not waiting for it", self.phase, STOP_WAIT_S)
        with self._lock:
            app = self.app
            if self.phase != "failed":
                self.phase = "stopped"
        self.ready.set()
        if app is not None:
            app.state.scheduler.stop()


def run_server(cfg: ServeConfig) -> None:
    """`blockrl serve`: bind, then load and calibrate while answering 503 "starting", serve until SIGTERM or
    Ctrl-C (both stop it at any moment, start-up included). Raises the start-up's error if it failed."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]

    def started() -> None:
        # the URL is printed once uvicorn's signal handlers are in place: a caller may send a signal on reading it
        print(f"blockrl serve: {app.name} on http://{host}:{port}/v1", flush=True)
        log.info("start-up: bind %.2fs (http://%s:%d)", time.perf_counter() - t0, host, port)
        app.t0 = time.perf_counter()

    app = ServeApp(cfg, on_started=started)
    server = _server(app)
    app.on_fail = lambda: setattr(server, "should_exit", True)  # a failed start-up ends the server
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it acted on, once stopped
        server.run(sockets=[sock])
    if isinstance(app.error, ConfigError):
        raise app.error  # the CLI names the field
    if app.error is not None:  # its traceback is in the log already
        raise SystemExit(f"blockrl serve: start-up failed: {app.error}")


class ServerThread:
    """A server on a background thread of this process, for tests and the benchmark; entered once it serves:

    with ServerThread(cfg, policy, tokenizer) as url:   # url = http://127.0.0.1:PORT/v1
        ...

    `app` is the served FastAPI app once entered (`serve_app` is what uvicorn runs).
    """

    def __init__(
        self, cfg: ServeConfig, policy: HybridPolicy | None = None, tokenizer=None, timeout_s: float = 120
    ):
        self.cfg, self.timeout_s = cfg, timeout_s
        self.serve_app = ServeApp(cfg, policy, tokenizer)
        self.server = _server(self.serve_app)
        self.app: FastAPI | None = None

    def __enter__(self) -> str:
        sock = _bind(self.cfg.host, self.cfg.port)
        host, port = sock.getsockname()[:2]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.serve_app.ready.wait(0.05):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                break
        if self.serve_app.app is None:
            self.__exit__()
            raise RuntimeError(f"the server did not start: {self.serve_app.error or self.serve_app.phase}")
        self.app = self.serve_app.app
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """`blockrl serve` in a child process (the benchmark's servers, the CLI test): started with this config, its
    URL read from its first line of output, stopped with SIGTERM to its own pid. Entered once it serves (GET /health
    answers 200), or with `wait_ready=False` as soon as its URL is known (it is still starting).

    with ServerProcess(cfg, log_path) as url:
        ...
    """

    def __init__(
        self,
        cfg: ServeConfig,
        log_path: Path,
        env: dict | None = None,
        timeout_s: float = 180.0,
        wait_ready: bool = True,
    ):
        self.cfg, self.log_path, self.env, self.timeout_s = cfg, Path(log_path), env, timeout_s
        self.wait_ready = wait_ready

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
        if url is not None and not self.wait_ready:
            return url
        while url is not None and time.monotonic() < deadline and self.proc.poll() is None:
            try:  # answers at once, 503 "starting" until loading and auto's calibration are done
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

"""`blockrl serve`: the HTTP face of the scheduler, on FastAPI + uvicorn (docs/serve.md).

    GET  /health                 liveness and the policy version serving (503 "starting" while it starts)
    GET  /v1/models              the one model served
    POST /v1/completions         text or token-id prompts; SSE with "stream": true
    POST /v1/chat/completions    messages rendered with the checkpoint's chat template
    POST /v1/weights             load new weights from a checkpoint directory (admin token)
    GET  /metrics                Prometheus text format

Running it: rollout/serve/run.py (`blockrl serve`, and a server on a thread or in a child process). The socket is
bound before the model loads; until this app is built and its scheduler calibrated and started, run.py's `ServeApp`
answers every request itself (503, status "starting").

Every handler validates, builds one `Request` per choice, submits them and turns the deliveries into OpenAI bodies
or stream chunks. A client that disconnects cancels its choices; their slots free at the next step. Bad requests get
a 400 with an OpenAI-style error body naming the parameter, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from common.checkpoint import missing_checkpoint
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from policy.tokenizer import ChatFormatError, encode_chat_prompt, encode_prompt
from rollout.serve import protocol as P
from rollout.serve.config import ServeConfig
from rollout.serve.metrics import CONTENT_TYPE, ServeMetrics
from rollout.serve.scheduler import Delivery, Scheduler, Submission, UpdateInProgress
from rollout.types import Request, SamplingParams

log = logging.getLogger(__name__)


def load_served_policy(cfg: ServeConfig) -> tuple[HybridPolicy, object]:
    policy = HybridPolicy.from_pretrained(cfg.checkpoint, dtype=cfg.torch_dtype).to(cfg.torch_device()).eval()
    return policy, load_tokenizer(cfg.checkpoint)


def served_name(cfg: ServeConfig) -> str:
    """The model id clients pass as `model`."""
    return cfg.model_name or Path(cfg.checkpoint).name


def create_app(cfg: ServeConfig, policy: HybridPolicy, tokenizer=None) -> FastAPI:
    """The served app, once the policy is loaded. Its scheduler (`app.state.scheduler`) is calibrated, started and
    stopped by whoever serves the app: `rollout/serve/run.py: ServeApp`, which answers while it starts."""
    metrics = ServeMetrics()
    scheduler = Scheduler(policy, tokenizer, cfg, metrics)
    name = served_name(cfg)
    context = int(getattr(policy.config, "max_position_embeddings", 0) or 1 << 20)
    eos = policy.eos_ids(tokenizer)

    app = FastAPI(title="blockrl")
    app.state.scheduler, app.state.metrics = scheduler, metrics

    # ------------------------------------------------------------------------------------------ errors
    @app.exception_handler(P.APIError)
    async def _api_error(request: HTTPRequest, e: P.APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            msg, param = "the body is not valid JSON", None
        elif param:
            msg = f"{'.'.join(loc)}: {msg}"
        return await _api_error(request, P.APIError(msg, param, err.get("type")))

    @app.exception_handler(HTTPException)
    async def _http(request: HTTPRequest, e: HTTPException):
        return await _api_error(request, P.APIError(str(e.detail), status=e.status_code))

    def _check_key(request: HTTPRequest) -> None:
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            raise P.APIError("invalid or missing API key", code="invalid_api_key", status=401)

    # ------------------------------------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        if not scheduler.alive:
            raise P.APIError("the engine thread is not running", code="engine_down", status=503)
        return {"status": "ok", "model": name, "policy_version": scheduler.version}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        _check_key(request)
        card = {
            "id": name,
            "object": "model",
            "created": P.now(),
            "owned_by": "blockrl",
            "max_model_len": context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------------------------------ generation
    def _submission(body: P._Sampling, prompts: list[list[int]], param: str, top: int) -> Submission:
        if body.model != name:
            raise P.APIError(
                f"model {body.model!r} is not served here (serving {name!r})", "model", "model_not_found"
            )
        if body.n > cfg.max_n:
            raise P.APIError(f"n: {body.n} choices exceed this server's max_n={cfg.max_n}", "n")
        sampler = body.sampler or cfg.sampler
        if sampler not in scheduler.samplers:
            raise P.APIError(
                f"sampler: {sampler!r} is not available here (have {list(scheduler.samplers)})", "sampler"
            )
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise P.APIError(
                f"{param}: {longest} tokens, the model's context is {context}",
                param,
                "context_length_exceeded",
            )
        budget = body.max_tokens or min(cfg.default_max_tokens, context - longest)
        if longest + budget > context:
            raise P.APIError(
                f"max_tokens: {longest} prompt tokens + {budget} exceed the context of {context}",
                "max_tokens",
                "context_length_exceeded",
            )
        if body.stops and tokenizer is None:
            raise P.APIError("stop: needs the checkpoint's tokenizer", "stop")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        if sampler == "auto" and body.seed is not None and cfg.backend == "engine":
            # a seed fixes the tokens of one sampler; auto's pick depends on the load, so a seeded request runs
            # lossless (exact, like every auto pick) and gives the same tokens alone or under any load
            sampler = "lossless"
        params = SamplingParams(
            budget,
            body.temperature,
            body.top_p,
            body.top_k,
            seed,
            eos_token_id=eos or None,
            stop_strings=body.stops,
        )
        reqs = [
            Request(p, params, stream=i * body.n + j, top_logprobs=top)
            for i, p in enumerate(prompts)
            for j in range(body.n)
        ]
        mode = body.on_weight_update or cfg.on_weight_update
        return Submission(reqs, sampler, deliver=lambda d: None, on_weight_update=mode, stream=body.stream)

    async def _run(request: HTTPRequest, body: P._Sampling, prompts, param: str, kind: str, want: int | None):
        """want: alternatives per token, or None when no log-probs were asked for."""
        t0 = time.perf_counter()
        greedy = body.temperature == 0
        top = 0 if want is None else max(want, 1 if greedy else 0)  # greedy log-probs read the alternatives
        sub = _submission(body, prompts, param, top)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        sub.deliver = lambda d: loop.call_soon_threadsafe(q.put_nowait, d)
        if not body.stream:
            scheduler.submit(
                sub
            )  # a stream submits when its response starts: a client gone before then costs nothing
        n_choices = len(sub.requests)
        rid, created = P.new_id("chatcmpl" if kind == "chat" else "cmpl"), P.now()
        streams = [P.TextStream(tokenizer, body.stops) for _ in range(n_choices)]
        prompt_tokens = sum(len(p) for p in prompts)
        path = request.url.path

        def choice_logprobs(ev_tokens, ev_lps, ev_alts, offset):
            if want is None:
                return None
            rows = P.token_logprobs(ev_tokens, ev_lps, ev_alts, greedy)
            if kind == "chat":
                return P.chat_logprobs(tokenizer, rows, want)
            return P.completion_logprobs(tokenizer, rows, want, offset)

        if body.stream:

            async def events():
                done, completion_tokens = 0, 0
                obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                scheduler.submit(sub)
                try:
                    if kind == "chat":
                        for i in range(n_choices):
                            delta = {"role": "assistant", "content": ""}
                            chunk = {"index": i, "delta": delta, "finish_reason": None}
                            yield _sse(
                                {
                                    "id": rid,
                                    "object": obj,
                                    "created": created,
                                    "model": name,
                                    "choices": [chunk],
                                }
                            )
                    while done < n_choices:
                        d: Delivery = await q.get()
                        if d.error is not None:
                            yield _sse(P.APIError(d.error, status=500).body())
                            break
                        ev, st = d.event, streams[d.choice]
                        offset = len(st.text()) if want is not None and kind != "chat" else 0
                        text = st.push(ev.tokens, ev.finished is not None)
                        c = {"index": d.choice, "finish_reason": None, "token_ids": ev.tokens}
                        c["logprobs"] = choice_logprobs(ev.tokens, ev.logprobs, ev.top_logprobs, offset)
                        if kind == "chat":
                            c["delta"] = {"content": text} if text or ev.finished is None else {}
                        else:
                            c["text"] = text
                        if ev.finished is not None:
                            t = ev.finished
                            done += 1
                            completion_tokens += t.num_tokens
                            c["finish_reason"] = P.FINISH.get(t.finish_reason, t.finish_reason)
                            c["prompt_token_ids"] = t.prompt_ids
                            c["blockrl"] = P.extension(t, d.option)
                        elif not ev.tokens:
                            continue
                        yield _sse(
                            {"id": rid, "object": obj, "created": created, "model": name, "choices": [c]}
                        )
                    if body.stream_options and body.stream_options.include_usage:
                        usage = _usage(prompt_tokens, completion_tokens)
                        yield _sse(
                            {
                                "id": rid,
                                "object": obj,
                                "created": created,
                                "model": name,
                                "choices": [],
                                "usage": usage,
                            }
                        )
                    yield "data: [DONE]\n\n"
                    metrics.requests.labels(path, "200").inc()
                finally:
                    if done < n_choices:
                        scheduler.cancel(sub.sub_id)  # the client went away: free its slots
                    metrics.latency.labels(path).observe(time.perf_counter() - t0)

            return StreamingResponse(events(), media_type="text/event-stream")

        finished: dict[int, tuple] = {}
        try:
            while len(finished) < n_choices:
                try:
                    d = await asyncio.wait_for(q.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(sub.sub_id)
                        return Response(status_code=499)
                    continue
                if d.error is not None:
                    raise P.APIError(d.error, status=500, code="engine_error")
                finished[d.choice] = (d.event.finished, d.option)  # non-streamed: only finished choices come
        except asyncio.CancelledError:
            scheduler.cancel(sub.sub_id)
            raise
        choices = []
        for i in range(n_choices):
            t, option = finished[i]
            c = {"index": i, "finish_reason": P.FINISH.get(t.finish_reason, t.finish_reason)}
            streams[i].tokens = t.tokens
            text = streams[i].final_text()
            if kind == "chat":
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            c["logprobs"] = choice_logprobs(t.tokens, t.behavior_logprobs, t.top_logprobs, 0)
            c |= {"token_ids": t.tokens, "prompt_token_ids": t.prompt_ids, "blockrl": P.extension(t, option)}
            choices.append(c)
        metrics.requests.labels(path, "200").inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": name,
            "choices": choices,
            "usage": _usage(prompt_tokens, sum(finished[i][0].num_tokens for i in range(n_choices))),
            "policy_version": finished[0][0].policy_version,
        }

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest, body: P.CompletionRequest):
        _check_key(request)
        prompts = _encode_prompts(body.prompt, tokenizer, policy.config.vocab_size)
        want = body.logprobs if body.logprobs is not None else None
        return await _run(request, body, prompts, "prompt", "completion", want)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest, body: P.ChatRequest):
        _check_key(request)
        if tokenizer is None:
            raise P.APIError("chat needs the checkpoint's tokenizer", "messages")
        try:
            prompt = encode_chat_prompt(tokenizer, [m.as_dict() for m in body.messages])
        except (ChatFormatError, ValueError) as e:
            raise P.APIError(f"messages: {e}", "messages") from e
        want = (body.top_logprobs or 0) if body.logprobs else None
        return await _run(request, body, [prompt], "messages", "chat", want)

    # ------------------------------------------------------------------------------------------ weights
    @app.post("/v1/weights")
    async def weights(request: HTTPRequest, body: P.WeightUpdate):
        token = os.environ.get(cfg.admin_token_env) or cfg.admin_token
        if not token:
            raise P.APIError(f"weight updates are disabled: set ${cfg.admin_token_env}", status=403)
        if not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
            raise P.APIError("invalid admin token", code="invalid_admin_token", status=401)
        path = Path(body.checkpoint).resolve()
        if cfg.weights_root is not None and not path.is_relative_to(Path(cfg.weights_root).resolve()):
            raise P.APIError(f"checkpoint: {path} is outside weights_root {cfg.weights_root}", "checkpoint")
        if not (path / "config.json").is_file():
            raise P.APIError(missing_checkpoint(body.checkpoint, "checkpoint"), "checkpoint")
        t0 = time.perf_counter()
        try:
            state = await asyncio.to_thread(_compatible_state, path, policy, cfg)
        except P.APIError:
            raise
        except Exception as e:  # not loadable as a blockrl checkpoint
            raise P.APIError(f"checkpoint: {path} did not load: {e}", "checkpoint") from e
        version = body.policy_version if body.policy_version is not None else scheduler.version + 1
        try:
            new = await asyncio.wrap_future(scheduler.update_weights(state, version, body.on_weight_update))
        except UpdateInProgress as e:
            raise P.APIError(str(e), code="update_in_progress", status=409) from e
        except Exception as e:  # the weights did not load: the old ones keep serving
            raise P.APIError(f"checkpoint: {e}", "checkpoint") from e
        metrics.requests.labels(request.url.path, "200").inc()
        return {"policy_version": new, "checkpoint": str(path), "seconds": time.perf_counter() - t0}

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _encode_prompts(prompt, tokenizer, vocab: int) -> list[list[int]]:
    """`prompt` as OpenAI allows it (a text, texts, token ids, lists of token ids) -> token ids per prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if tokenizer is None:
                raise P.APIError("prompt: text needs the checkpoint's tokenizer; send token ids", "prompt")
            ids = encode_prompt(tokenizer, p, "text")
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise P.APIError(
                    f"prompt[{i}]: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt"
                )
        if not ids:
            raise P.APIError(f"prompt[{i}]: empty", "prompt")
        out.append(ids)
    return out


def _compatible_state(path: Path, policy: HybridPolicy, cfg: ServeConfig) -> dict:
    """The new checkpoint's weights, after checking they fit the served model (same tensors, shapes, mask token)."""
    new = HybridPolicy.from_pretrained(path, dtype=cfg.torch_dtype)
    if new.mask_token_id != policy.mask_token_id:
        raise P.APIError(
            f"checkpoint: mask token {new.mask_token_id} differs from the served model's {policy.mask_token_id}",
            "checkpoint",
        )
    have = policy.model.state_dict()
    state = new.model.state_dict()
    for k, v in have.items():
        if k not in state or state[k].shape != v.shape:
            got = "missing" if k not in state else tuple(state[k].shape)
            raise P.APIError(f"checkpoint: {k} is {got}, the served model has {tuple(v.shape)}", "checkpoint")
    extra = sorted(set(state) - set(have))
    if extra:
        raise P.APIError(f"checkpoint: {extra[0]} is not a tensor of the served model", "checkpoint")
    return state  # on the host: load_state_dict copies tensor by tensor, never two models on the device

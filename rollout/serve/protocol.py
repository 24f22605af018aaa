"""The OpenAI wire format the server speaks: request bodies in (validated, with errors that name the parameter),
response and stream-chunk bodies out, and the text of a choice as its tokens arrive.

Extensions, all optional: requests may name a `sampler` (ar | lossless | logit_mix | auto), a `top_k`, an
`on_weight_update` policy, and pass prompts as token ids (`prompt` as a list of ints, as OpenAI allows). Every choice
carries `token_ids` and `prompt_token_ids` (so RL callers never re-tokenize) and a `blockrl` object: behaviour and
AR log-probs per token, accept and draft counts per decode step, tokens per forward, the sampler option that ran it
and the policy version that produced it.

Log-probs: `logprob` is the token's log-probability under the distribution it was drawn from (the target after
temperature, top-k and top-p: the AR policy's for lossless, the mixed target for logit_mix); at temperature 0,
greedy, it is the model's log-softmax, and `top_logprobs` are always from that same distribution.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout.types import Trajectory

SamplerName = Literal["ar", "lossless", "logit_mix", "auto"]
FINISH = {"eos": "stop", "stop_string": "stop", "length": "length", "abort": "abort", "cancelled": "abort"}


class APIError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status in (401, 403):
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (unknown fields are ignored, as OpenAI servers do)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    sampler: SamplerName | None = None
    on_weight_update: Literal["finish", "cancel"] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(
                    f"{name} is not supported (the samplers draw from the policy's own distribution)"
                )
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 sequences")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt: empty")
        return self

    @property
    def top_logprobs(self) -> int:
        return self.logprobs or 0


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ValueError("messages: only text content parts are supported")
            content = "".join(p.text or "" for p in content)
        return {"role": self.role, "content": content or ""}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _budget(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self


class WeightUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    policy_version: int | None = Field(None, ge=0)
    on_weight_update: Literal["finish", "cancel"] | None = None


# ------------------------------------------------------------------------------------------ text of a choice
class TextStream:
    """A choice's text as its tokens arrive: deltas that never need taking back. Text that might still turn out to
    start a stop sequence (its last len(stop) - 1 characters) and a trailing incomplete UTF-8 character are held
    until the next tokens or the end; the final text ends before the stop sequence, as OpenAI's does (the token
    ids keep everything through the token that completed it)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def final_text(self) -> str:
        full = self.text()
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=len(full))
        return full[:cut]

    def push(self, tokens: list[int], finished: bool) -> str:
        self.tokens += tokens
        if finished:
            out = self.final_text()
            if len(out) < self.sent:  # a stop the engine's token window missed, in text already sent: keep it
                out = self.text()[: self.sent]
        else:
            out = self.text()
            out = out[: max(self.sent, len(out) - self.hold)]
            out = out.rstrip("\ufffd")
        delta = out[self.sent :]
        self.sent = max(self.sent, len(out))
        return delta


# ------------------------------------------------------------------------------------------ response bodies
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def extension(t: Trajectory, option: str) -> dict:
    """The `blockrl` object of a finished choice."""
    return {
        "behavior_logprobs": t.behavior_logprobs,
        "ar_logprobs": t.ar_logprobs,
        "accept_counts": t.accept_counts,
        "draft_counts": t.draft_counts,
        "num_forwards": t.num_forwards,
        "tokens_per_forward": t.tokens_per_forward,
        "sampler": option or t.sampler,
        "policy_version": t.policy_version,
    }


def _piece(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid], skip_special_tokens=False)


def token_logprobs(
    tokens: list[int], logprobs: list[float], alts: list | None, greedy: bool
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token, its log-prob, alternatives) per token. Greedy rows report the model's log-softmax (the behaviour
    distribution is a point mass): the chosen token's entry among the alternatives, which always hold it."""
    out = []
    for i, (tok, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        a = alts[i] if alts is not None else []
        if greedy:  # the chosen token is the argmax: its entry, or (a tie ranked another first) the top value
            lp = dict(a).get(tok, a[0][1] if a else lp)
        out.append((tok, lp, a))
    return out


def completion_logprobs(tokenizer, rows, want: int, offset0: int = 0) -> dict:
    """The legacy completions `logprobs` object."""
    pieces = [_piece(tokenizer, t) for t, _, _ in rows]
    offsets, off = [], offset0
    for p in pieces:
        offsets.append(off)
        off += len(p)
    return {
        "tokens": pieces,
        "token_logprobs": [lp for _, lp, _ in rows],
        "top_logprobs": [{_piece(tokenizer, i): v for i, v in a[:want]} for _, _, a in rows],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, rows, want: int) -> dict:
    """The chat `logprobs` object."""

    def entry(tid: int, lp: float) -> dict:
        piece = _piece(tokenizer, tid)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    return {
        "content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in a[:want]]} for t, lp, a in rows]
    }

"""Where a completion stops: EOS, a stop string, or the token budget. One rule for the engine (`EngineCore.emit`,
checked on each step's new tokens) and the server's HF backend (whole completions)."""

from __future__ import annotations

from rollout.types import SamplingParams


def find_stop(tokens: list[int], start: int, p: SamplingParams, tokenizer=None) -> tuple[int | None, str]:
    """Length to keep if a stop falls in tokens[start:] (the tokens added since the last check), else None, and
    why: "eos", "stop_string" or "length". EOS is kept; nothing after a stop is."""
    cut, reason = None, ""
    if p.eos_token_id is not None:
        eos = {p.eos_token_id} if isinstance(p.eos_token_id, int) else set(p.eos_token_id)
        for i in range(start, len(tokens)):
            if tokens[i] in eos:
                cut, reason = i + 1, "eos"
                break
    if p.stop_strings:
        end = cut or len(tokens)
        # a stop string spans at most len(stop) tokens (one char or more each), and none ended before `start`
        lo = max(0, start - max(map(len, p.stop_strings)))
        for i in range(start, end):
            text = tokenizer.decode(tokens[lo : i + 1])
            if any(s in text for s in p.stop_strings):
                cut, reason = i + 1, "stop_string"
                break
    if (cut is None and len(tokens) >= p.max_new_tokens) or (cut is not None and cut > p.max_new_tokens):
        cut, reason = p.max_new_tokens, "length"
    return cut, reason

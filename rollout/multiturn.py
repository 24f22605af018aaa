"""Multi-turn episodes: the engine's model turns interleaved with an environment's replies.

`run_turns` is the one loop, shared by gymnasium text envs (`run_episodes`, used by the Ray workers) and the TRL
adapter's `turn_fn`. All episodes of a batch advance together: one engine call per round decodes every live
episode's next model turn (stopping at `stop_strings` such as tool-call closing tags, EOS or the remaining token
budget); `respond` then gives each episode's reply (or ends it), and the reply is appended as observation tokens.
The result is one `Trajectory` per episode whose `tokens` hold the whole exchange after the prompt, with `env_mask`
(1 = model token, 0 = env token: never trained on), `turn_ends`, and log-probs (0 on env tokens). The prefix is
re-prefilled each round; turns are short next to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import gymnasium as gym

import envs  # noqa: F401 (registers the blockrl/... env ids)
from policy.tokenizer import encode_prompt
from rollout.types import SamplingParams, Trajectory, with_eos

# (episode index, the episode so far, this turn's tokens, this turn's finish reason) -> reply token ids, or None to
# end the episode. Called after every model turn.
Respond = Callable[[int, Trajectory, list[int], str], list[int] | None]


def run_turns(
    engine,
    prompt_ids: Sequence[list[int]],
    sampling: SamplingParams,
    respond: Respond,
    index_offset: int = 0,
    max_turns: int = 8,
    seed_stride: int = 7919,
) -> list[Trajectory]:
    """Episodes of up to `max_turns` model turns; `sampling.max_new_tokens` budgets each episode's tokens (model and
    env). Round r draws from seed `sampling.seed + seed_stride * r` and, per row, (offset + its position among the
    live rows): deterministic for a given batch."""
    budget = sampling.max_new_tokens
    eps = [
        Trajectory(prompt_ids=list(p), env_mask=[], policy_version=engine.policy_version) for p in prompt_ids
    ]
    live = list(range(len(eps)))
    for turn in range(max_turns):
        live = [i for i in live if len(eps[i].tokens) < budget]
        if not live:
            break
        left = [budget - len(eps[i].tokens) for i in live]
        params = dataclasses.replace(
            sampling, max_new_tokens=max(left), seed=sampling.seed + seed_stride * turn
        )
        outs = engine.run(
            [eps[i].prompt_ids + eps[i].tokens for i in live], params, index_offset=index_offset
        )
        still = []
        for i, t, n in zip(live, outs, left, strict=True):
            ep = eps[i]
            if len(t.tokens) > n:  # a prefix of an exact sample is an exact sample of the shorter budget
                t.tokens, t.finish_reason = t.tokens[:n], "length"
            k = len(t.tokens)
            _append(ep, t.tokens, t.behavior_logprobs[:k], t.ar_logprobs[:k], model=True)
            ep.accept_counts += t.accept_counts
            ep.draft_counts += t.draft_counts
            ep.num_forwards += t.num_forwards
            ep.finish_reason = t.finish_reason
            ep.sampler = t.sampler if ep.sampler in ("", t.sampler) else "auto"  # turns may run other options
            ep.turn_ends.append(len(ep.tokens) - 1)
            reply = respond(i, ep, t.tokens, t.finish_reason)
            if not reply:
                continue
            reply = list(reply)[: budget - len(ep.tokens)]
            _append(ep, reply, [0.0] * len(reply), [0.0] * len(reply), model=False)
            still.append(i)
        live = still
    return eps


def run_episodes(
    engine,
    tok,
    env_id: str,
    env_seeds: list[int],
    sampling: SamplingParams,
    index_offset: int = 0,
    max_turns: int = 8,
) -> list[Trajectory]:
    """One episode of gym env `env_id` per seed (`env.reset(seed=...)`); the env's reward after each model turn goes
    to `turn_rewards`, and a turn that ends on one of the env's `turn_stops` (its tool-call tags) gets its reply."""
    envs_ = [gym.make(env_id).unwrapped for _ in env_seeds]
    # a model turn ends where the env takes over: its tool-call closing tags (env.turn_stops), EOS, or the budget
    stops = tuple(sampling.stop_strings) + tuple(getattr(envs_[0], "turn_stops", ()))
    prompts = [
        encode_prompt(tok, env.reset(seed=seed)[0]) for env, seed in zip(envs_, env_seeds, strict=True)
    ]

    def respond(i: int, ep: Trajectory, turn: list[int], finish: str) -> list[int] | None:
        obs, reward, terminated, truncated, _ = envs_[i].step(tok.decode(turn, skip_special_tokens=True))
        ep.turn_rewards.append(float(reward))
        if terminated or truncated or finish != "stop_string" or not obs:
            return None
        return tok(obs, add_special_tokens=False)["input_ids"]

    params = dataclasses.replace(with_eos(sampling, engine.eos_ids), stop_strings=stops)
    return run_turns(engine, prompts, params, respond, index_offset=index_offset, max_turns=max_turns)


def _append(ep: Trajectory, tokens, behavior, ar, model: bool) -> None:
    ep.tokens += list(tokens)
    ep.behavior_logprobs += list(behavior)
    ep.ar_logprobs += list(ar)
    ep.env_mask += [int(model)] * len(tokens)

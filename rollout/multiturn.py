"""Multi-turn episodes: the engine's model turns interleaved with a gymnasium text env's turns.

All episodes of a batch advance together: one `BlockEngine.generate` call per round decodes every live episode's next
model turn (stopping at the env's `turn_stops` tool-call tags, EOS or the remaining token budget), each env then replies, and its
reply is appended as observation tokens. The result is one `Trajectory` per episode whose `tokens` hold the whole
exchange after the prompt, with `env_mask` (1 = model token, 0 = env token: never trained on), per-turn rewards at
`turn_ends`, and log-probs (0 on env tokens). The prefix is re-prefilled each round; turns are short next to it.
"""

from __future__ import annotations

import gymnasium as gym

import envs  # noqa: F401 (registers the blockrl/... env ids)
from rollout.engine import BlockEngine
from rollout.types import Trajectory


def run_episodes(engine: BlockEngine, tok, env_id: str, env_seeds: list[int], sampling: dict,
                 index_offset: int = 0, max_turns: int = 8) -> list[Trajectory]:  # fmt: skip
    """One episode per seed (`env.reset(seed=...)`); `sampling['max_new_tokens']` budgets each episode's tokens."""
    sampling = dict(sampling)
    budget = sampling.pop("max_new_tokens", 128)
    base_seed = sampling.pop("seed", 0)
    envs_ = [gym.make(env_id).unwrapped for _ in env_seeds]
    # a model turn ends where the env takes over: its tool-call closing tags (env.turn_stops), EOS, or the budget
    stops = tuple(sampling.pop("stop_strings", ())) + tuple(getattr(envs_[0], "turn_stops", ()))
    eps = []
    for env, seed in zip(envs_, env_seeds, strict=True):
        prompt, _ = env.reset(seed=seed)
        ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
        eps.append(Trajectory(prompt_ids=ids, env_mask=[], policy_version=engine.policy_version))
    live = list(range(len(eps)))
    for turn in range(max_turns):
        live = [i for i in live if len(eps[i].tokens) < budget]
        if not live:
            break
        # one engine call per round decodes every live episode's turn (ragged rows batch inside the engine); a row
        # draws from (seed + turn, offset + its position among the live rows), deterministic for the shard
        left = [budget - len(eps[i].tokens) for i in live]
        outs = engine.generate([eps[i].prompt_ids + eps[i].tokens for i in live], max_new_tokens=max(left),
                               seed=base_seed + 7919 * turn, stop_strings=stops, index_offset=index_offset,
                               **sampling)  # fmt: skip
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
            obs, reward, terminated, truncated, _ = envs_[i].step(
                tok.decode(t.tokens, skip_special_tokens=True)
            )
            ep.turn_ends.append(len(ep.tokens) - 1)
            ep.turn_rewards.append(float(reward))
            if terminated or truncated or t.finish_reason != "stop_string" or not obs:
                continue
            reply = tok(obs, add_special_tokens=False)["input_ids"][: budget - len(ep.tokens)]
            _append(ep, reply, [0.0] * len(reply), [0.0] * len(reply), model=False)
            still.append(i)
        live = still
    return eps


def _append(ep: Trajectory, tokens, behavior, ar, model: bool) -> None:
    ep.tokens += list(tokens)
    ep.behavior_logprobs += list(behavior)
    ep.ar_logprobs += list(ar)
    ep.env_mask += [int(model)] * len(tokens)

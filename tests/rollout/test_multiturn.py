"""Multi-turn episodes: env turns interleave with model turns, are masked out of training, and the model's tokens stay
exact AR samples whose log-probs match a from-scratch forward over the whole exchange."""

import gymnasium as gym
import pytest
import torch

from envs.text_env import TextEnv
from policy import HybridPolicy
from policy.factory import build_model, tiny_moe_config
from rollout import BlockEngine
from rollout.multiturn import run_episodes
from rollout.types import SamplingParams
from trainers.rl.learner import RolloutBatch, token_logprobs

REPLY = "=ok\n"


class ToolEchoEnv(TextEnv):
    """Every model turn that ends in a vowel 'calls the tool': the env answers REPLY (reward 0.25); the third turn or a
    turn ending any other way ends the episode (reward 1)."""

    turn_stops = tuple("aeiou")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turns = 0
        return "say: hi\n", {}

    def step(self, action):
        self.turns += 1
        if self.turns >= 3 or not action or action[-1] not in self.turn_stops:
            return "", 1.0, True, False, {}
        return REPLY, 0.25, False, False, {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from policy.tokenizer import build_char_tokenizer

    if "test/tool-echo-v0" not in gym.registry:
        gym.register(id="test/tool-echo-v0", entry_point=ToolEchoEnv)
    tok = build_char_tokenizer()
    policy = HybridPolicy(build_model(tiny_moe_config(len(tok)), seed=3))
    policy.convert(tok, block_size=4)
    return policy.eval(), tok


def test_env_turns_interleave_masked_and_model_tokens_stay_exact(setup):
    policy, tok = setup
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=8, tokenizer=tok)
    eps = run_episodes(
        eng, tok, "test/tool-echo-v0", list(range(12)), SamplingParams(max_new_tokens=60, seed=5)
    )
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    multi = [e for e in eps if len(e.turn_ends) > 1]
    assert multi, "no episode reached a second turn"
    for e in eps:
        assert len(e.env_mask) == len(e.tokens) == len(e.ar_logprobs) == len(e.behavior_logprobs)
        assert len(e.turn_rewards) == len(e.turn_ends) <= 3
        # every non-final turn is followed by exactly the env's reply
        for k, end in enumerate(e.turn_ends[:-1]):
            assert e.env_mask[end] == 1 and e.tokens[end + 1 : end + 1 + len(reply)] == reply
            assert e.env_mask[end + 1 : end + 1 + len(reply)] == [0] * len(reply)
            assert e.turn_ends[k + 1] > end + len(reply)
        assert sum(e.env_mask) == len(e.tokens) - len(reply) * (len(e.turn_ends) - 1)
        assert e.turn_rewards[-1] == 1.0 or len(e.tokens) >= 60
    # learner view: env tokens are not loss positions; rewards sit on the turns' last model tokens
    batch = RolloutBatch.from_trajectories(eps, [sum(e.turn_rewards) for e in eps], 4, tok.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(
            policy(input_ids=batch.input_ids, attention_mask=batch.valid).logits, batch.input_ids, 1.0
        )
    m = batch.completion.bool()
    assert (lp[m] - batch.ar_logprobs[m]).abs().max() <= 1e-4  # exact on-policy log-probs across turns
    assert int(m.sum()) == sum(sum(e.env_mask) for e in eps)
    assert bool((batch.token_rewards[~m] == 0).all())
    # each turn's reward sits on its last model token, recomputed from the turn's text
    for i, e in enumerate(eps):
        start, P = 0, len(e.prompt_ids)
        for k, end in enumerate(e.turn_ends):
            text = tok.decode(e.tokens[start : end + 1], skip_special_tokens=True)
            want = 1.0 if k + 1 >= 3 or not text or text[-1] not in ToolEchoEnv.turn_stops else 0.25
            assert float(batch.token_rewards[i, P + end]) == want
            start = end + 1 + len(reply)
        assert float(batch.token_rewards[i].sum()) == sum(e.turn_rewards)


def test_episodes_are_reproducible_from_seeds(setup):
    policy, tok = setup
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=8, tokenizer=tok)
    a = run_episodes(eng, tok, "test/tool-echo-v0", [1, 2, 3], SamplingParams(max_new_tokens=40, seed=9))
    b = run_episodes(eng, tok, "test/tool-echo-v0", [1, 2, 3], SamplingParams(max_new_tokens=40, seed=9))
    assert [e.tokens for e in a] == [e.tokens for e in b]

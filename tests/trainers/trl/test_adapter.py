"""TRL adapter: real `trl.GRPOTrainer` steps on CPU with the shipped checkpoint and blockrl's rollout_func.

Compared: the rollout's behaviour log-probs with the trainer's own recomputed log-probs (lossless = equal), the
trainer's weights before and after, the engine's policy_version / weights with the trainer's at every call, the
env_mask with the env-reply tokens it must zero, and the importance weights with min(pi_AR / pi_behaviour, C).
"""

from __future__ import annotations

import copy
import json
import math
from itertools import groupby

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from envs.tasks import iter_samples
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from trainers.rl.losses import ImportanceConfig, importance_weights
from trainers.trl.adapter import (
    BlockGRPOTrainer,
    BlockRolloutFunc,
    TRLRolloutConfig,
    copy_checksum,
    tokenize_prompts,
    weights_fingerprint,
)

CKPT = "checkpoints/tiny-moe"
MAX_LEN = 24


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # NOTE: two torch threads on a shared 2-core machine spin against each other (30x slower measured here)
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CKPT)


@pytest.fixture(scope="module")
def dataset(tok):
    return Dataset.from_list([{"prompt": tok.bos_token + s.prompt} for s in iter_samples("chain_sum", 4, 11)])


def make_trainer(
    tmp_path, tok, dataset, rollout, cls=GRPOTrainer, steps=2, reward_log=None, trainer_kw=None, **kw
):
    def reward(prompts, completions, completion_ids, **extra):
        if reward_log is not None:
            reward_log.append({"completion_ids": completion_ids, **extra})
        return [float(len(c)) / MAX_LEN for c in completions]  # any varying reward: nonzero advantages

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=MAX_LEN,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **kw,
    )
    model = AutoModelForCausalLM.from_pretrained(CKPT)
    trainer = cls(
        model=model,
        processing_class=tok,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        rollout_func=rollout,
        **(trainer_kw or {}),
    )
    return trainer, model


def test_importance_weights_match_truncated_ratio():
    """Weights are 1 where behaviour == AR (lossless), exactly pi_AR/pi_b below C, C above it, 1 off the mask."""
    ar = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert torch.equal(importance_weights(ar, ar.clone(), mask, ImportanceConfig()), torch.ones_like(ar))
    behavior = torch.tensor([[-0.5, -4.0, -0.5, -0.1]])  # token 0: pi_b > pi_AR; token 1: pi_AR >> pi_b
    w = importance_weights(ar, behavior, mask, ImportanceConfig(cap=3.0))
    assert w[0, 0] == pytest.approx(math.exp(-0.5), rel=1e-6) and w[0, 0] < 1
    assert w[0, 1] == pytest.approx(3.0)  # exp(2) = 7.4 truncated to C
    assert w[0, 2] == 1.0 and w[0, 3] == 1.0  # equal; masked out
    seq = importance_weights(ar, behavior, mask, ImportanceConfig(cap=3.0, level="sequence"))
    assert torch.allclose(seq[0, :3], torch.full((3,), min(math.exp(-0.5 + 2.0), 3.0)))
    dropped = importance_weights(ar, behavior, mask, ImportanceConfig(cap=3.0, mode="mask"))
    assert dropped[0, 1] == 0.0 and dropped[0, 0] == pytest.approx(math.exp(-0.5), rel=1e-6)
    with pytest.raises(ValueError, match="level"):
        ImportanceConfig(level="bogus")


def test_two_grpo_steps_lossless_shared_weights(tmp_path, tok, dataset):
    """Two real TRL steps: weights move, every call generates with the current step's weights, lossless logprobs
    equal the trainer's recomputed AR log-probs, and the acceptance stats reach the reward function and the log."""
    rollout = BlockRolloutFunc(sampler="lossless", levels=[0, 4, 8])
    seen = []
    trainer, model = make_trainer(tmp_path, tok, dataset, rollout, BlockGRPOTrainer, reward_log=seen)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters()), "no weight moved"
    assert [r.global_step for r in rollout.history] == [0, 1]
    assert all(r.shared and not r.loaded for r in rollout.history)
    # step 1 generated with new weights
    assert rollout.history[0].fingerprint != rollout.history[1].fingerprint
    assert model.training  # the engine's eval() did not leak into training

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        # behaviour == AR (lossless), up to float noise
        assert h["sampling/sampling_logp_difference/max"] < 1e-3
        assert abs(h["sampling/importance_sampling_ratio/min"] - 1) < 1e-3
        assert abs(h["sampling/importance_sampling_ratio/max"] - 1) < 1e-3
        assert h["rollout/tokens_per_forward"] >= 1.0 and 0.0 <= h["rollout/accept_rate"] <= 1.0
        assert h["completions/max_length"] <= MAX_LEN
    assert [h["rollout/policy_version"] for h in logs] == [0.0, 1.0]

    for call, batch in enumerate(seen):
        n = len(batch["completion_ids"])
        assert n == 8
        assert all(1 <= len(c) <= MAX_LEN for c in batch["completion_ids"])
        assert len(batch["tokens_per_forward"]) == n and all(t >= 1.0 for t in batch["tokens_per_forward"])
        assert batch["policy_version"] == [call] * n


def test_plain_model_rolls_out_with_history_drafts(tmp_path, tok, dataset):
    """A trainer's model that was never converted (no blockrl metadata): the engine drafts from history only, and
    the lossless rollouts' log-probs still equal the trainer's own."""
    rollout = BlockRolloutFunc(sampler="lossless", levels=["end"])
    trainer, model = make_trainer(tmp_path, tok, dataset, rollout, BlockGRPOTrainer, steps=1)
    delattr(model.config, "blockrl")  # as a plain HF checkpoint loads
    trainer.train()
    assert rollout.engine.option.name == "lossless[history]"
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["sampling/sampling_logp_difference/max"] < 1e-3
    assert log["rollout/tokens_per_forward"] >= 1.0


def test_separate_copy_is_loaded_only_when_the_version_moves(tmp_path, tok, dataset):
    """A separate engine policy is re-loaded after every optimizer step and equals the trainer's weights."""
    engine_policy = HybridPolicy.from_pretrained(CKPT)
    with torch.no_grad():  # start the copy off: the first call must load the trainer's weights
        next(engine_policy.parameters()).add_(1.0)
    rollout = BlockRolloutFunc(TRLRolloutConfig(sampler="lossless"), policy=engine_policy)
    trainer, model = make_trainer(tmp_path, tok, dataset, rollout, steps=2)
    trainer.train()
    assert [(r.global_step, r.shared, r.loaded) for r in rollout.history] == [
        (0, False, True),
        (1, False, True),
    ]

    rec = rollout.sync(trainer)  # the last optimizer step happened after the last rollout
    assert rec.loaded and rec.global_step == 2
    assert weights_fingerprint(engine_policy.model) == weights_fingerprint(model)
    assert copy_checksum(engine_policy.model) == copy_checksum(model)
    assert not rollout.sync(trainer).loaded  # nothing changed: no copy


def test_stale_or_modified_engine_copy_is_refused(tmp_path, tok, dataset, monkeypatch):
    """The engine's copy itself is checksummed before each rollout: a load that never reached it, or a change made
    after the sync, raises instead of generating with weights the trainer does not have."""
    engine_policy = HybridPolicy.from_pretrained(CKPT)
    with torch.no_grad():
        next(engine_policy.parameters()).add_(1.0)
    trainer, _ = make_trainer(tmp_path, tok, dataset, None)
    prompts = [row["prompt"] for row in dataset.select(range(2))]

    with monkeypatch.context() as m:  # the copy silently stays stale
        m.setattr(engine_policy.model, "load_state_dict", lambda *a, **k: None)
        with pytest.raises(RuntimeError, match="weight copy differs"):
            BlockRolloutFunc(sampler="lossless", policy=engine_policy)(prompts, trainer)

    rollout = BlockRolloutFunc(sampler="lossless", policy=engine_policy)
    assert rollout(prompts, trainer)["policy_version"] == [0, 0]  # a faithful copy passes
    name, param = next(iter(engine_policy.model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] += 1e-3  # modified after the sync; the version did not move, so nothing re-loads
    with pytest.raises(RuntimeError, match=f"weight copy differs.*{name}"):
        rollout(prompts, trainer)


def test_engine_copy_in_another_dtype_verifies(tmp_path, tok, dataset):
    """A bf16 engine copy of the fp32 trainer passes the checksum (compared in the copy's dtype), and fails it when
    an entry the checksum samples is off by more than bf16 rounding."""
    engine_policy = HybridPolicy.from_pretrained(CKPT, dtype=torch.bfloat16)
    trainer, model = make_trainer(tmp_path, tok, dataset, None)
    rollout = BlockRolloutFunc(sampler="lossless", policy=engine_policy)
    assert rollout.sync(trainer).loaded
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0  # the trainer moved; the step and so the version did not
    rollout._synced = (trainer.state.global_step, weights_fingerprint(model))  # pretend it was synced
    with pytest.raises(RuntimeError, match="weight copy differs"):
        rollout.sync(trainer)


def test_logit_mix_batches_get_truncated_importance_weights(tmp_path, tok, dataset):
    """logit_mix behaviour log-probs differ from AR: the loss sees advantage * min(pi_AR / pi_b, C) per token, with
    pi_AR recomputed here by a plain forward of the model at the weights that generated the batch."""
    rollout = BlockRolloutFunc(sampler="logit_mix", mix_weight=0.3, levels=[0, 4, 8])
    assert rollout.off_policy
    returned = []

    def spy_rollout(prompts, trainer):
        returned.append(rollout(prompts, trainer))
        return returned[-1]

    temperature = 0.7
    trainer, model = make_trainer(
        tmp_path, tok, dataset, spy_rollout, BlockGRPOTrainer, steps=1, temperature=temperature
    )
    batches, compute = [], trainer._compute_loss

    def spy_loss(m, inputs):  # runs before the optimizer step: the weights that generated the batch
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logits = model(input_ids=ids, attention_mask=attn).logits[
                :, inputs["prompt_ids"].size(1) - 1 : -1
            ]
            logp = torch.log_softmax(logits.float() / temperature, -1)
            batches.append((inputs, logp.gather(-1, inputs["completion_ids"][..., None])[..., 0]))
        return compute(m, inputs)

    trainer._compute_loss = spy_loss
    trainer.train()
    (inputs, ar), out = batches[0], returned[0]
    w, adv, mask = inputs["importance_weights"], inputs["advantages"], inputs["completion_mask"].bool()
    behavior = inputs["sampling_per_token_logps"]
    # the batch's behaviour = the rollout's logprobs
    for row, ids in enumerate(inputs["completion_ids"].tolist()):
        n = int(mask[row].sum())
        same = [lp for c, lp in zip(out["completion_ids"], out["logprobs"], strict=True) if c == ids[:n]]
        assert any(torch.allclose(behavior[row, :n], torch.tensor(lp)) for lp in same)

    expected = torch.exp(ar - behavior).clamp(max=trainer.importance.cap)
    assert adv.shape == w.shape == mask.shape
    assert torch.allclose(w[mask], expected[mask], rtol=1e-3, atol=1e-4)
    assert (expected[mask] < 1 - 1e-3).any(), (
        "logit_mix rollouts should have tokens the AR policy finds less likely"
    )
    assert torch.equal(w[~mask], torch.ones_like(w[~mask]))
    base = adv[mask] / expected[mask]  # must be one GRPO advantage per sequence, scaled token by token
    rows = mask.nonzero()[:, 0]
    seq_adv = torch.stack([base[rows == r].mean() for r in range(len(mask))])
    assert torch.allclose(base, seq_adv[rows], rtol=1e-3, atol=1e-4)
    assert seq_adv.sum().abs() < 1e-3  # group-normalised advantages sum to zero over whole groups
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["sampling/importance_sampling_ratio/min"] < 1.0 and log["rollout/behavior_ar_logp_gap"] > 0


def test_truncated_sampling_is_refused_while_correcting(tmp_path, tok, dataset):
    """top_k/top_p make the rollout's log-probs truncated-distribution ones, TRL's full-softmax ones: the correction
    would be biased, so BlockGRPOTrainer refuses them (naming the field) unless the correction is off."""
    rollout = BlockRolloutFunc(sampler="logit_mix")
    with pytest.raises(ValueError, match="top_k"):
        make_trainer(tmp_path, tok, dataset, rollout, BlockGRPOTrainer, top_k=5)
    with pytest.raises(ValueError, match="top_p"):
        make_trainer(tmp_path, tok, dataset, rollout, BlockGRPOTrainer, top_p=0.9)
    trainer, _ = make_trainer(
        tmp_path,
        tok,
        dataset,
        rollout,
        BlockGRPOTrainer,
        top_k=5,
        trainer_kw={"importance": ImportanceConfig(level="off")},
    )
    assert trainer.importance.level == "off"


def test_multi_turn_env_mask_zeroes_env_replies(tmp_path, tok, dataset):
    """turn_fn replies after each line: its tokens sit in completion_ids with env_mask 0 and log-prob 0; one TRL step
    trains on the result."""
    reply = "=0\n"

    def turn_fn(prompt, completion):
        return reply if completion.count(reply) < 2 else None

    rollout = BlockRolloutFunc(sampler="lossless", stop_strings=["\n"], max_turns=3, turn_fn=turn_fn)
    trainer, _ = make_trainer(tmp_path, tok, dataset, rollout, steps=1)
    prompts = [row["prompt"] for row in dataset.select(range(2))]
    out = rollout(prompts, trainer)
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
    for ids, mask, lps in zip(out["completion_ids"], out["env_mask"], out["logprobs"], strict=True):
        assert len(ids) == len(mask) == len(lps) <= MAX_LEN
        runs = [(m, [i for i, _ in grp]) for m, grp in groupby(enumerate(mask), key=lambda x: x[1])]
        assert sum(m == 0 for m, _ in runs) <= 2
        for k, (m, pos) in enumerate(runs):
            if m == 1:
                continue
            toks = [ids[i] for i in pos]
            last = k == len(runs) - 1
            assert toks == reply_ids if not last else toks == reply_ids[: len(toks)]  # cut only by the budget
            assert all(lps[i] == 0.0 for i in pos)
            assert tok.decode([ids[i] for i in runs[k - 1][1]]).endswith("\n")  # the model turn hit the stop
    assert any(0 in m for m in out["env_mask"]), "no env turn happened"
    trainer.train()
    assert trainer.state.global_step == 1


CHAT_TEMPLATE = (
    "{% if tools %}tools:{{ tools | length }}\n{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'a' if short else 'assistant' }}:{% endif %}"
)
TOOL = {
    "type": "function",
    "function": {"name": "calc", "description": "add", "parameters": {"type": "object"}},
}


def test_prompts_are_tokenized_like_trl(tmp_path, tok, dataset):
    """The rollout's prompt_ids equal TRL's own `_tokenize_prompts` for string prompts, and for chat prompts with the
    trainer's chat_template_kwargs, tools and chat_template (each of which changes the ids)."""
    trainer, _ = make_trainer(tmp_path, tok, dataset, None)
    strings = [row["prompt"] for row in dataset.select(range(2))]
    assert tokenize_prompts(strings, tok) == [list(x) for x in trainer._tokenize_prompts(strings)[0]]

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    rollout = BlockRolloutFunc(sampler="lossless", max_new_tokens=4)
    trainer, _ = make_trainer(tmp_path, chat_tok, dataset, rollout, chat_template_kwargs={"short": True})
    chats = [[{"role": "user", "content": "sum: 1 + 2"}], [{"role": "user", "content": "hi"}]]
    plain = tokenize_prompts(chats, chat_tok)
    assert (
        [list(x) for x in trainer._tokenize_prompts(chats)[0]]
        == rollout(chats, trainer)["prompt_ids"]
        != plain
    )

    trainer.tools = [TOOL]  # what GRPOTrainer(tools=...) sets, and the template TRL would substitute
    trainer.chat_template = CHAT_TEMPLATE.replace("m['role'] }}", "m['role'] | upper }}")
    trl_ids = [list(x) for x in trainer._tokenize_prompts(chats)[0]]
    assert rollout(chats, trainer)["prompt_ids"] == trl_ids
    assert chat_tok.decode(trl_ids[1]).startswith("tools:1\nUSER: hi")

    with pytest.raises(ValueError, match="chat template"):
        tokenize_prompts(chats, tok)
    image = [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="multimodal"):
        tokenize_prompts([image], chat_tok)


def test_seeds_follow_global_step_not_call_history(tmp_path, tok, dataset):
    """A call's random streams depend on (seed, global_step, calls earlier at that step): a fresh adapter after a
    resume continues where an uninterrupted one would be, instead of replaying step 0's samples."""
    # hot: the model is peaked at T=1
    trainer, _ = make_trainer(tmp_path, tok, dataset, None, temperature=3.0)
    prompts = [row["prompt"] for row in dataset]

    def sample(rollout):
        return rollout(prompts, trainer)["completion_ids"]

    running = BlockRolloutFunc(sampler="lossless")
    first = sample(running)
    assert sample(BlockRolloutFunc(sampler="lossless")) == first  # same step, first call: same streams
    assert sample(running) != first  # a second call at the same step draws new ones
    trainer.state.global_step = 7  # as after resuming from a step-7 checkpoint
    resumed = sample(BlockRolloutFunc(sampler="lossless"))
    assert resumed != first
    assert sample(running) == resumed


def test_unsupported_generation_settings_fail_naming_the_field(tmp_path, tok, dataset):
    rollout = BlockRolloutFunc(sampler="lossless")
    trainer, _ = make_trainer(tmp_path, tok, dataset, rollout, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        rollout(["<bos>sum: 1 + 2\n"], trainer)
    with pytest.raises(ValueError, match="turn_fn needs stop_strings"):
        BlockRolloutFunc(turn_fn=lambda p, c: None)


def test_trl_bench_cli_alternates_variants_step_by_step(tmp_path):
    """`blockrl trl-bench` smoke: HF generate and our rollout_func run the same steps, interleaved one step at a time,
    and the JSON holds the medians and the ratio; a bad config exits 2 naming the field."""
    from trainers.cli import main

    out = tmp_path / "r.json"
    sets = [
        f"run_dir={tmp_path / 'run'}",
        "steps=2",
        "max_completion_length=16",
        "prompts_per_task=2",
        "tasks=[chain_sum]",
        "prompts_per_step=2",
        "num_generations=2",
    ]
    assert main(["trl-bench", "--json", str(out), *(a for s in sets for a in ("--set", s))]) == 0
    result = json.loads(out.read_text())
    starts = sorted((s["start_s"], v) for v, steps in result["steps"].items() for s in steps)
    assert [v for _, v in starts] == ["hf", "lossless"] * 2
    lossless = result["summary"]["lossless"]
    assert lossless["steps_counted"] == 1 and lossless["step_speedup_vs_hf"] > 0
    assert (tmp_path / "run" / "trl_bench.png").is_file()
    assert main(["trl-bench", "--set", "steps=1", "--set", "warmup_steps=1"]) == 2


def test_two_accelerate_processes_return_the_one_process_rollouts(tmp_path):
    """GRPOTrainer under accelerate with 2 CPU processes (torchrun, gloo, DDP): each process's engine decodes its
    share with the full weights, and the shares together are the rollouts one process returns for all the prompts
    with the same seeds; a real step keeps both processes' weights equal (tests/trainers/trl/two_processes.py)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    script = os.path.join(os.path.dirname(__file__), "two_processes.py")
    done = subprocess.run([*cmd, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["distributed_type"].endswith("MULTI_CPU")
    assert r0["fingerprint"] == r1["fingerprint"]  # both engines wrap the same full weights
    assert r0["per_process"] == r0["one_process"] and len(r0["one_process"]) == 8
    assert len({tuple(x) for x in r0["one_process"]}) > 1  # sampled, not one repeated answer
    assert (
        r0["after_step_fingerprint"] == r1["after_step_fingerprint"] != r0["fingerprint"]
    )  # trained, in step

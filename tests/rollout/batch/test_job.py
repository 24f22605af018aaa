"""`blockrl rollout` (rollout/batch/job.py, rollout/batch/io.py): complete, self-consistent rows; crash + resume reproduces an
uninterrupted run (task and multi-turn env prompts); config mismatch and malformed prompt files fail with messages
naming the field / file and row; the manifest follows content, not paths; env rows carry the env's rewards and masks;
`auto` rows name the sampler they used; the CLI path runs on two Ray workers and writes the same rows as an
in-process worker.

Generation uses the shipped checkpoint with short completions; all but one test use the in-process backend.
"""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from common.paths import SHIPPED_CHECKPOINT
from envs.tasks import iter_samples
from envs.text_env import TaskEnv
from policy.metadata import load_tokenizer
from rollout.batch.io import ManifestMismatchError, PromptFileError, env_seed
from rollout.batch.job import RolloutJobConfig, make_backend, run_job
from trainers.cli import main

CKPT = str(SHIPPED_CHECKPOINT)
TOK = load_tokenizer(CKPT)


def config(out_dir, **kw) -> RolloutJobConfig:
    base = {
        "out_dir": str(out_dir),
        "checkpoint": CKPT,
        "num_prompts": 3,
        "group_size": 2,
        "shard_size": 2,
        "max_new_tokens": 8,
        "levels": [0, 4],
        "max_batch": 4,
    }
    return RolloutJobConfig(**(base | kw))


@pytest.fixture(scope="module")
def local():
    """One in-process worker shared by the tests (the backend belongs to the caller, run_job leaves it open)."""
    return make_backend(config("unused"), kind="local")


def table(out_dir) -> pa.Table:
    return pq.read_table(out_dir).sort_by("sample_index")


class Crashing:
    """Yields the inner backend's first `after` shards, then dies as a killed driver would."""

    def __init__(self, inner, after: int):
        self.inner, self.after = inner, after

    def run(self, shards):
        for k, res in enumerate(self.inner.run(shards)):
            if k == self.after:
                raise RuntimeError("injected crash")
            yield res


class Recording:
    def __init__(self, inner):
        self.inner, self.shard_ids = inner, []

    def run(self, shards):
        for res in self.inner.run(shards):
            self.shard_ids.append(res.shard.shard_id)
            yield res


def test_rows_are_complete_and_self_consistent(tmp_path, local):
    """N = num_prompts * group_size rows, unique global indices, tokens agree with text and every per-token list."""
    cfg = config(tmp_path / "out", num_prompts=4, shard_size=3)
    summary = run_job(cfg, backend=local, progress=False)
    rows = table(cfg.out_dir).to_pylist()
    n = cfg.num_prompts * cfg.group_size
    assert summary.num_samples == len(rows) == n and summary.num_shards == 3  # ceil(8 / 3)
    assert [r["sample_index"] for r in rows] == list(range(n))
    assert [r["group_index"] for r in rows] == [i // 2 for i in range(n)]
    for r in rows:
        assert TOK.decode(r["tokens"], skip_special_tokens=True) == r["text"]
        assert TOK.decode(r["prompt_ids"], skip_special_tokens=True) == r["prompt"]
        assert 1 <= len(r["tokens"]) <= cfg.max_new_tokens
        assert len(r["behavior_logprobs"]) == len(r["ar_logprobs"]) == len(r["tokens"])
        assert all(lp <= 0 for lp in r["behavior_logprobs"])
        assert len(r["accept_counts"]) == len(r["draft_counts"]) and r["num_forwards"] >= 1
        assert r["tokens_per_forward"] == pytest.approx(len(r["tokens"]) / r["num_forwards"])
        assert r["finish_reason"] in ("eos", "stop_string", "length") and r["policy_version"] == 0
        assert r["task"] in cfg.tasks and 0.0 <= r["reward"] <= 1.0  # built-in task: scored
        assert r["sampler"] == "lossless[0, 4]"  # the configured sampler, named as auto names its options
        assert r["env_seed"] is None and r["env_mask"] is None and r["turn_ends"] == r["turn_rewards"] == []
    assert [r["task"] for r in rows[::2]] == [
        cfg.tasks[j % 3] for j in range(4)
    ]  # the mix cycles over prompts
    assert all(a["prompt"] == b["prompt"] for a, b in zip(rows[::2], rows[1::2], strict=True))  # groups
    assert len({tuple(r["tokens"]) for r in rows}) > 1  # distinct random streams per sample
    assert json.loads((Path(cfg.out_dir) / "_summary.json").read_text())["num_samples"] == n


def test_crash_then_resume_generates_only_missing_shards_and_equals_uninterrupted_run(tmp_path, local):
    """A run killed after 1 of 3 shards, resumed, then a deleted shard regenerated: only missing shards are generated
    and the dataset equals one written in a single uninterrupted run."""
    clean = config(tmp_path / "clean")
    run_job(clean, backend=local, progress=False)

    cfg = config(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="injected crash"):
        run_job(cfg, backend=Crashing(local, after=1), progress=False)
    out = Path(cfg.out_dir)
    assert len(list(out.glob("part-*.parquet"))) == 1
    (out / ".part-00002.parquet.tmp").write_bytes(b"half-written")  # a shard that was in flight
    rec = Recording(local)
    summary = run_job(cfg, backend=rec, progress=False)
    assert len(rec.shard_ids) == summary.generated_shards == 2
    assert not list(out.glob(".*.tmp"))

    (out / "part-00001.parquet").unlink()
    rec = Recording(local)
    run_job(cfg, backend=rec, progress=False)
    assert rec.shard_ids == [1]
    assert table(cfg.out_dir).equals(table(clean.out_dir))


def test_rerun_with_another_config_fails_naming_the_field(tmp_path, local, capsys):
    cfg = config(tmp_path / "out", num_prompts=2, group_size=1)
    run_job(cfg, backend=local, progress=False)
    # operational fields (workers, threads, ...) may change on resume
    assert (
        run_job(config(cfg.out_dir, num_prompts=2, group_size=1, workers=7), progress=False).generated_shards
        == 0
    )
    with pytest.raises(ManifestMismatchError, match=r"temperature: 1\.0 -> 0\.5"):
        run_job(config(cfg.out_dir, num_prompts=2, group_size=1, temperature=0.5), backend=local)
    argv = [
        "rollout",
        "--set",
        f"out_dir={cfg.out_dir}",
        "--set",
        f"checkpoint={CKPT}",
        "--set",
        "num_prompts=2",
        "--set",
        "group_size=1",
        "--set",
        "shard_size=3",
        "--set",
        "max_new_tokens=12",
    ]
    assert main(argv) == 2  # the preset's sampler settings differ from this directory's
    assert "another config" in capsys.readouterr().err


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "sum: 1 + 2\n"})


@pytest.mark.parametrize(
    ("lines", "row", "message"),
    [
        ([GOOD, "", '{"prompt": "sum: 3 +'], 3, "not valid JSON"),
        ([GOOD, json.dumps({"text": "no prompt here"})], 2, "missing required field 'prompt'"),
        ([json.dumps({"prompt": 17})], 1, "'prompt' must be a non-empty string"),
        ([GOOD, GOOD, json.dumps(["sum: 1\n"])], 3, "expected an object"),
        ([GOOD, json.dumps({"prompt": "sum: 1 + 2\n", "task": "chain_sum"})], 2, "needs 'answer'"),
        (
            [json.dumps({"prompt": "x", "task": "countdown", "answer": "1", "metadata": [1]})],
            1,
            "'metadata' must be",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, local, lines, row, message, capsys):
    path = write_jsonl(tmp_path / "prompts.jsonl", lines)
    with pytest.raises(PromptFileError, match=f"line {row}: .*{message}") as err:
        run_job(config(tmp_path / "out", prompts_file=str(path), num_prompts=None), backend=local)
    assert str(path) in str(err.value)
    argv = [
        "rollout",
        "--set",
        f"out_dir={tmp_path / 'cli'}",
        "--set",
        f"prompts_file={path}",
        "--set",
        "num_prompts=null",
    ]
    assert main(argv) == 2
    assert f"{path}: line {row}" in capsys.readouterr().err


def test_unreadable_or_incomplete_parquet_is_named(tmp_path, local):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PromptFileError, match=f"{bad}: not a readable Parquet file"):
        run_job(config(tmp_path / "o1", prompts_file=str(bad), num_prompts=None), backend=local)
    no_col = tmp_path / "no_prompt.parquet"
    pq.write_table(pa.table({"question": ["a"]}), no_col)
    with pytest.raises(PromptFileError, match="no 'prompt' or 'messages' column"):
        run_job(config(tmp_path / "o2", prompts_file=str(no_col), num_prompts=None), backend=local)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"prompt": ["a", None]}), nulls)
    with pytest.raises(PromptFileError, match=f"{nulls}: row 2: missing required field 'prompt'"):
        run_job(config(tmp_path / "o3", prompts_file=str(nulls), num_prompts=None), backend=local)
    short = write_jsonl(tmp_path / "short.jsonl", [GOOD])
    with pytest.raises(PromptFileError, match=r"num_prompts: .*1 usable prompt rows, 4 asked for"):
        run_job(config(tmp_path / "o4", prompts_file=str(short), num_prompts=4), backend=local)


def test_empty_and_non_array_json_files_say_so(tmp_path, local):
    """An empty .jsonl / .json / .parquet says it is empty (whatever num_prompts asks); a .json that is not one array
    of records (an object, or JSONL under a .json name) says what a .json file must hold; a bad array element is
    named by its 1-based record number."""
    empty_pq = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_pq)
    empties = [write_jsonl(tmp_path / "empty.jsonl", ["", "  "]), tmp_path / "empty.json", empty_pq]
    empties[1].write_text("[]")
    for k, path in enumerate(empties):
        for n in (None, 3):
            with pytest.raises(PromptFileError, match=f"{path} is empty"):
                run_job(config(tmp_path / f"e{k}", prompts_file=str(path), num_prompts=n), backend=local)
    obj = tmp_path / "obj.json"
    obj.write_text(GOOD)
    with pytest.raises(PromptFileError, match=f"{obj}: a .json file must hold a JSON array.*got a dict"):
        run_job(config(tmp_path / "o5", prompts_file=str(obj), num_prompts=None), backend=local)
    lines = write_jsonl(tmp_path / "lines.json", [GOOD, GOOD])
    with pytest.raises(PromptFileError, match=f"{lines}: line 2: not valid JSON.*name the file .jsonl"):
        run_job(config(tmp_path / "o6", prompts_file=str(lines), num_prompts=None), backend=local)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}]))
    with pytest.raises(PromptFileError, match=f"{bad}: record 2: field 'prompt' must be a non-empty string"):
        run_job(config(tmp_path / "o7", prompts_file=str(bad), num_prompts=None), backend=local)


def test_parquet_jsonl_and_json_inputs_give_the_same_rows_scored_only_for_known_tasks(tmp_path, local):
    """Three records (a built-in task with its answer, an unknown task label, no task) from Parquet, JSONL and a JSON
    array: identical rows; only the built-in task gets a reward; prompt text is kept verbatim."""
    s = next(iter_samples("chain_sum", 1, seed=5))
    records = [
        {"prompt": s.prompt, "task": "chain_sum", "answer": s.entry["answer"], "metadata": None},
        {"prompt": "reverse: stone\n", "task": "my_eval", "answer": None, "metadata": None},
        {"prompt": "count a: banana\n", "task": None, "answer": None, "metadata": None},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    write_jsonl(
        tmp_path / "p.jsonl", [json.dumps({k: v for k, v in r.items() if v is not None}) for r in records]
    )
    (tmp_path / "p.json").write_text(json.dumps(records, indent=1))
    got = {}
    for ext in ("parquet", "jsonl", "json"):
        cfg = config(tmp_path / ext, prompts_file=str(tmp_path / f"p.{ext}"), num_prompts=None, tasks=[])
        assert run_job(cfg, backend=local, progress=False).num_samples == 6
        got[ext] = table(cfg.out_dir)
    assert got["parquet"].equals(got["jsonl"]) and got["parquet"].equals(got["json"])
    rows = got["parquet"].to_pylist()
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records for _ in range(2)]
    assert [r["task"] for r in rows[::2]] == ["chain_sum", "my_eval", None]
    assert [r["reward"] is None for r in rows] == [False, False, True, True, True, True]
    # the file's own columns travel with their rows (a user joins on them); a parsed object as JSON text
    assert [r["answer"] for r in rows[::2]] == [str(s.entry["answer"]), None, None]
    assert rows[0]["metadata"] is not None and isinstance(json.loads(rows[0]["metadata"]), dict)


def test_manifest_follows_content_not_paths(tmp_path, local):
    """Moving the checkpoint and the prompts file resumes (nothing regenerated); retrained weights of the same shapes
    (same file size and safetensors header, other tensor bytes) and an edited prompts file are both refused."""
    shutil.copytree(CKPT, tmp_path / "a")
    write_jsonl(tmp_path / "a.jsonl", [GOOD, json.dumps({"prompt": "count a: banana\n"})])
    kw = {"out_dir": str(tmp_path / "out"), "num_prompts": None, "group_size": 1}
    run_job(
        config(checkpoint=str(tmp_path / "a"), prompts_file=str(tmp_path / "a.jsonl"), **kw), backend=local
    )
    (tmp_path / "a").rename(tmp_path / "b")
    (tmp_path / "a.jsonl").rename(tmp_path / "b.jsonl")
    moved = config(checkpoint=str(tmp_path / "b"), prompts_file=str(tmp_path / "b.jsonl"), **kw)
    assert run_job(moved, backend=local, progress=False).generated_shards == 0

    weights = tmp_path / "b" / "model.safetensors"
    header = weights.read_bytes()[: 8 + int.from_bytes(weights.read_bytes()[:8], "little")]
    size = weights.stat().st_size
    save_file({k: v + 1e-3 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    # only tensor bytes differ
    assert weights.stat().st_size == size and weights.read_bytes().startswith(header)
    with pytest.raises(ManifestMismatchError, match="checkpoint_files"):
        run_job(moved, backend=local)
    shutil.rmtree(tmp_path / "b")
    shutil.copytree(CKPT, tmp_path / "b")
    assert run_job(moved, backend=local, progress=False).generated_shards == 0
    write_jsonl(tmp_path / "b.jsonl", [GOOD, json.dumps({"prompt": "count b: banana\n"})])
    with pytest.raises(ManifestMismatchError, match="prompts_sha256"):
        run_job(moved, backend=local)


def test_env_config_is_validated():
    with pytest.raises(ValidationError, match=r"env\n.*'blockrl/nope-v0' is not a registered gym env id"):
        RolloutJobConfig(env="blockrl/nope-v0", num_prompts=1)
    with pytest.raises(ValidationError, match="either env or prompts_file"):
        RolloutJobConfig(env="blockrl/chain_sum-v0", prompts_file="p.jsonl")
    with pytest.raises(ValidationError, match=r"num_prompts\n.*required when prompts come from `env`"):
        RolloutJobConfig(env="blockrl/chain_sum-v0")


def test_single_turn_env_rows_are_the_envs_episodes(tmp_path, local):
    """Prompt j is env.reset(seed=env_seed(seed, j)) (a group shares it); the reward is what that env returns for
    the row's completion, and equals the sum of the turn rewards; every token is the model's."""
    env_id = "blockrl/chain_sum-v0"
    cfg = config(tmp_path / "out", env=env_id, num_prompts=3, group_size=2, shard_size=4, max_new_tokens=12)
    run_job(cfg, backend=local, progress=False)
    rows = table(cfg.out_dir).to_pylist()
    env = TaskEnv("chain_sum")
    assert len(rows) == 6 and len({r["env_seed"] for r in rows}) == 3
    for r in rows:
        assert r["task"] == env_id and r["env_seed"] == env_seed(cfg.seed, r["group_index"])
        assert (
            env.reset(seed=r["env_seed"])[0]
            == r["prompt"]
            == TOK.decode(r["prompt_ids"], skip_special_tokens=True)
        )
        assert r["reward"] == env.step(r["text"])[1] == sum(r["turn_rewards"])
        assert r["env_mask"] == [1] * len(r["tokens"]) and r["turn_ends"] == [len(r["tokens"]) - 1]
        assert r["sampler"] == "lossless[0, 4]" and r["tokens_per_forward"] == pytest.approx(
            len(r["tokens"]) / r["num_forwards"]
        )
    assert len({tuple(r["tokens"]) for r in rows}) > 1


def test_multi_turn_env_rows_are_consistent_and_resume_exactly(tmp_path, local):
    """blockrl/calc-chain_sum-v0 episodes: masks and log-probs cover every token, turn ends are model tokens in
    order, reward = sum of turn rewards; a crashed and resumed run equals an uninterrupted one."""
    kw = {
        "env": "blockrl/calc-chain_sum-v0",
        "num_prompts": 3,
        "group_size": 2,
        "shard_size": 2,
        "max_new_tokens": 24,
    }
    clean = config(tmp_path / "clean", **kw)
    run_job(clean, backend=local, progress=False)
    cfg = config(tmp_path / "resumed", **kw)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_job(cfg, backend=Crashing(local, after=1), progress=False)
    assert run_job(cfg, backend=local, progress=False).generated_shards == 2
    assert table(cfg.out_dir).equals(table(clean.out_dir))
    for r in table(clean.out_dir).to_pylist():
        n, mask = len(r["tokens"]), r["env_mask"]
        assert len(mask) == len(r["behavior_logprobs"]) == len(r["ar_logprobs"]) == n <= kw["max_new_tokens"]
        assert set(mask) <= {0, 1} and mask[0] == 1
        assert all(lp == 0.0 for lp, m in zip(r["behavior_logprobs"], mask, strict=True) if m == 0)
        ends = r["turn_ends"]
        assert 1 <= len(ends) == len(r["turn_rewards"]) and ends == sorted(set(ends)) and ends[-1] < n
        assert all(mask[e] == 1 for e in ends)
        assert r["reward"] == pytest.approx(sum(r["turn_rewards"]))
        assert r["tokens_per_forward"] == pytest.approx(sum(mask) / r["num_forwards"])


def test_auto_rows_name_the_sampler_they_used(tmp_path):
    """sampler=auto: a worker's first batch runs auto's lossless pilot, later rows the option it chose; every row
    names a concrete option."""
    cfg = config(tmp_path / "out", sampler="auto", num_prompts=3, group_size=2, shard_size=4, max_batch=2)
    backend = make_backend(cfg, kind="local")
    run_job(cfg, backend=backend, progress=False)
    auto = backend.worker.engine  # an AutoSampler: the wrapper over engines
    rows = table(cfg.out_dir).to_pylist()
    assert [r["sampler"] for r in rows[:2]] == [auto.pilot.name] * 2
    assert {r["sampler"] for r in rows} <= {o.name for o in auto.options}
    assert rows[-1]["sampler"] == auto.last_choice.name


def test_cli_rollout_on_two_ray_workers_matches_in_process_worker(tmp_path):
    """`blockrl rollout` (Ray, 2 workers, logit_mix, weights published as v3) writes the same rows as the in-process
    worker: sample i is seeded by (seed, i), whichever worker runs it."""
    ref = config(tmp_path / "local", sampler="logit_mix", policy_version=3)
    run_job(ref, backend=make_backend(ref, kind="local"), progress=False)
    keys = ("num_prompts", "group_size", "shard_size", "max_new_tokens", "levels", "max_batch", "sampler")
    argv = ["rollout", "--set", f"out_dir={tmp_path / 'ray'}", "--set", f"checkpoint={CKPT}"]
    argv += [a for k in keys for a in ("--set", f"{k}={getattr(ref, k)}")]
    argv += ["--set", "policy_version=3", "--set", "workers=2", "--set", "cpus_per_worker=0.5"]
    try:
        assert main(argv) == 0
    finally:
        ray.shutdown()
    got, want = table(tmp_path / "ray"), table(ref.out_dir)
    assert set(got["policy_version"].to_pylist()) == {3}
    logprobs = ["behavior_logprobs", "ar_logprobs"]
    assert got.drop_columns(logprobs).equals(want.drop_columns(logprobs))  # tokens, text, rewards, counts
    # the actors run 1 torch thread, this process more: float sums may differ in the last bits
    for name in logprobs:
        for a, b in zip(got[name].to_pylist(), want[name].to_pylist(), strict=True):
            assert a == pytest.approx(b, abs=1e-5)


def test_bf16_workers_write_complete_rows(tmp_path):
    """dtype=bfloat16 on the CPU: the worker's weights are bf16, rows are complete, log-probs are finite fp32."""
    cfg = config(tmp_path / "out", dtype="bfloat16", num_prompts=2)
    backend = make_backend(cfg, kind="local")
    assert next(backend.worker.policy.parameters()).dtype == torch.bfloat16
    run_job(cfg, backend=backend, progress=False)
    rows = table(cfg.out_dir).to_pylist()
    assert len(rows) == 4 and all(1 <= len(r["tokens"]) <= cfg.max_new_tokens for r in rows)
    assert all(
        len(r["ar_logprobs"]) == len(r["tokens"]) and all(lp <= 0 for lp in r["ar_logprobs"]) for r in rows
    )


REWARDS = """
def has_digit(prompts, completions, completion_ids, level, **kwargs):
    # TRL's forms: a text prompt's completion is text, a conversation's is one assistant message
    assert all(isinstance(c, list) == isinstance(p, list) for p, c in zip(prompts, completions))
    text = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(any(ch.isdigit() for ch in t)) * lv for t, lv in zip(text, level)]

def length(prompts, completions, completion_ids, **kwargs):
    return [None if isinstance(p, list) else float(len(ids)) for p, ids in zip(prompts, completion_ids)]

def flaky(prompts, completions, completion_ids, level, **kwargs):
    return [float("nan") if lv == 2 else 1.0 for lv in level]
"""


def test_the_researchers_prompt_file_and_reward_functions(tmp_path):
    """Text and conversational rows (the chat template renders the latter), an extra column reaching the reward
    functions, two weighted functions: `reward` is the weighted sum over the functions that scored a row, each term
    in `reward_terms`; a NaN under `record` is a null term and a counted failure, under `raise` an error naming the
    function and the row."""
    from common.paths import SHIPPED_BPE_CHECKPOINT
    from envs.rewards import RewardError
    from policy.tokenizer import encode_chat_prompt

    ckpt = str(SHIPPED_BPE_CHECKPOINT)
    tok = load_tokenizer(ckpt)
    chat = [{"role": "user", "content": "sum: 1 + 2"}]
    write_jsonl(
        tmp_path / "p.jsonl",
        [json.dumps({"prompt": "sum: 3 + 4\n", "level": 1}), json.dumps({"messages": chat, "level": 2})],
    )
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    fn = f"{tmp_path / 'my_rewards.py'}"
    kw = dict(checkpoint=ckpt, prompts_file=str(tmp_path / "p.jsonl"), num_prompts=None, prompt_format="text")
    rewards = [{"function": f"{fn}:has_digit", "weight": 2.0}, {"function": f"{fn}:length", "weight": 0.5}]
    backend = make_backend(config("unused", checkpoint=ckpt), kind="local")
    cfg = config(tmp_path / "out", rewards=rewards, **kw)
    assert run_job(cfg, backend=backend, progress=False).num_samples == 4
    rows = table(cfg.out_dir).to_pylist()
    assert rows[0]["prompt_ids"] == tok("sum: 3 + 4\n")["input_ids"]
    assert rows[2]["prompt_ids"] == encode_chat_prompt(tok, chat)
    assert json.loads(rows[2]["prompt"]) == chat
    for r in rows:
        level = 1 if r["group_index"] == 0 else 2
        assert r["level"] == level  # the file's column, carried into the Parquet
        terms = dict(r["reward_terms"])
        assert terms["has_digit"] == level * any(ch.isdigit() for ch in r["text"])
        assert terms["length"] == (len(r["tokens"]) if level == 1 else None)  # not scored: the term is null
        assert r["reward"] == pytest.approx(2.0 * terms["has_digit"] + 0.5 * (terms["length"] or 0.0))

    flaky = [{"function": f"{fn}:flaky"}]
    out = run_job(
        config(tmp_path / "rec", rewards=flaky, on_reward_error="record", **kw),
        backend=backend,
        progress=False,
    )
    assert out.reward_failures == 2
    assert [dict(r["reward_terms"])["flaky"] for r in table(tmp_path / "rec").to_pylist()] == [
        1,
        1,
        None,
        None,
    ]
    with pytest.raises(RewardError, match=r"reward .*:flaky: returned nan for .*p.jsonl: line 2"):
        run_job(config(tmp_path / "raise", rewards=flaky, **kw), backend=backend, progress=False)

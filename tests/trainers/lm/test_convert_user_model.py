"""A new user's path, end to end: a plain HF Llama built here with a byte-level BPE tokenizer (no BOS, pad = EOS, a
ChatML template whose turns end with a second stop token), converted on a chat JSONL file, then `blockrl bench` on
it, then `blockrl train`. This is the README's three-command path (the case that first crashed with
`Could not infer dtype of NoneType`)."""

import json
from types import SimpleNamespace

import ray
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from policy import HybridPolicy
from policy.tokenizer import encode_chat, encode_prompt, pad_id
from trainers.cli import main


def plain_llama(path, tok):
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def sets(**kw):
    return [a for k, v in kw.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


def test_convert_bench_and_train_a_plain_bpe_chat_model_on_a_chat_file(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    assert tok.bos_token_id is None and tok.pad_token_id == tok.eos_token_id
    init, data, conv = tmp_path / "plain", tmp_path / "chat.jsonl", tmp_path / "conv"
    plain_llama(init, tok)

    # 1. convert your model on your data
    assert main(["export-tasks", "--out", str(data), "--shape", "messages", "--per-task", "12"]) == 0
    small = sets(optim__steps=3, optim__batch_size=4, log_every=1, eval__max_sequences=4)
    assert (
        main(
            ["convert", *sets(init=init, run_dir=conv, data__files=f"[{data}]", data__heldout_rows=6), *small]
        )
        == 0
    )
    final = conv / "final"
    policy = HybridPolicy.from_pretrained(final)
    back = AutoTokenizer.from_pretrained(final)
    end = back.convert_tokens_to_ids("<|im_end|>")
    assert policy.is_converted and policy.prompt_format == "chat"
    assert set(policy.eos_ids(back)) == {back.eos_token_id, end}  # the turn end stops generation
    msgs = [{"role": "user", "content": "sum: 1 + 2\n"}]
    prompt = encode_prompt(back, "sum: 1 + 2\n", "chat")
    assert prompt == back.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    ids, _ = encode_chat(back, [*msgs, {"role": "assistant", "content": "3"}])
    assert ids[: len(prompt)] == prompt  # apply_chat_template gives the ids training continued
    stats = json.loads((conv / "data.json").read_text())
    assert stats["rows_by_format"] == {"messages": 36} and stats["heldout_rows"] == 6
    assert "slot_accuracy" in json.loads((conv / "eval.json").read_text())

    # 2. bench it: prompts go through its chat template; a raw-format row measures the difference
    bench = sets(
        checkpoint=final,
        run_dir=tmp_path / "bench",
        repeats=1,
        batch_sizes="[2]",
        max_new_tokens=8,
        min_prompts=2,
        prompts_per_row=1,
        levels="[[0]]",
        mix_levels="[0]",
        threads=1,
        sweep__batch_size=2,
        compare="[]",
    )
    assert main(["bench", "--config", "bench_full", *bench]) == 0
    runs = json.loads((tmp_path / "bench" / "results.json").read_text())["runs"]
    assert {r["prompt_format"] for r in runs if not r["sweep"]} == {"chat"}
    assert {r["sampler"] for r in runs if r["sweep"] == "prompt_format=raw"} == {"ar", "lossless"}

    # 3. train it with GRPO on Ray workers
    train = sets(
        checkpoint=final,
        run_dir=tmp_path / "rl",
        steps=1,
        prompts_per_step=2,
        group_size=2,
        wandb="disabled",
        rollout__workers=1,
        rollout__cpus_per_worker=0.5,
        rollout__max_new_tokens=12,
    )
    try:
        assert main(["train", *train]) == 0
    finally:
        ray.shutdown()
    rec = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and rec["rollout/logprob_mismatch"] <= 1e-3


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=5)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=(5, 6))) == 5  # several EOS ids
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0

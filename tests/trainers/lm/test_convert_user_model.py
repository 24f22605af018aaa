"""`blockrl convert` on a model a user brings: a plain HF Llama with a byte-level BPE tokenizer trained here, no BOS
token, pad equal to EOS and a chat template (the case that crashed with `Could not infer dtype of NoneType`).
The converted checkpoint loads as a hybrid and its prompts are encoded without a BOS."""

from pathlib import Path
from types import SimpleNamespace

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from envs.tasks import iter_samples
from policy import HybridPolicy
from policy.tokenizer import encode_prompt, pad_id
from trainers.cli import main

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"


def bpe_tokenizer(path: Path, pad: str | None) -> PreTrainedTokenizerFast:
    text = [s.prompt + s.completion for t in ("chain_sum", "spell_backward") for s in iter_samples(t, 200, 5)]
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|end|>", pad_token="<|end|>", chat_template=TEMPLATE
    )
    tok.save_pretrained(path)
    return tok


def test_convert_a_plain_bpe_model_without_bos(tmp_path):
    init = tmp_path / "plain"
    tok = bpe_tokenizer(init, "<|end|>")
    assert tok.bos_token_id is None and tok.pad_token_id == tok.eos_token_id
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
    LlamaForCausalLM(cfg).save_pretrained(init)
    run = tmp_path / "conv"
    args = [
        "convert",
        "--set",
        f"init={init}",
        "--set",
        f"run_dir={run}",
        "--set",
        "optim.steps=3",
        "--set",
        "data.train_per_task=20",
        "--set",
        "data.heldout_per_task=2",
        "--set",
        "eval.samples_per_task=2",
        "--set",
        "eval.max_new_tokens=8",
        "--set",
        "log_every=1",
    ]
    assert main(args) == 0
    policy = HybridPolicy.from_pretrained(run / "final")
    assert policy.is_converted
    back = AutoTokenizer.from_pretrained(run / "final")
    ids = encode_prompt(back, "sum: 1 + 2\n")
    assert ids == back("sum: 1 + 2\n", add_special_tokens=False)["input_ids"]  # no BOS to add
    msgs = [{"role": "user", "content": "sum: 1 + 2"}]
    chat = back.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert chat == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)  # the template survived


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=5)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=(5, 6))) == 5  # several EOS ids
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0

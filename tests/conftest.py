"""Shared fixtures: tiny random models and the char tokenizer; side effects stay in tmp dirs."""

import os

# NOTE: Triton reads TRITON_INTERPRET when triton.language and each kernel are decorated, so it must be set before
# torch (which imports triton) is imported. CPU test runs use the interpreter; run GPU tests with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from policy.factory import build_model, tiny_dense_config, tiny_moe_config
from policy.hybrid import HybridPolicy
from policy.tokenizer import build_char_tokenizer


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / ".mpl"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf"))
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


def make_policy(kind: str, attn: str = "sdpa", vocab_size: int = 37, block_size: int = 4, seed: int = 0):
    cfg = tiny_moe_config(vocab_size) if kind == "moe" else tiny_dense_config(vocab_size, arch=kind)
    policy = HybridPolicy(build_model(cfg, seed=seed, attn_implementation=attn))
    policy.convert(block_size=block_size)
    policy.eval()
    return policy


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(texts, vocab_size: int = 300, chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained here: no BOS, EOS `<|endoftext|>`, pad = EOS, a ChatML template whose
    turns end with `<|im_end|>` (a second stop id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        chat_template=chat_template,
    )


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from envs.tasks import iter_samples

    texts = [
        s.prompt + s.completion for t in ("chain_sum", "spell_backward") for s in iter_samples(t, 200, 5)
    ]
    return train_bpe_tokenizer(texts)

"""Shared fixtures: tiny random models and the char tokenizer; side effects stay in tmp dirs."""

# ruff: noqa: E402  (the environment is set, by a small GPU check, before torch is imported: see the NOTE below)

import glob
import os
import shutil


def _has_nvidia_gpu() -> bool:
    """Whether this process would see an NVIDIA GPU, decided without importing torch (see the NOTE below): the
    driver's tool is on PATH, a device node exists, and CUDA_VISIBLE_DEVICES does not hide every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = visible is not None and visible.strip() in ("", "-1")
    return shutil.which("nvidia-smi") is not None and bool(glob.glob("/dev/nvidia[0-9]*")) and not hidden


# NOTE: Triton reads TRITON_INTERPRET when triton.language and each kernel are decorated, so it must be set before
# torch (which imports triton) is imported. Rule: without a GPU the interpreter is on by default (CPU-tensor kernel
# tests run under it); with one it is off by default, so `pytest -m gpu` compiles real kernels. An explicit
# TRITON_INTERPRET in the environment always wins.
if not _has_nvidia_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from policy.factory import build_model, tiny_dense_config, tiny_moe_config
from policy.hybrid import HybridPolicy
from policy.tokenizer import build_char_tokenizer


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skipped cleanly without it (scripts/gpu_check.sh runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / ".mpl"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf"))
    # torch.compile's kernels: one cache for the session, inside pytest's temp dir (a graph compiled again after a
    # dynamo reset, or by another test, loads instead of compiling)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))
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


PROMPTS = [[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8], [2, 11, 12]]


def lively_policy(kind="moe", vocab=37, block_size=4, attn="sdpa", seed=1):
    """Random tiny model with a large init, so greedy outputs vary (a default init just repeats one token)."""
    cfg = tiny_moe_config(vocab) if kind == "moe" else tiny_dense_config(vocab)
    cfg.initializer_range = 0.3
    policy = HybridPolicy(build_model(cfg, seed=seed, attn_implementation=attn))
    policy.convert(block_size=block_size)
    return policy.eval()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here: no BOS, pad = EOS, a ChatML template (a second stop id)."""
    from envs.tasks import iter_samples
    from policy.tokenizer import train_bpe_tokenizer

    texts = [
        s.prompt + s.completion for t in ("chain_sum", "spell_backward") for s in iter_samples(t, 200, 5)
    ]
    return train_bpe_tokenizer(texts, vocab_size=300)

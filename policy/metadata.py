"""A checkpoint's blockrl metadata (mask token, block size, prompt format), which travels in its HF config under the
key `blockrl`, read from the directory alone; and its tokenizer as every job loads it."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

METADATA_KEY = "blockrl"
METADATA_FORMAT = 1


def _checkpoint_metadata(path: str | os.PathLike) -> dict:
    return getattr(AutoConfig.from_pretrained(path), METADATA_KEY, None) or {}


def checkpoint_prompt_format(path: str | os.PathLike) -> str:
    """The prompt format a checkpoint was trained on (`HybridPolicy.prompt_format`), read from its config alone."""
    return _checkpoint_metadata(path).get("prompt_format", "text")


def checkpoint_is_converted(path: str | os.PathLike) -> bool:
    """Whether a checkpoint is converted (has a mask token: `HybridPolicy.is_converted`), from its config alone."""
    return _checkpoint_metadata(path).get("mask_token_id") is not None


def checkpoint_block_size(path: str | os.PathLike) -> int:
    """A checkpoint's block size K (`HybridPolicy.block_size`), read from its config alone."""
    return int(_checkpoint_metadata(path).get("block_size", 16))


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A checkpoint's tokenizer, left-padding. A blockrl checkpoint written before prompt formats were recorded was
    trained with its BOS first (the old encoder prepended it): its tokenizer is made to add it, so that
    `tokenizer(text)` stays its training format."""
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if (Path(path) / "config.json").is_file() and tok.bos_token_id is not None:
        meta = getattr(AutoConfig.from_pretrained(path), METADATA_KEY, None)
        if (
            meta is not None
            and "prompt_format" not in meta
            and tok("a")["input_ids"][:1] != [tok.bos_token_id]
        ):
            tok.add_bos_token = True
    return tok

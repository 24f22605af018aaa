"""Character-level tokenizer for the built-in tasks, built offline as a real `PreTrainedTokenizerFast`.

Decision: one token per character. The built-in traces are copy-heavy and templated, so a char vocabulary keeps the
vocab tiny (~100), makes every draft slot a single character the drafter can place, and needs no training data to
build. It is a BPE model with an empty merge list over a fixed alphabet, so `tokenizers` splits any string into its
characters; unknown characters map to `<unk>`.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
MASK = "<mask>"  # added by `HybridPolicy.convert`, not part of the AR vocabulary
SPECIALS = (PAD, EOS, BOS, UNK)
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A fast char-level tokenizer: ids 0..3 are specials, then one id per alphabet character."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has duplicate characters")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.decoder = decoders.Fuse()  # join characters without separators
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=4096,
    )
    return tok


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's ids in the training format: BOS (when the tokenizer has one) then the text's own tokens.

    The one place prompts are encoded, for every job and worker (issue: the format the drafter was trained on decides
    its acceptance). A tokenizer without a BOS token encodes the text alone."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None else [bos, *ids]


def pad_id(tokenizer) -> int:
    """The id that pads batches: the pad token, else EOS (many BPE tokenizers have no pad), else 0. Padding is
    always masked out, so any id serves; a real one keeps embeddings in range."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid[0] if isinstance(tid, list | tuple) else tid)
    return 0

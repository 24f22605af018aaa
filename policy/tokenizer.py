"""Character-level tokenizer for the built-in tasks, built offline as a real `PreTrainedTokenizerFast`.

Decision: one token per character. The built-in traces are copy-heavy and templated, so a char vocabulary keeps the
vocab tiny (~100), makes every draft slot a single character the drafter can place, and needs no training data to
build. It is a BPE model with an empty merge list over a fixed alphabet, so `tokenizers` splits any string into its
characters; unknown characters map to `<unk>`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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
        add_bos_token=True,  # `tokenizer(text)` gives the training format, BOS first
    )
    return tok


PromptFormat = Literal["text", "raw", "chat"]
PROMPT_FORMATS: tuple[str, ...] = ("text", "raw", "chat")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, chat_template: str | None = CHATML
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, shaped like common open models: no BOS, EOS
    `<|endoftext|>` (also the pad), a ChatML chat template whose assistant turns end with `<|im_end|>` (so a
    converted model has two EOS ids)."""
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=specials[0],
        pad_token=specials[0],
        additional_special_tokens=specials[1:],
        chat_template=chat_template,
        padding_side="left",
        model_max_length=4096,
    )


def encode_prompt(tokenizer, text: str, format: PromptFormat = "text") -> list[int]:
    """A prompt's ids. `text` (the training format): the tokenizer's own encoding, `tokenizer(text)`, with the
    special tokens it adds in front (a BOS where it adds one) and none it would append (an EOS ends a sequence, not
    a prompt). `chat`: the text as one user turn through the chat template, up to the assistant's turn. `raw`: the
    text's tokens alone, no special tokens (outside the training format where the tokenizer adds a BOS; benchmarks
    measure what that costs).

    The one place prompts are encoded, for every job, worker and corpus (the format the drafter was trained on
    decides its acceptance). Conversion trains on this same encoding, so a converted checkpoint's `tokenizer(text)`
    is in distribution."""
    if format == "chat":
        return encode_chat_prompt(tokenizer, [{"role": "user", "content": text}])
    if format == "raw":
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if format != "text":
        raise ValueError(f"prompt format {format!r}: expected one of {PROMPT_FORMATS}")
    ids = tokenizer(text)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        raw = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not raw or raw[-1] != eos:  # appended by the tokenizer, not part of the text
            ids = ids[:-1]
    return ids


class ChatFormatError(ValueError):
    """The chat template cannot render this conversation, or not incrementally (assistant spans unknown)."""


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template (tokenizer_config.json: chat_template)")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja errors: raise_exception(...) in templates, missing keys
        raise ChatFormatError(f"the chat template failed: {e}") from e


def encode_chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation's ids up to the assistant's turn: exactly `apply_chat_template(..., add_generation_prompt=True)`
    (the template writes its own BOS; nothing is added)."""
    return tokenizer(render_chat(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, target) of a whole conversation: ids are `apply_chat_template(messages)`; target is 1 on the tokens
    of every assistant turn (its content and the template's end-of-turn), 0 elsewhere.

    Assistant spans are found incrementally, as the characters that turn i adds to the rendering of turns < i
    followed by the generation prompt, and mapped to tokens by their offsets in one tokenization of the whole text,
    so the ids are exactly those a prompt encoded by `encode_chat_prompt` continues. A template that does not
    render incrementally (e.g. one that rewrites earlier turns) is refused."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatFormatError(f"messages[{j}] must be an object with 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("no assistant message: nothing to train on")
    full = render_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if not upto.startswith(before) or not full.startswith(upto):
            raise ChatFormatError(
                f"the chat template does not render messages[{i}] as a continuation of the turns before it"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    target = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    if target:
        target[0] = 0  # nothing precedes the first token (a leading assistant turn trains from its second)
    return list(enc["input_ids"]), target


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """Special tokens the chat template closes an assistant turn with (e.g. `<|im_end|>`): generation must stop
    there, so conversion adds them to the model's EOS ids. Empty without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return ()
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        ids, target = encode_chat(tokenizer, probe)
    except ChatFormatError:
        return ()
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    span = [t for t, y in zip(ids, target, strict=True) if y]
    while span and span[-1] not in special:  # trailing whitespace after the end-of-turn token
        span.pop()
    tail: list[int] = []
    while span and span[-1] in special:  # the run of specials that closes the turn, not ones that open it
        tail.insert(0, span.pop())
    return tuple(dict.fromkeys(tail))


def eos_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's EOS and the model's `generation_config.eos_token_id`
    (one id or several, e.g. an end-of-turn token beside the end-of-text one)."""
    out: list[int] = []
    for v in (
        tokenizer.eos_token_id if tokenizer is not None else None,
        getattr(generation_config, "eos_token_id", None),
    ):
        if v is None:
            continue
        out.extend(int(x) for x in (v if isinstance(v, list | tuple) else [v]))
    return tuple(dict.fromkeys(out))


def pad_id(tokenizer) -> int:
    """The id that pads batches: the pad token, else EOS (many BPE tokenizers have no pad), else 0. Padding is
    always masked out, so any id serves; a real one keeps embeddings in range."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid[0] if isinstance(tid, list | tuple) else tid)
    return 0

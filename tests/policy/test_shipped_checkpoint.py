"""The shipped checkpoint loads as a hybrid and as a plain HF causal LM, and HF generate runs on it."""

import torch
from transformers import AutoModelForCausalLM

from common.paths import SHIPPED_BPE_CHECKPOINT, SHIPPED_CHECKPOINT
from policy import HybridPolicy, load_tokenizer

CKPT = SHIPPED_CHECKPOINT


def test_loads_as_hybrid_with_metadata():
    policy = HybridPolicy.from_pretrained(CKPT)
    tok = load_tokenizer(CKPT)
    assert policy.is_converted and policy.block_size == 16 and policy.moe == (8, 2)
    assert tok.mask_token_id == policy.mask_token_id
    assert (CKPT / "model.safetensors").stat().st_size <= 20 * 1000 * 1000


def test_loads_as_plain_hf_and_generates():
    model = AutoModelForCausalLM.from_pretrained(CKPT)
    tok = load_tokenizer(CKPT)
    ids = tok(tok.bos_token + "reverse: planet\n", return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **ids,
        max_new_tokens=60,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "<answer>tenalp</answer>" in text  # the trained model really solves a held-out-style prompt


def test_ar_half_of_tidar_equals_plain_forward():
    policy = HybridPolicy.from_pretrained(CKPT)
    x = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(
            policy.tidar_forward(x).ar_logits, policy(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def test_the_bpe_checkpoint_is_a_chat_model_that_solves_through_its_template():
    """The second shipped checkpoint: byte-level BPE, no BOS, ChatML; trained on chats, so its metadata says chat,
    its EOS ids include the template's end-of-turn, and greedy HF generate through apply_chat_template solves."""
    policy = HybridPolicy.from_pretrained(SHIPPED_BPE_CHECKPOINT)
    tok = load_tokenizer(SHIPPED_BPE_CHECKPOINT)
    assert policy.is_converted and policy.prompt_format == "chat" and tok.bos_token_id is None
    assert tok.convert_tokens_to_ids("<|im_end|>") in policy.eos_ids(tok)
    assert (SHIPPED_BPE_CHECKPOINT / "model.safetensors").stat().st_size <= 20 * 1000 * 1000
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_BPE_CHECKPOINT)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "reverse: planet\n"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=60, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "<answer>tenalp</answer>" in text

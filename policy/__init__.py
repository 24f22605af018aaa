"""The hybrid AR + block-diffusion policy: masks, TiDAR loss, HF wrapper, tokenizer, tiny-model factory."""

from policy.hybrid import HybridPolicy
from policy.masks import decode_step_mask, prefill_mask, tidar_training_mask
from policy.metadata import load_tokenizer

__all__ = ["HybridPolicy", "decode_step_mask", "load_tokenizer", "prefill_mask", "tidar_training_mask"]

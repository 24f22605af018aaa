"""The hybrid AR + block-diffusion policy: masks, TiDAR loss, HF wrapper, tokenizer, tiny-model factory."""

from policy.hybrid import HybridPolicy, load_tokenizer
from policy.masks import decode_step_mask, prefill_mask, tidar_training_mask

__all__ = ["HybridPolicy", "decode_step_mask", "load_tokenizer", "prefill_mask", "tidar_training_mask"]

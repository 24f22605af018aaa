"""`BlockGRPOTrainer`: TRL's GRPOTrainer plus the truncated importance correction that TRL applies only on its vLLM
path, for off-policy rollouts from blockrl's `rollout_func` (logit_mix). See docs/trl.md.

    from trainers.trl.adapter import BlockGRPOTrainer, BlockRolloutFunc
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer


def importance_weights(
    ar_logprobs: torch.Tensor,  # [B, T] pi_AR of the sampled tokens, at the weights that generated them
    behavior_logprobs: torch.Tensor,  # [B, T] the sampler's distribution (p_mix at draft positions)
    mask: torch.Tensor,  # [B, T] 1 = model token in the loss
    mode: str = "token_truncate",
    clip_max: float = 3.0,
) -> torch.Tensor:
    """Per-token weights [B, T] (sequence modes: one value per row, broadcast) correcting behaviour -> AR.

    token_truncate: min(pi_AR / pi_b, C) per token; sequence_truncate: min(prod_t pi_AR / pi_b, C) per row;
    *_mask: the ratio where it is <= C, else 0 (the sample is dropped). Masked positions get 1. NaN log-probs count
    as no correction, like TRL's vLLM path."""
    diff = torch.nan_to_num((ar_logprobs - behavior_logprobs) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(diff)
    ratio = torch.exp(diff.clamp(max=80.0))  # NOTE: clamp before exp keeps fp32 finite; C is far below e^80
    if mode.endswith("truncate"):
        w = ratio.clamp(max=clip_max)
    elif mode.endswith("mask"):
        w = torch.where(ratio <= clip_max, ratio, torch.zeros_like(ratio))
    else:
        raise ValueError(f"importance mode must be token_/sequence_ + truncate/mask, got {mode!r}")
    return torch.where(mask.bool(), w, torch.ones_like(w))


class BlockGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that corrects off-policy rollouts from a custom rollout_func (blockrl's logit_mix).

    After TRL builds the batch, each token's advantage is scaled by `importance_weights(pi_AR, pi_behaviour)`:
    pi_behaviour is the `logprobs` the rollout returned, pi_AR the trainer's own log-probs of those tokens at the
    weights that generated them (TRL's `old_per_token_logps` when it computed them, else one no-grad forward). With an
    exact sampler (lossless) the weights are 1 up to float noise, and the logged `sampling/*` metrics show it.

    is_mode: token_truncate (default), sequence_truncate, token_mask, sequence_mask, or "off"; is_clip_max: C.
    GRPOConfig top_k / top_p are refused unless is_mode="off": the rollout's log-probs would then come from the
    truncated distribution and TRL's from the full softmax, biasing every weight below 1.
    """

    def __init__(self, *args, is_mode: str = "token_truncate", is_clip_max: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        if is_mode != "off":
            importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), is_mode, is_clip_max)
        if is_clip_max <= 0:
            raise ValueError(f"is_clip_max must be > 0, got {is_clip_max}")
        if self.use_vllm:
            raise ValueError(
                "BlockGRPOTrainer: with vLLM use GRPOTrainer's vllm_importance_sampling_correction"
            )
        if self.loss_type == "vespo":
            raise ValueError("BlockGRPOTrainer: loss_type='vespo' weights samples itself; use another loss")
        for name, on in (("top_k", bool(self.args.top_k)), ("top_p", self.args.top_p < 1.0)):
            # NOTE: TRL's log-probs are the full softmax(logits / T), never truncated
            if on and is_mode != "off":
                raise ValueError(
                    f"BlockGRPOTrainer: GRPOConfig.{name}={getattr(self.args, name)!r} truncates the sampling "
                    "distribution, so the rollout's log-probs are not comparable with TRL's full-softmax ones and the "
                    f"importance weights would be biased; unset {name} or pass is_mode='off'"
                )
        self.is_mode, self.is_clip_max = is_mode, is_clip_max

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        behavior = out.get("sampling_per_token_logps")
        if self.is_mode == "off" or behavior is None:
            return out
        mask = out["completion_mask"] * out.get("tool_mask", 1)
        ar = out.get("old_per_token_logps")
        if ar is None:
            ar = self._ar_logprobs(out)
        w = importance_weights(ar, behavior, mask, self.is_mode, self.is_clip_max)  # [B, T]
        adv = out["advantages"]
        out["advantages"] = (adv[:, None] if adv.dim() == 1 else adv) * w
        out["importance_weights"] = w
        self._log_correction(ar, behavior, mask.bool(), w)
        return out

    @torch.no_grad()
    def _ar_logprobs(self, out: dict) -> torch.Tensor:
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        bs = (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, ids, attn, out["completion_ids"].size(1), batch_size=bs
        )
        return logps

    def _log_correction(self, ar, behavior, mask, w) -> None:
        """TRL's vLLM metric names, so dashboards read the same."""
        m = self._metrics["train" if self.model.training else "eval"]
        delta = (ar - behavior).abs()[mask & ~torch.isnan(behavior)]
        ws = w[mask]
        zero = torch.zeros(1, device=w.device)
        delta, ws = (delta if delta.numel() else zero), (ws if ws.numel() else zero + 1)
        m["sampling/sampling_logp_difference/mean"].append(delta.mean().item())
        m["sampling/sampling_logp_difference/max"].append(delta.max().item())
        m["sampling/importance_sampling_ratio/min"].append(ws.min().item())
        m["sampling/importance_sampling_ratio/mean"].append(ws.mean().item())
        m["sampling/importance_sampling_ratio/max"].append(ws.max().item())
        m["sampling/importance_sampling_clipped_frac"].append((ws >= self.is_clip_max).float().mean().item())

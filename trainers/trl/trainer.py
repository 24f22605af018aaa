"""`BlockGRPOTrainer`: TRL's GRPOTrainer plus the truncated importance correction that TRL applies only on its vLLM
path, for off-policy rollouts from blockrl's `rollout_func` (logit_mix). See docs/trl.md.

    from trainers.trl.adapter import BlockGRPOTrainer, BlockRolloutFunc
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from trainers.rl.losses import ImportanceConfig, importance_weights


class BlockGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that corrects off-policy rollouts from a custom rollout_func (blockrl's logit_mix).

    After TRL builds the batch, each token's advantage is scaled by `importance_weights(pi_AR, pi_behaviour)`:
    pi_behaviour is the `logprobs` the rollout returned, pi_AR the trainer's own log-probs of those tokens at the
    weights that generated them (TRL's `old_per_token_logps` when it computed them, else one no-grad forward). With an
    exact sampler (lossless) the weights are 1 up to float noise, and the logged `sampling/*` metrics show it.

    importance: the same `ImportanceConfig` as blockrl's own learner (level token / sequence / off, cap C, mode
    truncate / mask). GRPOConfig top_k / top_p are refused unless its level is "off": the rollout's log-probs would
    then come from the truncated distribution and TRL's from the full softmax, biasing every weight below 1.
    """

    def __init__(self, *args, importance: ImportanceConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.importance = importance or ImportanceConfig()
        off = self.importance.level == "off"
        if self.use_vllm:
            raise ValueError(
                "BlockGRPOTrainer: with vLLM use GRPOTrainer's vllm_importance_sampling_correction"
            )
        if self.loss_type == "vespo":
            raise ValueError("BlockGRPOTrainer: loss_type='vespo' weights samples itself; use another loss")
        for name, on in (("top_k", bool(self.args.top_k)), ("top_p", self.args.top_p < 1.0)):
            # NOTE: TRL's log-probs are the full softmax(logits / T), never truncated
            if on and not off:
                raise ValueError(
                    f"BlockGRPOTrainer: GRPOConfig.{name}={getattr(self.args, name)!r} truncates the sampling "
                    "distribution, so the rollout's log-probs are not comparable with TRL's full-softmax ones and the "
                    f"importance weights would be biased; unset {name} or pass importance=ImportanceConfig(level='off')"
                )

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        behavior = out.get("sampling_per_token_logps")
        if self.importance.level == "off" or behavior is None:
            return out
        mask = out["completion_mask"] * out.get("tool_mask", 1)
        ar = out.get("old_per_token_logps")
        if ar is None:
            ar = self._ar_logprobs(out)
        w = importance_weights(ar, behavior, mask, self.importance)  # [B, T]
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
        m["sampling/importance_sampling_clipped_frac"].append(
            (ws >= self.importance.cap).float().mean().item()
        )

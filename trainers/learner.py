"""The learner: trains the hybrid policy directly on rollouts (DESIGN §5).

Loss = GRPO/PPO-clip on the AR log-probs (the policy is the AR mode) + lambda_diff * TiDAR diffusion CE on the same
rollout sequences (sampled tokens as labels, so the drafter follows the moving policy) + the MoE load-balancing loss.
Lossless rollouts are exact AR samples, so `old_logprobs` = the rollout's `ar_logprobs` and the first epoch is
on-policy; logit_mix rollouts get truncated importance weights against their `behavior_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from policy.hybrid import HybridPolicy
from policy.losses import masked_ce
from rollout.types import Trajectory
from trainers.config import Section
from trainers.rl_losses import GRPOConfig, LossInputs, group_advantages, grpo_loss


class LearnerConfig(Section):
    """Optimisation of the RL step."""

    lr: float = Field(1e-5, gt=0.0)
    """AdamW learning rate."""
    epochs: int = Field(1, ge=1)
    """passes over each rollout batch."""
    minibatches: int = Field(1, ge=1)
    """optimizer steps per epoch."""
    grad_clip: float = Field(1.0, gt=0.0)
    """global grad-norm clip."""
    lambda_diff: float = Field(0.5, ge=0.0)
    """weight of the diffusion self-distillation loss on the rollouts (0 = drafter left to drift)."""
    temperature: float = Field(1.0, gt=0.0)
    """sampling temperature of the rollouts: learner log-probs are taken at the same T."""
    grpo: GRPOConfig = GRPOConfig()


@dataclass(frozen=True)
class RolloutBatch:
    """Rollouts as right-padded tensors; token-level tensors are aligned with `input_ids`."""

    input_ids: torch.Tensor  # [B, S] prompt + completion
    valid: torch.Tensor  # [B, S] real tokens
    completion: torch.Tensor  # [B, S] 1 on model-generated tokens (loss positions)
    behavior_logprobs: torch.Tensor  # [B, S] at completion positions, else 0
    ar_logprobs: torch.Tensor  # [B, S]
    rewards: torch.Tensor  # [B]
    group_size: int

    @staticmethod
    def from_trajectories(trajs: list[Trajectory], rewards: list[float], group_size: int, pad_id: int):
        if len(trajs) % group_size:
            raise ValueError(f"{len(trajs)} trajectories do not split into groups of {group_size}")
        S = max(len(t.prompt_ids) + len(t.tokens) for t in trajs)
        B = len(trajs)
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        valid, comp = torch.zeros(B, S), torch.zeros(B, S)
        blp, alp = torch.zeros(B, S), torch.zeros(B, S)
        for i, t in enumerate(trajs):
            P, n = len(t.prompt_ids), len(t.tokens)
            ids[i, : P + n] = torch.tensor(t.prompt_ids + t.tokens)
            valid[i, : P + n] = 1
            comp[i, P : P + n] = 1
            blp[i, P : P + n] = torch.tensor(t.behavior_logprobs)
            alp[i, P : P + n] = torch.tensor(t.ar_logprobs)
        return RolloutBatch(ids, valid, comp, blp, alp, torch.tensor(rewards, dtype=torch.float), group_size)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, S] log-prob of token t under the logits at t-1 (0 at t = 0), at the sampling temperature."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    taken = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(taken, (1, 0))


class Learner:
    def __init__(self, policy: HybridPolicy, cfg: LearnerConfig):
        self.policy, self.cfg = policy, cfg
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        cfg, policy = self.cfg, self.policy
        policy.train()
        adv = group_advantages(batch.rewards, batch.group_size, cfg.grpo.scale)
        old = batch.ar_logprobs  # exact AR log-probs of the rollout policy (pi_old)
        B = batch.input_ids.shape[0]
        metrics: dict[str, float] = {}
        for epoch in range(cfg.epochs):
            for idx in torch.randperm(B).chunk(cfg.minibatches):
                ids, valid, comp = batch.input_ids[idx], batch.valid[idx], batch.completion[idx]
                out = policy.tidar_forward(ids, valid) if cfg.lambda_diff > 0 else None
                logits = (
                    out.ar_logits if out is not None else policy(input_ids=ids, attention_mask=valid).logits
                )
                learner = token_logprobs(logits, ids, cfg.temperature)
                if epoch == 0 and "rollout/logprob_mismatch" not in metrics:
                    diff = (learner.detach() - old[idx]).abs()[comp.bool()]
                    metrics["rollout/logprob_mismatch"] = float(diff.mean()) if diff.numel() else 0.0
                x = LossInputs(learner, old[idx], batch.behavior_logprobs[idx], adv[idx], comp)
                loss, m = grpo_loss(x, cfg.grpo)
                metrics |= m
                if out is not None:
                    diff_loss = masked_ce(out.diff_logits, ids, comp)
                    loss = loss + cfg.lambda_diff * diff_loss
                    metrics["train/diff_loss"] = float(diff_loss.detach())
                if out is not None and out.aux_loss is not None:
                    loss = loss + float(getattr(policy.config, "router_aux_loss_coef", 0.0)) * out.aux_loss
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                metrics["train/grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                )
                self.opt.step()
                metrics["train/loss"] = float(loss)
        metrics["reward/mean"] = float(batch.rewards.mean())
        metrics["reward/std"] = float(batch.rewards.std(unbiased=False))
        return metrics

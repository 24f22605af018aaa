"""The learner: trains the hybrid policy directly on rollouts.

Loss = GRPO/PPO-clip on the AR log-probs (the policy is the AR mode) + lambda_diff * TiDAR diffusion CE on the same
rollout sequences (sampled tokens as labels, so the drafter follows the moving policy) + the MoE load-balancing loss.
Lossless rollouts are exact AR samples, so `old_logprobs` = the rollout's `ar_logprobs` and the first epoch is
on-policy; logit_mix rollouts get truncated importance weights against their `behavior_logprobs`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from common.checkpoint import save_checkpoint
from common.config import Section
from common.device import DeviceName, resolve_device
from common.distributed import DistContext, Parallel
from policy.hybrid import HybridPolicy
from policy.losses import masked_ce, masked_soft_ce
from policy.masks import draft_block_positions, draft_block_targets, pack_block_columns
from rollout.types import Trajectory
from rollout.weight_sync import SentWeights, SyncAddress, SyncGroup, send, sync_names, sync_targets
from rollout.worker import to_numpy
from trainers.rl.losses import GRPOConfig, LossInputs, group_advantages, grpo_loss
from trainers.rl.ppo import PPOConfig, ValueHead, gae, value_loss, whiten


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
    diffusion: Literal["blocks", "full"] = "blocks"
    """the diffusion term's layout. `blocks`: `diff_blocks` decode proposals (K+1 masks each, the engine's draft)
    per row at random completion positions, n(K+1) extra tokens per row; `full`: TiDAR's S masks per row (K-blocks
    at shift 0), S extra tokens and a [2S, 2S] attention."""
    diff_blocks: int = Field(4, ge=1)
    """mask blocks per row under `diffusion: blocks`, where they fit in `diff_width`."""
    diff_width: int | None = Field(1, ge=1)
    """the fewest columns the term adds past the padded length, in blocks (None: diff_blocks, so every row gets them
    all, n(K+1) extra tokens per row). Otherwise each row packs its blocks into its own padding first
    (`pack_block_columns`) and gets min(diff_blocks, what fits): the padded batch computed those columns anyway."""
    diff_blocks_mean: float = Field(2.5, ge=0.0)
    """packed: the width grows from diff_width, one block at a time, until the rows hold this many blocks on average
    (or all they can), so the drafter's signal does not depend on how ragged the batch is: on the ablation's mixed
    lengths one block's width mostly suffices (2.8 blocks per row, +18% on the learner step), on countdown's equal
    lengths it takes two or three. With 1.7 blocks per row the drafter did not learn countdown; with 3.1 it did
    (docs/benchmarks.md)."""
    diff_focus: float = Field(0.0, ge=0.0, le=1.0)
    """the share of a row's `diff_blocks` placed at the proposals its rollout's engine got wrong (`draft_misses`:
    the steps that rejected a draft, likelier the more drafts they lost), the rest uniform; rows with fewer misses,
    or decoded without drafts, fill up uniformly (0 = all uniform)."""
    diff_target: Literal["tokens", "ar"] = "tokens"
    """what a diffusion slot learns: the rollout's sampled token (CE), or the AR policy's own distribution at that
    position, from the same forward at the rollout temperature (distillation: the same expected target, less
    variance)."""
    temperature: float = Field(1.0, gt=0.0)
    """sampling temperature of the rollouts: learner log-probs are taken at the same T."""
    algo: Literal["grpo", "ppo"] = "grpo"
    """group-relative advantages (GRPO) or a value head with GAE over tokens (PPO)."""
    grpo: GRPOConfig = GRPOConfig()
    """policy loss: clipping, aggregation, KL, truncated IS (shared by GRPO and PPO)."""
    ppo: PPOConfig = PPOConfig()
    device: DeviceName = "auto"
    """the learner's device, apart from the rollout workers' (auto: CUDA when visible, else cpu)."""
    gpus: float = Field(1.0, gt=0.0, le=1.0)
    """the GPU share the learner's bundle reserves under `rollout.placement` (a fraction lets workers share its GPU)."""
    autocast: Literal["none", "bfloat16"] = "none"
    """bf16 autocast of the learner's forwards (weights and AdamW state stay fp32; log-probs and losses fp32)."""
    world_size: int = Field(1, ge=1)
    """learner ranks. 1: the learner runs in the driver. N > 1: a group of N Ray actors (one placement-group bundle
    and, on CUDA, one GPU each) forming one torch.distributed group (gloo on CPU, nccl on CUDA); each takes its
    share of every minibatch, losses normalised by global counts, so N ranks follow the 1-rank curve."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """with world_size > 1: DDP (every rank holds the model; gradients all-reduced) or FSDP2 (fully_shard per decoder
    layer, then the root: parameters, gradients and AdamW state sharded, for a policy one device cannot train)."""
    cpus_per_rank: float = Field(1.0, gt=0.0)
    """CPUs each learner rank reserves in Ray (world_size > 1)."""
    threads: int = Field(1, ge=1)
    """torch threads of each learner rank (world_size > 1; the single learner uses the driver's)."""
    timeout_s: float = Field(600.0, gt=0.0)
    """deadline of every collective of the learner group and of one learner step: a lost rank fails the step with
    an error naming it instead of hanging."""
    seed: int = 0
    """seed of the learner's own generator (minibatch order, diffusion block positions), checkpointed with it: the
    same on every rank, so N ranks draw what 1 rank draws."""


@dataclass(frozen=True)
class RolloutBatch:
    """Rollouts as right-padded tensors; token-level tensors are aligned with `input_ids`."""

    input_ids: torch.Tensor  # [B, S] prompt + completion (model and env turns)
    valid: torch.Tensor  # [B, S] real tokens
    completion: torch.Tensor  # [B, S] 1 on model-generated tokens (loss positions; env tokens are 0)
    behavior_logprobs: torch.Tensor  # [B, S] at completion positions, else 0
    ar_logprobs: torch.Tensor  # [B, S] AR policy of the rollout's version
    rewards: torch.Tensor  # [B] episode reward
    token_rewards: torch.Tensor  # [B, S] each turn's reward on its last model token (PPO)
    group_size: int
    policy_version: int  # oldest policy version among the rollouts
    # [B, S] draft tokens the rollout's engine rejected in the proposal anchored at each position (`draft_misses`)
    draft_miss: torch.Tensor | None = None

    def to(self, device: torch.device) -> RolloutBatch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return RolloutBatch(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        )

    @staticmethod
    def from_trajectories(trajs: list[Trajectory], rewards: list[float], group_size: int, pad_id: int):
        """`rewards[i]` is trajectory i's episode reward; for multi-turn trajectories its per-turn rewards (which
        must sum to it) are placed at their turns' ends, otherwise it sits on the last completion token."""
        if len(trajs) % group_size:
            raise ValueError(f"{len(trajs)} trajectories do not split into groups of {group_size}")
        S = max(len(t.prompt_ids) + len(t.tokens) for t in trajs)
        B = len(trajs)
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        valid, comp = torch.zeros(B, S), torch.zeros(B, S)
        blp, alp, tok_r, miss = torch.zeros(B, S), torch.zeros(B, S), torch.zeros(B, S), torch.zeros(B, S)
        for i, t in enumerate(trajs):
            P, n = len(t.prompt_ids), len(t.tokens)
            for at, missed in draft_misses(t):
                miss[i, P + at] += missed
            ids[i, : P + n] = torch.tensor(t.prompt_ids + t.tokens)
            valid[i, : P + n] = 1
            comp[i, P : P + n] = torch.tensor(t.env_mask, dtype=torch.float) if t.env_mask is not None else 1
            blp[i, P : P + n] = torch.tensor(t.behavior_logprobs)
            alp[i, P : P + n] = torch.tensor(t.ar_logprobs)
            if t.turn_ends:
                for end, r in zip(t.turn_ends, t.turn_rewards, strict=True):
                    tok_r[i, P + end] += r
            elif n:
                tok_r[i, P + n - 1] = rewards[i]
        return RolloutBatch(
            ids,
            valid,
            comp,
            blp,
            alp,
            torch.tensor(rewards, dtype=torch.float),
            tok_r,
            group_size,
            min(t.policy_version for t in trajs),
            miss,
        )


def draft_misses(t: Trajectory) -> list[tuple[int, int]]:
    """(completion index, rejected drafts) for every decode step of `t` that rejected a draft. The index is the
    proposal's start in the training layout (`draft_blocks_mask`): the position before its first drafted token,
    whose token the same forward's AR head sampled (slot 0), so a block started there is the proposal that failed.

    Each model turn opens with a prefill token and goes on in decode steps of accepted + 1 tokens; the steps of all
    turns are concatenated in `accept_counts`, in order, and a turn's last step may be cut by its stop (a rejection
    past the cut is not counted: its token was never kept)."""
    segments, at = [], 0  # contiguous model-generated runs [lo, hi): one per turn
    for model, run in itertools.groupby(t.env_mask or [1] * len(t.tokens)):
        n = len(list(run))
        if model:
            segments.append((at, at + n))
        at += n
    out, step = [], 0
    steps = list(zip(t.accept_counts, t.draft_counts, strict=True))
    for lo, hi in segments:
        c = lo + 1  # the prefill emitted the turn's first token
        while c < hi and step < len(steps):
            accepted, offered = steps[step]
            if accepted < offered and c + accepted < hi:  # a rejection inside the kept tokens
                out.append((c - 1, offered - accepted))
            c += accepted + 1
            step += 1
    return out


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, S] log-prob of token t under the logits at t-1 (0 at t = 0), at the sampling temperature."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    taken = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(taken, (1, 0))


@torch.no_grad()
def rollout_diagnostics(
    logits,
    learner_logprobs,
    ar_logprobs,
    behavior_logprobs,
    mask,
    temperature: float,
    ctx: DistContext | None = None,
) -> dict:
    """Rollout-vs-learner mismatch over model tokens: mean |learner - rollout AR| log-prob, k3 KL(behaviour ||
    learner), normalised ESS of the raw importance weights pi_learner / pi_behavior, and the policy's entropy.
    Under a learner group each rank passes its rows and the sums are taken over every rank's (`ctx`)."""
    m = mask.bool()
    log_w = (learner_logprobs - behavior_logprobs)[m]
    w = log_w.exp()
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # predicts tokens 1..S-1
    entropy = -(logp.exp() * logp).sum(-1)[m[:, 1:]]
    sums = torch.stack(
        [
            m.sum().double(),
            (learner_logprobs - ar_logprobs)[m].abs().double().sum(),
            (w - 1 - log_w).double().sum(),
            w.double().sum(),
            (w.double() ** 2).sum(),
            entropy.double().sum(),
            torch.tensor(float(entropy.numel()), dtype=torch.float64, device=m.device),
        ]
    )
    if ctx is not None:
        sums = ctx.sum_tensor(sums)
    n, mismatch, kl, w1, w2, ent, n_ent = sums.tolist()
    if not n:
        return {}
    return {
        "rollout/logprob_mismatch": mismatch / n,
        "rollout/mismatch_kl": kl / n,
        "rollout/is_ess": w1**2 / (n * w2),
        "train/entropy": ent / max(n_ent, 1.0),
    }


class _Trained(nn.Module):
    """Everything the learner trains as one root module: the policy and, for PPO, the value head. Its forward is
    every forward the learner takes, so DDP and FSDP2 wrap it whole (FSDP2's root unit gathers the embeddings, head
    and value head in its pre-forward)."""

    def __init__(self, policy: HybridPolicy, value_head: ValueHead | None, autocast: bool):
        super().__init__()
        self.policy, self.value_head, self.autocast = policy, value_head, autocast

    def forward(
        self,
        ids,
        valid,
        need_diff: bool,
        need_values: bool,
        need_aux: bool = True,
        starts: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ):
        """AR logits [B,S,V], diffusion logits or None, MoE aux or None, values [B,S] (V before token t) or None.

        One forward either way: the clean half of the TiDAR forward (full layout, or the draft blocks at `starts`)
        is the AR forward, so its hidden states feed the value head too."""
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=self.autocast):
            if need_diff:
                if starts is not None:
                    out = self.policy.draft_blocks_forward(ids, valid, starts, active=active, cols=cols)
                else:
                    out = self.policy.tidar_forward(ids, valid)
                logits, diff, aux, hidden = out.ar_logits, out.diff_logits, out.aux_loss, out.hidden
            else:
                ar = self.policy.ar_forward(ids, valid, want_aux=need_aux)
                logits, diff, aux, hidden = ar.logits, None, ar.aux_loss, ar.hidden
            # the value of the state that token t is sampled from: the hidden state at t - 1
            values = F.pad(self.value_head(hidden)[:, :-1].float(), (1, 0)) if need_values else None
        return logits, diff, aux, values


class Learner:
    """One RL update per rollout batch. `version` counts updates: it is the policy version the workers get next.

    Alone (the default `ctx`), it trains in this process. As one rank of a learner group (trainers/rl/group.py) every
    rank gets the whole batch and computes what depends on all of it (advantages, minibatch order, diffusion block
    positions: the same generator on every rank), then forwards only its share of each minibatch. Each loss term is
    its local sum over the *global* count it is a mean of (tokens, rows or diffusion slots), so the averaged
    gradient is the 1-rank gradient; metrics are reduced the same way. The MoE load-balancing loss is a product of
    routing means and stays per rank, as in every data-parallel MoE trainer."""

    def __init__(
        self,
        policy: HybridPolicy,
        cfg: LearnerConfig,
        version: int = 0,
        ctx: DistContext | None = None,
    ):
        self.cfg, self.version = cfg, version
        # the drift action may raise it; checkpointed with the learner. A plain (unconverted) policy has no drafter
        # to keep fresh: it drafts from history only, which needs no training
        self.lambda_diff = cfg.lambda_diff if policy.is_converted else 0.0
        self.ctx = ctx or DistContext(device=resolve_device(cfg.device, "learner.device"))
        device = self.device = self.ctx.device
        value_head = ValueHead(policy.model.config.hidden_size) if cfg.algo == "ppo" else None
        self.ref = None  # frozen copy of the starting policy: the KL reference (whole on every rank)
        if cfg.grpo.kl_coef > 0:
            self.ref = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
        self.trained = _Trained(policy, value_head, cfg.autocast == "bfloat16")
        self.par = Parallel(self.ctx, policy, self.trained, cfg.strategy)
        if not self.par.fsdp:
            self.trained.to(device)  # FSDP shards the CPU model and moves only each rank's shards
        self.par.place()
        self.module = self.par.module  # the forward: bare, under DDP, or sharded
        groups = [{"params": list(policy.parameters()), "lr": cfg.lr}]
        if value_head is not None:
            groups.append({"params": list(value_head.parameters()), "lr": cfg.ppo.value_lr})
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._sync: SyncGroup | None = None  # rank 0's handle on the weight-sync group
        self._published: tuple[int, SentWeights] | None = None
        self._spare: SentWeights | None = None  # the copy before the last: its buffers are reused

    @property
    def policy(self) -> HybridPolicy:
        """The policy with its full weights (FSDP: rank 0's gathered copy, a collective every rank must join)."""
        return self.par.full_policy() if self.par.fsdp else self.trained.policy

    @property
    def value_head(self) -> ValueHead | None:
        return self.trained.value_head

    def state_dict(self, full: dict[str, torch.Tensor] | None = None) -> dict:
        """The full, name-keyed state (optimizer by parameter name, so it resumes under any world size and
        strategy). A collective under a group: every rank calls it; rank 0's is complete. `full`: the gathered
        `par.full_state()` when the caller has it already."""
        state = {
            "optimizer": self.par.optimizer_state(self.opt),
            "version": self.version,
            "lambda_diff": self.lambda_diff,
            "generator": self.gen.get_state(),
        }
        if self.value_head is not None:
            full = (full if full is not None else self.par.full_state()) or {}
            state["value_head"] = {
                k.removeprefix("value_head."): v for k, v in full.items() if k.startswith("value_head.")
            }
        if self.ref is not None:
            state["ref"] = self.ref.model.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        # the value head first: FSDP's optimizer-state load reads the parameters it shards
        if self.value_head is not None:
            self._load_value_head(state["value_head"])
        self.par.load_optimizer_state(self.opt, state["optimizer"])
        self.version = state.get("version", self.version)
        self.lambda_diff = state.get("lambda_diff", self.lambda_diff)
        if "generator" in state:
            self.gen.set_state(state["generator"])
        if self.ref is not None:
            self.ref.model.load_state_dict(state["ref"])

    def save(self, dest: Path, tokenizer, extra: dict) -> None:
        """An atomic, resumable checkpoint: the full policy as an HF directory, plus this learner's state (under
        `learner`) and `extra`. Under a group every rank calls it (the gathers are collectives); rank 0 writes."""
        if self.par.fsdp:  # one gather serves the policy and the value head (full: None on ranks > 0)
            full = self.par.full_state()
            policy = self.par.full_policy(full) if self.ctx.is_main else None
            state = self.state_dict(full if self.ctx.is_main else {})
        else:
            policy, state = self.trained.policy, self.state_dict()
        if self.ctx.is_main:
            save_checkpoint(dest, policy, tokenizer, {"learner": state, **extra})
        self.ctx.barrier()

    def full_weights(
        self, dtype: torch.dtype | None = None, every_rank: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The policy's weights as a sync carries them (`sync_names`: tied ones once; names relative to the HF
        model), floating ones cast to `dtype`: on rank 0 (None on the others), or on every rank (colocated
        rollouts). Under FSDP every shard is gathered before this returns (a collective all ranks join), so rank 0
        can send without interleaving."""
        names = sync_names(self.trained.policy.model)
        if self.par.fsdp:
            full = self.par.full_state(every_rank)
            if full is None:
                return None
            tensors = {n: full[f"policy.model.{n}"] for n in names}
        elif self.ctx.is_main or every_rank:
            tensors = {n: t.detach() for n, t in sync_targets(self.trained.policy.model).items()}
        else:
            return None
        return {
            n: t.to(dtype) if dtype is not None and t.is_floating_point() else t for n, t in tensors.items()
        }

    def weights_numpy(self) -> dict[str, np.ndarray] | None:
        """The object-store path: the weights as a numpy state dict on rank 0 (a collective under FSDP)."""
        tensors = self.full_weights()
        return None if tensors is None else to_numpy(tensors)

    def send_weights(
        self, address: SyncAddress, version: int, dtype: torch.dtype, bucket_mb: float
    ) -> dict[str, float]:
        """The collective path, on every rank: all gather, then rank 0 sends as sync rank 0. Rank 0 keeps what it
        sent (on the host) as `version`'s object-store copy: the fallback, and a restarted worker's weights
        (`published`). Returns rank 0's `sync/*` metrics ({} on the others)."""
        t0 = time.perf_counter()
        tensors = self.full_weights(dtype)
        if tensors is None:
            return {}
        gathered = time.perf_counter() - t0
        if self._sync is None or self._sync.address != address:
            if self._sync is not None:  # re-formed after a failure: leave the old group
                self._sync.close()
            self._sync = None
            self._sync = SyncGroup(address, 0, self.device)
        # the copy before last is overwritten: this one and the last alternate (two host copies at most)
        stats, sent = send(self._sync, tensors, version, bucket_mb, reuse=self._spare)
        self._spare = self._published[1] if self._published is not None else None
        self._published = (version, sent)
        return stats.metrics() | {"sync/gather_s": gathered, "sync/send_s": stats.seconds}

    def published(self, version: int) -> dict[str, np.ndarray]:
        """Rank 0: the numpy copy of what the last collective sync sent, which must be `version`."""
        if self._published is None or self._published[0] != version:
            have = None if self._published is None else self._published[0]
            raise RuntimeError(
                f"learner: no copy of policy v{version} to resend (the last sync sent v{have})"
            )
        return to_numpy(self._published[1].tensors())

    def move_optimizer_state(self, device: torch.device) -> None:
        """AdamW's moments to `device` (the host while colocated rollouts run on the GPU, back before a step).
        Under FSDP they are sharded already (1/N of them per rank) and stay put."""
        if self.par.fsdp:
            return
        for state in self.opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != "step":  # the step count stays where AdamW keeps it
                    state[k] = v.to(device, non_blocking=True)

    def _load_value_head(self, weights: dict[str, torch.Tensor]) -> None:
        """Full value-head weights into this rank's value head (FSDP: into its shards of the root unit)."""
        if not self.par.fsdp:
            self.value_head.load_state_dict(weights)
            return
        set_model_state_dict(
            self.trained,
            {f"value_head.{k}": v for k, v in weights.items()},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )

    def _forward(self, ids, valid, need_diff: bool, need_values: bool, need_aux: bool = True, **blocks):
        return self.module(ids, valid, need_diff, need_values, need_aux, **blocks)

    def _all_rows(self, fn, n: int) -> torch.Tensor:
        """[n, S]: `fn(rows)` on this rank's share of rows 0..n-1, gathered from every rank (no gradient)."""
        lo, hi = self.ctx.bounds(n)
        with torch.no_grad():
            return self.ctx.gather_rows(fn(slice(lo, hi)), n)

    def _advantages(
        self, batch: RolloutBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """GRPO: [B] group-normalised. PPO: [B, S] GAE over model tokens, plus rollout-time values and returns."""
        if self.cfg.algo == "grpo":
            return group_advantages(batch.rewards, batch.group_size, self.cfg.grpo.scale), None, None

        def values(rows):
            *_, v = self._forward(
                batch.input_ids[rows], batch.valid[rows], False, need_values=True, need_aux=False
            )
            return v

        values = self._all_rows(values, batch.input_ids.shape[0])
        adv, returns = gae(
            batch.token_rewards, values, batch.completion, self.cfg.ppo.gamma, self.cfg.ppo.lam
        )
        if self.cfg.ppo.whiten:
            adv = whiten(adv, batch.completion)
        return adv, values, returns

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """`epochs` x `minibatches` optimizer steps on one rollout batch. Train metrics are the mean over every
        minibatch step. The rollout-vs-learner diagnostics come from the first minibatch, the only forward that runs
        before an update: later ones would measure the learner's own steps, not the rollout's exactness."""
        cfg = self.cfg
        B = batch.input_ids.shape[0]
        if B // cfg.minibatches < self.ctx.world:  # minibatches of B // m or B // m + 1 rows
            raise ValueError(
                f"learner: {B} rollouts in {cfg.minibatches} minibatches leave a minibatch of {B // cfg.minibatches} "
                f"rows, fewer than the {self.ctx.world} ranks that each need one (learner.world_size x "
                "learner.minibatches <= batch size)"
            )
        batch = batch.to(self.device)
        self.trained.train()
        adv, old_values, returns = self._advantages(batch)
        staleness = self.version - batch.policy_version
        # async: pi_old is the learner now; the rollout policy is the IS behaviour distribution
        if staleness > 0:

            def logprobs(rows):
                ids = batch.input_ids[rows]
                logits, *_ = self._forward(ids, batch.valid[rows], False, need_values=False, need_aux=False)
                return token_logprobs(logits, ids, cfg.temperature)

            old = self._all_rows(logprobs, B)
        else:  # exact AR log-probs of the rollout policy; logit_mix rollouts carry their own behaviour log-probs
            old = batch.ar_logprobs
        targets = _Targets(old, batch.behavior_logprobs, adv, old_values, returns)
        steps, diagnostics = [], []
        for _ in range(cfg.epochs):
            for idx in torch.randperm(B, generator=self.gen).to(self.device).tensor_split(cfg.minibatches):
                m, diag = self._minibatch(batch, targets, idx, diagnose=not steps)
                steps.append(m)
                diagnostics.append(diag)
        self.version += 1
        return {
            "rollout/staleness": float(staleness),
            **_mean_metrics(diagnostics),
            **_mean_metrics(steps),
            "train/optimizer_steps": float(len(steps)),
            "reward/mean": float(batch.rewards.mean()),
            "reward/std": float(batch.rewards.std(unbiased=False)),
        }

    def _diff_loss(self, diff_logits, ar_logits, ids, comp, starts, ok) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion term and its weight sum (the count it is a mean over): each slot's CE against the sampled
        token at its position, or (diff_target: ar) against the AR distribution there (the AR logits one position
        back predict it)."""
        cfg = self.cfg
        if starts is None:  # full layout: slot t predicts x_t
            pos, weight = None, comp
            targets = ids
        else:
            L = diff_logits.shape[1] // starts.shape[1]
            targets, weight = draft_block_targets(ids, comp, starts, L)
            weight = weight * ok.repeat_interleave(L, dim=1)
            pos = draft_block_positions(starts, L).clamp(max=ids.shape[1] - 1)
        if cfg.diff_target == "tokens":
            return masked_ce(diff_logits, targets, weight), weight.sum()
        if pos is None:  # row t - 1's AR logits predict x_t (row 0 is a prompt position, never weighted)
            teacher = F.pad(ar_logits[:, :-1], (0, 0, 1, 0))
        else:  # slot positions are completion positions or later, so pos - 1 >= 0
            teacher = ar_logits.gather(
                1, (pos - 1).clamp(min=0)[:, :, None].expand(-1, -1, ar_logits.shape[-1])
            )
        return masked_soft_ce(diff_logits, teacher / cfg.temperature, weight), weight.sum()

    def _pack(self, lengths: torch.Tensor, S: int, ok: torch.Tensor) -> torch.Tensor:
        """Block columns [B, n] of the narrowest packed layout, from diff_width blocks past S up, whose rows hold
        diff_blocks_mean blocks on average (capped by the blocks they have, `ok`)."""
        cfg, L, n = self.cfg, self.trained.policy.block_size + 1, ok.shape[1]
        want = min(cfg.diff_blocks_mean, float(ok.sum(1).float().mean()))
        for width in range(cfg.diff_width, cfg.diff_blocks + 1):
            cols = pack_block_columns(lengths, S + width * L, n, L)
            if float(((cols >= 0) & ok).sum(1).float().mean()) >= want:
                break
        return cols

    def _blocks(self, batch: RolloutBatch, idx: torch.Tensor) -> dict:
        """The diffusion term's draft blocks of minibatch `idx` (starts, ok, cols [b, n]), drawn over the whole
        minibatch from the learner's generator, so every rank draws what one rank would; {} without the term."""
        cfg = self.cfg
        if not (self.lambda_diff > 0 and cfg.diffusion == "blocks"):
            return {}
        comp, valid = batch.completion[idx], batch.valid[idx]
        misses = batch.draft_miss[idx] if batch.draft_miss is not None else None
        n_focus = round(cfg.diff_blocks * cfg.diff_focus)
        starts, ok = sample_block_starts(comp, cfg.diff_blocks, misses, n_focus, self.gen)
        cols = None
        if cfg.diff_width is not None and cfg.diff_width < cfg.diff_blocks:
            cols = self._pack(valid.sum(1), comp.shape[1], ok)
            ok = ok & (cols >= 0)
            cols = cols.masked_fill(~ok, -1)
        return {"starts": starts, "active": ok, "cols": cols}

    def _minibatch(self, batch: RolloutBatch, t: _Targets, idx: torch.Tensor, diagnose: bool):
        """One optimizer step on minibatch `idx`, of which this rank forwards its share `rows`: (train metrics,
        rollout diagnostics or {}), both over the whole minibatch."""
        cfg, ctx = self.cfg, self.ctx
        blocks = self._blocks(batch, idx)
        lo, hi = ctx.bounds(len(idx))
        rows = idx[lo:hi]
        local = {k: v[lo:hi] if v is not None else None for k, v in blocks.items()}
        ids, valid, comp = batch.input_ids[rows], batch.valid[rows], batch.completion[rows]
        logits, diff_logits, aux, values = self._forward(
            ids, valid, self.lambda_diff > 0, need_values=self.value_head is not None, **local
        )
        learner = token_logprobs(logits, ids, cfg.temperature)
        ref = None
        if self.ref is not None:
            with torch.no_grad():
                ref = token_logprobs(self.ref.ar_forward(ids, valid).logits, ids, cfg.temperature)
        diag = {}
        if diagnose:
            diag = rollout_diagnostics(
                logits.detach(),
                learner.detach(),
                batch.ar_logprobs[rows],
                t.behavior[rows],
                comp,
                cfg.temperature,
                ctx,
            )
        pg_loss, pg_metrics = grpo_loss(
            LossInputs(learner, t.old[rows], t.behavior[rows], t.adv[rows], comp, ref), cfg.grpo
        )
        # each term is a mean over this rank's count; times count / global count it is this rank's part of the
        # global mean (all ranks' parts sum to the 1-rank term)
        terms: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []  # (metric, term, local count, weight)
        per_row = cfg.grpo.aggregation != "token_mean"
        terms.append(("", pg_loss, comp.sum() if not per_row else _count(hi - lo, comp), 1.0))
        if values is not None:
            v_loss = value_loss(values, t.old_values[rows], t.returns[rows], comp, cfg.ppo.value_clip)
            terms.append(("train/value_loss", v_loss, comp.sum(), cfg.ppo.vf_coef))
        if diff_logits is not None:
            diff_loss, diff_w = self._diff_loss(
                diff_logits, logits, ids, comp, local.get("starts"), local.get("active")
            )
            terms.append(("train/diff_loss", diff_loss, diff_w, self.lambda_diff))
        if (
            aux is not None
        ):  # a product of routing means: per rank, weighted by its rows (as data-parallel MoE does)
            coef = float(getattr(self.trained.policy.config, "router_aux_loss_coef", 0.0))
            terms.append(("", aux, _count(hi - lo, comp), coef))
        counts = torch.stack([c.detach().double().reshape(()) for _, _, c, _ in terms])
        totals = ctx.sum_tensor(counts).clamp(min=1.0)
        shares = (counts.clamp(min=1.0) / totals).float()
        # a rank with no items of a term (no completion tokens in its rows, no diffusion slots) adds an exact 0
        loss = sum(
            torch.where(c > 0, w * term * share, torch.zeros_like(term))
            for (_, term, _, w), share, c in zip(terms, shares, counts, strict=True)
        )
        self.opt.zero_grad(set_to_none=True)
        # DDP and FSDP2 average gradients over ranks: the world-size factor makes it their sum
        (loss * ctx.world).backward()
        grad_norm = self.par.clip_grad_norm(cfg.grad_clip)
        self.opt.step()
        n_tok = float(comp.sum())
        local_metrics = {k: (v, n_tok) for k, v in pg_metrics.items()}  # token means over the completion
        local_metrics |= {k: (float(term.detach()), float(c)) for (k, term, c, _) in terms if k}
        local_metrics["train/loss"] = (
            float(loss.detach()) * ctx.world,
            1.0,
        )  # the mean over ranks of N x part
        metrics = ctx.weighted_means(local_metrics)
        metrics["train/grad_norm"] = grad_norm
        if "active" in blocks:
            metrics["train/diff_blocks_per_row"] = float(blocks["active"].sum(1).float().mean())
        return metrics, diag


def _count(rows: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(rows), device=like.device)


def sample_block_starts(
    eligible: torch.Tensor,
    n: int,
    misses: torch.Tensor | None = None,
    n_focus: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n distinct start positions per row among its eligible positions ([B, S] > 0, e.g. its model tokens):
    first up to `n_focus` of the positions with `misses` > 0 (drawn without replacement in proportion to it, by
    Efraimidis-Spirakis keys log(u) / w), then uniform. (starts [B, min(n, S)], ok [B, min(n, S)]); ok is False
    where a row has fewer than n eligible positions."""
    B, S = eligible.shape

    def rand() -> torch.Tensor:  # drawn on the CPU generator: the same numbers on every device
        return torch.rand(B, S, generator=generator).to(eligible.device)

    score = rand()  # uniform order in [0, 1)
    if n_focus and misses is not None:
        keys = rand().clamp(min=1e-12).log() / misses.clamp(min=1e-6)
        keys = keys.masked_fill((misses <= 0) | (eligible <= 0), -float("inf"))
        top = keys.topk(min(n_focus, S), dim=1)
        score.scatter_(
            1, top.indices, torch.where(top.values > -float("inf"), 2.0, score.gather(1, top.indices))
        )
    score = score.masked_fill(eligible <= 0, -float("inf"))
    top = score.topk(min(n, S), dim=1)
    return top.indices, top.values > -float("inf")


@dataclass(frozen=True)
class _Targets:
    """What every minibatch of one step is trained against ([B, S] unless noted)."""

    old: torch.Tensor  # pi_old log-probs: the ratio's denominator
    behavior: torch.Tensor  # the sampler's log-probs: the importance weights' denominator
    adv: torch.Tensor  # [B] (GRPO) or [B, S] (PPO)
    old_values: torch.Tensor | None  # PPO: values at rollout time
    returns: torch.Tensor | None  # PPO: GAE returns


def _mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over the records that have the key."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}

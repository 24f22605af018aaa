"""`HybridPolicy`: any Hugging Face causal LM as a hybrid AR + one-step block-diffusion model (TiDAR).

The wrapped model is untouched apart from one added mask token. Its default forward is plain causal AR, so HF
`generate`, TRL and likelihood evaluation work unchanged. The diffusion mode is the same network under a different
attention pattern (`policy.masks`). The blockrl metadata (`mask_token_id`, `block_size`) travels in the HF config
under the key `blockrl`, so a converted checkpoint is still a plain `AutoModelForCausalLM` directory.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from policy.families import (
    UnsupportedModelError,
    family_name,
    load_causal_lm,
    own_logits,
    refusal_reason,
    window_mask_mods,
    window_masks,
)
from policy.flex import FLEX, block_mask, register_flex
from policy.losses import TidarLossOutput, load_balancing_loss, tidar_loss
from policy.masks import (
    appended_block_columns,
    draft_block_positions,
    draft_blocks_mask,
    slot_columns,
    tidar_mask_mod,
    tidar_training_mask,
    to_additive,
)
from policy.metadata import METADATA_FORMAT, METADATA_KEY
from policy.tokenizer import MASK, eos_ids


@dataclass(frozen=True)
class TidarOutput:
    ar_logits: torch.Tensor  # [B, S, V] clean half: position t predicts token t+1
    diff_logits: (
        torch.Tensor
    )  # [B, S, V] mask half: position t predicts token t ([B, n*L, V] for draft blocks)
    aux_loss: torch.Tensor | None  # MoE load balancing over real tokens, None for dense models
    hidden: torch.Tensor | None = None  # [B, S, H] clean half's last hidden state (= the AR forward's)


@dataclass
class ArOutput:
    logits: torch.Tensor  # [B, S, V] position t predicts token t+1
    hidden: torch.Tensor  # [B, S, H] last hidden state
    aux_loss: torch.Tensor | None  # MoE load balancing over real tokens (when asked, MoE only)


def moe_shape(config) -> tuple[int, int] | None:
    """(num_experts, top_k) for MoE configs across HF families, None for dense ones."""
    n = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    return (int(n), int(k)) if n and k else None


def router_logits(out) -> list[torch.Tensor]:
    """The per-layer router logits of a base-model output (empty for dense models and families that return none)."""
    return [r for r in (getattr(out, "router_logits", None) or ()) if isinstance(r, torch.Tensor)]


class HybridPolicy(nn.Module):
    """A causal LM plus a mask token: AR by default, block diffusion under the TiDAR mask.

    Construction refuses, with `UnsupportedModelError` naming the family, a model the policy cannot serve exactly:
    a family on the refusal list (`policy.families`), or one whose logits through the policy's path (base model
    under a 4D mask with explicit positions, then the CausalLM's own head) differ from `model(ids).logits` on one
    probe forward. An untested family is thus refused rather than silently wrong. `check=False` skips both."""

    def __init__(
        self,
        model: PreTrainedModel,
        mask_token_id: int | None = None,
        block_size: int = 16,
        check: bool = True,
    ):
        super().__init__()
        self.model = model
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.prompt_format = (
            "text"  # how task prompts were encoded in training: "text" or "chat" (PromptFormat)
        )
        self.training_attention = (
            "dense"  # how tidar_forward masks: "dense" [2S, 2S] or "flex" (set_training_attention)
        )
        if check:
            reason = refusal_reason(model.config)
            if reason is not None:
                raise UnsupportedModelError(f"{family_name(model)}: not supported: {reason}")
            self.probe()

    # ------------------------------------------------------------------ construction and I/O
    @property
    def config(self):
        return self.model.config

    @property
    def is_converted(self) -> bool:
        return self.mask_token_id is not None

    @property
    def moe(self) -> tuple[int, int] | None:
        return moe_shape(self.model.config)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
    ) -> HybridPolicy:
        """Load a blockrl checkpoint, or a plain HF checkpoint (then `is_converted` is False; call `convert`)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
        reason = refusal_reason(AutoConfig.from_pretrained(path))  # refuse before loading any weights
        if reason is not None:
            config = AutoConfig.from_pretrained(path)
            raise UnsupportedModelError(f"{config.model_type} ({path}): not supported: {reason}")
        model = load_causal_lm(
            lambda attn: AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype),
            attn_implementation,
        )
        meta = getattr(model.config, METADATA_KEY, None) or {}  # as _checkpoint_metadata reads it
        policy = cls(model, meta.get("mask_token_id"), int(meta.get("block_size", 16)))
        policy.prompt_format = meta.get("prompt_format", "text")
        return policy

    def convert(self, tokenizer: PreTrainedTokenizerBase | None = None, block_size: int | None = None) -> int:
        """Add the mask token (to the tokenizer when given) and resize the embeddings; returns its id.

        The new embedding row starts at the mean of the existing ones (transformers' mean resizing).
        """
        if block_size is not None:
            self.block_size = block_size
        if self.is_converted:
            return self.mask_token_id
        if tokenizer is not None:
            tokenizer.add_special_tokens({"mask_token": MASK})
            mask_id = tokenizer.mask_token_id
            new_size = max(len(tokenizer), self.model.config.vocab_size)
        else:
            mask_id = self.model.config.vocab_size
            new_size = mask_id + 1
        self.model.resize_token_embeddings(new_size, mean_resizing=True)
        self.mask_token_id = int(mask_id)
        self._write_metadata()
        return self.mask_token_id

    def eos_ids(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[int, ...]:
        """Every id that ends a generation: the tokenizer's EOS and `generation_config.eos_token_id` (several ids
        where the model has them, e.g. a chat template's end-of-turn token added by conversion)."""
        return eos_ids(tokenizer, self.model.generation_config)

    def _write_metadata(self) -> None:
        meta = {
            "format": METADATA_FORMAT,
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "prompt_format": self.prompt_format,
        }
        setattr(self.model.config, METADATA_KEY, meta)

    def resolve_prompt_format(self, requested: str) -> str:
        """A job's `prompt_format`: `auto` is the format this checkpoint was trained on (chat for a model converted
        on chats), anything else is taken as asked."""
        return self.prompt_format if requested == "auto" else requested

    def save_pretrained(
        self, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        """Save as an HF directory (safetensors + config with blockrl metadata [+ tokenizer])."""
        if self.is_converted or self.prompt_format != "text":
            self._write_metadata()
        self.model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------ forwards
    def forward(self, *args, **kwargs):
        """Plain causal AR forward of the wrapped model (HF semantics)."""
        return self.model(*args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> logits [..., V], exactly as the model's own forward makes them (its LM
        head plus whatever the family does after it: soft-capping, scaling, ...)."""
        return own_logits(self.model, hidden)

    def attention_mask_4d(
        self,
        mask: torch.Tensor,
        dtype: torch.dtype,
        q_pos: torch.Tensor | None = None,
        k_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Bool [Q, KV] or [B, Q, KV] mask -> the 4D form this model's attention implementation reads correctly.

        For a family with sliding-window layers, give the token positions of the queries (q_pos [B, Q]) and keys
        (k_pos [B, KV]): the result is then the per-layer-type dict (or the windowed mask) the family reads."""
        m = mask[None, None] if mask.dim() == 2 else mask[:, None]
        m = window_masks(self.model.config, m, q_pos, k_pos)
        if self.model.config._attn_implementation in ("sdpa", FLEX):
            return m
        if isinstance(m, dict):
            return {k: to_additive(v, dtype) for k, v in m.items()}
        return to_additive(m, dtype)  # eager (and others) need an additive mask

    @contextlib.contextmanager
    def _probing(self):
        """A probe's model state: eval mode, sliding windows shrunk to 3 (so windowed masks matter at the probe's
        short length); both restored after."""
        cfg = self.model.config
        was_training, saved_window = self.model.training, getattr(cfg, "sliding_window", None)
        self.model.eval()
        if saved_window:
            cfg.sliding_window = 3
        try:
            yield
        finally:
            if saved_window:
                cfg.sliding_window = saved_window
            self.model.train(was_training)

    @torch.no_grad()
    def probe(self, seq_len: int = 9) -> None:
        """One forward through the policy's logit path vs `model(ids).logits`; raises UnsupportedModelError naming
        the family on a mismatch (or when the path fails). Sliding windows are shrunk to 3 during the probe so
        that the windowed masks are exercised at the probe's short length."""
        emb = self.model.get_input_embeddings().weight
        V = min(int(emb.shape[0]), 1000)
        ids = (torch.arange(seq_len, device=emb.device) * 7 + 3) % V
        ids = ids[None]
        pos = torch.arange(seq_len, device=emb.device)[None]
        try:
            with self._probing():
                ref = self.model(input_ids=ids, use_cache=False).logits.float()
                got = self.masked_forward(ids, pos, torch.ones(seq_len, seq_len, dtype=torch.bool).tril())[
                    0
                ].float()
        except UnsupportedModelError:
            raise
        except Exception as e:
            raise UnsupportedModelError(
                f"{family_name(self.model)}: not supported: the policy's forward path fails ({type(e).__name__}: {e})"
            ) from e
        tol = _probe_tolerance(ref, emb.dtype)
        err = float((got - ref).abs().max())
        if got.shape != ref.shape or not err <= tol:
            raise UnsupportedModelError(
                f"{family_name(self.model)}: not supported: logits through the policy's path (4D mask, explicit "
                f"positions, own head) differ from model(ids).logits by {err:.3g} (tolerance {tol:.3g})"
            )

    def masked_forward(
        self,
        input_ids: torch.Tensor,  # [B, Q]
        position_ids: torch.Tensor,  # [B, Q]
        mask: torch.Tensor,  # bool [Q, Q] or [B, Q, Q], True = attend
        token_mask: torch.Tensor | None = None,  # [B, Q] real tokens, for the MoE aux loss
        want_aux: bool = False,
        want_hidden: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """One forward under an arbitrary mask; returns (logits [B,Q,V], aux loss or None), plus the last hidden
        state [B,Q,H] when `want_hidden`."""
        dtype = self.model.get_input_embeddings().weight.dtype
        B, Q = input_ids.shape
        mask = mask.to(input_ids.device).expand(B, Q, Q)  # some families want the batch dim spelled out
        attn = self.attention_mask_4d(mask, dtype, position_ids, position_ids)
        return self._forward_4d(input_ids, position_ids, attn, token_mask, want_aux, want_hidden)

    def _forward_4d(self, input_ids, position_ids, attention_mask, token_mask, want_aux, want_hidden):
        """The base model under a ready 4D mask (tensor, BlockMask, or a dict of them per layer type), then the
        model's own head; the MoE load-balancing loss from the router logits over `token_mask`."""
        kwargs = {"output_router_logits": True} if (want_aux and self.moe) else {}
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        logits = self.logits(out.last_hidden_state)
        aux = None
        if kwargs and router_logits(out):
            n_exp, top_k = self.moe
            aux = load_balancing_loss(router_logits(out), n_exp, top_k, token_mask)
        return (logits, aux, out.last_hidden_state) if want_hidden else (logits, aux)

    def ar_forward(
        self, input_ids: torch.Tensor, valid: torch.Tensor | None = None, want_aux: bool = False
    ) -> ArOutput:
        """Plain causal AR forward of a right-padded batch: logits, last hidden state and (MoE, `want_aux`) the
        load-balancing loss over real tokens, computed from the router logits with the 2D mask (transformers' own
        aux loss crashes with 4D masks)."""
        kwargs = {"output_router_logits": True} if (want_aux and self.moe) else {}
        mask = None if valid is None else valid.long()
        out = self.model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs)
        logits = self.logits(out.last_hidden_state)
        aux = (
            load_balancing_loss(router_logits(out), *self.moe, valid)
            if kwargs and router_logits(out)
            else None
        )
        return ArOutput(logits, out.last_hidden_state, aux)

    def tidar_forward(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        block_size: int | None = None,
        shift: int = 0,
    ) -> TidarOutput:
        """TiDAR layout `[x | M]` (docs/architecture.md). `valid` [B,S] marks real (non-pad) tokens; pads must be on the right.

        Right padding needs no key masking: clean queries never look right, and a mask block only sees the clean
        prefix before it, so real positions never see a pad.
        """
        if not self.is_converted:
            raise RuntimeError("tidar_forward needs a mask token: call HybridPolicy.convert() first")
        B, S = input_ids.shape
        bs = block_size or self.block_size
        ids = torch.cat([input_ids, torch.full_like(input_ids, self.mask_token_id)], dim=1)
        pos = torch.arange(S, device=input_ids.device).repeat(2)[None].expand(B, -1)
        valid2 = None if valid is None else torch.cat([valid, valid], dim=1)
        attn = self._tidar_mask_4d(S, bs, shift, B, pos, self.training_attention == "flex")
        logits, aux, hidden = self._forward_4d(ids, pos, attn, valid2, want_aux=True, want_hidden=True)
        return TidarOutput(logits[:, :S], logits[:, S:], aux, hidden[:, :S])

    def draft_blocks_forward(
        self,
        input_ids: torch.Tensor,  # [B, S] right-padded
        valid: torch.Tensor,  # [B, S] real tokens
        starts: torch.Tensor,  # [B, n] first position of each mask block
        block_len: int | None = None,
        active: torch.Tensor
        | None = None,  # [B, n] blocks that count (others are padding: out of the MoE aux)
        cols: torch.Tensor
        | None = None,  # [B, n] layout column of each block (default: after x); < 0: absent
    ) -> TidarOutput:
        """The short training layout `[x | n blocks of L masks]` (`policy.masks.draft_blocks_mask`): the AR forward
        plus n decode proposals per row (L = K+1 by default, the engine's proposal size); `diff_logits` [B, n*L, V]
        holds block i's slot j at i*L + j, predicting x[starts[:, i] + j] (`draft_block_targets`). It costs n*L
        extra tokens per row instead of the full layout's S, or fewer with `cols` (`pack_block_columns`): blocks
        packed into a row's own padding cost nothing the padded batch did not already compute."""
        if not self.is_converted:
            raise RuntimeError("draft_blocks_forward needs a mask token: call HybridPolicy.convert() first")
        B, S = input_ids.shape
        n, L, dev = starts.shape[1], block_len or self.block_size + 1, input_ids.device
        if cols is None:
            cols = appended_block_columns(B, S, n, L, dev)
        present = (cols >= 0).repeat_interleave(L, dim=1)
        W = max(S, int((cols + L).max())) if n else S
        slot_col = slot_columns(cols, L, W)
        slot_pos = draft_block_positions(starts, L)
        slot_mask = valid.gather(1, slot_pos.clamp(max=S - 1)) * (slot_pos < S) * present
        if active is not None:
            slot_mask = slot_mask * active.repeat_interleave(L, dim=1)
        spare = torch.zeros(
            B, W + 1 - S, dtype=input_ids.dtype, device=dev
        )  # columns past x, and W for absent
        ids = torch.cat([input_ids, spare], dim=1).scatter(1, slot_col, self.mask_token_id)[:, :W]
        pos = torch.arange(W + 1, device=dev).expand(B, -1).scatter(1, slot_col, slot_pos)[:, :W]
        token_mask = torch.cat([valid, spare.to(valid.dtype)], dim=1).scatter(1, slot_col, slot_mask)[:, :W]
        dtype = self.model.get_input_embeddings().weight.dtype
        attn = self.attention_mask_4d(draft_blocks_mask(S, starts, L, cols, W), dtype, pos, pos)
        logits, aux, hidden = self._forward_4d(ids, pos, attn, token_mask, want_aux=True, want_hidden=True)
        diff = logits.gather(1, slot_col.clamp(max=W - 1)[:, :, None].expand(-1, -1, logits.shape[-1]))
        return TidarOutput(logits[:, :S], diff, aux, hidden[:, :S])

    def _tidar_mask_4d(self, S: int, bs: int, shift: int, B: int, pos: torch.Tensor, use_flex: bool):
        """The TiDAR training mask over `[x | M]` in the form the attention reads: a FlexAttention BlockMask built from
        the mask rule (no dense [2S, 2S] tensor), or the dense 4D mask."""
        if use_flex:
            mods = window_mask_mods(self.model.config, tidar_mask_mod(S, bs, shift), lambda i: i % S)
            return _map_masks(lambda m: block_mask(m, 2 * S, 2 * S, pos.device), mods)
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = tidar_training_mask(S, bs, shift).to(pos.device).expand(B, 2 * S, 2 * S)
        return self.attention_mask_4d(mask, dtype, pos, pos)

    def set_training_attention(self, kind: str) -> None:
        """How `tidar_forward` masks: `dense` (a [2S, 2S] mask, any attention implementation) or `flex` (a
        FlexAttention BlockMask; the model must run sdpa, whose path every other forward keeps, see policy.flex).

        Flex is checked once against dense on a probe TiDAR forward; a family it does not serve exactly is refused
        with `UnsupportedModelError` naming the family and why, and the policy stays dense."""
        if kind not in ("dense", "flex"):
            raise ValueError(f"training attention must be 'dense' or 'flex', got {kind!r}")
        impl = self.model.config._attn_implementation
        if kind == "dense":
            if impl == FLEX:
                self.model.set_attn_implementation("sdpa")
            self.training_attention = "dense"
            return
        if impl not in ("sdpa", FLEX):
            raise UnsupportedModelError(
                f"{family_name(self.model)}: FlexAttention training masks need a model that runs sdpa; this one "
                f"runs {impl!r} (use training attention 'dense')"
            )
        register_flex()
        self.model.set_attn_implementation(FLEX)
        try:
            self._probe_flex()
        except BaseException:
            self.model.set_attn_implementation("sdpa")
            raise
        self.training_attention = "flex"

    @torch.no_grad()
    def _probe_flex(self, seq_len: int = 11, block_size: int = 4) -> None:
        """The TiDAR forward's logits under the BlockMask vs the dense mask, on a short probe (windows shrunk to 3)."""
        emb = self.model.get_input_embeddings().weight
        V = min(int(emb.shape[0]), 1000)
        S = seq_len
        ids = ((torch.arange(2 * S, device=emb.device) * 7 + 3) % V)[None].expand(2, -1)
        pos = torch.arange(S, device=emb.device).repeat(2)[None].expand(2, -1)
        try:
            with self._probing():
                dense, got = (
                    self._forward_4d(
                        ids, pos, self._tidar_mask_4d(S, block_size, 1, 2, pos, f), None, False, False
                    )[0].float()
                    for f in (False, True)
                )
        except Exception as e:
            raise UnsupportedModelError(
                f"{family_name(self.model)}: FlexAttention training masks not supported: the flex forward fails "
                f"({type(e).__name__}: {e})"
            ) from e
        tol = _probe_tolerance(dense, emb.dtype)
        err = float((got - dense).abs().max())
        if not err <= tol:
            raise UnsupportedModelError(
                f"{family_name(self.model)}: FlexAttention training masks not supported: the TiDAR forward under "
                f"the BlockMask differs from the dense mask by {err:.3g} (tolerance {tol:.3g})"
            )

    def tidar_loss(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        valid: torch.Tensor | None = None,
        alpha: float = 1.0,
        block_size: int | None = None,
        shift: int = 0,
    ) -> TidarLossOutput:
        """TiDAR objective on a right-padded batch; `loss_mask` selects target tokens (e.g. completions only)."""
        out = self.tidar_forward(input_ids, valid, block_size, shift)
        coef = (
            float(getattr(self.model.config, "router_aux_loss_coef", 0.0))
            if out.aux_loss is not None
            else 0.0
        )
        return tidar_loss(out.ar_logits, out.diff_logits, input_ids, loss_mask, alpha, out.aux_loss, coef)


def _probe_tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """A probe's allowed |error|: 1e-4 (fp32) or 3e-2 (half precision) of the logit scale."""
    return (1e-4 if dtype == torch.float32 else 3e-2) * max(1.0, float(ref.abs().max()))


def _map_masks(fn, masks):
    return {k: fn(v) for k, v in masks.items()} if isinstance(masks, dict) else fn(masks)

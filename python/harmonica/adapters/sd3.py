"""SD3 / SD3.5: ``SD3Transformer2DModel``'s MMDiT ``JointTransformerBlock``.

Units of block i, in the order the block runs them:

- ``blocks.{i}.attn``: the joint attention's image-stream output, gated by ``gate_msa``;
- ``blocks.{i}.attn_context``: its text-stream output, gated by ``c_gate_msa`` (not in the last
  block, whose text stream ends at the attention: ``context_pre_only``);
- ``blocks.{i}.attn2``: SD3.5's second, image-only self-attention (``dual_attention_layers``);
- ``blocks.{i}.ff`` / ``blocks.{i}.ff_context``: the image / text MLPs (no ``ff_context`` in the last
  block).

As for FLUX's double block, both attention units come from one module call (run when either is
computed), each with its own cache and gate. Gated residuals run the fused ops; the residual in
front of each MLP is fused with its LayerNorm and modulation. fp32 results equal diffusers' to
rounding (the fused LayerNorm sums in another order).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock, _chunked_feed_forward
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import nn

from .base import (
    IMAGE,
    TEXT,
    BlockAdapter,
    CachedBlock,
    UnsupportedModelError,
    call_argument,
    joint_attention_flops,
    joint_attention_modules,
    plain_layer_norm_eps,
    shape_of,
    with_mlp_input,
)
from .base import project_chunks as _project

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = ["CachedJointBlock", "SD3Adapter"]


class CachedJointBlock(CachedBlock):
    """``JointTransformerBlock.forward`` with each unit applied through the handle."""

    def __init__(
        self,
        block: JointTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(
            block, "norm1", "norm1_context", "attn", "attn2", "norm2", "ff", "norm2_context", "ff_context"
        )
        self.context_pre_only = block.context_pre_only
        self.use_dual_attention = block.use_dual_attention
        self._eps = plain_layer_norm_eps(block.norm2)
        self._context_eps = None if block.context_pre_only else plain_layer_norm_eps(block.norm2_context)

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        """As ``JointTransformerBlock.set_chunk_feed_forward`` (kept on the original block)."""
        self._original.set_chunk_feed_forward(chunk_size, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        handle, ids = self._handle, self._unit_ids
        kwargs = joint_attention_kwargs or {}
        text_units = not self.context_pre_only
        attn_runs = handle.computes(ids["attn"]) or (text_units and handle.computes(ids["attn_context"]))
        attn2_runs = self.use_dual_attention and handle.computes(ids["attn2"])
        ff_runs = handle.computes(ids["ff"])
        context_ff_runs = text_units and handle.computes(ids["ff_context"])

        # The adaLN projections (SD35AdaLayerNormZeroX / AdaLayerNormZero), rows of reused units skipped
        silu_temb = self.norm1.silu(temb)
        count = 9 if self.use_dual_attention else 6
        needed = (attn_runs, attn_runs, True, ff_runs, ff_runs, True, attn2_runs, attn2_runs, True)[:count]
        chunks = _project(self.norm1.linear, silu_temb, count, needed)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        if text_units:
            c_needed = (attn_runs, attn_runs, True, context_ff_runs, context_ff_runs, True)
            c_chunks = _project(self.norm1_context.linear, self.norm1_context.silu(temb), 6, c_needed)
        else:
            c_chunks = [None] * 6
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_chunks

        x, c = hidden_states, encoder_hidden_states
        attention = functools.partial(
            self._attention, x, c, (shift_msa, scale_msa, c_shift_msa, c_scale_msa), temb, kwargs
        )
        image_norm = None
        if ff_runs and self._eps is not None and not self.use_dual_attention:
            image_norm = (shift_mlp, scale_mlp, self._eps)
        if text_units:
            text_norm = (
                (c_shift_mlp, c_scale_mlp, self._context_eps)
                if context_ff_runs and self._context_eps
                else None
            )
            image, text = handle.unit_residuals(
                (ids["attn"], ids["attn_context"]),
                (x, c),
                (gate_msa, c_gate_msa),
                attention,
                (image_norm, text_norm),
            )
        else:
            (image,) = handle.unit_residuals(
                (ids["attn"],), (x,), (gate_msa,), lambda: attention()[:1], (image_norm,)
            )
            text = None

        if self.use_dual_attention:
            shift2, scale2, gate2 = chunks[6:]
            attn2 = functools.partial(self._attention2, x, shift2, scale2, kwargs)
            if ff_runs and self._eps is not None:
                image = handle.unit_residual_norm_modulate(
                    ids["attn2"], image, gate2, attn2, shift_mlp, scale_mlp, self._eps
                )
            else:
                image = handle.unit_residual(ids["attn2"], image, gate2, attn2)
        x, h = with_mlp_input(image, ff_runs, self.norm2, shift_mlp, scale_mlp)
        x = handle.unit_residual(ids["ff"], x, gate_mlp, functools.partial(self._mlp, self.ff, h))
        if not text_units:
            return None, x
        c, hc = with_mlp_input(text, context_ff_runs, self.norm2_context, c_shift_mlp, c_scale_mlp)
        c = handle.unit_residual(
            ids["ff_context"], c, c_gate_mlp, functools.partial(self._mlp, self.ff_context, hc)
        )
        return c, x

    def _attention(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        modulation: tuple[Any, ...],
        temb: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, c_shift, c_scale = modulation
        h = self.norm1.norm(x) * (1 + scale[:, None]) + shift[:, None]
        if self.context_pre_only:
            hc = self.norm1_context(c, temb)
        else:
            hc = self.norm1_context.norm(c) * (1 + c_scale[:, None]) + c_shift[:, None]
        return self.attn(hidden_states=h, encoder_hidden_states=hc, **kwargs)

    def _attention2(
        self, x: torch.Tensor, shift2: torch.Tensor, scale2: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        # SD35AdaLayerNormZeroX modulates the block input's LayerNorm a second time for attn2
        h2 = self.norm1.norm(x) * (1 + scale2[:, None]) + shift2[:, None]
        return self.attn2(hidden_states=h2, **kwargs)

    def _mlp(self, ff: nn.Module, h: torch.Tensor) -> torch.Tensor:
        chunk_size = self._original._chunk_size
        if chunk_size is not None:
            return _chunked_feed_forward(ff, h, self._original._chunk_dim, chunk_size)
        return ff(h)


class SD3Adapter(BlockAdapter):
    """``SD3Transformer2DModel`` (SD3 medium, SD3.5 medium / large / turbo)."""

    family = "SD3 / SD3.5 (JointTransformerBlock)"
    model_classes = (SD3Transformer2DModel,)
    block_lists = (("transformer_blocks", "blocks"),)

    def block_units(self, list_name: str, block: nn.Module) -> tuple[str, ...]:
        text = () if block.context_pre_only else ("attn_context",)
        dual = ("attn2",) if block.attn2 is not None else ()
        context_ff = () if block.context_pre_only else ("ff_context",)
        return ("attn", *text, *dual, "ff", *context_ff)

    def unit_stream(self, list_name: str, branch: str) -> str:
        return TEXT if branch.endswith("_context") else IMAGE

    def unit_modules(self, list_name: str, block: nn.Module, branch: str) -> tuple[nn.Module, ...]:
        if branch in ("attn", "attn_context"):
            return joint_attention_modules(block.attn, self.unit_stream(list_name, branch))
        return super().unit_modules(list_name, block, branch)

    def check_block(self, list_name: str, block: nn.Module) -> None:
        if type(block) is not JointTransformerBlock:
            raise UnsupportedModelError(
                f"expected diffusers JointTransformerBlock, got {type(block).__name__}"
            )
        norm1 = SD35AdaLayerNormZeroX if block.use_dual_attention else AdaLayerNormZero
        norm1_context = AdaLayerNormContinuous if block.context_pre_only else AdaLayerNormZero
        if type(block.norm1) is not norm1 or getattr(block.norm1, "emb", None) is not None:
            raise UnsupportedModelError(f"this SD3 block's adaLN is a {type(block.norm1).__name__}")
        if type(block.norm1_context) is not norm1_context:
            raise UnsupportedModelError(
                f"this SD3 block's context adaLN is a {type(block.norm1_context).__name__}"
            )
        if type(block.norm1.norm) is not nn.LayerNorm:
            raise UnsupportedModelError("this SD3 block's adaLN does not use nn.LayerNorm")

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        return CachedJointBlock(block, handle, unit_ids, (list_name, index))

    def tokens(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, int, int | None]:
        hidden_states = call_argument(model, args, kwargs, "hidden_states")
        text = call_argument(model, args, kwargs, "encoder_hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            raise ValueError(
                f"SD3's hidden_states must be latents [B, C, H, W], got {shape_of(hidden_states)}"
            )
        if not isinstance(text, torch.Tensor) or text.dim() != 3:
            raise ValueError("SD3's encoder_hidden_states must be prompt embeddings [B, L, C]")
        batch, _, height, width = hidden_states.shape
        patch = int(model.config.patch_size)
        return batch, (height // patch) * (width // patch), text.shape[1]

    def native_tokens(self, model: nn.Module) -> int:
        side = model.config.sample_size // model.config.patch_size
        return side * side

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        config = model.config
        size = config.sample_size
        return {
            "hidden_states": torch.empty(1, config.in_channels, size, size),
            "encoder_hidden_states": torch.empty(1, text_tokens, config.joint_attention_dim),
            "pooled_projections": torch.empty(1, config.pooled_projection_dim),
            "timestep": torch.zeros(1),
        }

    def noise_shape(self, model: nn.Module, side: int) -> tuple[int, ...]:
        patch = int(model.config.patch_size)
        return (int(model.config.in_channels), side * patch, side * patch)

    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> Any:
        if pooled is None:
            pooled = latents.new_zeros(latents.shape[0], model.config.pooled_projection_dim)
        return model(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=timestep,
        ).sample

    def unit_flops(
        self, per_module: dict[str, int], path: str, list_name: str, block: nn.Module, branch: str
    ) -> int:
        def flops(name: str) -> int:
            return int(per_module.get(f"{path}.{name}", 0))

        if branch not in ("attn", "attn_context"):
            return flops(branch)
        if block.context_pre_only:  # the last block's text outputs are unused: it is all the image unit's
            return flops("attn")
        image, text = joint_attention_flops(per_module, f"{path}.attn")
        return image if branch == "attn" else text

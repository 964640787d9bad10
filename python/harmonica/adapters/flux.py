"""FLUX.1: ``FluxTransformer2DModel``'s double-stream ``FluxTransformerBlock`` and single-stream
``FluxSingleTransformerBlock``.

Units of double block i (``transformer_blocks``), in the order the block runs them:

- ``blocks.{i}.attn``: the joint attention's image-stream output (``attn.to_out``), gated by
  ``gate_msa``;
- ``blocks.{i}.attn_context``: its text-stream output (``attn.to_add_out``), gated by ``c_gate_msa``;
- ``blocks.{i}.ff`` / ``blocks.{i}.ff_context``: the image / text MLPs, gated by ``gate_mlp`` /
  ``c_gate_mlp``.

The two attention units come from one module call (image and text tokens attend jointly): the
attention runs when either is computed, and each stream then keeps its own cache, gate and
decision (:meth:`CacheHandle.unit_residuals`). Schedules that compute both together save the whole
attention; one computed alone saves only the other stream's residual.

Unit of single block j (``single_transformer_blocks``): ``single_blocks.{j}.joint``, the gated output
of ``proj_out(cat(attn, mlp))`` over the concatenated text + image tokens.

Every gated residual runs a fused op; the residual in front of each MLP is fused with the MLP's
LayerNorm and modulation (``norm2`` / ``norm2_context``). adaLN rows of reused units are not
projected. fp32 results equal diffusers' to rounding (the fused LayerNorm sums in another order).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from .base import (
    IMAGE,
    JOINT,
    TEXT,
    BlockAdapter,
    CachedBlock,
    UnsupportedModelError,
    call_argument,
    joint_attention_flops,
    joint_attention_modules,
    joint_stream_residuals,
    plain_layer_norm_eps,
    project_chunks,
    shape_of,
)

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = ["CachedFluxSingleBlock", "CachedFluxDoubleBlock", "FluxAdapter"]

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
# FLOP profiles: FLUX.1's native 1024 x 1024 images are 64 x 64 = 4096 packed latent tokens.
NATIVE_TOKENS = 4096


def _refuse_extra_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if len(outputs) != 2:
        raise UnsupportedModelError(
            "this FLUX attention returned IP-adapter outputs; IP-adapters are not supported with caching"
        )
    return outputs


def grid_ids(tokens: int, text_tokens: int, axes: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's position ids for a square grid of ``tokens`` image tokens (row, column on axes 1, 2)
    and ``text_tokens`` text tokens (zeros; FLUX.2 numbers them on its last axis)."""
    side = int(round(tokens**0.5))
    index = torch.arange(tokens, device=device)
    img_ids = torch.zeros(tokens, axes, device=device)
    img_ids[:, 1], img_ids[:, 2] = index // side, index % side
    txt_ids = torch.zeros(text_tokens, axes, device=device)
    if axes == 4:
        txt_ids[:, 3] = torch.arange(text_tokens, device=device)
    return img_ids, txt_ids


class CachedFluxDoubleBlock(CachedBlock):
    """``FluxTransformerBlock.forward`` with its four units applied through the handle."""

    def __init__(
        self,
        block: FluxTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
        self._eps = plain_layer_norm_eps(block.norm2)
        self._context_eps = plain_layer_norm_eps(block.norm2_context)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        handle, ids = self._handle, self._unit_ids
        attn, attn_context, ff, ff_context = ids["attn"], ids["attn_context"], ids["ff"], ids["ff_context"]
        attn_runs = handle.computes(attn) or handle.computes(attn_context)
        ff_runs, context_ff_runs = handle.computes(ff), handle.computes(ff_context)
        # AdaLayerNormZero.forward (emb given), its LayerNorm moved into the attention branch
        silu_temb = self.norm1.silu(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = project_chunks(
            self.norm1.linear, silu_temb, 6, (attn_runs, attn_runs, True, ff_runs, ff_runs, True)
        )
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = project_chunks(
            self.norm1_context.linear,
            self.norm1_context.silu(temb),
            6,
            (attn_runs, attn_runs, True, context_ff_runs, context_ff_runs, True),
        )
        x, c = hidden_states, encoder_hidden_states
        attention = functools.partial(
            self._attention,
            x,
            c,
            (shift_msa, scale_msa, c_shift_msa, c_scale_msa),
            image_rotary_emb,
            joint_attention_kwargs or {},
        )
        x, c = joint_stream_residuals(
            handle,
            (attn, attn_context, ff, ff_context),
            x,
            c,
            (gate_msa, c_gate_msa),
            attention,
            (
                (gate_mlp, shift_mlp, scale_mlp, self._eps, self.norm2, self.ff),
                (
                    c_gate_mlp,
                    c_shift_mlp,
                    c_scale_mlp,
                    self._context_eps,
                    self.norm2_context,
                    self.ff_context,
                ),
            ),
        )
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return c, x

    def _attention(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        modulation: tuple[torch.Tensor, ...],
        image_rotary_emb: Any,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, c_shift, c_scale = modulation
        h = self.norm1.norm(x) * (1 + scale[:, None]) + shift[:, None]
        hc = self.norm1_context.norm(c) * (1 + c_scale[:, None]) + c_shift[:, None]
        outputs = self.attn(
            hidden_states=h, encoder_hidden_states=hc, image_rotary_emb=image_rotary_emb, **kwargs
        )
        return _refuse_extra_outputs(outputs)


class CachedFluxSingleBlock(CachedBlock):
    """``FluxSingleTransformerBlock.forward`` with its one unit applied through the handle."""

    def __init__(
        self,
        block: FluxSingleTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(block, "norm", "proj_mlp", "act_mlp", "proj_out", "attn")
        self.mlp_hidden_dim = block.mlp_hidden_dim

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        handle = self._handle
        unit = self._unit_ids["joint"]
        text_seq_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        runs = handle.computes(unit)
        shift, scale, gate = project_chunks(self.norm.linear, self.norm.silu(temb), 3, (runs, runs, True))
        branch = functools.partial(
            self._branch, x, shift, scale, image_rotary_emb, joint_attention_kwargs or {}
        )
        x = handle.unit_residual(unit, x, gate, branch)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x[:, :text_seq_len], x[:, text_seq_len:]

    def _branch(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        image_rotary_emb: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        h = self.norm.norm(x) * (1 + scale[:, None]) + shift[:, None]
        mlp = self.act_mlp(self.proj_mlp(h))
        attn = self.attn(hidden_states=h, image_rotary_emb=image_rotary_emb, **kwargs)
        return self.proj_out(torch.cat([attn, mlp], dim=2))


class FluxAdapter(BlockAdapter):
    """``FluxTransformer2DModel`` (FLUX.1 dev / schnell / Kontext / Fill and their tiny variants)."""

    family = "FLUX.1 (FluxTransformerBlock, FluxSingleTransformerBlock)"
    model_classes = (FluxTransformer2DModel,)
    block_lists = ((DOUBLE, "blocks"), (SINGLE, "single_blocks"))
    timestep_scale = 1000.0

    def block_units(self, list_name: str, block: nn.Module) -> tuple[str, ...]:
        return ("attn", "attn_context", "ff", "ff_context") if list_name == DOUBLE else ("joint",)

    def unit_stream(self, list_name: str, branch: str) -> str:
        if list_name == SINGLE:
            return JOINT
        return TEXT if branch.endswith("_context") else IMAGE

    def unit_modules(self, list_name: str, block: nn.Module, branch: str) -> tuple[nn.Module, ...]:
        if list_name == SINGLE:
            return self.single_unit_modules(block)
        if branch in ("attn", "attn_context"):
            return joint_attention_modules(block.attn, self.unit_stream(list_name, branch))
        return super().unit_modules(list_name, block, branch)

    def single_unit_modules(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """The single block's joint branch: everything but its adaLN projection."""
        return (block.proj_mlp, block.attn, block.proj_out)

    def check_block(self, list_name: str, block: nn.Module) -> None:
        expected = FluxTransformerBlock if list_name == DOUBLE else FluxSingleTransformerBlock
        if type(block) is not expected:
            raise UnsupportedModelError(f"expected diffusers {expected.__name__}, got {type(block).__name__}")
        norms = (block.norm1, block.norm1_context) if list_name == DOUBLE else (block.norm,)
        for norm in norms:
            kind = AdaLayerNormZero if list_name == DOUBLE else AdaLayerNormZeroSingle
            if type(norm) is not kind or getattr(norm, "emb", None) is not None:
                raise UnsupportedModelError(f"this FLUX block's adaLN is a {type(norm).__name__}")
        if getattr(block, "_chunk_size", None) is not None:
            raise UnsupportedModelError("chunked feed-forward in a FLUX block is not supported with caching")

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        cls = CachedFluxDoubleBlock if list_name == DOUBLE else CachedFluxSingleBlock
        return cls(block, handle, unit_ids, (list_name, index))

    def tokens(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, int, int | None]:
        hidden_states = call_argument(model, args, kwargs, "hidden_states")
        text = call_argument(model, args, kwargs, "encoder_hidden_states")
        for name, value in (("hidden_states", hidden_states), ("encoder_hidden_states", text)):
            if not isinstance(value, torch.Tensor) or value.dim() != 3:
                raise ValueError(f"FLUX's {name} must be packed tokens [B, N, C], got {shape_of(value)}")
        return hidden_states.shape[0], hidden_states.shape[1], text.shape[1]

    def native_tokens(self, model: nn.Module) -> int:
        return NATIVE_TOKENS

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        config = model.config
        inputs: dict[str, Any] = {
            "hidden_states": torch.empty(1, NATIVE_TOKENS, config.in_channels),
            "encoder_hidden_states": torch.empty(1, text_tokens, config.joint_attention_dim),
            "pooled_projections": torch.empty(1, config.pooled_projection_dim),
            "timestep": torch.zeros(1),
            "img_ids": torch.zeros(NATIVE_TOKENS, 3),
            "txt_ids": torch.zeros(text_tokens, 3),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.zeros(1)
        return inputs

    def noise_shape(self, model: nn.Module, side: int) -> tuple[int, ...]:
        return (side * side, int(model.config.in_channels))

    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> Any:
        config = model.config
        batch, tokens = latents.shape[:2]
        img_ids, txt_ids = grid_ids(tokens, prompt_embeds.shape[1], 3, latents.device)
        if pooled is None:
            pooled = latents.new_zeros(batch, config.pooled_projection_dim)
        kwargs: dict[str, Any] = {}
        if config.guidance_embeds:
            kwargs["guidance"] = latents.new_full((batch,), 3.5 if guidance is None else guidance)
        return model(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
            **kwargs,
        ).sample

    def unit_flops(
        self, per_module: dict[str, int], path: str, list_name: str, block: nn.Module, branch: str
    ) -> int:
        def flops(name: str) -> int:
            return int(per_module.get(f"{path}.{name}", 0))

        if list_name == SINGLE:
            return int(per_module.get(path, 0)) - flops("norm")  # all but the adaLN projection
        if branch in ("ff", "ff_context"):
            return flops(branch)
        image, text = joint_attention_flops(per_module, f"{path}.attn")
        return image if branch == "attn" else text

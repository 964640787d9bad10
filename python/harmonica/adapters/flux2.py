"""FLUX.2: ``Flux2Transformer2DModel``'s ``Flux2TransformerBlock`` (double stream) and
``Flux2SingleTransformerBlock`` (single stream).

The units are FLUX.1's: ``blocks.{i}.attn`` / ``blocks.{i}.attn_context`` (the joint attention's
image / text outputs, one module call, each with its own cache and gate), ``blocks.{i}.ff`` /
``blocks.{i}.ff_context``, and ``single_blocks.{j}.joint`` (the fused parallel attention + MLP
branch over the concatenated text + image tokens). FLUX.2 projects its modulations once per call
for all blocks, so a reused unit saves its branch only. Reference-image KV caching
(``kv_cache_mode``, per-token modulation) is refused: the fused ops take one gate per sample.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Modulation,
    Flux2SingleTransformerBlock,
    Flux2TransformerBlock,
)
from torch import nn

from .base import (
    CachedBlock,
    UnsupportedModelError,
    joint_attention_flops,
    joint_stream_residuals,
    plain_layer_norm_eps,
)
from .flux import DOUBLE, NATIVE_TOKENS, SINGLE, FluxAdapter, grid_ids

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = ["CachedFlux2DoubleBlock", "CachedFlux2SingleBlock", "Flux2Adapter"]


def _per_sample(mod: torch.Tensor) -> None:
    if mod.ndim == 3 and mod.shape[1] != 1:
        raise UnsupportedModelError(
            "FLUX.2 reference-image KV caching (per-token modulation) is not supported with caching"
        )


def _refuse_kv_cache(kwargs: dict[str, Any]) -> None:
    if kwargs.get("kv_cache_mode") is not None:
        raise UnsupportedModelError("FLUX.2 reference-image KV caching (kv_cache_mode) is not supported")


class CachedFlux2DoubleBlock(CachedBlock):
    """``Flux2TransformerBlock.forward`` with its four units applied through the handle."""

    def __init__(
        self,
        block: Flux2TransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
        self.mlp_hidden_dim = block.mlp_hidden_dim
        self._eps = plain_layer_norm_eps(block.norm2)
        self._context_eps = plain_layer_norm_eps(block.norm2_context)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb_mod_img: torch.Tensor,
        temb_mod_txt: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = joint_attention_kwargs or {}
        _refuse_kv_cache(kwargs)
        _per_sample(temb_mod_img)
        handle, ids = self._handle, self._unit_ids
        attn, attn_context, ff, ff_context = ids["attn"], ids["attn_context"], ids["ff"], ids["ff_context"]
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(
            temb_mod_img, 2
        )
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = (
            Flux2Modulation.split(temb_mod_txt, 2)
        )
        x, c = hidden_states, encoder_hidden_states
        attention = functools.partial(
            self._attention, x, c, (shift_msa, scale_msa, c_shift_msa, c_scale_msa), image_rotary_emb, kwargs
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
        h = (1 + scale) * self.norm1(x) + shift
        hc = (1 + c_scale) * self.norm1_context(c) + c_shift
        image, text = self.attn(
            hidden_states=h, encoder_hidden_states=hc, image_rotary_emb=image_rotary_emb, **kwargs
        )
        return image, text


class CachedFlux2SingleBlock(CachedBlock):
    """``Flux2SingleTransformerBlock.forward`` with its one unit applied through the handle."""

    def __init__(
        self,
        block: Flux2SingleTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(block, "norm", "attn")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb_mod: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        split_hidden_states: bool = False,
        text_seq_len: int | None = None,
    ) -> Any:
        kwargs = joint_attention_kwargs or {}
        _refuse_kv_cache(kwargs)
        _per_sample(temb_mod)
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = Flux2Modulation.split(temb_mod, 1)[0]
        x = hidden_states
        branch = functools.partial(self._branch, x, shift, scale, image_rotary_emb, kwargs)
        x = self._handle.unit_residual(self._unit_ids["joint"], x, gate, branch)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        if split_hidden_states:
            return x[:, :text_seq_len], x[:, text_seq_len:]
        return x

    def _branch(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        image_rotary_emb: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        h = (1 + scale) * self.norm(x) + shift
        return self.attn(hidden_states=h, image_rotary_emb=image_rotary_emb, **kwargs)


class Flux2Adapter(FluxAdapter):
    """``Flux2Transformer2DModel`` (FLUX.2 dev, klein)."""

    family = "FLUX.2 (Flux2TransformerBlock, Flux2SingleTransformerBlock)"
    model_classes = (Flux2Transformer2DModel,)

    def check_block(self, list_name: str, block: nn.Module) -> None:
        expected = Flux2TransformerBlock if list_name == DOUBLE else Flux2SingleTransformerBlock
        if type(block) is not expected:
            raise UnsupportedModelError(f"expected diffusers {expected.__name__}, got {type(block).__name__}")

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        cls = CachedFlux2DoubleBlock if list_name == DOUBLE else CachedFlux2SingleBlock
        return cls(block, handle, unit_ids, (list_name, index))

    def single_unit_modules(self, block: nn.Module) -> tuple[nn.Module, ...]:
        return (block.attn,)  # one parallel attention + MLP module

    def width(self, model: nn.Module) -> int:
        return int(model.config.num_attention_heads * model.config.attention_head_dim)

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        config = model.config
        axes = len(config.axes_dims_rope)
        inputs: dict[str, Any] = {
            "hidden_states": torch.empty(1, NATIVE_TOKENS, config.in_channels),
            "encoder_hidden_states": torch.empty(1, text_tokens, config.joint_attention_dim),
            "timestep": torch.zeros(1),
            "img_ids": torch.zeros(NATIVE_TOKENS, axes),
            "txt_ids": torch.zeros(text_tokens, axes),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.zeros(1)
        return inputs

    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> Any:
        batch, tokens = latents.shape[:2]
        img_ids, txt_ids = grid_ids(
            tokens, prompt_embeds.shape[1], len(model.config.axes_dims_rope), latents.device
        )
        kwargs: dict[str, Any] = {}
        if model.config.guidance_embeds:
            kwargs["guidance"] = latents.new_full((batch,), 4.0 if guidance is None else guidance)
        return model(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds,
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
            **kwargs,
        ).sample

    def unit_flops(
        self, per_module: dict[str, int], path: str, list_name: str, block: nn.Module, branch: str
    ) -> int:
        if list_name == SINGLE:
            return int(per_module.get(path, 0))
        if branch in ("ff", "ff_context"):
            return int(per_module.get(f"{path}.{branch}", 0))
        image, text = joint_attention_flops(per_module, f"{path}.attn")
        return image if branch == "attn" else text

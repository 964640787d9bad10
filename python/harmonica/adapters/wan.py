"""Wan 2.1 / 2.2: ``WanTransformer3DModel``'s ``WanTransformerBlock``.

Units of block i (``model.blocks``), in the order the block runs them:

- ``blocks.{i}.attn1``: self-attention over the video tokens, gated by ``gate_msa``;
- ``blocks.{i}.attn2``: cross-attention to the prompt (and, for image-to-video, the image
  embedding), ungated;
- ``blocks.{i}.ffn``: the MLP, gated by ``c_gate_msa``.

diffusers adds Wan's gated residuals in fp32 (``x.float() + branch * gate``); the fused ops do their
arithmetic in fp32 too, with the gate and modulation taken in the activations' dtype (a rounding of
the fp32 modulation under bf16 weights; exact under fp32). The ungated cross-attention residual is
fused with ``norm3`` and the MLP's modulation. Wan 2.2 TI2V-5B's per-token modulation (a 2-D
``timestep``) is refused at run time: the fused ops take one gate per sample.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

from .base import (
    BlockAdapter,
    CachedBlock,
    UnsupportedModelError,
    call_argument,
    plain_layer_norm_eps,
    shape_of,
)

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = ["CachedWanBlock", "WanAdapter"]

# FLOP profiles: Wan's 480 x 832, 81-frame videos are 21 x 60 x 104 latents.
NATIVE_LATENTS = (21, 60, 104)
# CLIP image tokens of Wan 2.1's image-to-video conditioning (encoder_hidden_states_image).
IMAGE_TOKENS = 257


class CachedWanBlock(CachedBlock):
    """``WanTransformerBlock.forward`` with its three units applied through the handle."""

    def __init__(
        self,
        block: WanTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(block, "norm1", "attn1", "attn2", "norm2", "ffn", "norm3", "scale_shift_table")
        self._eps = plain_layer_norm_eps(block.norm3)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: torch.Tensor,
    ) -> torch.Tensor:
        if temb.ndim == 4:
            raise UnsupportedModelError(
                "per-token timesteps (Wan 2.2 TI2V) give every token its own gate, which the fused cache "
                "ops do not take; sample with one timestep per sample, or disable_cache"
            )
        handle, ids = self._handle, self._unit_ids
        x = hidden_states
        modulation = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        # fp32 in diffusers; the fused ops take them in the activations' dtype (no copy under fp32)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            m.to(x.dtype) if m.dtype != x.dtype else m for m in modulation
        )
        attn1 = functools.partial(self._self_attention, x, modulation[0], modulation[1], rotary_emb)
        x = handle.unit_residual(ids["attn1"], x, gate_msa, attn1)

        attn2 = functools.partial(self._cross_attention, x, encoder_hidden_states)
        if handle.computes(ids["ffn"]) and self._eps is not None:
            x, h = handle.unit_residual_norm_modulate(
                ids["attn2"], x, None, attn2, c_shift_msa, c_scale_msa, self._eps
            )
        else:
            x = handle.unit_residual(ids["attn2"], x, None, attn2)
            h = None
            if handle.computes(ids["ffn"]):
                h = (self.norm3(x.float()) * (1 + modulation[4]) + modulation[3]).type_as(x)
        return handle.unit_residual(ids["ffn"], x, c_gate_msa, functools.partial(self.ffn, h))

    def _self_attention(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rotary_emb: torch.Tensor
    ) -> torch.Tensor:
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        return self.attn1(h, None, None, rotary_emb)

    def _cross_attention(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.norm2(x.float()).type_as(x)
        return self.attn2(h, encoder_hidden_states, None, None)


class WanAdapter(BlockAdapter):
    """``WanTransformer3DModel`` (Wan 2.1 T2V / I2V, Wan 2.2 A14B; each transformer of a pair)."""

    family = "Wan 2.1 / 2.2 (WanTransformerBlock)"
    model_classes = (WanTransformer3DModel,)
    block_lists = (("blocks", "blocks"),)

    def block_units(self, list_name: str, block: nn.Module) -> tuple[str, ...]:
        return ("attn1", "attn2", "ffn")

    def check_block(self, list_name: str, block: nn.Module) -> None:
        if type(block) is not WanTransformerBlock:
            raise UnsupportedModelError(f"expected diffusers WanTransformerBlock, got {type(block).__name__}")

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        return CachedWanBlock(block, handle, unit_ids, (list_name, index))

    def width(self, model: nn.Module) -> int:
        return int(model.config.num_attention_heads * model.config.attention_head_dim)

    def tokens(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, int, int | None]:
        hidden_states = call_argument(model, args, kwargs, "hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
            got = shape_of(hidden_states)
            raise ValueError(f"Wan's hidden_states must be video latents [B, C, F, H, W], got {got}")
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        return batch, (frames // p_t) * (height // p_h) * (width // p_w), None

    def noise_shape(self, model: nn.Module, side: int) -> tuple[int, ...]:
        _, p_h, p_w = model.config.patch_size
        return (int(model.config.in_channels), 1, side * p_h, side * p_w)  # one latent frame: an image

    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> Any:
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds).sample

    def native_tokens(self, model: nn.Module) -> int:
        p_t, p_h, p_w = model.config.patch_size
        frames, height, width = _native_latents(model)
        return (frames // p_t) * (height // p_h) * (width // p_w)

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        config = model.config
        inputs: dict[str, Any] = {
            "hidden_states": torch.empty(1, config.in_channels, *_native_latents(model)),
            "timestep": torch.zeros(1),
            "encoder_hidden_states": torch.empty(1, text_tokens, config.text_dim),
        }
        if config.image_dim is not None:
            inputs["encoder_hidden_states_image"] = torch.empty(1, IMAGE_TOKENS, config.image_dim)
        return inputs


def _native_latents(model: nn.Module) -> tuple[int, int, int]:
    """:data:`NATIVE_LATENTS`, each side cut to what the model's rotary table covers (tiny models)."""
    longest = int(model.config.rope_max_seq_len)
    return tuple(
        min(side, longest * patch)
        for side, patch in zip(NATIVE_LATENTS, model.config.patch_size, strict=True)
    )

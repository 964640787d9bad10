"""Qwen-Image: ``QwenImageTransformer2DModel``'s double-stream ``QwenImageTransformerBlock``.

Units of block i, in the order the block runs them:

- ``blocks.{i}.attn`` / ``blocks.{i}.attn_context``: the joint attention's image / text outputs (one
  module call, run when either is computed; each stream has its own cache and gate, as FLUX's);
- ``blocks.{i}.img_mlp`` / ``blocks.{i}.txt_mlp``: the image / text MLPs.

The modulations (``img_mod`` / ``txt_mod``: SiLU then a ``6 * dim`` projection laid out as
shift, scale, gate for the attention, then for the MLP) project only the rows a step uses. Models
built with ``zero_cond_t`` (per-token modulation for edit references) are not supported: the fused
ops take one gate per sample.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
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
    joint_stream_residuals,
    plain_layer_norm_eps,
    project_chunks,
    shape_of,
)

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = ["CachedQwenImageBlock", "QwenImageAdapter"]

# FLOP profiles: 1328 x 1328 images (Qwen-Image's 1:1 bucket) are 83 x 83 = 6889 packed tokens.
NATIVE_SIDE = 83


class CachedQwenImageBlock(CachedBlock):
    """``QwenImageTransformerBlock.forward`` with its four units applied through the handle."""

    def __init__(
        self,
        block: QwenImageTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int],
    ) -> None:
        super().__init__(block, handle, unit_ids, slot)
        self._share(
            block,
            "img_mod",
            "img_norm1",
            "attn",
            "img_norm2",
            "img_mlp",
            "txt_mod",
            "txt_norm1",
            "txt_norm2",
            "txt_mlp",
        )
        self.zero_cond_t = block.zero_cond_t
        self._eps = plain_layer_norm_eps(block.img_norm2)
        self._context_eps = plain_layer_norm_eps(block.txt_norm2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if modulate_index is not None:
            raise UnsupportedModelError("Qwen-Image's per-token modulation (zero_cond_t) is not supported")
        handle, ids = self._handle, self._unit_ids
        attn, attn_context, mlp, txt_mlp = ids["attn"], ids["attn_context"], ids["img_mlp"], ids["txt_mlp"]
        attn_runs = handle.computes(attn) or handle.computes(attn_context)
        mlp_runs, txt_mlp_runs = handle.computes(mlp), handle.computes(txt_mlp)
        shift1, scale1, gate1, shift2, scale2, gate2 = project_chunks(
            self.img_mod[1], self.img_mod[0](temb), 6, (attn_runs, attn_runs, True, mlp_runs, mlp_runs, True)
        )
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = project_chunks(
            self.txt_mod[1],
            self.txt_mod[0](temb),
            6,
            (attn_runs, attn_runs, True, txt_mlp_runs, txt_mlp_runs, True),
        )
        x, c = hidden_states, encoder_hidden_states
        attention = functools.partial(
            self._attention,
            x,
            c,
            (shift1, scale1, c_shift1, c_scale1),
            encoder_hidden_states_mask,
            image_rotary_emb,
            joint_attention_kwargs or {},
        )
        x, c = joint_stream_residuals(
            handle,
            (attn, attn_context, mlp, txt_mlp),
            x,
            c,
            (gate1, c_gate1),
            attention,
            (
                (gate2, shift2, scale2, self._eps, self.img_norm2, self.img_mlp),
                (c_gate2, c_shift2, c_scale2, self._context_eps, self.txt_norm2, self.txt_mlp),
            ),
        )
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return c, x

    def _attention(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        modulation: tuple[torch.Tensor, ...],
        mask: torch.Tensor | None,
        image_rotary_emb: Any,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, c_shift, c_scale = modulation
        h = self.img_norm1(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        hc = self.txt_norm1(c) * (1 + c_scale.unsqueeze(1)) + c_shift.unsqueeze(1)
        image, text = self.attn(
            hidden_states=h,
            encoder_hidden_states=hc,
            encoder_hidden_states_mask=mask,
            image_rotary_emb=image_rotary_emb,
            **kwargs,
        )
        return image, text


class QwenImageAdapter(BlockAdapter):
    """``QwenImageTransformer2DModel`` (Qwen-Image text-to-image)."""

    family = "Qwen-Image (QwenImageTransformerBlock)"
    model_classes = (QwenImageTransformer2DModel,)
    timestep_scale = 1000.0
    block_lists = (("transformer_blocks", "blocks"),)

    def block_units(self, list_name: str, block: nn.Module) -> tuple[str, ...]:
        return ("attn", "attn_context", "img_mlp", "txt_mlp")

    def unit_stream(self, list_name: str, branch: str) -> str:
        return TEXT if branch in ("attn_context", "txt_mlp") else IMAGE

    def unit_modules(self, list_name: str, block: nn.Module, branch: str) -> tuple[nn.Module, ...]:
        if branch in ("attn", "attn_context"):
            return joint_attention_modules(block.attn, self.unit_stream(list_name, branch))
        return super().unit_modules(list_name, block, branch)

    def check_block(self, list_name: str, block: nn.Module) -> None:
        if type(block) is not QwenImageTransformerBlock:
            raise UnsupportedModelError(
                f"expected diffusers QwenImageTransformerBlock, got {type(block).__name__}"
            )
        if block.zero_cond_t:
            raise UnsupportedModelError("Qwen-Image's zero_cond_t (per-token modulation) is not supported")
        for mod in (block.img_mod, block.txt_mod):
            if len(mod) != 2 or type(mod[0]) is not nn.SiLU or type(mod[1]) is not nn.Linear:
                raise UnsupportedModelError("a Qwen-Image modulation that is not SiLU + Linear")

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        return CachedQwenImageBlock(block, handle, unit_ids, (list_name, index))

    def tokens(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, int, int | None]:
        hidden_states = call_argument(model, args, kwargs, "hidden_states")
        text = call_argument(model, args, kwargs, "encoder_hidden_states")
        for name, value in (("hidden_states", hidden_states), ("encoder_hidden_states", text)):
            if not isinstance(value, torch.Tensor) or value.dim() != 3:
                raise ValueError(
                    f"Qwen-Image's {name} must be packed tokens [B, N, C], got {shape_of(value)}"
                )
        return hidden_states.shape[0], hidden_states.shape[1], text.shape[1]

    def native_tokens(self, model: nn.Module) -> int:
        return NATIVE_SIDE * NATIVE_SIDE

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        config = model.config
        return {
            "hidden_states": torch.empty(1, NATIVE_SIDE * NATIVE_SIDE, config.in_channels),
            "encoder_hidden_states": torch.empty(1, text_tokens, config.joint_attention_dim),
            "encoder_hidden_states_mask": torch.ones(1, text_tokens),
            "timestep": torch.zeros(1),
            "img_shapes": [(1, NATIVE_SIDE, NATIVE_SIDE)],
        }

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
        batch, tokens = latents.shape[:2]
        side = int(round(tokens**0.5))
        return model(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds,
            encoder_hidden_states_mask=torch.ones(batch, prompt_embeds.shape[1], device=latents.device),
            timestep=timestep / 1000,
            img_shapes=[(1, side, side)] * batch,
        ).sample

    def unit_flops(
        self, per_module: dict[str, int], path: str, list_name: str, block: nn.Module, branch: str
    ) -> int:
        def flops(name: str) -> int:
            return int(per_module.get(f"{path}.{name}", 0))

        if branch in ("img_mlp", "txt_mlp"):
            return flops(branch)
        image, text = joint_attention_flops(per_module, f"{path}.attn")
        return image if branch == "attn" else text

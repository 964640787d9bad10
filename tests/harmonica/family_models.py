"""Tiny random FLUX.1, FLUX.2, SD3, Wan and Qwen-Image transformers, a flow-matching Euler loop
for each, and an independent METHOD.md §1 oracle that replays recorded unit outputs on the
unpatched models."""

from __future__ import annotations

import functools

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

FAMILIES = ("flux", "sd3", "wan", "qwen", "flux2")
TEXT_TOKENS = 5
TEXT_DIM = 24
POOLED_DIM = 16
CHANNELS = 4


def tiny(kind: str, num_layers: int = 2, seed: int = 0):
    """Width 32 (2 heads x 16) models; SD3 with an SD3.5 dual-attention first block and a
    ``context_pre_only`` last block, Wan with an affine cross-attention norm (Wan 2.1's default)."""
    torch.manual_seed(seed)
    if kind == "flux":
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=2 * CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            axes_dims_rope=(4, 6, 6),
        )
    elif kind == "sd3":
        model = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=CHANNELS,
            num_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=POOLED_DIM,
            out_channels=CHANNELS,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
    elif kind == "flux2":
        model = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=2 * CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
        )
    elif kind == "qwen":
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * CHANNELS,
            out_channels=CHANNELS,
            num_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
        )
    else:
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=64,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    return model.eval().requires_grad_(False)


def noise(kind: str, batch: int, side: int = 4, seed: int = 0) -> torch.Tensor:
    """Initial latents with ``side x side`` image tokens (Wan: 2 frames of them)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("flux", "flux2"):
        return torch.randn(batch, side * side, 2 * CHANNELS, generator=g)
    if kind == "qwen":
        return torch.randn(batch, side * side, 4 * CHANNELS, generator=g)
    if kind == "sd3":
        return torch.randn(batch, CHANNELS, 2 * side, 2 * side, generator=g)
    return torch.randn(batch, CHANNELS, 2, 2 * side, 2 * side, generator=g)


def prompts(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings ``[B, L, TEXT_DIM]`` and pooled embeddings ``[B, POOLED_DIM]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g)


def _flux_ids(tokens: int, axes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    side = int(tokens**0.5)
    img_ids = torch.zeros(tokens, axes)
    img_ids[:, 1] = torch.arange(tokens) // side
    img_ids[:, 2] = torch.arange(tokens) % side
    txt_ids = torch.zeros(TEXT_TOKENS, axes)
    if axes == 4:  # FLUX.2 numbers text tokens along its last axis
        txt_ids[:, 3] = torch.arange(TEXT_TOKENS)
    return img_ids, txt_ids


def predict(kind: str, model, x: torch.Tensor, t: torch.Tensor, text, pooled) -> torch.Tensor:
    """One transformer call: the velocity for latents ``x`` at scheduler timestep ``t``."""
    timestep = t.expand(x.shape[0])
    if kind == "flux":
        img_ids, txt_ids = _flux_ids(x.shape[1])
        return model(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
        ).sample
    if kind == "flux2":  # guidance-distilled: the guidance scale is an input
        img_ids, txt_ids = _flux_ids(x.shape[1], axes=4)
        return model(
            hidden_states=x,
            encoder_hidden_states=text,
            timestep=timestep / 1000,
            guidance=torch.full_like(timestep, 4.0),
            img_ids=img_ids,
            txt_ids=txt_ids,
        ).sample
    if kind == "sd3":
        return model(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep
        ).sample
    if kind == "qwen":
        side = int(x.shape[1] ** 0.5)
        mask = torch.ones(x.shape[0], text.shape[1], dtype=torch.long)
        mask[:, -1] = 0  # a padded prompt token, so the attention mask matters
        return model(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=timestep / 1000,
            img_shapes=[(1, side, side)] * x.shape[0],
        ).sample
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample


def euler(
    kind: str,
    model,
    latents,
    text,
    pooled,
    num_steps: int,
    guidance: float = 1.0,
    separate_cfg: bool = False,
) -> torch.Tensor:
    """A bare flow-matching Euler loop (``FlowMatchEulerDiscreteScheduler``), one transformer call per
    step; ``guidance > 1`` is true classifier-free guidance with the batch doubled (zero prompt as the
    unconditional half), or with ``separate_cfg`` two calls per step on the same latents (conditional
    first), as diffusers' Wan, Qwen-Image and FLUX true-CFG pipelines make them."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    x = latents
    batch = x.shape[0]
    cfg = guidance > 1
    if cfg and separate_cfg:
        for t in scheduler.timesteps:
            cond = predict(kind, model, x, t, text, pooled)
            uncond = predict(kind, model, x, t, torch.zeros_like(text), torch.zeros_like(pooled))
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        return x
    if cfg:
        text, pooled = (
            torch.cat([text, torch.zeros_like(text)]),
            torch.cat([pooled, torch.zeros_like(pooled)]),
        )
    for t in scheduler.timesteps:
        v = predict(kind, model, torch.cat([x, x]) if cfg else x, t, text, pooled)
        if cfg:
            cond, uncond = v.split(batch)
            v = uncond + guidance * (cond - uncond)
        x = scheduler.step(v, t, x).prev_sample
    return x


def unit_outputs(kind: str, model) -> list[tuple[str, torch.nn.Module, int | None]]:
    """Each unit as ``(name, module, output index)``: written out here from diffusers' block
    structure, independently of harmonica's adapters. ``output index`` picks one stream of a joint
    attention's ``(image, text)`` output; None for a module with one output."""
    units = []
    if kind in ("flux", "flux2"):
        for i, block in enumerate(model.transformer_blocks):
            units += [
                (f"blocks.{i}.attn", block.attn, 0),
                (f"blocks.{i}.attn_context", block.attn, 1),
                (f"blocks.{i}.ff", block.ff, None),
                (f"blocks.{i}.ff_context", block.ff_context, None),
            ]
        for j, block in enumerate(model.single_transformer_blocks):
            # FLUX.1: proj_out(cat(attn, mlp)); FLUX.2: one parallel attention + MLP module
            branch = block.proj_out if kind == "flux" else block.attn
            units.append((f"single_blocks.{j}.joint", branch, None))
    elif kind == "sd3":
        for i, block in enumerate(model.transformer_blocks):
            units.append((f"blocks.{i}.attn", block.attn, 0))
            if not block.context_pre_only:
                units.append((f"blocks.{i}.attn_context", block.attn, 1))
            if block.attn2 is not None:
                units.append((f"blocks.{i}.attn2", block.attn2, None))
            units.append((f"blocks.{i}.ff", block.ff, None))
            if not block.context_pre_only:
                units.append((f"blocks.{i}.ff_context", block.ff_context, None))
    elif kind == "qwen":
        for i, block in enumerate(model.transformer_blocks):
            units += [
                (f"blocks.{i}.attn", block.attn, 0),
                (f"blocks.{i}.attn_context", block.attn, 1),
                (f"blocks.{i}.img_mlp", block.img_mlp, None),
                (f"blocks.{i}.txt_mlp", block.txt_mlp, None),
            ]
    else:
        for i, block in enumerate(model.blocks):
            units += [
                (f"blocks.{i}.{name}", getattr(block, name), None) for name in ("attn1", "attn2", "ffn")
            ]
    return units


class ReplayOracle:
    """METHOD.md §1 on an *unpatched* model: every module still runs, but on a step where a unit is
    reused its output (one stream of it, for a joint attention) is replaced by the output recorded
    the last time it was computed; diffusers' own block code applies the current gate and residual."""

    def __init__(
        self,
        kind: str,
        model,
        compute: torch.Tensor,
        calls_per_step: int = 1,
        orders: torch.Tensor | None = None,
        coefficients: torch.Tensor | None = None,
    ) -> None:
        self.compute = compute.tolist()
        self.calls_per_step = calls_per_step  # CFG as separate calls: each call its own cache
        # Forecast entries (order > 0): c0 + a (c0 - c1) + b (c0 - 2 c1 + c2) from the last computed
        # outputs c0, c1, c2 and the given per-entry coefficients (a, b).
        self.orders = orders.tolist() if orders is not None else None
        self.coefficients = coefficients
        self.call = -1
        self.cache: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.hooks = [model.register_forward_pre_hook(self._next_step)]
        per_module: dict[torch.nn.Module, list[tuple[int, int | None]]] = {}
        self.names = []
        for k, (name, module, index) in enumerate(unit_outputs(kind, model)):
            per_module.setdefault(module, []).append((k, index))
            self.names.append(name)
        for module, picks in per_module.items():
            self.hooks.append(module.register_forward_hook(functools.partial(self._replay, picks)))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _next_step(self, module, args) -> None:
        self.call += 1

    def _replay(self, picks, module, args, output):
        parts = list(output) if isinstance(output, tuple) else [output]
        step, branch = divmod(self.call, self.calls_per_step)
        for k, index in picks:
            i = 0 if index is None else index
            if self.compute[step][k]:
                self.cache.setdefault((branch, k), []).insert(0, parts[i].detach().clone())
                continue
            history = self.cache[branch, k]
            order = self.orders[step][k] if self.orders is not None else 0
            if order == 0:
                parts[i] = history[0]
                continue
            a, b = self.coefficients[step, k].tolist()
            c0, c1 = history[0].double(), history[1].double()
            c2 = history[2].double() if order == 2 else c1
            parts[i] = (c0 + a * (c0 - c1) + b * (c0 - 2 * c1 + c2)).to(history[0].dtype)
        return tuple(parts) if isinstance(output, tuple) else parts[0]

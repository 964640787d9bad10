"""The flow-matching reference model: a small SD3 transformer trained by rectified flow on the digits.

The DDIM reference (:mod:`harmonica.reference.model`) predicts noise; FLUX, SD3, Wan and Qwen-Image
predict a flow-matching velocity and sample with ``FlowMatchEulerDiscreteScheduler``. So that caching,
forecasting and routers are also measured on such a model, this one is a stock diffusers
``SD3Transformer2DModel`` (6 joint blocks, 4 heads × 32 = width 128, 16×16 pixels, patch 2 → 64
image tokens, 1 channel) trained here on the same digits, in pixel space.

It is text-conditioned as SD3 is, through a *prompt pool*: each digit class is a fixed prompt,
``prompt_embeds[c]`` (``[PROMPT_TOKENS, 64]``) and ``pooled_prompt_embeds[c]`` (``[32]``), drawn once
from a seeded Gaussian and shipped next to the weights as ``prompts.safetensors`` (the file
``harmonica compare/sample/train --prompt-embeds`` reads). The unconditional prompt for guidance is
all zeros, the default of those commands; training drops the prompt to zeros for 10 % of samples.

Training: rectified flow (``x_σ = (1 − σ)·x₀ + σ·ε``, target velocity ``ε − x₀``, σ uniform in [0, 1],
the timestep ``1000·σ`` as ``FlowMatchEulerDiscreteScheduler`` feeds it), MSE, AdamW with warm-up,
gradient clipping and an EMA of the weights, as :mod:`harmonica.reference.train` trains the DiT
(same data order, checkpoints and resume). The scheduler saved with it is
``FlowMatchEulerDiscreteScheduler(shift=1)``.

Retrain with ``python -m harmonica.reference.flow --out DIR --steps 2000`` (the shipped run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES
from .train import TrainConfig, command_line, train_loop, write_summary

__all__ = [
    "PROMPT_TOKENS",
    "SD3_CONFIG",
    "build_flow_model",
    "build_flow_scheduler",
    "digit_prompts",
    "train_flow",
]

PROMPT_TOKENS = 4
"""Tokens per digit prompt."""

SD3_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 128,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": IMAGE_SIZE // 2,
}
"""Constructor arguments of the flow reference ``SD3Transformer2DModel``."""

_PROMPT_SEED = 2024


def digit_prompts() -> dict[str, torch.Tensor]:
    """The prompt pool, one prompt per digit class (seeded, the same on every machine):
    ``prompt_embeds`` ``[10, PROMPT_TOKENS, 64]`` and ``pooled_prompt_embeds`` ``[10, 32]``."""
    generator = torch.Generator().manual_seed(_PROMPT_SEED)
    text = torch.randn(NUM_CLASSES, PROMPT_TOKENS, SD3_CONFIG["joint_attention_dim"], generator=generator)
    pooled = torch.randn(NUM_CLASSES, SD3_CONFIG["pooled_projection_dim"], generator=generator)
    return {"prompt_embeds": text, "pooled_prompt_embeds": pooled}


def build_flow_model(seed: int = 0) -> nn.Module:
    """A freshly initialised flow reference model (``SD3_CONFIG``; diffusers' own initialisation,
    which zeroes nothing, so the output projection is zeroed here and the model starts at velocity 0)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**SD3_CONFIG)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def build_flow_scheduler() -> Any:
    """The sampler saved with the model: ``FlowMatchEulerDiscreteScheduler`` without a shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def train_flow(
    out: str | os.PathLike[str],
    cfg: TrainConfig,
    *,
    ckpt_dir: str | os.PathLike[str] | None = None,
    ckpt_every: int = 200,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the flow reference model and save it (EMA weights, scheduler config, prompt pool) to
    ``out``. Returns a summary: final loss (mean of the last 100 steps), wall time, parameters."""
    from safetensors.torch import save_file

    prompts = digit_prompts()
    null_text = torch.zeros_like(prompts["prompt_embeds"][0])
    null_pooled = torch.zeros_like(prompts["pooled_prompt_embeds"][0])

    def loss_of(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x0.shape[0]
        sigma = torch.rand(b, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = (torch.rand(b, generator=gen) < cfg.label_drop_prob).view(b, 1)
        text = torch.where(drop.view(b, 1, 1), null_text, prompts["prompt_embeds"][y])
        pooled = torch.where(drop, null_pooled, prompts["pooled_prompt_embeds"][y])
        s = sigma.view(b, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(
            hidden_states=xt, encoder_hidden_states=text, pooled_projections=pooled, timestep=1000 * sigma
        ).sample
        return F.mse_loss(pred, noise - x0)

    out = Path(out)
    ema, losses, wall = train_loop(
        out,
        cfg,
        build_flow_model(cfg.seed),
        loss_of,
        "train SD3 (flow)",
        ckpt_dir,
        ckpt_every,
        resume,
        progress,
    )
    ema.save_pretrained(out, safe_serialization=True)
    build_flow_scheduler().save_config(out)
    save_file({k: v.contiguous() for k, v in prompts.items()}, out / "prompts.safetensors.tmp")
    os.replace(out / "prompts.safetensors.tmp", out / "prompts.safetensors")
    return write_summary(
        out,
        cfg,
        ema,
        losses,
        wall,
        objective="rectified flow, velocity noise - x0, sigma ~ U[0, 1], timestep 1000 sigma",
        conditioning=f"prompt pool prompts.safetensors (seed {_PROMPT_SEED}); unconditional = zeros",
        data="sklearn load_digits, train split (1437 images), bicubic 8->16, [-1, 1]",
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; ``--help`` lists the options."""
    command_line(argv, "python -m harmonica.reference.flow", __doc__, train_flow)


if __name__ == "__main__":
    main()

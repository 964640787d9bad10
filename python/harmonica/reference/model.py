"""The reference DiT's architecture, initialisation and noise schedule.

The model is a stock diffusers ``DiTTransformer2DModel`` (8 blocks, 4 heads × 32 = width 128,
16×16 pixels, patch 2 → 64 tokens, 1 channel, ~2.8 M parameters), class-conditional on the ten
digits with one extra *null* class for classifier-free guidance. The null class id is
``config.num_embeds_ada_norm`` (10): diffusers' label embedder allocates ``num_classes + 1``
rows and uses the last one for dropped labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "BETA_SCHEDULE",
    "DIT_CONFIG",
    "NUM_TRAIN_TIMESTEPS",
    "build_model",
    "build_scheduler",
    "disable_block_label_dropout",
    "init_dit_weights",
]

DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}
"""Constructor arguments of the reference ``DiTTransformer2DModel``; null class id = 10."""

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"


def build_model(seed: int = 0) -> nn.Module:
    """A freshly initialised reference DiT (``DIT_CONFIG``, adaLN-Zero init, no block dropout).

    Returns:
        ``diffusers.DiTTransformer2DModel`` in train mode, float32, on the CPU.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIT_CONFIG)
    init_dit_weights(model)
    disable_block_label_dropout(model)
    return model


def init_dit_weights(model: nn.Module) -> None:
    """Apply DiT's initialisation (Peebles & Xie, 2023) to a diffusers DiT, in place.

    Xavier-uniform for every linear layer and for the patch embedding (viewed as a linear map),
    zero biases; N(0, 0.02²) for the label tables and the timestep MLPs; and the adaLN-Zero
    part: every block's modulation layer and the final layer's modulation and output projection
    start at zero, so each block starts as the identity and the model outputs zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    patch = model.pos_embed.proj
    nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    nn.init.zeros_(patch.bias)

    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)

    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def disable_block_label_dropout(model: nn.Module) -> None:
    """Turn off the per-block label dropout of a diffusers DiT, in place.

    The null-class embedding row is kept (it was allocated at construction); only the random
    dropping in train mode stops. Labels are then dropped by the caller, once per sample.
    """
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def build_scheduler() -> Any:
    """The ``DDIMScheduler`` saved with the model: cosine betas, x0 clipped to [-1, 1]."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=BETA_SCHEDULE,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )

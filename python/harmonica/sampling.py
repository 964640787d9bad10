"""A plain class-conditional sampler for diffusers DiT models, with batched classifier-free guidance.

diffusers' ``DiTPipeline`` cannot drive the reference model: it hard-codes the ImageNet null class
(1000) and always decodes through a VAE. :func:`sample` is the same loop without those two
assumptions: the null class is read from the model's config (``num_embeds_ada_norm``) and the
result is the final sample itself (pixels for the reference model, latents for a latent DiT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["null_class_id", "sample"]


def null_class_id(transformer: nn.Module) -> int:
    """The class id a diffusers DiT uses for the unconditional (dropped-label) branch.

    diffusers' label embedder allocates ``num_embeds_ada_norm + 1`` rows and uses the last one
    for dropped labels, so the null id is ``config.num_embeds_ada_norm`` (1000 for DiT-XL/2,
    10 for the reference digits model).

    Raises:
        ValueError: if the model's config has no ``num_embeds_ada_norm``.
    """
    config = getattr(transformer, "config", None)
    num_classes = getattr(config, "num_embeds_ada_norm", None)
    if num_classes is None:
        raise ValueError(
            f"{type(transformer).__name__} has no config.num_embeds_ada_norm; "
            "sample() needs a class-conditional diffusers DiT"
        )
    return int(num_classes)


@torch.no_grad()
def sample(
    transformer: nn.Module,
    scheduler: Any,
    class_labels: torch.Tensor | Sequence[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.5,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = False,
    clamp: bool = True,
) -> torch.Tensor:
    """Sample a class-conditional DiT with a diffusers scheduler and classifier-free guidance.

    With ``guidance_scale > 1`` every step makes ONE transformer call on ``2B`` inputs (the
    latents twice; the class labels, then ``B`` null labels), exactly as ``DiTPipeline`` does,
    and guides the noise prediction: ``eps = eps_uncond + s * (eps_cond - eps_uncond)``. With
    ``guidance_scale == 1`` the call is conditional only, on ``B`` inputs. A model with a learned
    variance (``out_channels == 2 * in_channels``, as DiT-XL/2) has its extra channels dropped.

    If the transformer carries a harmonica cache handle (attribute ``_harmonica_cache``, set by
    ``harmonica.enable_cache``), it is reset first, so every call is a fresh generation.

    The scheduler's timesteps are set here (``scheduler.set_timesteps``), so the scheduler
    object is modified; ``DDIMScheduler`` with its default ``eta = 0`` is deterministic given
    the initial noise.

    Args:
        transformer: a diffusers ``DiTTransformer2DModel`` (or a model with its call signature
            and config fields ``sample_size``, ``in_channels``, ``out_channels``,
            ``num_embeds_ada_norm``), in eval mode.
        scheduler: a diffusers scheduler with the noise schedule the model was trained with.
        class_labels: int64 ``[B]`` (or a sequence of ints), each in ``0 … null_id - 1``.
        num_inference_steps: number of sampler steps.
        guidance_scale: classifier-free guidance scale ``s >= 1``; 1 disables guidance.
        generator: draws the initial noise when ``noise`` is None.
        noise: explicit initial latents ``[B, C, H, W]`` (``C = config.in_channels``,
            ``H = W = config.sample_size``), so that two runs (e.g. cached and uncached) start
            from the same noise. Any float dtype; the loop runs in float32.
        progress: show a tqdm bar over the steps.
        clamp: clamp the result to [-1, 1] (right for pixel-space models such as the reference
            model; pass False for a latent-space model and decode the latents yourself).

    Returns:
        float32 ``[B, C, H, W]`` on the transformer's device: the final sample ``x_0``, in
        [-1, 1] when ``clamp``.

    Raises:
        ValueError: on labels outside the model's classes, a noise tensor of the wrong shape,
            ``guidance_scale < 1`` or ``num_inference_steps < 1``.
    """
    handle = getattr(transformer, "_harmonica_cache", None)
    if handle is not None:
        handle.reset()

    config = transformer.config
    param = next(transformer.parameters())
    device, model_dtype = param.device, param.dtype
    null_id = null_class_id(transformer)
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
    batch = labels.numel()
    if batch == 0:
        raise ValueError("class_labels is empty")
    if labels.min() < 0 or labels.max() >= null_id:
        raise ValueError(f"class labels must lie in [0, {null_id - 1}], got {labels.tolist()}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")

    channels, size = config.in_channels, config.sample_size
    shape = (batch, channels, size, size)
    if noise is None:
        gen_device = generator.device if generator is not None else device
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(
                f"noise must have shape {shape} (labels × in_channels × size²), got {tuple(noise.shape)}"
            )
        if not noise.is_floating_point():
            raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
        latents = noise.to(device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma

    use_cfg = guidance_scale > 1
    model_labels = torch.cat([labels, torch.full_like(labels, null_id)]) if use_cfg else labels

    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if progress:
        from tqdm import tqdm

        timesteps = tqdm(timesteps, desc="sample", leave=False)
    for t in timesteps:
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        t_batch = t.reshape(1).to(device).expand(model_in.shape[0])
        out = transformer(model_in.to(model_dtype), timestep=t_batch, class_labels=model_labels).sample
        eps = out[:, :channels].float()
        if use_cfg:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]

    return latents.clamp(-1.0, 1.0) if clamp else latents

"""``harmonica compare``: caching methods swept over strengths, measured side by side against uncached.

One run loads a model and sampler, generates a fixed evaluation set uncached, then for every method
(ours: FORA and trained routers on harmonica's engine; peers: diffusers' FirstBlockCache, TaylorSeer,
MagCache, PAB and cache-dit's DBCache through their own APIs, see :mod:`harmonica.peers`) measures

- **skipped units**: ``1 − Σ executed / (calls · U)`` over the evaluation set, counted by hooks on the
  units' own layers (:class:`harmonica.peers.UnitCounter`), never taken from the method's word; a
  method that ran every unit is reported as *skipped nothing*;
- **FLOP-ideal speedup**: ``CacheSchedule.ideal_speedup`` of the executed-unit table (for a dynamic
  method, the table of its first evaluation batch, the batch that is timed);
- **measured speedup**: wall-clock uncached / cached on the first evaluation batch, median over paired
  rounds (uncached run, then cached run, same batch and noise), after the evaluation runs warmed
  both paths up;
- **fidelity to the uncached model**: PSNR, SSIM, MSE of the final samples from the same noise;
- **fidelity to the data** (reference model only): classifier-feature FID against the held-out
  digits and the share of samples classified as the class asked for.

The default model is the reference digits DiT (:mod:`harmonica.reference`); a local diffusers
pipeline or transformer folder of any supported family works too (:func:`harmonica.models.load_local`:
nothing is downloaded), its samples decoded by the pipeline's VAE when it has one (:func:`_decoder`).
Results: a terminal table and, with ``out_dir``,
``report.md``, ``report.json``, ``pareto.png`` (speedup vs PSNR and vs FID) and ``executed.png``
(which units each method ran at which step), all written atomically.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_path, write_text
from ._machine import cpu_name
from .eval import (
    class_accuracy,
    classifier_features,
    classifier_fid,
    classifier_kid,
    kid_with_interval,
    mean_with_interval,
    mse,
    psnr,
    ssim,
)
from .models import default_latent_size, load_local, supported_class, units
from .peers import (
    DBCache,
    EvenSteps,
    FirstBlockCache,
    FittedForecast,
    Fora,
    Forecast,
    LogSnrForecast,
    MagCache,
    Method,
    PyramidAttentionBroadcast,
    RouterMethod,
    RunInfo,
    StepForecast,
    TaylorSeer,
    UnitCounter,
)
from .sampling import null_class_id, sample
from .schedule import CacheSchedule

__all__ = [
    "DEFAULT_SWEEP",
    "OPTIONAL_SWEEP",
    "CompareReport",
    "MethodRow",
    "compare",
    "method_from_spec",
    "methods_from_sweep",
]

DEFAULT_SWEEP: dict[str, tuple[str, ...]] = {
    "fora": ("2", "3", "4", "5"),
    "forecast": ("2", "3", "4"),
    "fitted": ("2", "3", "4"),
    "fbcache": ("0.05", "0.1", "0.2"),
    "taylorseer": ("default", "2", "3", "4"),
    "magcache": ("0.03", "0.24", "0.24:5"),
    "pab": ("2", "3"),
    "dbcache": ("0.1", "0.2", "0.4"),
}
"""Strengths swept by default, per family (see :func:`method_from_spec` for the value syntax).

Chosen on the reference model (20 DDIM steps) to span each family's range: FirstBlockCache skips
~30–70 % of units over 0.05–0.2; MagCache reaches its 3-skip cap by τ ≈ 0.12, so 0.24 shows the cap
and 0.24:5 lifts it; PAB broadcasts attention only (≤ 25 % of units); DBCache F1B0 keeps cache-dit's
8 warm-up steps (≤ 60 % of units). TaylorSeer ``default`` is diffusers' own module patterns: a no-op
on DiT blocks, kept in the sweep so the report shows it."""

OPTIONAL_SWEEP: dict[str, tuple[str, ...]] = {"step": ("2", "3", "4"), "lsnr": ("2", "3", "4")}
"""Families run only when asked for (``--methods step,lsnr``), with these strengths."""


# -- methods from specs ------------------------------------------------------------------------------


def _number(family: str, text: str, kind: type, minimum: float, hint: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{family}: {text!r} is not a valid {kind.__name__}; {hint}") from None
    if not value >= minimum or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{family}: {text!r} must be at least {minimum}; {hint}")
    return value


def method_from_spec(family: str, spec: str | float | int) -> Method:
    """One method from a family name and a strength value.

    ==============  ======================================  ===========================================
    family          value                                   meaning
    ==============  ======================================  ===========================================
    ``fora``        ``N`` (int ≥ 1)                         compute every unit on steps ``t % N == 0``
    ``forecast``    ``N`` or ``N:order`` (order 1–2)        FORA N with Taylor forecasting (default order 2),
                                                            the mean of the rule in step index and in the
                                                            sampler's log-SNR (``fora(scheduler=...)``)
    ``fitted``      ``N`` or ``N:order``                    the same with coefficients fitted on this model
                                                            (:func:`harmonica.fit_forecast`, other noise)
    ``step``        ``N`` or ``N:order``                    ``forecast`` with the rule in step index alone
                                                            (TaylorSeer's rule)
    ``lsnr``        ``N`` or ``N:order``                    ``forecast`` with the rule in the sampler's
                                                            log-SNR alone (:func:`log_snr_times`)
    ``steps``       usage (float in [0, 1))                 every unit reused on evenly spaced steps
    ``fbcache``     ``τ`` (float > 0)                       FirstBlockCache threshold
    ``taylorseer``  ``N`` or ``N:order``, or ``default``    cache interval (and Taylor order); ``default``
                                                            = diffusers' default module patterns
    ``magcache``    ``τ`` or ``τ:K``                        error threshold (and max consecutive skips)
    ``pab``         ``N`` (int ≥ 2)                         attention recomputed every N-th step
    ``dbcache``     ``τ`` or ``τ:Fn``                       residual-diff threshold (and compute blocks)
    ==============  ======================================  ===========================================

    Raises:
        ValueError: unknown family or a malformed value (the message says what is expected).
    """
    text = str(spec).strip()
    head, _, tail = text.partition(":")
    if family == "fora":
        n = _number(family, text, int, 1, "pass the FORA interval N, e.g. 3")
        return Fora(f"FORA N={n}", interval=n)
    if family in ("forecast", "fitted", "step", "lsnr"):
        fitted = family == "fitted"
        hint = "pass the interval N (e.g. 2) or N:order (e.g. 3:1); order 1 or 2, default 2"
        n = _number(family, head, int, 1, hint)
        order = _number(family, tail, int, 1, hint) if tail else 2
        if order > 2:
            raise ValueError(f"{family}: order {order} is not 1 or 2; {hint}")
        if fitted:
            return FittedForecast(f"fitted forecast N={n} order {order}", interval=n, order=order)
        if family == "step":
            return StepForecast(f"forecast N={n} order {order} step index", interval=n, order=order)
        if family == "lsnr":
            return LogSnrForecast(f"forecast N={n} order {order} log-SNR", interval=n, order=order)
        return Forecast(f"forecast N={n} order {order}", interval=n, order=order)
    if family == "steps":
        usage = _number(family, text, float, 0.0, "pass a cache usage ratio in [0, 1), e.g. 0.35")
        if usage >= 1:
            raise ValueError(f"steps: {text!r} must be below 1; pass a cache usage ratio, e.g. 0.35")
        return EvenSteps(f"even steps {usage:.0%}", usage=usage)
    if family == "fbcache":
        tau = _number(family, text, float, 1e-12, "pass a threshold such as 0.1")
        return FirstBlockCache(f"FBCache τ={tau:g}", threshold=tau)
    if family == "taylorseer":
        if text == "default":
            return TaylorSeer("TaylorSeer default patterns", cache_identifiers=None)
        hint = "pass the cache interval N (e.g. 3), N:order (e.g. 3:2) or 'default'"
        n = _number(family, head, int, 1, hint)
        order = _number(family, tail, int, 1, hint) if tail else 1
        label = f"TaylorSeer N={n}" + (f" order {order}" if tail else "")
        return TaylorSeer(label, cache_interval=n, max_order=order)
    if family == "magcache":
        hint = "pass a threshold (e.g. 0.12) or threshold:max_skip_steps (e.g. 0.24:5)"
        tau = _number(family, head, float, 1e-12, hint)
        k = _number(family, tail, int, 1, hint) if tail else 3
        return MagCache(f"MagCache τ={tau:g}" + (f" K={k}" if tail else ""), threshold=tau, max_skip_steps=k)
    if family == "pab":
        n = _number(family, text, int, 2, "pass the attention skip range N >= 2, e.g. 2")
        return PyramidAttentionBroadcast(f"PAB N={n}", skip_range=n)
    if family == "dbcache":
        hint = "pass a threshold (e.g. 0.1) or threshold:Fn (e.g. 0.1:2)"
        tau = _number(family, head, float, 1e-12, hint)
        fn = _number(family, tail, int, 1, hint) if tail else 1
        return DBCache(f"DBCache F{fn}B0 τ={tau:g}", threshold=tau, fn_compute_blocks=fn)
    known = ", ".join(sorted({*DEFAULT_SWEEP, *OPTIONAL_SWEEP, "steps"}))
    raise ValueError(f"unknown method family {family!r}; choose from {known} (routers: pass routers=...)")


def methods_from_sweep(sweep: Mapping[str, Sequence[str | float | int]]) -> list[Method]:
    """Methods for a ``{family: [value, ...]}`` sweep, in the given order (see :func:`method_from_spec`)."""
    return [method_from_spec(family, value) for family, values in sweep.items() for value in values]


def _router_methods(
    routers: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
    thresholds: Sequence[float],
) -> list[Method]:
    if isinstance(routers, (str, os.PathLike)):
        raise ValueError("routers must be a {label: path} mapping or a list of paths, not a single path")
    items = routers.items() if isinstance(routers, Mapping) else [(Path(p).stem, p) for p in routers]
    methods: list[Method] = []
    for label, path in items:
        for tau in thresholds:
            if not 0 <= tau < 1:
                raise ValueError(f"router threshold must lie in [0, 1), got {tau}")
            name = label if len(thresholds) == 1 else f"{label} τ={tau:g}"
            methods.append(RouterMethod(name, path=os.fspath(path), threshold=float(tau)))
    return methods


# -- the workload ------------------------------------------------------------------------------------


@dataclass
class _Workload:
    """Model, sampler and evaluation set: ``generate(i)`` samples evaluation batch ``i`` from its noise."""

    name: str
    transformer: nn.Module
    scheduler: Any
    noise: torch.Tensor
    conditions: Any
    batches: list[slice]
    num_inference_steps: int
    guidance_scale: float
    sampler: Callable[..., torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    classifier: nn.Module | None = None
    labels: torch.Tensor | None = None
    calibration_noise: torch.Tensor | None = None
    output_space: str = "pixels"
    fit_setup: Callable[[], Any] | None = None

    def generate(self, index: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        part = self.batches[index]
        out = self.sampler(self.noise[part] if noise is None else noise, _take(self.conditions, part))
        return out

    def finish(self, samples: torch.Tensor) -> torch.Tensor:
        return samples if self.decode is None else self.decode(samples)


def _take(conditions: Any, part: slice) -> Any:
    if isinstance(conditions, torch.Tensor):
        return conditions[part]
    return {
        k: (v[part] if isinstance(v, torch.Tensor) and v.shape[0] > 1 else v) for k, v in conditions.items()
    }


def prompt_conditions(transformer: nn.Module, prompt_embeds: Mapping[str, torch.Tensor] | None) -> dict:
    """PixArt conditions from ``prompt_embeds [N, L, C]`` and its optional mask and negative prompt.

    Missing masks are all ones; a missing negative prompt is one all-zero embedding. Raises
    ValueError naming the fix when the embeddings are missing or do not fit the model.
    """
    kind = type(transformer).__name__
    if prompt_embeds is None or "prompt_embeds" not in prompt_embeds:
        raise ValueError(
            f"{kind} is text-conditioned: pass prompt_embeds={{'prompt_embeds': [N, L, C], ...}} "
            "(CLI: --prompt-embeds FILE.safetensors with a tensor 'prompt_embeds'; encode the prompts "
            "once with the pipeline's text encoder)"
        )
    text = prompt_embeds["prompt_embeds"]
    width = getattr(transformer.config, "caption_channels", None)
    if text.dim() != 3 or text.shape[0] == 0 or (width is not None and text.shape[-1] != width):
        raise ValueError(
            f"prompt_embeds must be [N, L, {width or 'C'}] for this {kind}, got {tuple(text.shape)}; "
            "encode the prompts with this model's text encoder"
        )
    mask = prompt_embeds.get("prompt_attention_mask", torch.ones(text.shape[:2], dtype=torch.long))
    neg = prompt_embeds.get("negative_prompt_embeds", torch.zeros_like(text[:1]))
    neg_mask = prompt_embeds.get(
        "negative_prompt_attention_mask", torch.ones(neg.shape[:2], dtype=torch.long)
    )
    return {
        "prompt_embeds": text,
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": neg,
        "negative_prompt_attention_mask": neg_mask,
    }


def seeded_noise(
    transformer: nn.Module, count: int, seed: int, sample_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """The initial noise of ``count`` samples, ``[count, in_channels, size, size]`` (or
    ``[count, *sample_shape]``: a flow-matching family's latents, see :class:`FlowSetup`) from a CPU
    generator seeded with ``seed``: the convention ``compare`` and ``harmonica sample`` share."""
    config = transformer.config
    if sample_shape is None:
        size = config.sample_size
        sample_shape = (config.in_channels, size, size)
    return torch.randn(count, *sample_shape, generator=torch.Generator().manual_seed(seed))


# -- flow-matching families (FLUX.1/.2, SD3, Wan, Qwen-Image) ---------------------------------------

_CLASS_OR_CAPTION = ("DiTTransformer2DModel", "PixArtTransformer2DModel")


def is_flow_family(transformer: nn.Module) -> bool:
    """Whether ``transformer`` is one of the text-conditioned flow-matching families (FLUX.1/.2, SD3,
    Wan, Qwen-Image) rather than DiT (class labels) or PixArt (captions, DDPM-type samplers)."""
    return supported_class(transformer).__name__ not in _CLASS_OR_CAPTION


@dataclass
class FlowSetup:
    """How a flow-matching family is sampled here: the conditioning of router training
    (:class:`harmonica.training._FlowConditioning`: prompt pool, CFG batching, the family's
    transformer call), whether CFG is true CFG (``cfg``; FLUX models with a guidance embedding are
    conditioned on the guidance scale instead), and the per-sample latent shape."""

    conditioning: Any
    cfg: bool
    sample_shape: tuple[int, ...]
    note: str


def flow_setup(
    transformer: nn.Module,
    scheduler: Any,
    prompt_embeds: Mapping[str, torch.Tensor] | None,
    guidance_scale: float,
    latent_size: int | None,
) -> FlowSetup:
    """Conditioning for a FLUX/SD3/Wan/Qwen-Image transformer from a prompt-embedding pool.

    ``prompt_embeds``: ``{"prompt_embeds": [P, L, C]}`` and optionally ``pooled_prompt_embeds``
    ``[P, D]`` (FLUX.1, SD3), ``negative_prompt_embeds`` ``[1, L, C]``,
    ``negative_pooled_prompt_embeds`` ``[1, D]`` (default zeros). Raises ValueError naming the fix
    when they are missing or do not fit the model, or when the scheduler is not a flow-matching one.
    """
    from .training import _FlowConditioning

    kind = type(transformer).__name__
    config = transformer.config
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if not (type(scheduler).__name__.startswith("FlowMatch") or prediction == "flow_prediction"):
        raise ValueError(
            f"{kind} predicts a flow-matching velocity: sample it with FlowMatchEulerDiscreteScheduler "
            f"(or another flow_prediction scheduler), got {type(scheduler).__name__}"
        )
    if prompt_embeds is None or "prompt_embeds" not in prompt_embeds:
        raise ValueError(
            f"{kind} is text-conditioned: pass prompt_embeds={{'prompt_embeds': [P, L, C], ...}} "
            "(CLI: --prompt-embeds FILE.safetensors with a tensor 'prompt_embeds', and "
            "'pooled_prompt_embeds' [P, D] for FLUX.1 / SD3; encode the prompts once with the "
            "pipeline's encode_prompt)"
        )
    text = prompt_embeds["prompt_embeds"]
    width = getattr(config, "joint_attention_dim", None) or getattr(config, "text_dim", None)
    if text.dim() != 3 or text.shape[0] == 0 or (width is not None and text.shape[-1] != width):
        raise ValueError(
            f"prompt_embeds must be [P, L, {width or 'C'}] for this {kind}, got {tuple(text.shape)}; "
            "encode the prompts with this model's text encoder(s)"
        )
    pooled = prompt_embeds.get("pooled_prompt_embeds")
    pooled_width = getattr(config, "pooled_projection_dim", None)
    if pooled is not None and (
        pooled.dim() != 2 or pooled.shape[0] != text.shape[0] or pooled.shape[-1] != pooled_width
    ):
        raise ValueError(
            f"pooled_prompt_embeds must be [{text.shape[0]}, {pooled_width}] for this {kind}, "
            f"got {tuple(pooled.shape)}"
        )
    if latent_size is None:
        latent_size = default_latent_size(transformer)
    distilled = bool(getattr(config, "guidance_embeds", False))
    conditioning = _FlowConditioning(
        transformer,
        text,
        pooled if pooled_width is not None else None,
        prompt_embeds.get("negative_prompt_embeds"),
        prompt_embeds.get("negative_pooled_prompt_embeds"),
        latent_size,
        guidance_scale if distilled else None,
    )
    note = (
        f"guidance-distilled: guidance {guidance_scale:g} is an input of the model (no CFG call)"
        if distilled
        else ("true CFG, batched into one call per step" if guidance_scale > 1 else "no CFG")
    )
    return FlowSetup(
        conditioning, not distilled and guidance_scale > 1, tuple(conditioning.sample_shape), note
    )


def _flow_sampler(
    transformer: nn.Module, scheduler: Any, steps: int, guidance: float, setup: FlowSetup
) -> Callable[..., torch.Tensor]:
    """A bare flow-matching loop (the pipelines', without text encoding and decoding): velocity from
    the conditioning's transformer call, CFG batched into it, then ``scheduler.step``.

    ``conditions``: ``[B]`` row indices into the prompt pool."""
    from .training import _guide

    @torch.no_grad()
    def run(noise: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        param = next(transformer.parameters())
        latents = noise.to(param.device, torch.float32)
        scheduler.set_timesteps(steps, device=param.device)
        for t in scheduler.timesteps:
            velocity = setup.conditioning.call(transformer, latents, t, rows, setup.cfg)
            latents = scheduler.step(_guide(velocity, guidance, setup.cfg), t, latents, return_dict=False)[0]
        return latents

    return run


def latents_as_images(latents: torch.Tensor) -> torch.Tensor:
    """Flow-family latents laid out as ``[B, C, H, W]`` images (for PSNR/SSIM and the PNG grid):
    packed tokens ``[B, N, C]`` (FLUX, Qwen-Image) as a square grid, video latents
    ``[B, C, F, H, W]`` (Wan) with their frames stacked vertically."""
    if latents.dim() == 3:
        batch, tokens, channels = latents.shape
        side = math.isqrt(tokens)
        rows = side if side * side == tokens else 1
        return latents.transpose(1, 2).reshape(batch, channels, rows, tokens // rows)
    if latents.dim() == 5:
        return latents.flatten(2, 3)
    return latents


def _dit_sampler(
    transformer: nn.Module, scheduler: Any, steps: int, guidance: float, clamp: bool
) -> Callable[..., torch.Tensor]:
    def run(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sample(
            transformer,
            scheduler,
            labels,
            num_inference_steps=steps,
            guidance_scale=guidance,
            noise=noise,
            clamp=clamp,
        )

    return run


def _pixart_sampler(
    transformer: nn.Module, scheduler: Any, steps: int, guidance: float
) -> Callable[..., torch.Tensor]:
    """A bare PixArt loop (the pipeline's, without text encoding and decoding): CFG batched into one call.

    ``conditions``: ``prompt_embeds [B, L, C]``, ``prompt_attention_mask [B, L]`` and the
    unconditional ``negative_prompt_embeds`` / ``negative_prompt_attention_mask`` (``[1, …]`` or ``[B, …]``).
    """

    @torch.no_grad()
    def run(noise: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        param = next(transformer.parameters())
        batch = noise.shape[0]
        text, mask = conditions["prompt_embeds"], conditions["prompt_attention_mask"]
        neg, neg_mask = conditions["negative_prompt_embeds"], conditions["negative_prompt_attention_mask"]
        neg, neg_mask = neg.expand(batch, *neg.shape[1:]), neg_mask.expand(batch, *neg_mask.shape[1:])
        use_cfg = guidance > 1
        text_in = torch.cat([text, neg]) if use_cfg else text
        mask_in = torch.cat([mask, neg_mask]) if use_cfg else mask
        rows = text_in.shape[0]
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(transformer, "use_additional_conditions", False):
            side = float(transformer.config.sample_size * 8)  # PixArt's VAE downsamples by 8
            on = dict(device=param.device, dtype=param.dtype)
            added = {
                "resolution": torch.tensor([[side, side]], **on).repeat(rows, 1),
                "aspect_ratio": torch.ones(rows, 1, **on),
            }
        latents = noise.to(param.device, torch.float32) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=param.device)
        channels = transformer.config.in_channels
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * (2 if use_cfg else 1)), t)
            out = transformer(
                model_in.to(param.dtype),
                encoder_hidden_states=text_in.to(param.device, param.dtype),
                encoder_attention_mask=mask_in.to(param.device),
                timestep=t.reshape(1).to(param.device).expand(rows),
                added_cond_kwargs=added,
            ).sample
            eps = out[:, :channels].float()
            if use_cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        return latents

    return run


def _load(model: Any, scheduler: Any) -> tuple[str, nn.Module, Any, Any, bool]:
    """``(name, transformer, scheduler, vae or None, is_reference)``."""
    if model is None:
        from .reference import load_model, load_scheduler

        return "reference digits DiT", load_model(), scheduler or load_scheduler(), None, True
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        transformer, folder_scheduler = load_local(folder)  # pipeline or transformer folder, no downloads
        vae = None
        config = folder / "vae" / "config.json"
        kind = None
        if config.is_file():
            kind = _vae_class(config) if is_flow_family(transformer) else "AutoencoderKL"
        if kind in _DECODED_VAES:
            import diffusers

            vae = getattr(diffusers, kind).from_pretrained(folder / "vae", local_files_only=True).eval()
        return folder.name, transformer, scheduler or folder_scheduler, vae, False
    if isinstance(model, nn.Module) or hasattr(model, "transformer"):
        if getattr(model, "transformer_2", None) is not None:
            raise ValueError(
                "this pipeline runs two transformers (Wan 2.2's stages); compare and sample run one: "
                "pass pipe.transformer or pipe.transformer_2 with scheduler=pipe.scheduler"
            )
        transformer = getattr(model, "transformer", model)
        supported_class(transformer)
        scheduler = scheduler or getattr(model, "scheduler", None)
        if scheduler is None:
            example = "FlowMatchEulerDiscreteScheduler" if is_flow_family(transformer) else "a DDIMScheduler"
            raise ValueError(f"a bare transformer needs its sampler: pass scheduler=... (e.g. {example})")
        vae = getattr(model, "vae", None)
        if vae is not None and is_flow_family(transformer) and not _decodes(vae):
            vae = None
        return type(transformer).__name__, transformer.eval(), scheduler, vae, False
    raise ValueError(
        f"model must be None, a folder path, a pipeline or a transformer; got {type(model).__name__}"
    )


_DECODED_VAES = ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLQwenImage", "AutoencoderKLFlux2")


def _vae_class(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        message = f"{config} is not a readable diffusers VAE config ({err}); fix or remove it"
        raise ValueError(message) from err


def _decodes(vae: Any) -> bool:
    """Whether samples are decoded with this flow pipeline's VAE (those of SD3, FLUX.1/.2, Wan and
    Qwen-Image, see :func:`_decoder`); another VAE class leaves the samples as latents."""
    return type(vae).__name__ in _DECODED_VAES


def _decoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents to images in [-1, 1], as each family's pipeline decodes them:

    - ``AutoencoderKL``: ``vae.decode(latents / scaling_factor + shift_factor)`` (SD3's and FLUX.1's
      VAEs have a shift, DiT's and PixArt's none); FLUX.1's packed ``[B, N, 4C]`` tokens are
      unpacked to ``[B, C, 2√N, 2√N]`` first, as ``FluxPipeline`` does;
    - Wan's and Qwen-Image's video VAEs: ``latents / (1 / latents_std) + latents_mean`` per channel;
      Qwen-Image's packed tokens unpacked to one frame (its image), Wan's frames stacked vertically;
    - FLUX.2's: its tokens laid out on their row-major grid, ``latents · σ + μ`` with the VAE's
      batch-norm statistics (σ = √(running_var + eps)), then the 2×2 patches unfolded.
    """
    config = vae.config
    kind = type(vae).__name__
    if kind == "AutoencoderKLFlux2":

        def prepare(latents: torch.Tensor) -> torch.Tensor:
            batch, _, channels = latents.shape
            side = _square_side(latents)
            grid = latents.reshape(batch, side, side, channels).permute(0, 3, 1, 2)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps).to(grid)
            grid = grid * std + mean
            patches = grid.reshape(batch, channels // 4, 2, 2, side, side).permute(0, 1, 4, 2, 5, 3)
            return patches.reshape(batch, channels // 4, 2 * side, 2 * side)

    elif kind == "AutoencoderKL":
        scale = getattr(config, "scaling_factor", None) or 1.0
        shift = getattr(config, "shift_factor", None)

        def prepare(latents: torch.Tensor) -> torch.Tensor:
            latents = (_unpack_tokens(latents) if latents.dim() == 3 else latents) / scale
            return latents if shift is None else latents + shift

    else:
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape)

        def prepare(latents: torch.Tensor) -> torch.Tensor:
            if latents.dim() == 3:
                latents = _unpack_tokens(latents).unsqueeze(2)  # Qwen-Image: one frame
            return latents / inverse_std.to(latents) + mean.to(latents)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        images = vae.decode(prepare(latents.to(param.device, param.dtype))).sample
        if images.dim() == 5:  # a video VAE: Qwen-Image's one frame, Wan's frames stacked vertically
            images = images[:, :, 0] if latents.dim() == 3 else images.flatten(2, 3)
        return images.float().clamp(-1, 1).cpu()

    return decode


def _square_side(latents: torch.Tensor) -> int:
    side = math.isqrt(latents.shape[1])
    if side * side != latents.shape[1] or latents.shape[2] % 4:
        raise ValueError(
            f"cannot unpack latents of shape {tuple(latents.shape)} for the VAE: expected packed "
            "[B, N, 4C] tokens of a square image"
        )
    return side


def _unpack_tokens(latents: torch.Tensor) -> torch.Tensor:
    """Packed latents ``[B, N, 4C]`` (FLUX.1, Qwen-Image: 2×2 patches of a square grid) as
    ``[B, C, H, W]``."""
    batch, _, channels = latents.shape
    side = _square_side(latents)
    patches = latents.view(batch, side, side, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels // 4, 2 * side, 2 * side)


def _workload(
    model: Any,
    scheduler: Any,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    n_per_class: int,
    num_samples: int | None,
    class_labels: Sequence[int] | torch.Tensor | None,
    prompt_embeds: Mapping[str, torch.Tensor] | None,
    batch_size: int,
    seed: int,
    latent_size: int | None = None,
) -> _Workload:
    name, transformer, scheduler, vae, is_reference = _load(model, scheduler)
    is_dit = supported_class(transformer).__name__ == "DiTTransformer2DModel"
    classifier, labels, conditions = None, None, None
    sample_shape = None
    if latent_size is not None and not is_flow_family(transformer):
        raise ValueError(
            f"latent_size applies to the flow-matching families (FLUX, SD3, Wan, Qwen-Image); "
            f"{type(transformer).__name__} samples at its sample_size"
        )

    if is_flow_family(transformer):
        setup = flow_setup(transformer, scheduler, prompt_embeds, guidance_scale, latent_size)
        prompts = setup.conditioning.embeds.shape[0]
        count = num_samples or prompts
        conditions = torch.arange(count) % prompts  # rows of the prompt pool, cycled
        sampler = _flow_sampler(transformer, scheduler, num_inference_steps, guidance_scale, setup)
        sample_shape = setup.sample_shape
    elif is_dit:
        num_classes = null_class_id(transformer)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        elif is_reference:
            labels = torch.arange(num_classes).repeat(n_per_class)  # every batch sees every class
        else:
            count = num_samples or 16
            labels = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:count]
            labels = labels.repeat(math.ceil(count / len(labels)))[:count]
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be non-empty and lie in [0, {num_classes - 1}]")
        conditions = labels
        sampler = _dit_sampler(
            transformer, scheduler, num_inference_steps, guidance_scale, clamp=is_reference
        )
        count = len(labels)
    else:
        conditions = prompt_conditions(transformer, prompt_embeds)
        count = conditions["prompt_embeds"].shape[0]
        sampler = _pixart_sampler(transformer, scheduler, num_inference_steps, guidance_scale)

    if is_reference:
        from .reference import load_classifier

        classifier = load_classifier()

    def fit_setup() -> Any:
        """The sampling set-up of router training for this workload's conditions (fitted forecasts)."""
        from .training import _ClassConditioning, _Group, _PromptConditioning, _Setup

        if is_flow_family(transformer):
            conditioning, cfg = setup.conditioning, setup.cfg
        elif is_dit:
            conditioning, cfg = _ClassConditioning(transformer, labels.unique()), guidance_scale > 1
        else:
            conditioning = _PromptConditioning(
                transformer,
                conditions["prompt_embeds"],
                conditions.get("prompt_attention_mask"),
                conditions.get("negative_prompt_embeds"),
                conditions.get("negative_prompt_attention_mask"),
            )
            cfg = guidance_scale > 1
        device = next(transformer.parameters()).device
        return _Setup(
            transformer, None, copy.deepcopy(scheduler), conditioning, cfg, guidance_scale, device, _Group()
        )

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    noise = seeded_noise(transformer, count, seed, sample_shape)
    calibration = seeded_noise(transformer, min(batch_size, count), seed + 1, sample_shape)
    batches = [slice(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
    return _Workload(
        name=name,
        transformer=transformer,
        scheduler=scheduler,
        noise=noise,
        conditions=conditions,
        batches=batches,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        decode=_decoder(vae) if vae is not None else (latents_as_images if sample_shape else None),
        classifier=classifier,
        labels=labels,
        calibration_noise=calibration,
        output_space="pixels" if is_reference or vae is not None else "latents",
        fit_setup=fit_setup,
    )


# -- results -----------------------------------------------------------------------------------------


@dataclass
class MethodRow:
    """One line of the comparison. Quality numbers compare with the uncached samples from the same noise.

    ``skipped_share``: measured share of (call, unit) pairs whose unit did not run, over the whole
    evaluation set; ``skipped_share_timed``: the same on the timed batch. ``cache_usage_ratio``: the
    schedule's CUR (ours only; equals ``skipped_share``). ``psnr`` is None when the samples are
    identical to the uncached ones (infinite PSNR); ``psnr_low``/``psnr_high`` and ``kid_low``/
    ``kid_high`` are 95 % bootstrap intervals over the samples. ``executed``: per step and unit, the share of
    evaluation batches in which the unit ran (``[T][U]``).
    ``note``: remarks, e.g. that another strength of the same family ran exactly the same units.
    """

    method: str
    family: str
    origin: str
    settings: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    skipped_share: float | None = None
    skipped_share_timed: float | None = None
    cache_usage_ratio: float | None = None
    ideal_speedup: float | None = None
    measured_speedup: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None
    uncached_seconds: float | None = None
    cached_seconds: float | None = None
    psnr: float | None = None
    psnr_low: float | None = None
    psnr_high: float | None = None
    ssim: float | None = None
    mse: float | None = None
    kid: float | None = None
    kid_low: float | None = None
    kid_high: float | None = None
    fid: float | None = None
    accuracy: float | None = None
    executed: list[list[float]] | None = None
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.status in ("ok", "skipped nothing")


@dataclass
class CompareReport:
    """All rows (the uncached baseline first) and the run's context (model, device, settings)."""

    rows: list[MethodRow]
    context: dict[str, Any]

    def row(self, method: str) -> MethodRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def to_json(self) -> str:
        return json.dumps({"context": self.context, "rows": [asdict(r) for r in self.rows]}, indent=1)

    def table(self) -> str:
        """A fixed-width terminal table."""
        head = (
            f"{'method':<30}{'skipped':>8}{'ideal':>7}{'speedup':>9}{'PSNR (95% CI)':>20}{'SSIM':>7}"
            f"{'MSE':>10}{'KIDx1e3':>9}{'FID':>9}{'acc':>6}  note"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.method[:29]:<30}{_fmt(r.skipped_share, '.1%'):>8}{_fmt(r.ideal_speedup, '.2f', 'x'):>7}"
                f"{_fmt(r.measured_speedup, '.2f', 'x'):>9}{_psnr(r, interval=True):>20}"
                f"{_fmt(r.ssim, '.3f'):>7}{_fmt(r.mse, '.2e'):>10}{_kid(r):>9}{_fmt(r.fid, '.2f'):>9}"
                f"{_fmt(r.accuracy, '.0%'):>6}  {_note(r)}"
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        c = self.context
        lines = [
            "# harmonica compare",
            "",
            f"{c['model']} ({c['num_units']} units), {c['num_inference_steps']} {c['scheduler']} steps, CFG "
            f"{c['guidance_scale']}, {c['num_samples']} samples (seed {c['seed']}, {c['output_space']}). "
            f"Speed: {c['device']}, torch {c['torch']}, `{c['backend']}` op backend; "
            f"batch {c['timing_batch']} (+ CFG), median of {c['timing_repeats']} paired rounds "
            f"(uncached run, then cached run). {c['date']}.",
            "",
            "| method | family | skipped units | FLOP-ideal | measured speedup (min–max) "
            "| PSNR dB (95 % CI) | SSIM | MSE | KID ×10³ (95 % CI) | FID | accuracy | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            spread = (
                f" ({r.speedup_min:.2f}–{r.speedup_max:.2f})"
                if r.speedup_min is not None and r.origin != "baseline"
                else ""
            )
            lines.append(
                f"| {r.method} | {r.family} | {_fmt(r.skipped_share, '.1%')} | "
                f"{_fmt(r.ideal_speedup, '.2f', '×')} | "
                f"{_fmt(r.measured_speedup, '.2f', '×')}{spread} | {_psnr(r, interval=True)} | "
                f"{_fmt(r.ssim, '.4f')} | {_fmt(r.mse, '.2e')} | {_kid(r, interval=True)} | "
                f"{_fmt(r.fid, '.2f')} | {_fmt(r.accuracy, '.1%')} | {_note(r)} |"
            )
        lines += ["", *self._notes(), ""]
        matched = _matched_speedup(self.rows)
        if matched:
            lines += [
                "## At matched speedup",
                "",
                "Each of our methods against each peer family at our measured speedup: the peer's "
                "quality interpolated linearly along its measured sweep where our speedup lies inside "
                "the peer's measured range, else the peer's nearest point (with its own speedup; "
                "differences only when it is within 10 % of ours: *fastest* means the peer never got "
                "this fast). Positive ΔPSNR / negative ΔFID: ours better.",
                "",
                "| ours | speedup | PSNR | FID | vs | peer point | peer PSNR | ΔPSNR dB | peer FID | ΔFID |",
                "|---|---|---|---|---|---|---|---|---|---|",
                *matched,
                "",
            ]
        lines += ["![speed vs quality](pareto.png)", "", "![executed units](executed.png)", ""]
        return "\n".join(lines)

    def _notes(self) -> list[str]:
        c = self.context
        notes = [
            "Skipped units are counted by hooks on the layers inside every unit (attn1/attn2/ff), per "
            "transformer call, over the whole evaluation set; *skipped nothing* means every unit ran at "
            "every step. FLOP-ideal speedups are arithmetic bounds from the executed-unit table of the "
            "timed batch (matmul/attention FLOPs), not measurements. Methods that skip whole blocks "
            "(FirstBlockCache, MagCache, DBCache) also skip the blocks' adaLN modulation, norms and "
            "residual adds, which the unit FLOPs do not count and which weigh on a model this small; "
            "their measured speedup can exceed the FLOP-ideal one.",
            "PSNR/SSIM/MSE compare with the uncached samples from the same noise and labels. Intervals "
            "are 95 % bootstrap intervals over the samples (1 000 resamples): two methods whose "
            "intervals overlap are not told apart by this run.",
        ]
        unsteady = _unsteady_timing(self.rows)
        if unsteady:
            notes.append(unsteady)
        if c.get("kid_floor") is not None:
            notes.append(
                f"KID (×10³): unbiased kernel distance of the reference classifier's features to the "
                f"{c['num_test_images']} held-out test digits, meaningful at this sample count. Real "
                f"training digits at the same count: {1e3 * c['kid_floor']:.2f}; the uncached model from "
                f"this noise {1e3 * c['kid_uncached']:.2f} and from other noise "
                f"{1e3 * c['kid_uncached_other_noise']:.2f}: KID differences smaller than that gap, or "
                "inside the intervals, are noise."
            )
        if c.get("fid_floor") is not None:
            notes.append(
                f"FID: reference classifier features, {c['num_samples']} samples vs the "
                f"{c['num_test_images']} held-out test digits; real-vs-real floor at the same count: "
                f"{c['fid_floor']:.2f}; the uncached model from other noise: "
                f"{c['fid_uncached_other_noise']:.2f} (FID is biased at this count and differences of "
                "that size are noise; read KID)."
            )
        if c.get("mag_ratios"):
            notes.append(
                "MagCache ratios from its own calibration run (one uncached generation, other noise): "
                + ", ".join(f"{x:.3f}" for x in c["mag_ratios"])
                + "."
            )
        return notes

    def save(self, out_dir: str | os.PathLike[str]) -> None:
        """Write ``report.md``, ``report.json``, ``pareto.png`` and ``executed.png`` to ``out_dir``."""
        out = Path(out_dir)
        _plot_pareto(self, out / "pareto.png")
        _plot_executed(self, out / "executed.png")
        write_text(out / "report.json", self.to_json() + "\n")
        write_text(out / "report.md", self.markdown())


UNSTEADY_SPREAD = 0.15
"""A method's timing rounds spreading over more than this share of their median make the run's
timing unsteady (a note says so)."""


def _unsteady_timing(rows: list[MethodRow]) -> str | None:
    """A note when the paired timing rounds of some methods spread over more than
    :data:`UNSTEADY_SPREAD` of their median (a busy or throttled machine), naming the widest."""
    spreads = [
        ((r.speedup_max - r.speedup_min) / r.measured_speedup, r)
        for r in rows
        if r.origin != "baseline" and r.measured_speedup and r.speedup_min is not None
    ]
    wide = [(spread, r) for spread, r in spreads if spread > UNSTEADY_SPREAD]
    if not wide:
        return None
    spread, r = max(wide, key=lambda item: item[0])
    return (
        f"Timing was unsteady: the rounds of {len(wide)} of {len(spreads)} methods spread over more than "
        f"{UNSTEADY_SPREAD:.0%} of their median, most {r.method} ({r.speedup_min:.2f}–{r.speedup_max:.2f}×, "
        f"{spread:.0%}). Speedups that differ by less than that are not told apart by this run; time on an "
        "idle machine (nothing else running: a second busy process slows a CPU run many times) or with "
        "more rounds (--timing-repeats)."
    )


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _psnr(r: MethodRow, *, interval: bool = False) -> str:
    if r.psnr is None:
        return "∞" if r.measured else "—"
    if interval and r.psnr_low is not None:
        return f"{r.psnr:.2f} ({r.psnr_low:.1f}–{r.psnr_high:.1f})"
    return f"{r.psnr:.2f}"


def _kid(r: MethodRow, *, interval: bool = False) -> str:
    if r.kid is None:
        return "—"
    if interval and r.kid_low is not None:
        return f"{1e3 * r.kid:.2f} ({1e3 * r.kid_low:.2f}–{1e3 * r.kid_high:.2f})"
    return f"{1e3 * r.kid:.2f}"


def _note(r: MethodRow) -> str:
    if r.origin == "baseline":
        return "baseline"
    return f"{r.status}; {r.note}" if r.note else r.status


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    points = sorted(points)
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]


def _matched_speedup(rows: list[MethodRow]) -> list[str]:
    """Markdown rows: each of our methods against each peer family at our measured speedup.

    Within the peer's measured speedup range its PSNR and FID are interpolated linearly along its
    sweep; outside it the peer's nearest point is shown with its own speedup, and compared (Δ) only
    when that speedup is within 10 % of ours.
    """
    ok = [r for r in rows if r.status == "ok" and r.measured_speedup is not None]
    ours = [r for r in ok if r.origin == "ours"]
    families = sorted({r.family for r in ok if r.origin == "peer"})
    lines = []
    for r in ours:
        x = r.measured_speedup
        for family in families:
            peers = sorted((p for p in ok if p.family == family), key=lambda p: p.measured_speedup)
            psnr_at = _interpolate([(p.measured_speedup, p.psnr) for p in peers if p.psnr is not None], x)
            fid_at = _interpolate([(p.measured_speedup, p.fid) for p in peers if p.fid is not None], x)
            where, matched = "interpolated", True
            if psnr_at is None and fid_at is None:
                nearest = min(peers, key=lambda p: abs(p.measured_speedup - x))
                psnr_at, fid_at = nearest.psnr, nearest.fid
                # a point more than 10 % away in speed is shown, but not compared
                matched = abs(nearest.measured_speedup - x) <= 0.1 * x
                side = "nearest" if matched else ("fastest" if nearest.measured_speedup < x else "slowest")
                where = f"{side}: {nearest.method} at {nearest.measured_speedup:.2f}×"
            d_psnr = None if not matched or psnr_at is None or r.psnr is None else r.psnr - psnr_at
            d_fid = None if not matched or fid_at is None or r.fid is None else r.fid - fid_at
            lines.append(
                f"| {r.method} | {x:.2f}× | {_fmt(r.psnr, '.2f')} | {_fmt(r.fid, '.2f')} | {family} | "
                f"{where} | {_fmt(psnr_at, '.2f')} | {_fmt(d_psnr, '+.2f')} | {_fmt(fid_at, '.2f')} | "
                f"{_fmt(d_fid, '+.2f')} |"
            )
    return lines


# -- plots -------------------------------------------------------------------------------------------

_FAMILY_STYLE = {
    "FORA": ("tab:blue", "o"),
    "forecast": ("tab:cyan", "X"),
    "fitted forecast": ("tab:olive", "P"),
    "forecast (step index)": ("tab:gray", "x"),
    "forecast (log-SNR)": ("tab:purple", "h"),
    "router": ("tab:red", "*"),
    "FirstBlockCache": ("tab:orange", "s"),
    "TaylorSeer": ("tab:green", "^"),
    "MagCache": ("tab:purple", "D"),
    "PAB": ("tab:brown", "v"),
    "DBCache": ("tab:pink", "P"),
}


def _plot_pareto(report: CompareReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A method that skipped nothing is not timed; it sits at 1× (its FLOP-ideal speedup), marked ×.
    rows = [r for r in report.rows if r.origin != "baseline" and r.measured]
    speed = {r.method: 1.0 if r.measured_speedup is None else r.measured_speedup for r in rows}
    has_fid = any(r.fid is not None for r in rows)
    panels = [("psnr", "PSNR vs uncached, dB (higher is better)")]
    if has_fid:
        panels.append(("fid", "classifier FID vs test digits (lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    finite_psnr = [r.psnr for r in rows if r.psnr is not None]
    psnr_cap = (max(finite_psnr) + 5) if finite_psnr else 60.0
    for ax, (metric, ylabel) in zip(axes[0], panels, strict=True):
        for family in dict.fromkeys(r.family for r in rows):
            color, marker = _FAMILY_STYLE.get(family, ("tab:gray", "o"))
            # along the sweep (by skipped share), not by the noisier measured speedup
            members = sorted((r for r in rows if r.family == family), key=lambda r: r.skipped_share or 0.0)
            xs, ys = [], []
            for r in members:
                y = getattr(r, metric)
                if metric == "psnr" and y is None:
                    y = psnr_cap  # identical to uncached: drawn at the top
                if y is None:
                    continue
                xs.append(speed[r.method])
                ys.append(y)
                nothing = r.status == "skipped nothing"
                ax.scatter(
                    speed[r.method],
                    y,
                    s=70 if marker == "*" else 40,
                    marker="x" if nothing else marker,
                    color="grey" if nothing else color,
                    zorder=3,
                )
                short = r.method.removeprefix(family).strip() or r.method
                ax.annotate(
                    short, (speed[r.method], y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
            if xs:
                ax.plot(xs, ys, color=color, linewidth=1, alpha=0.6, label=family)
        front = _pareto_front(
            [(speed[r.method], getattr(r, metric)) for r in rows if getattr(r, metric) is not None],
            higher_is_better=metric == "psnr",
        )
        if len(front) > 1:
            fx, fy = zip(*front, strict=True)
            ax.step(fx, fy, where="post", color="black", linestyle=":", linewidth=1, label="Pareto front")
        if metric == "fid":
            base = report.rows[0].fid
            if base is not None:
                ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="uncached")
        ax.axvline(1.0, color="lightgrey", linewidth=1)
        ax.set_xlabel("measured speedup over uncached (wall-clock)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    c = report.context
    fig.suptitle(
        f"{c['model']}, {c['num_inference_steps']} steps, CFG {c['guidance_scale']}, {c['device']} "
        "(× = skipped nothing)",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _pareto_front(points: list[tuple[float, float]], *, higher_is_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both speedup and quality, by increasing speedup."""
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if not front or sign * y > sign * front[-1][1]:
            front.append((x, y))
    return sorted(front)


def _plot_executed(report: CompareReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.executed]
    cols = min(5, max(1, len(rows)))
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows, strict=False):
        ax.axis("on")
        ax.imshow(r.executed, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{r.method}\nskipped {_fmt(r.skipped_share, '.0%')}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_ylabel("step →", fontsize=8)
    axes[0][0].set_xlabel("unit →", fontsize=8)
    fig.suptitle(
        "Executed units (green: ran; white: skipped; shade: share of evaluation batches)", fontsize=9
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


# -- the run -----------------------------------------------------------------------------------------


def _device_name(transformer: nn.Module) -> str:
    device = next(transformer.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _ideal_speedup(transformer: nn.Module, executed: torch.Tensor) -> float | None:
    """FLOP-ideal speedup of an executed-unit table (``CacheSchedule.ideal_speedup``), or None."""
    try:
        return CacheSchedule.from_mask(executed).ideal_speedup(transformer)
    except ValueError:  # e.g. a step-0 unit skipped: not a valid schedule, no ideal figure
        return None


def _quality(
    row: MethodRow, images: torch.Tensor, reference: torch.Tensor, work: _Workload, data_range: float
) -> None:
    value, interval = mean_with_interval(psnr(images, reference, data_range=data_range, reduction="none"))
    row.psnr = None if math.isinf(value) else value
    if interval is not None:
        row.psnr_low, row.psnr_high = interval
    row.mse = mse(images, reference).item()
    if min(images.shape[-2:]) > 9:  # the 9×9 SSIM window needs larger images
        row.ssim = ssim(images, reference, data_range=data_range).item()
    if work.classifier is not None:
        from .reference import load_dataset

        test_images, _ = load_dataset("test")
        row.fid = classifier_fid(images, test_images, work.classifier).item()
        row.kid, (row.kid_low, row.kid_high) = kid_with_interval(
            classifier_features(images, work.classifier), classifier_features(test_images, work.classifier)
        )
        row.accuracy = class_accuracy(images, work.labels, work.classifier).item()


def compare(
    model: Any = None,
    *,
    scheduler: Any = None,
    methods: Sequence[Method] | Mapping[str, Sequence[str | float | int]] | None = None,
    routers: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]] = (),
    router_thresholds: Sequence[float] = (0.1,),
    num_inference_steps: int = 20,
    guidance_scale: float = 1.5,
    n_per_class: int = 10,
    num_samples: int | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    prompt_embeds: Mapping[str, torch.Tensor] | None = None,
    latent_size: int | None = None,
    batch_size: int = 10,
    timing_repeats: int = 3,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> CompareReport:
    """Sweep caching methods on one model and sampler; measure each against the uncached model.

    Args:
        model: None (the reference digits DiT), a local diffusers pipeline folder or model folder of
            any supported family (:func:`harmonica.models.load_local`; nothing is downloaded), or a
            pipeline or transformer object. FLUX.1/.2, SD3, Wan and Qwen-Image are sampled with a
            flow-matching loop from a prompt-embedding pool; their latents are not VAE-decoded.
        scheduler: the sampler; default: the folder's or pipeline's (a bare transformer needs one;
            the flow-matching families a flow-matching one, e.g. ``FlowMatchEulerDiscreteScheduler``).
        methods: None (:data:`DEFAULT_SWEEP`), a ``{family: [value, ...]}`` sweep (see
            :func:`method_from_spec`), or :class:`harmonica.peers.Method` objects.
        routers: trained router files, ``{label: path}`` or a list of paths (label = file stem); each
            is loaded with ``Router.load(path, model=transformer)`` and run at every ``router_thresholds`` τ.
        num_inference_steps, guidance_scale: the sampler's step count and CFG scale (CFG batched into
            one transformer call per step).
        n_per_class: reference model: evaluation samples per digit (``10 · n_per_class`` in all).
        num_samples, class_labels: another DiT: the evaluation labels (default 16 random classes).
            Flow-matching families: ``num_samples`` evaluation samples cycling through the prompts
            (default: one per prompt).
        prompt_embeds: a PixArt model: ``{"prompt_embeds": [N, L, C], "prompt_attention_mask": [N, L],
            "negative_prompt_embeds": [1, L, C], "negative_prompt_attention_mask": [1, L]}``
            (encode the prompts once with the pipeline's text encoder; masks default to all ones,
            the negative embedding to zeros). FLUX.1/.2, SD3, Wan, Qwen-Image:
            ``{"prompt_embeds": [P, L, C], "pooled_prompt_embeds": [P, D] (FLUX.1, SD3; default
            zeros), "negative_prompt_embeds": [1, L, C], "negative_pooled_prompt_embeds": [1, D]}``,
            ``num_samples`` (default P) cycling through the prompts. CFG: true CFG batched into one
            call per step (the negative prompt, default zeros, as the unconditional half); a FLUX
            model with a guidance embedding takes ``guidance_scale`` as that input instead.
        latent_size: flow-matching families: image tokens per side (default: SD3's native size,
            else 32).
        batch_size: images per sampling call; the first evaluation batch is also the timed batch.
        timing_repeats: paired timing rounds per method (median reported).
        seed: seed of the evaluation noise (the MagCache calibration uses ``seed + 1``).
        out_dir: write ``report.md``, ``report.json``, ``pareto.png``, ``executed.png`` here.
        progress: tqdm bars.  verbose: print the table.

    Returns:
        A :class:`CompareReport`; ``rows[0]`` is the uncached baseline.

    Raises:
        ValueError: bad settings, an unknown method family or value, an unreadable or mismatched
            router, an unsupported model or missing inputs (the message says how to fix it).
    """
    for name, value, low in (
        ("num_inference_steps", num_inference_steps, 1),
        ("timing_repeats", timing_repeats, 1),
        ("batch_size", batch_size, 1),
        ("n_per_class", n_per_class, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
    if methods is None:
        method_list = methods_from_sweep(DEFAULT_SWEEP)
    elif isinstance(methods, Mapping):
        method_list = methods_from_sweep(methods)
    else:
        method_list = list(methods)
        bad = [m for m in method_list if not isinstance(m, Method)]
        if bad:
            raise ValueError(
                f"methods must be harmonica.peers.Method objects or a sweep mapping, got {bad[0]!r}"
            )
    method_list += _router_methods(routers, router_thresholds)
    labels = [m.label for m in method_list]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"method labels must be unique; repeated: {duplicates}")
    if not method_list:
        raise ValueError("no methods to compare; pass methods=... or routers=...")

    revision = _revision()  # of the code that starts the run (others may commit while it runs)
    work = _workload(
        model,
        scheduler,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        n_per_class=n_per_class,
        num_samples=num_samples,
        class_labels=class_labels,
        prompt_embeds=prompt_embeds,
        batch_size=batch_size,
        seed=seed,
        latent_size=latent_size,
    )
    transformer = work.transformer
    for m in method_list:  # routers: fail on a bad file or step count before any sampling
        if isinstance(m, RouterMethod):
            m.load(transformer, num_inference_steps)

    unit_names = units(transformer)
    steps = num_inference_steps

    def calibrate() -> None:
        with torch.inference_mode():
            work.generate(0, noise=work.calibration_noise)

    run = RunInfo(
        num_inference_steps=steps,
        calibrate=calibrate,
        fit_setup=work.fit_setup,
        seed=seed + 2,
        scheduler=work.scheduler,
    )

    bar = tqdm(total=1 + len(method_list), desc="compare", disable=not progress)
    bar.set_postfix_str("uncached")
    reference_chunks = []
    with torch.inference_mode():
        for i in range(len(work.batches)):
            with UnitCounter(transformer) as counter:
                reference_chunks.append(work.generate(i))
            if counter.executed.shape[0] != steps or not bool(counter.executed.all()):
                raise RuntimeError(
                    f"the uncached model made {counter.executed.shape[0]} transformer calls with "
                    f"{int((~counter.executed).sum())} units not running; expected {steps} full calls "
                    "(one per step, CFG batched)"
                )
    reference_raw = torch.cat(reference_chunks)
    reference = work.finish(reference_raw)
    data_range = 2.0 if work.output_space == "pixels" else float(reference.max() - reference.min()) or 1.0
    baseline = MethodRow("uncached", "baseline", "baseline", skipped_share=0.0, ideal_speedup=1.0)
    baseline.measured_speedup = 1.0
    _quality(baseline, reference, reference, work, data_range)
    baseline.psnr = None
    rows = [baseline]
    bar.update()

    mag_ratios = None
    uncached_restored = True
    for method in method_list:
        bar.set_postfix_str(method.label)
        row = MethodRow(method.label, method.family, method.origin, settings=dict(method.settings))
        rows.append(row)
        reason = method.unavailable()
        if reason:
            row.status = f"unavailable: {reason}"
            bar.update()
            continue
        try:
            method.prepare(transformer, run)
            row.settings = dict(method.settings)
            chunks, executed = [], []
            try:
                attachment = method.attach(transformer, run)
            except Exception as err:  # noqa: BLE001 - a peer that cannot be installed on this model
                if method.origin == "ours":
                    raise
                row.status = f"unavailable: {type(err).__name__}: {err}"
                bar.update()
                continue
            try:
                with torch.inference_mode():
                    for i in range(len(work.batches)):
                        with UnitCounter(transformer) as counter, attachment.generation():
                            chunks.append(work.generate(i))
                        executed.append(counter.executed)
            finally:
                attachment.detach()

            ratios, uncached_times, cached_times = [], [], []
            skipped_any = any(not bool(e.all()) for e in executed)
            with torch.inference_mode():
                # The evaluation runs above warmed up both paths; every round is kept.
                # A method that ran every unit is not timed: it cannot be faster, only add overhead.
                for _ in range(timing_repeats if skipped_any else 0):
                    t_uncached, out = _timed(lambda: work.generate(0))
                    uncached_restored &= torch.equal(out, reference_chunks[0])
                    attachment = method.attach(transformer, run)
                    try:
                        with attachment.generation():
                            t_cached, _ = _timed(lambda: work.generate(0))
                    finally:
                        attachment.detach()
                    ratios.append(t_uncached / t_cached)
                    uncached_times.append(t_uncached)
                    cached_times.append(t_cached)
        except Exception as err:  # noqa: BLE001 - one broken peer must not lose the whole sweep
            if method.origin == "ours":
                raise
            # diffusers' hooks assume their own block outputs, which some families' blocks do not
            # return (FirstBlockCache on SD3's last block, on FLUX.2): the peer does not run there.
            kind = f"unavailable on {type(transformer).__name__}" if is_flow_family(transformer) else "failed"
            row.status = f"{kind}: {type(err).__name__}: {err}"
            bar.update()
            continue

        if isinstance(method, MagCache):
            mag_ratios = method.mag_ratios
        calls = {e.shape[0] for e in executed}
        if calls != {steps}:
            row.status = f"made {sorted(calls)} transformer calls per generation, expected {steps}"
        total = sum(int(e.numel()) for e in executed)
        ran = sum(int(e.sum()) for e in executed)
        row.skipped_share = 1.0 - ran / total
        row.skipped_share_timed = 1.0 - executed[0].float().mean().item()
        row.executed = [
            [round(v, 3) for v in line] for line in torch.stack(executed).float().mean(0).tolist()
        ]
        row.ideal_speedup = _ideal_speedup(transformer, executed[0])
        if isinstance(method, (Fora, EvenSteps, RouterMethod)):
            row.cache_usage_ratio = method.schedule(transformer, steps).cache_usage_ratio
            # A joint attention (FLUX, SD3, Qwen-Image) runs both streams when either is computed, so
            # a schedule that computes one stream alone measures less skipped than its CUR.
            joint = is_flow_family(transformer) and row.skipped_share < row.cache_usage_ratio
            if joint:
                row.note = (
                    f"schedule CUR {row.cache_usage_ratio:.1%}: a joint attention runs both streams when "
                    "either is computed"
                )
            if abs(row.cache_usage_ratio - row.skipped_share) * total > 0.5 and not joint:
                row.status = (
                    f"engine mismatch: schedule CUR {row.cache_usage_ratio:.4f} but "
                    f"{row.skipped_share:.4f} measured"
                )
        if ratios:
            row.measured_speedup = statistics.median(ratios)
            row.speedup_min, row.speedup_max = min(ratios), max(ratios)
            row.uncached_seconds = statistics.median(uncached_times)
            row.cached_seconds = statistics.median(cached_times)
        _quality(row, work.finish(torch.cat(chunks)), reference, work, data_range)
        if row.status == "ok" and ran == total:
            row.status = "skipped nothing"
        bar.update()
    bar.close()

    # A strength past a family's cap (MagCache's max_skip_steps, TaylorSeer's warm-up) can run exactly
    # the units of a weaker one: say so, since the sweep then did not move.
    for i, row in enumerate(rows):
        for earlier in rows[1:i]:
            if row.executed and earlier.family == row.family and earlier.executed == row.executed:
                row.note = f"same units ran as {earlier.method}"
                break

    with torch.inference_mode():  # the last method is checked too, not only those followed by a timing round
        uncached_restored &= torch.equal(work.generate(0), reference_chunks[0])
    if not uncached_restored:
        raise RuntimeError(
            "after a method was detached the uncached model no longer reproduced its own samples "
            "bit for bit; a method did not restore the model (results are invalid)"
        )

    context: dict[str, Any] = {
        "model": work.name,
        "model_class": type(transformer).__name__,
        "num_units": len(unit_names),
        "num_inference_steps": steps,
        "scheduler": type(work.scheduler).__name__,
        "guidance_scale": guidance_scale,
        "num_samples": int(work.noise.shape[0]),
        "seed": seed,
        "output_space": work.output_space,
        "sample_shape": list(work.noise.shape[1:]),
        "timing_batch": work.batches[0].stop - work.batches[0].start,
        "timing_repeats": timing_repeats,
        "device": _device_name(transformer),
        "dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "backend": _backend(transformer),
        "date": time.strftime("%Y-%m-%d"),
        "mag_ratios": mag_ratios,
        "versions": _versions(),
        "revision": revision,
    }
    if work.classifier is not None:
        from .reference import load_dataset
        from .reference.report import class_balanced_subset

        test_images, _ = load_dataset("test")
        train_images, train_labels = load_dataset("train")
        floor, _ = class_balanced_subset(train_images, train_labels, n_per_class, seed)
        context["fid_floor"] = classifier_fid(floor, test_images, work.classifier).item()
        context["kid_floor"] = classifier_kid(floor, test_images, work.classifier).item()
        context["kid_uncached"] = baseline.kid
        context["num_test_images"] = len(test_images)
        # FID's own noise at this count: the uncached model again, from other noise (seed + 2).
        other = torch.randn(work.noise.shape, generator=torch.Generator().manual_seed(seed + 2))
        with torch.inference_mode():
            resampled = torch.cat(
                [work.generate(i, noise=other[part]) for i, part in enumerate(work.batches)]
            )
        context["fid_uncached_other_noise"] = classifier_fid(
            work.finish(resampled), test_images, work.classifier
        ).item()
        context["kid_uncached_other_noise"] = classifier_kid(
            work.finish(resampled), test_images, work.classifier
        ).item()
    report = CompareReport(rows, context)
    if out_dir is not None:
        report.save(out_dir)
    if verbose:
        print(report.table())
        if out_dir is not None:
            print(f"\nreport written to {Path(out_dir) / 'report.md'}")
    return report


def _backend(transformer: nn.Module) -> str:
    import harmonica_kernels as hk

    return hk.get_backend(next(transformer.parameters()).device.type)


def _revision() -> str | None:
    """The git commit of the harmonica checkout that ran, when it runs from one (editable install)."""
    import subprocess

    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("harmonica", "diffusers", "cache-dit"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found

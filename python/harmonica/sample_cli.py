"""``harmonica sample``: images from a model, uncached or under a cache schedule, as a PNG grid.

:func:`sample_images` loads the model (default: the embedded reference digits DiT; or a local
diffusers DiT / PixArt pipeline or transformer folder, nothing is downloaded), chooses the cache
(a trained router at threshold τ, FORA with interval N, or none), samples the asked images in
batches from seeded noise and decodes them with the pipeline's VAE when there is one. With
``compare_uncached`` the same noise is also sampled uncached, the two runs of every batch timed side
by side, and the cached images are compared with the uncached ones (PSNR).

The noise of image ``i`` is row ``i`` of
``torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(seed))`` (``C = in_channels``,
``S = sample_size``), the same convention as ``harmonica compare``, so a run can be reproduced with
:func:`harmonica.sampling.sample` from that noise.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._images import tile
from ._io import atomic_path
from .cache import ScheduleMismatchError, disable_cache, enable_cache
from .compare import (
    _decoder,
    _dit_sampler,
    _flow_sampler,
    _load,
    _pixart_sampler,
    _take,
    _Workload,
    flow_setup,
    is_flow_family,
    latents_as_images,
    prompt_conditions,
    seeded_noise,
)
from .eval import psnr
from .models import supported_class, units
from .router import Router
from .sampling import null_class_id
from .schedule import FORECAST_TIMES, CacheSchedule, times_keywords

__all__ = ["SampleResult", "load_prompt_embeds", "sample_images"]

_GAP = 2
"""White pixels between and around the images of a grid."""
_SEPARATOR = 8
"""Grey pixels between the uncached grid (top) and the cached grid (bottom)."""
_MIN_TILE = 64
"""Small images are enlarged by an integer factor (nearest neighbour) to at least this many pixels."""
_MAX_COLUMNS = 10


@dataclass
class SampleResult:
    """What :func:`sample_images` did and measured.

    ``cache_usage_ratio`` and ``ideal_speedup`` describe the schedule: the share of (step, unit)
    pairs served from the cache, and the FLOP ratio uncached / cached (an arithmetic upper bound,
    not a measurement). ``seconds``: wall-clock of the cached (or only) sampling calls, VAE
    decoding excluded. With ``compare_uncached``: ``uncached_seconds`` of the uncached calls on the
    same batches, timed side by side after a short warm-up of both paths; ``measured_speedup`` =
    ``uncached_seconds / seconds``; ``psnr`` of the images against the uncached ones in dB
    (``inf`` when identical); ``uncached``: the uncached images.
    """

    model: str
    model_class: str
    method: str
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    output_space: str
    cache_usage_ratio: float
    ideal_speedup: float
    seconds: float
    labels: list[int] | None = None
    uncached_seconds: float | None = None
    measured_speedup: float | None = None
    psnr: float | None = None
    image_path: str | None = None
    tensor_path: str | None = None
    notes: list[str] = field(default_factory=list)
    uncached: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"model     {self.model} ({self.model_class})"]
        method = f"method    {self.method}: cache usage ratio {self.cache_usage_ratio:.1%}"
        if self.cache_usage_ratio > 0:
            method += f", FLOP ratio uncached/cached {self.ideal_speedup:.2f}× (ideal bound, not measured)"
        lines.append(method)
        what = f"labels {_ids(self.labels)}" if self.labels is not None else "prompts"
        lines.append(
            f"images    {self.num_images} ({what}), {self.num_inference_steps} steps of {self.scheduler}, "
            f"guidance {self.guidance_scale:g}, seed {self.seed}"
        )
        if self.uncached_seconds is None:
            lines.append(f"time      {self.seconds:.2f} s sampling")
        else:
            lines.append(
                f"time      {self.seconds:.2f} s cached, {self.uncached_seconds:.2f} s uncached "
                f"(same batches, side by side): measured speedup {self.measured_speedup:.2f}×"
            )
        if self.psnr is not None:
            value = "identical" if math.isinf(self.psnr) else f"{self.psnr:.2f} dB"
            lines.append(f"PSNR      {value} vs uncached (same noise)")
        if self.image_path is not None:
            layout = f" (top: uncached, bottom: {self.method})" if self.uncached is not None else ""
            lines.append(f"image     {self.image_path}{layout}")
        if self.tensor_path is not None:
            lines.append(f"tensors   {self.tensor_path}")
        lines += [f"note      {n}" for n in self.notes]
        return "\n".join(lines)


def _ids(labels: list[int]) -> str:
    text = ",".join(map(str, labels[:20]))
    return text + (f",… ({len(labels)} in all)" if len(labels) > 20 else "")


def _check_output(path: str | os.PathLike[str] | None, suffix: str, option: str) -> Path | None:
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise ValueError(
            f"{option} {target} is a folder; pass a file name such as {target / ('samples' + suffix)}"
        )
    if target.suffix.lower() != suffix:
        raise ValueError(f"{option} {target}: the file name must end in {suffix}")
    return target


def _labels(
    transformer: torch.nn.Module, class_labels: Any, num_images: int | None, is_reference: bool, seed: int
) -> torch.Tensor:
    num_classes = null_class_id(transformer)
    if class_labels is not None:
        if num_images is not None:
            raise ValueError(
                "pass either class labels (CLI: --labels) or a number of images (--num), not both"
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("no class labels given; pass class ids such as 0,3,7 (CLI: --labels 0,3,7)")
        bad = sorted({int(v) for v in labels if not 0 <= int(v) < num_classes})
        if bad:
            raise ValueError(
                f"class labels {bad} are outside the model's {num_classes} classes; "
                f"pass ids in 0..{num_classes - 1} (CLI: --labels)"
            )
        return labels
    if is_reference:  # one per digit, in order
        count = num_images or num_classes
        return torch.arange(num_classes).repeat(math.ceil(count / num_classes))[:count]
    count = num_images or 8
    labels = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:count]
    return labels.repeat(math.ceil(count / len(labels)))[:count]


def _prompt_conditions(
    transformer: torch.nn.Module, prompt_embeds: Any, num_images: int | None
) -> dict[str, torch.Tensor]:
    conditions = prompt_conditions(transformer, prompt_embeds)
    prompts = conditions["prompt_embeds"].shape[0]
    if num_images is not None and num_images != prompts:  # cycle through the prompts
        rows = torch.arange(num_images) % prompts
        conditions = {
            k: (v[rows] if v.shape[0] == prompts and (prompts > 1 or k.startswith("prompt")) else v)
            for k, v in conditions.items()
        }
    return conditions


def load_prompt_embeds(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file of prompt embeddings (``prompt_embeds`` [N, L, C] and the
    optional masks and negatives, see :func:`sample_images`).

    Raises:
        FileNotFoundError: no such file.  ValueError: unreadable, or no tensor named ``prompt_embeds``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no prompt embeddings file at {path}")
    try:
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if "prompt_embeds" not in tensors:
        raise ValueError(
            f"{path} has no tensor named 'prompt_embeds' (found {sorted(tensors)}); save the encoded "
            "prompts under that name"
        )
    return tensors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_images(
    model: Any = None,
    *,
    scheduler: Any = None,
    router: str | os.PathLike[str] | Router | None = None,
    threshold: float = 0.1,
    fora: int | None = None,
    order: int = 0,
    forecast_times: str = "blend",
    num_inference_steps: int = 20,
    guidance_scale: float = 1.5,
    class_labels: Any = None,
    prompt_embeds: dict[str, torch.Tensor] | None = None,
    latent_size: int | None = None,
    num_images: int | None = None,
    seed: int = 0,
    batch_size: int = 10,
    compare_uncached: bool = False,
    out: str | os.PathLike[str] | None = None,
    save_tensor: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, SampleResult]:
    """Sample images, uncached or with a cache (a router or FORA); optionally write a PNG grid and tensors.

    Args:
        model: None (the reference digits DiT), a local diffusers pipeline or transformer folder of any
            supported family, or a pipeline or transformer object (a bare transformer needs
            ``scheduler``). FLUX.1/.2, SD3, Wan and Qwen-Image are sampled with a flow-matching loop
            from a prompt-embedding pool (as :func:`harmonica.compare.compare`), decoded by the
            pipeline's VAE when it has one (a bare transformer's: latents).
        scheduler: the sampler; default: the folder's or pipeline's (flow-matching families: a
            flow-matching one such as ``FlowMatchEulerDiscreteScheduler``).
        router: a trained router file (or :class:`Router`) for this model and step count, applied at
            ``threshold`` τ. Mutually exclusive with ``fora``.
        fora: FORA interval N >= 2 (every unit computed on steps ``t % N == 0``, reused otherwise).
            Neither ``router`` nor ``fora``: no caching.
        order: with ``fora``: 0 reuses the skipped steps, 1 or 2 forecasts them (Taylor).
        forecast_times: with ``order``: the forecast rule's step distances in ``"step"`` index, in the
            sampler's ``"log-snr"`` (:func:`harmonica.schedule.log_snr_times`), or ``"blend"`` (the
            default): the mean of both forecasts (:meth:`CacheSchedule.fora` with ``scheduler``).
        num_inference_steps, guidance_scale: sampler steps and classifier-free guidance scale (>= 1).
        class_labels: DiT class ids. Default: one per class 0..9 for the reference model, otherwise
            ``num_images`` (default 8) random classes drawn from ``seed``.
        prompt_embeds: PixArt: ``{"prompt_embeds": [N, L, C]}`` and optionally
            ``prompt_attention_mask``, ``negative_prompt_embeds``, ``negative_prompt_attention_mask``
            (as :func:`harmonica.compare.compare`); one image per prompt, or ``num_images`` cycling
            through them. FLUX.1/.2, SD3, Wan, Qwen-Image: ``prompt_embeds`` ``[P, L, C]`` and
            optionally ``pooled_prompt_embeds`` ``[P, D]``, ``negative_prompt_embeds``,
            ``negative_pooled_prompt_embeds`` (:func:`harmonica.compare.flow_setup`); true CFG batched
            into one call per step, or FLUX's guidance embedding set to ``guidance_scale``.
        latent_size: flow-matching families: image tokens per side (default: SD3's native size,
            else 32).
        num_images: how many images when ``class_labels`` is not given.
        seed: seed of the initial noise (see the module docstring).
        batch_size: images per sampling call.
        compare_uncached: also sample uncached from the same noise, time both side by side, report
            PSNR; the PNG then shows the uncached grid above the cached one.
        out: write a ``.png`` grid of the images here (parent folders are created).
        save_tensor: write a ``.safetensors`` file here: ``samples`` (the returned images), and when
            they apply ``latents`` (before VAE decoding), ``labels``, ``uncached``
            (``uncached_latents``); the settings are in its metadata.
        device, dtype: move the transformer there / cast it (and move the VAE); None keeps them.
        progress: a tqdm bar over the denoising steps.

    Returns:
        ``(images, result)``: ``images`` float32 ``[N, C, H, W]`` on the CPU, in [-1, 1] for pixel
        models (the reference model, or a pipeline with a VAE), the raw latents otherwise (a flow
        family's latents laid out as images by :func:`harmonica.compare.latents_as_images`; the
        tensor file keeps them as sampled under ``latents``); and a :class:`SampleResult`.

    Raises:
        ValueError: bad settings or inputs (labels outside the classes, FORA N < 2, both a router and
            FORA, a PixArt model without prompt embeddings, a wrong output file name), an unreadable
            router or one for another model (``RouterMismatchError``) or another step count
            (``ScheduleMismatchError``); the message says how to fix it.
        FileNotFoundError: no model folder or router file at the given path.
    """
    for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"the number of images must be an int >= 1, got {num_images!r}")
    if not guidance_scale >= 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
    if router is not None and fora is not None:
        raise ValueError("choose one cache: a router (--router) or FORA (--fora), not both")
    if fora is not None and (not isinstance(fora, int) or fora < 2):
        raise ValueError(
            f"the FORA interval must be an int >= 2, got {fora!r} "
            "(N=1 computes every step: that is no caching, --uncached)"
        )
    if order and fora is None:
        raise ValueError("--order applies to FORA: pass --fora N with it (a router file carries its own)")
    if forecast_times not in FORECAST_TIMES:
        raise ValueError(f"forecast_times must be one of {FORECAST_TIMES}, got {forecast_times!r}")
    if forecast_times != "blend" and not order:
        raise ValueError("--forecast-times applies to forecasting: pass --fora N --order 1 or 2 with it")
    if not 0 <= threshold < 1:
        raise ValueError(f"the router threshold τ is a probability in [0, 1), got {threshold}")
    if compare_uncached and router is None and fora is None:
        raise ValueError(
            "comparing with the uncached model needs a cache: pass a router (--router) or --fora N"
        )
    image_path = _check_output(out, ".png", "--out")
    tensor_path = _check_output(save_tensor, ".safetensors", "--save-tensor")
    if isinstance(router, (str, os.PathLike)) and not Path(router).is_file():
        raise FileNotFoundError(f"no router file at {router}")

    name, transformer, scheduler, vae, is_reference = _load(model, scheduler)
    if device is not None or dtype is not None:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its note on keeping modules in fp32 names none here
        try:
            transformer.to(device=device, dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        if vae is not None and device is not None:
            vae.to(device=device)
    steps = num_inference_steps
    is_dit = supported_class(transformer).__name__ == "DiTTransformer2DModel"
    is_flow = is_flow_family(transformer)
    labels = None
    sample_shape = None
    notes: list[str] = []
    if latent_size is not None and not is_flow:
        raise ValueError(
            "latent_size (--latent-size) applies to the flow-matching families (FLUX, SD3, Wan, "
            f"Qwen-Image); {type(transformer).__name__} samples at its sample_size"
        )
    if is_flow:
        if class_labels is not None:
            raise ValueError(
                f"{type(transformer).__name__} is text-conditioned: it takes prompt embeddings "
                "(--prompt-embeds), not class labels"
            )
        setup = flow_setup(transformer, scheduler, prompt_embeds, guidance_scale, latent_size)
        prompts = setup.conditioning.embeds.shape[0]
        count = num_images or prompts
        conditions: Any = torch.arange(count) % prompts  # rows of the prompt pool, cycled
        sampler = _flow_sampler(transformer, scheduler, steps, guidance_scale, setup)
        warm_sampler = _flow_sampler(transformer, scheduler, min(2, steps), guidance_scale, setup)
        sample_shape = setup.sample_shape
        notes.append(setup.note)
    elif is_dit:
        if prompt_embeds is not None:
            raise ValueError(
                f"{type(transformer).__name__} is class-conditional: pass class labels (--labels), "
                "not prompt embeddings"
            )
        labels = _labels(transformer, class_labels, num_images, is_reference, seed)
        conditions = labels
        sampler = _dit_sampler(transformer, scheduler, steps, guidance_scale, clamp=is_reference)
        warm_sampler = _dit_sampler(transformer, scheduler, min(2, steps), guidance_scale, clamp=is_reference)
        count = len(labels)
    else:
        if class_labels is not None:
            raise ValueError(
                f"{type(transformer).__name__} is text-conditioned: it takes prompt embeddings "
                "(--prompt-embeds), not class labels"
            )
        conditions = _prompt_conditions(transformer, prompt_embeds, num_images)
        sampler = _pixart_sampler(transformer, scheduler, steps, guidance_scale)
        warm_sampler = _pixart_sampler(transformer, scheduler, min(2, steps), guidance_scale)
        count = conditions["prompt_embeds"].shape[0]

    noise = seeded_noise(transformer, count, seed, sample_shape)
    work = _Workload(
        name=name,
        transformer=transformer,
        scheduler=scheduler,
        noise=noise,
        conditions=conditions,
        batches=[slice(i, min(i + batch_size, count)) for i in range(0, count, batch_size)],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        decode=_decoder(vae) if vae is not None else (latents_as_images if is_flow else None),
        labels=labels,
        output_space="pixels" if is_reference or vae is not None else "latents",
    )

    num_units = len(units(transformer))
    if router is not None:
        loaded = router if isinstance(router, Router) else Router.load(router, model=transformer)
        if isinstance(router, Router):
            loaded.check_model(transformer)
        where = f" ({router})" if not isinstance(router, Router) else ""
        wrong_steps = loaded.steps_mismatch(steps)
        if wrong_steps is not None:
            raise ScheduleMismatchError(f"the router{where} {wrong_steps}")
        mismatch = loaded.sampler_mismatch(scheduler)
        if mismatch is not None:
            notes.append(mismatch)
        schedule: CacheSchedule | None = loaded.to_schedule(threshold)
        label = Path(router).stem if not isinstance(router, Router) else "router"
        method = f"router {label} τ={threshold:g}"
    elif fora is not None:
        where = times_keywords(forecast_times, scheduler, steps) if order else {}
        schedule = CacheSchedule.fora(steps, num_units, fora, order=order, **where)
        times_label = {"blend": "", "step": " (step index)", "log-snr": " (log-SNR)"}[forecast_times]
        method = f"FORA N={fora}" + (f" forecast order {order}{times_label}" if order else "")
    else:
        schedule, method = None, "uncached"

    device = next(transformer.parameters()).device

    def run(index: int, cached: bool, sampler_fn: Any = None) -> tuple[float, torch.Tensor]:
        """One batch, uncached or under the schedule; returns (seconds, final sample)."""
        part = work.batches[index]
        fn = sampler_fn or work.sampler
        if cached:
            handle = enable_cache(transformer, schedule)
        try:
            if cached:
                handle.reset()  # the PixArt loop does not reset it itself
            _sync(device)
            start = time.perf_counter()
            result = fn(work.noise[part], _take(work.conditions, part))
            _sync(device)
            seconds = time.perf_counter() - start
        finally:
            if cached:
                disable_cache(transformer)
        return seconds, result.float().cpu()

    with torch.inference_mode():
        if compare_uncached:  # warm both paths up on the first batch, so neither pays first-call costs
            run(0, False, warm_sampler)
            run(0, True, warm_sampler)
        runs_per_batch = 2 if compare_uncached else 1
        bar = tqdm(
            total=len(work.batches) * steps * runs_per_batch, desc="sample", unit="step", disable=not progress
        )
        hook = transformer.register_forward_hook(lambda *_: bar.update() and None)  # None: output kept
        cached_raw, uncached_raw, cached_s, uncached_s = [], [], 0.0, 0.0
        try:
            for i in range(len(work.batches)):
                order = [schedule is not None]
                if compare_uncached:  # alternate which path runs first
                    order = [False, True] if i % 2 == 0 else [True, False]
                for cached in order:
                    bar.set_postfix_str(method if cached else "uncached")
                    seconds, result = run(i, cached)
                    if cached or not compare_uncached:
                        cached_raw.append(result)
                        cached_s += seconds
                    else:
                        uncached_raw.append(result)
                        uncached_s += seconds
        finally:
            hook.remove()
            bar.close()
        raw = torch.cat(cached_raw)
        images = torch.cat([work.finish(r) for r in cached_raw]) if work.decode is not None else raw
        uncached = None
        if compare_uncached:
            uncached_latents = torch.cat(uncached_raw)
            uncached = (
                torch.cat([work.finish(r) for r in uncached_raw])
                if work.decode is not None
                else uncached_latents
            )

    result = SampleResult(
        model=name,
        model_class=type(transformer).__name__,
        method=method,
        num_images=count,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        scheduler=type(scheduler).__name__,
        output_space=work.output_space,
        cache_usage_ratio=0.0 if schedule is None else schedule.cache_usage_ratio,
        ideal_speedup=1.0 if schedule is None else schedule.ideal_speedup(transformer),
        seconds=cached_s,
        labels=None if labels is None else labels.tolist(),
        notes=notes,
    )
    if uncached is not None:
        data_range = 2.0 if work.output_space == "pixels" else float(uncached.max() - uncached.min()) or 1.0
        result.uncached = uncached
        result.uncached_seconds = uncached_s
        result.measured_speedup = uncached_s / cached_s
        result.psnr = psnr(images, uncached, data_range=data_range).item()
    if work.output_space == "latents":
        shown = "channels 0-2" if images.shape[1] >= 3 else "channel 0"
        notes.append(
            f"no VAE: the PNG shows latent {shown}, min-max normalised per channel"
            + (" (the tensor file keeps all channels)" if tensor_path is not None else "")
        )
    if image_path is not None:
        _save_grid([images] if uncached is None else [uncached, images], work.output_space, image_path)
        result.image_path = str(image_path)
    if tensor_path is not None:
        tensors = {"samples": images}
        if work.decode is not None:
            tensors["latents"] = raw
        if labels is not None:
            tensors["labels"] = labels
        if uncached is not None:
            tensors["uncached"] = uncached
            if work.decode is not None:
                tensors["uncached_latents"] = uncached_latents
        settings = {
            k: v
            for k, v in vars(result).items()
            if k not in ("uncached", "notes", "image_path", "tensor_path") and v is not None
        }
        with atomic_path(tensor_path) as tmp:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={"harmonica.sample": json.dumps(settings)},
            )
        result.tensor_path = str(tensor_path)
    return images, result


def _to_unit_range(sets: list[torch.Tensor], output_space: str) -> list[torch.Tensor]:
    """Images in [0, 1] with 1 or 3 channels: pixels from [-1, 1]; latents min-max normalised per channel."""
    channels = 3 if sets[0].shape[1] >= 3 else 1
    sets = [s[:, :channels].float() for s in sets]
    if output_space == "pixels":
        return [((s + 1) / 2).clamp(0, 1) for s in sets]
    joined = torch.cat(sets)
    low = joined.amin(dim=(0, 2, 3), keepdim=True)
    span = (joined.amax(dim=(0, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    return [((s - low) / span).clamp(0, 1) for s in sets]


def _grid(images: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] as one ``[C, H', W']`` grid, up to :data:`_MAX_COLUMNS` per row."""
    tiles = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return tile(tiles, min(len(images), _MAX_COLUMNS), _GAP)


def _save_grid(sets: list[torch.Tensor], output_space: str, path: Path) -> None:
    """One grid per set, stacked top to bottom with a grey band between them; written atomically."""
    import numpy as np
    from PIL import Image

    sets = _to_unit_range(sets, output_space)
    h, w = sets[0].shape[-2:]
    scale = max(1, math.ceil(_MIN_TILE / max(h, w)))
    grids = [_grid(s, scale) for s in sets]
    band = torch.full((grids[0].shape[0], _SEPARATOR, grids[0].shape[2]), 0.5)
    parts = [grids[0]]
    for g in grids[1:]:
        parts += [band, g]
    canvas = torch.cat(parts, dim=1)
    array = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

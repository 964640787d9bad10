"""``harmonica quickstart``: the reference model sampled uncached and under cache schedules.

Methods: the full schedule, FORA N=2 and N=3, FORA N=3 with Taylor forecasting, and the routers
packaged with the reference model for the chosen step count (``assets/routers/*-T<steps>.safetensors``:
HarmoniCa in several forms, SDT-only, L2C, the searched schedules and the searched forecasting schedules
with fitted coefficients, made by ``python -m harmonica.reference.train_routers``), a router
trained by the quickstart itself (a short SDT + IEPO run, so that the report shows training end to
end), plus any router files given.
With ``peers`` the report also holds :func:`harmonica.compare` on a reduced sweep of the
training-free peers (diffusers' FirstBlockCache, TaylorSeer, MagCache, PAB; cache-dit's DBCache when
installed) next to FORA and the same routers, in ``compare/``.

Every method samples the same class labels from the same initial noise, so fidelity to the
uncached model (PSNR, SSIM, MSE of the final images) isolates what caching changed; fidelity
to the data is the classifier-feature FID against the held-out test digits and the share of
samples the classifier recognises as the asked class. Speed is wall-clock on this machine,
measured in paired rounds (uncached, then cached, same batch and noise), next to the cache usage
ratio and the FLOP-ideal speedup of each schedule. Everything lands in one report folder.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import harmonica_kernels as hk

from ._io import atomic_path, write_text
from ._machine import cpu_name
from .cache import disable_cache, enable_cache
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
from .models import units
from .reference import ASSETS, load_classifier, load_dataset, load_model, load_scheduler
from .reference.report import class_balanced_subset, save_grid
from .router import Router
from .sampling import sample
from .schedule import CacheSchedule


@dataclass
class MethodResult:
    method: str
    cache_usage_ratio: float
    ideal_speedup: float
    measured_speedup: float
    psnr: float
    psnr_interval: tuple[float, float] | None
    ssim: float
    mse: float
    kid: float
    kid_interval: tuple[float, float]
    fid: float
    accuracy: float


def _schedules(
    num_steps: int, num_units: int, routers: list[Path], threshold: float, scheduler: Any
) -> dict[str, CacheSchedule]:
    methods = {
        "full": CacheSchedule.full(num_steps, num_units),
        "FORA N=2": CacheSchedule.fora(num_steps, num_units, 2),
        "FORA N=3": CacheSchedule.fora(num_steps, num_units, 3),
        "forecast N=3": CacheSchedule.fora(num_steps, num_units, 3, order=2, scheduler=scheduler),
    }
    for path in routers:
        methods[f"router {path.stem}"] = Router.load(path).to_schedule(threshold)
    return methods


PEER_SWEEP: dict[str, tuple[str, ...]] = {
    "fora": ("2",),
    "fbcache": ("0.1",),
    "taylorseer": ("3",),
    "magcache": ("0.03",),
    "pab": ("2",),
    "dbcache": ("0.2",),
}
"""The reduced sweep of :func:`harmonica.compare` in the quickstart report (one strength per family)."""


def packaged_routers(num_steps: int) -> list[Path]:
    """The routers shipped with the reference model for ``num_steps`` sampling steps: the trained ones
    (``<name>-T<steps>``), the schedules searched on 24 samples (``search-a2-b24-T<steps>-<pct>``),
    the trained forecasting router polished by exchanges at 45 % (``harmonica-forecast-T<steps>-45``),
    FORA N=3 with fitted forecast coefficients (``fora3-fit-T<steps>``) and the forecasting schedules
    searched with fitted coefficients at 65 and 75 % (``forecast-T<steps>-<pct>``)."""
    folder = ASSETS / "routers"
    trained = sorted(p for p in folder.glob(f"*-T{num_steps}.safetensors") if "fit" not in p.stem)
    searched = sorted(folder.glob(f"search-a2-b24-T{num_steps}-*.safetensors"))
    forecasting = [
        folder / f"harmonica-forecast-T{num_steps}-45.safetensors",
        folder / f"fora3-fit-T{num_steps}.safetensors",
    ] + [folder / f"forecast-T{num_steps}-{pct}.safetensors" for pct in (65, 75)]
    return trained + searched + [p for p in forecasting if p.is_file()]


TRAIN_ITERATIONS = 200
"""Iterations of the router the quickstart trains itself (~2 minutes on 2 CPU cores)."""

TRAIN_SETTINGS = dict(method="harmonica", batch_size=16, target_cur=0.4, exchanges=1)
"""train_router's defaults (straight-through with the gradient taken at reuse, age cap 2, one logit
per step, order-2 forecasts fitted on the training calls) at the packaged routers' budget; one λ
estimate; one exchange pass instead of three (the pass that gains most; ~3½ minutes on 2 cores)."""


def _train_here(
    out: Path, num_steps: int, guidance_scale: float, iterations: int, seed: int, progress: bool
) -> dict:
    """Train a short SDT + IEPO router on the reference model; ``{path, iterations, seconds, cur}``."""
    from .training import train_router

    began = time.perf_counter()
    result = train_router(
        load_model(),
        load_scheduler(),
        num_steps=num_steps,
        iterations=iterations,
        guidance_scale=guidance_scale,
        lambda_every=iterations,
        seed=seed,
        progress=progress,
        **TRAIN_SETTINGS,
    )
    path = out / f"trained-here-T{num_steps}.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    result.router.save(path)
    return {
        "path": path,
        "iterations": result.iterations,
        "seconds": result.seconds,
        "polish_seconds": time.perf_counter() - began - result.seconds,
        "swaps": len(result.router.training_settings["polish"]),
        "cur": result.router.training_settings["cur"],
    }


def _paired_speedup(model, scheduler, schedule, labels, noise, steps, guidance, repeats) -> float:
    """Median over rounds of uncached / cached wall-clock, each round on the same batch and noise."""
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, noise=noise)
    ratios = []
    for _ in range(repeats + 1):  # the first round warms both paths up and is dropped
        start = time.perf_counter()
        sample(model, scheduler, labels, **kwargs)
        uncached = time.perf_counter() - start
        enable_cache(model, schedule)
        try:
            start = time.perf_counter()
            sample(model, scheduler, labels, **kwargs)
            cached = time.perf_counter() - start
        finally:
            disable_cache(model)
        ratios.append(uncached / cached)
    return statistics.median(ratios[1:])


def _plot_schedules(schedules: dict[str, CacheSchedule], unit_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(schedules), figsize=(3.2 * len(schedules), 3.6), squeeze=False)
    for ax, (name, schedule) in zip(axes[0], schedules.items(), strict=True):
        # computed 1, forecast 0.5 (order 1) / 0.7 (order 2), reused 0
        shade = schedule.compute.float() + 0.3 * schedule.orders.float() + 0.2 * (schedule.orders > 0).float()
        ax.imshow(shade.numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nCUR {schedule.cache_usage_ratio:.0%}", fontsize=9)
        ax.set_xlabel(f"unit ({len(unit_names)}: attn1/ff per block)", fontsize=8)
        ax.set_ylabel("denoising step", fontsize=8)
    fig.suptitle(
        "Schedules: dark green = computed, light = forecast (order 1 lighter), white = reused", fontsize=10
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_speed_quality(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [r for r in results if r.method != "uncached"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "psnr", "PSNR vs uncached (dB, higher is better)"),
        (axes[1], "fid", "classifier FID vs test digits (lower is better)"),
    ):
        for r in cached:
            value = getattr(r, metric)
            value = min(value, 60.0) if metric == "psnr" else value  # identical images: PSNR = inf
            ax.scatter(r.measured_speedup, value, s=40, label=f"{r.method} (measured)")
            ax.scatter(r.ideal_speedup, value, s=40, facecolors="none", edgecolors="grey")
            ax.annotate(
                r.method, (r.measured_speedup, value), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        if metric == "fid":
            base = next(r.fid for r in results if r.method == "uncached")
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="uncached")
        ax.set_xlabel("speedup over uncached (filled: measured; hollow: FLOP-ideal)")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _markdown(results: list[MethodResult], context: dict) -> str:
    lines = [
        "# harmonica quickstart report",
        "",
        f"Reference digits DiT ({context['num_units']} units), {context['num_inference_steps']} DDIM steps, "
        f"CFG {context['guidance_scale']}, {context['num_samples']} samples (seed {context['seed']}); "
        f"speed on {context['device']} with the `{context['backend']}` op backend, "
        f"timing batch {context['timing_batch']} + CFG, median of {context['timing_repeats']} paired rounds.",
        "",
        "| method | CUR | FLOP-ideal speedup | measured speedup | PSNR dB (95 % CI) | SSIM | MSE "
        "| KID ×10³ (95 % CI) | FID | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        psnr_text = f"{r.psnr:.2f}" + (
            f" ({r.psnr_interval[0]:.1f}–{r.psnr_interval[1]:.1f})" if r.psnr_interval else ""
        )
        lines.append(
            f"| {r.method} | {r.cache_usage_ratio:.1%} | {r.ideal_speedup:.2f}× "
            f"| {r.measured_speedup:.2f}× | {psnr_text} | {r.ssim:.4f} | {r.mse:.2e} "
            f"| {1e3 * r.kid:.2f} ({1e3 * r.kid_interval[0]:.2f}–{1e3 * r.kid_interval[1]:.2f}) "
            f"| {r.fid:.2f} | {r.accuracy:.1%} |"
        )
    trained = context.get("trained_here")
    if trained:
        packaged = context.get("packaged_iterations")
        packaged_text = (
            f"the packaged routers had {', '.join(map(str, packaged))} iterations "
            "(`python -m harmonica.reference.train_routers`), "
            if packaged
            else ""
        )
        lines += [
            "",
            f"`router {Path(trained['path']).stem}` was trained by this run: SDT + IEPO, "
            f"{trained['iterations']} iterations in {trained['seconds']:.0f} s, budget mode at "
            f"{TRAIN_SETTINGS['target_cur']:.0%} (reached {trained['cur']:.1%}), then "
            f"{TRAIN_SETTINGS['exchanges']} exchange pass on the final image in "
            f"{trained['polish_seconds']:.0f} s (swaps kept: {trained['swaps']}); {packaged_text}"
            "the paper ~2 000 trajectories.",
        ]
    lines += [
        "",
        f"Real digits against the test digits at the same count: FID {context['fid_floor']:.2f}, KID ×10³ "
        f"{1e3 * context['kid_floor']:.2f}. FID is biased at this count; KID is not. Intervals are 95 % "
        "bootstrap intervals over the samples: differences inside them are noise.",
        "PSNR/SSIM/MSE compare each method with the uncached samples from the same noise. "
        "FLOP-ideal speedups are arithmetic bounds, not measurements.",
        "",
        "![schedules](schedules.png)",
        "",
        "![speed vs quality](speed_quality.png)",
        "",
    ]
    lines += [f"![{r.method}](grid_{_slug(r.method)}.png)" for r in results]
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _table(results: list[MethodResult]) -> str:
    w = max(len("method"), *(len(r.method) for r in results)) + 1
    head = (
        f"{'method':<{w}}{'CUR':>7}{'ideal':>8}{'measured':>10}{'PSNR (95% CI)':>20}{'SSIM':>8}"
        f"{'KIDx1e3':>9}{'acc':>7}"
    )
    rows = [
        f"{r.method:<{w}}{r.cache_usage_ratio:>7.1%}{r.ideal_speedup:>7.2f}x{r.measured_speedup:>9.2f}x"
        + (
            f"{r.psnr:>8.2f} ({r.psnr_interval[0]:.1f}-{r.psnr_interval[1]:.1f})"
            if r.psnr_interval
            else f"{r.psnr:>8.2f}{'':12}"
        )
        + f"{r.ssim:>8.4f}{1e3 * r.kid:>9.2f}{r.accuracy:>7.1%}"
        for r in results
    ]
    return "\n".join([head, *rows])


def run_quickstart(
    out_dir: str | os.PathLike[str] = "harmonica-report",
    *,
    n_per_class: int = 10,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.5,
    seed: int = 0,
    timing_batch: int = 8,
    timing_repeats: int = 3,
    routers: list[str | os.PathLike[str]] = (),
    threshold: float = 0.1,
    peers: bool = True,
    train_iterations: int = TRAIN_ITERATIONS,
    progress: bool = True,
) -> list[MethodResult]:
    """Sample the reference model uncached and under each schedule; write the report to ``out_dir``.

    Writes ``report.md``, ``report.json``, ``schedules.png``, ``speed_quality.png`` and one
    ``grid_<method>.png`` per method (one row per digit class); with ``peers`` also ``compare/``
    (:func:`harmonica.compare` on :data:`PEER_SWEEP` and the same routers). Returns the rows of the
    table. The packaged routers for ``num_inference_steps`` are always included; with
    ``train_iterations`` > 0 a router is first trained here (SDT + IEPO, :data:`TRAIN_SETTINGS`),
    saved as ``trained-here-T<steps>.safetensors`` in ``out_dir`` and compared with the others.
    """
    if n_per_class < 2:
        raise ValueError(f"n_per_class must be at least 2 (FID needs a covariance), got {n_per_class}")
    if train_iterations < 0:
        raise ValueError(f"train_iterations must be >= 0 (0 trains no router), got {train_iterations}")
    out = Path(out_dir)
    model, scheduler, classifier = load_model(), load_scheduler(), load_classifier()
    test_images, _ = load_dataset("test")
    test_features = classifier_features(test_images, classifier)
    unit_names = units(model)
    router_paths = packaged_routers(num_inference_steps) + [Path(r) for r in routers]
    trained = None
    if train_iterations:
        trained = _train_here(out, num_inference_steps, guidance_scale, train_iterations, seed, progress)
        router_paths.append(trained["path"])
    schedules = _schedules(num_inference_steps, len(unit_names), router_paths, threshold, scheduler)

    labels = torch.arange(10).repeat_interleave(n_per_class)
    size, channels = model.config.sample_size, model.config.in_channels
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), channels, size, size, generator=gen)
    timing_labels, timing_noise = (
        labels[:: max(1, len(labels) // timing_batch)][:timing_batch],
        noise[:timing_batch],
    )
    kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    bar = tqdm(total=1 + len(schedules), desc="quickstart", disable=not progress)
    bar.set_postfix_str("uncached")
    with torch.inference_mode():
        reference = sample(model, scheduler, labels, noise=noise, **kwargs)
    samples = {"uncached": reference}
    bar.update()
    for name, schedule in schedules.items():
        bar.set_postfix_str(name)
        enable_cache(model, schedule)
        try:
            with torch.inference_mode():
                samples[name] = sample(model, scheduler, labels, noise=noise, **kwargs)
        finally:
            disable_cache(model)
        bar.update()
    bar.close()

    results = []
    for name, images in samples.items():
        schedule = schedules.get(name)
        with torch.inference_mode():
            speedup = (
                1.0
                if schedule is None
                else _paired_speedup(
                    model,
                    scheduler,
                    schedule,
                    timing_labels,
                    timing_noise,
                    num_inference_steps,
                    guidance_scale,
                    timing_repeats,
                )
            )
        psnr_mean, psnr_interval = mean_with_interval(psnr(images, reference, reduction="none"))
        kid_value, kid_interval = kid_with_interval(classifier_features(images, classifier), test_features)
        results.append(
            MethodResult(
                method=name,
                cache_usage_ratio=0.0 if schedule is None else schedule.cache_usage_ratio,
                ideal_speedup=1.0 if schedule is None else schedule.ideal_speedup(model),
                measured_speedup=speedup,
                psnr=psnr_mean,
                psnr_interval=psnr_interval,
                ssim=ssim(images, reference).item(),
                mse=mse(images, reference).item(),
                kid=kid_value,
                kid_interval=kid_interval,
                fid=classifier_fid(images, test_images, classifier).item(),
                accuracy=class_accuracy(images, labels, classifier).item(),
            )
        )
        with atomic_path(out / f"grid_{_slug(name)}.png") as tmp:
            save_grid(images, rows=10, path=tmp)

    train_images, train_labels = load_dataset("train")
    floor_images, _ = class_balanced_subset(train_images, train_labels, n_per_class, seed)
    context = {
        "num_units": len(unit_names),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "num_samples": len(labels),
        "seed": seed,
        "device": f"{cpu_name()} ({torch.get_num_threads()} threads)",
        "backend": hk.get_backend("cpu"),
        "timing_batch": len(timing_labels),
        "timing_repeats": timing_repeats,
        "fid_floor": classifier_fid(floor_images, test_images, classifier).item(),
        "kid_floor": classifier_kid(floor_images, test_images, classifier).item(),
        "trained_here": None if trained is None else {**trained, "path": trained["path"].name},
        "packaged_iterations": sorted(
            {
                Router.load(p).training_settings.get("iterations")
                for p in packaged_routers(num_inference_steps)
            }
            - {None}
        ),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    _plot_schedules(schedules, unit_names, out / "schedules.png")
    _plot_speed_quality(results, out / "speed_quality.png")
    write_text(
        out / "report.json",
        json.dumps({"context": context, "results": [asdict(r) for r in results]}, indent=1),
    )
    markdown = _markdown(results, context)
    if peers:
        from .compare import compare

        compare(
            model,
            scheduler=scheduler,
            methods=PEER_SWEEP,
            routers={f"router {p.stem}": p for p in router_paths},
            router_thresholds=(threshold,),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            n_per_class=n_per_class,
            batch_size=timing_batch,
            timing_repeats=timing_repeats,
            seed=seed,
            out_dir=out / "compare",
            progress=progress,
            verbose=False,
        )
        markdown += (
            "\n## Next to the training-free peers\n\n"
            "`harmonica.compare` on one strength per family, same samples and noise: "
            "[compare/report.md](compare/report.md).\n\n![pareto](compare/pareto.png)\n"
        )
    write_text(out / "report.md", markdown)
    print(_table(results))
    print(f"\nreport written to {out}/report.md")
    return results

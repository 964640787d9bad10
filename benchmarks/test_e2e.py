"""End-to-end sampling speed: cached vs uncached, side by side in one run (pytest-benchmark).

A DiT-S/2-shaped ``DiTTransformer2DModel`` (12 blocks, width 384, 6 heads, 32×32×4 latents →
256 tokens; random weights time the same as trained ones) samples a batch of 2 with classifier-
free guidance (4 rows per transformer call) over 10 DDIM steps, through a bare loop:

- ``uncached``: the unpatched diffusers model (the baseline);
- ``full``: ``CacheSchedule.full`` (the engine's overhead; target ≤ 2 % slower than uncached);
- ``fora2`` / ``fora3``: FORA N=2 / N=3 (target: measured speedup ≥ 90 % of the FLOP-ideal one).

Each cached round is paired with an uncached round run just before it (same machine load). Each
variant reports in ``extra_info`` its cache usage ratio, the measured speedup (median over the
rounds of uncached / cached), the FLOP-ideal speedup of its schedule
(:meth:`CacheSchedule.ideal_speedup`, an arithmetic bound, not a measurement) and their ratio.

Run: ``pytest benchmarks/test_e2e.py`` (``HARMONICA_BENCH_THREADS=N`` sets torch's threads). Speeds
are CPU speeds with the op backend active in this process (``python -m harmonica_kernels.info``).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import harmonica_kernels as hk
from harmonica import CacheSchedule, disable_cache, enable_cache, units

STEPS = 10
BATCH = 2
GUIDANCE = 1.5
ROUNDS = 3
GROUP = f"DiT-S/2 256 tokens, {STEPS} DDIM steps, batch {BATCH}+CFG, fp32, CPU"


@pytest.fixture(scope="module")
def setup():
    # On a machine shared with other jobs, fewer threads than cores gives steadier timings.
    threads = os.environ.get("HARMONICA_BENCH_THREADS")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=12,
        sample_size=32,
        patch_size=2,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(BATCH, 4, 32, 32, generator=generator)
    labels = torch.randint(0, 1000, (BATCH,), generator=generator)
    yield model, scheduler, noise, labels
    torch.set_num_threads(previous_threads)


def schedules(num_units: int) -> dict[str, CacheSchedule | None]:
    return {
        "uncached": None,
        "full": CacheSchedule.full(STEPS, num_units),
        "fora2": CacheSchedule.fora(STEPS, num_units, 2),
        "fora3": CacheSchedule.fora(STEPS, num_units, 3),
    }


@torch.inference_mode()
def sample(model, scheduler, noise, labels) -> torch.Tensor:
    """DDIM with CFG batched into one transformer call per step; resets the cache first."""
    handle = getattr(model, "_harmonica_cache", None)
    if handle is not None:
        handle.reset()
    scheduler.set_timesteps(STEPS)
    x = noise
    class_labels = torch.cat([labels, torch.full_like(labels, 1000)])
    for t in scheduler.timesteps:
        out = model(torch.cat([x, x]), timestep=t.expand(2 * BATCH), class_labels=class_labels).sample
        cond, uncond = out[:, :4].split(BATCH)
        x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("variant", ["uncached", "full", "fora2", "fora3"])
def test_sampling(benchmark, recorder, setup, variant):
    model, scheduler, noise, labels = setup
    schedule = schedules(len(units(model)))[variant]
    benchmark.group = GROUP
    benchmark.extra_info.update(backend=hk.get_backend("cpu"), threads=torch.get_num_threads())
    args = (model, scheduler, noise, labels)
    if schedule is None:
        benchmark.pedantic(sample, args=args, rounds=ROUNDS, warmup_rounds=1)
        return

    # Every timed cached round follows an uncached round of its own, so the two see the same
    # machine load; the speedup is the median of the per-round ratios.
    uncached_seconds: list[float] = []

    def run_uncached_then_enable():
        start = time.perf_counter()
        sample(*args)
        uncached_seconds.append(time.perf_counter() - start)
        enable_cache(model, schedule)
        return args, {}

    def disable(*_):
        disable_cache(model)

    try:
        benchmark.pedantic(
            sample, setup=run_uncached_then_enable, teardown=disable, rounds=ROUNDS, warmup_rounds=1
        )
    finally:  # --benchmark-disable runs setup but not teardown
        if getattr(model, "_harmonica_cache", None) is not None:
            disable_cache(model)
    if benchmark.disabled:
        return
    cached_seconds = benchmark.stats.stats.data
    paired_uncached = uncached_seconds[-len(cached_seconds) :]  # drop the warm-up round
    measured = statistics.median(u / c for u, c in zip(paired_uncached, cached_seconds, strict=True))
    ideal = schedule.ideal_speedup(model)
    row = {
        "group": GROUP,
        "impl": f"{variant} ({hk.get_backend('cpu')})",
        "schedule": variant,
        "cache_usage_ratio": schedule.cache_usage_ratio,
        "uncached_median_s": statistics.median(paired_uncached),
        "median_s": statistics.median(cached_seconds),
        "speedup": measured,
        "ideal_speedup": ideal,
        "pct_of_ideal": 100 * measured / ideal,
        "threads": torch.get_num_threads(),
    }
    benchmark.extra_info.update(row)
    recorder.add("e2e", row)

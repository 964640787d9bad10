"""What the host pays per call: the eager dispatch of the fused ops, and a step that reuses every unit.

Tiny tensors make every call host-bound, so these rows measure Python and dispatch, not memory:

- ``op``: each public op in eager mode (active backend) against the torch code it replaces, on
  ``[2, 24, 72]`` fp32 tensors with a strided ``chunk()`` gate. ``host_us`` is microseconds per call
  (a loop of calls between two host clock reads; on CUDA nothing is synchronised inside the loop,
  so it is the cost of issuing a call); ``paired_ratio`` is the median over interleaved pairs of
  (fused loop time / baseline loop time), which is what the bars of issue 15 are stated in.
- ``reuse-step``: one transformer call of a 28-block DiT at tiny width (2 heads × 16, 16 tokens,
  batch 1 + CFG) in which every unit is reused, after a first such step of the same generation (a
  reuse step in steady state), against the same call of the unpatched model
  (interleaved pairs of single calls); with the blocks' conditioning embedders tied (as in the
  released checkpoints) and untied (as diffusers initialises a fresh model).

Under ``--benchmark-disable`` each row runs a handful of calls (the smoke path) and records nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import harmonica_kernels as hk

from .conftest import device_name

SHAPE = (2, 24, 72)
EPS = 1e-6


def _loop_seconds(fn: Callable[[], Any], calls: int, device: str) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()  # outside the timed loop: it measures issuing, not running
    return seconds


def paired(fused: Callable[[], Any], baseline: Callable[[], Any], *, calls: int, pairs: int, device: str):
    """``(fused s/call, baseline s/call, median over pairs of fused/baseline)``, the two loops of a
    pair back to back in alternating order (the first pair warms up and is dropped)."""
    fused_s, base_s, ratios = [], [], []
    for i in range(pairs + 1):
        order = (fused, baseline) if i % 2 else (baseline, fused)
        seconds = {id(fn): _loop_seconds(fn, calls, device) for fn in order}
        if i:
            fused_s.append(seconds[id(fused)] / calls)
            base_s.append(seconds[id(baseline)] / calls)
            ratios.append(fused_s[-1] / base_s[-1])
    return statistics.median(fused_s), statistics.median(base_s), statistics.median(ratios)


def op_cases(device: str) -> dict[str, tuple[Callable[[], Any], str, Callable[[], Any]]]:
    """op -> (fused eager call, baseline name, baseline torch call)."""
    gen = torch.Generator().manual_seed(0)
    x, y, cache = (torch.randn(*SHAPE, generator=gen).to(device) for _ in range(3))
    D = SHAPE[-1]
    shift, scale, gate = torch.randn(SHAPE[0], 6 * D, generator=gen).to(device).chunk(6, dim=1)[:3]
    g = gate.unsqueeze(1)

    def modulate(v):
        return F.layer_norm(v, (D,), eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def unfused_update():
        out = x + g * y
        cache.copy_(y)
        return out

    def unfused_norm_update():
        out = unfused_update()
        return out, modulate(out)

    # Forecast reads: history (cache, c1, c2), coefficients on the device for the fused op and as
    # Python floats for the unfused sequence (no tensor to read there).
    c1, c2 = (torch.randn(*SHAPE, generator=gen).to(device) for _ in range(2))
    coeffs = torch.tensor([0.5, 0.25], device=device)

    def unfused_forecast2():
        return x + g * (cache + 0.5 * (cache - c1) + 0.25 * (cache - 2 * c1 + c2))

    return {
        "cached_gated_residual": (
            lambda: hk.cached_gated_residual(x, gate, cache),
            "addcmul",
            lambda: torch.addcmul(x, g, cache),
        ),
        "gated_residual_update_": (
            lambda: hk.gated_residual_update_(x, gate, y, cache),
            "unfused",
            unfused_update,
        ),
        "gated_residual_norm_modulate[update]": (
            lambda: hk.gated_residual_norm_modulate(x, gate, y, shift, scale, EPS, cache=cache),
            "unfused",
            unfused_norm_update,
        ),
        "gated_residual_norm_modulate[reuse]": (
            lambda: hk.gated_residual_norm_modulate(
                x, gate, None, shift, scale, EPS, cache=cache, reuse=True
            ),
            "unfused",
            lambda: modulate(x + g * cache),
        ),
        "forecast_gated_residual[order1]": (
            lambda: hk.forecast_gated_residual(x, gate, cache, c1, None, coeffs),
            "unfused",
            lambda: x + g * (cache + 0.5 * (cache - c1)),
        ),
        "forecast_gated_residual[order2]": (
            lambda: hk.forecast_gated_residual(x, gate, cache, c1, c2, coeffs),
            "unfused",
            unfused_forecast2,
        ),
        "forecast_residual_norm_modulate[order2]": (
            lambda: hk.forecast_residual_norm_modulate(x, gate, cache, c1, c2, coeffs, shift, scale, EPS),
            "unfused",
            lambda: modulate(unfused_forecast2()),
        ),
    }


OPS = list(op_cases("cpu"))


@pytest.mark.parametrize("op", OPS)
def test_op_host_cost(request, recorder, device, op):
    smoke = request.config.getoption("benchmark_disable")
    fused, base_name, baseline = op_cases(device)[op]
    with torch.inference_mode():
        fused_s, base_s, ratio = paired(
            fused, baseline, calls=5 if smoke else 400, pairs=1 if smoke else 21, device=device
        )
    if smoke:
        return
    print(f"\n{op}: {fused_s * 1e6:.2f} us vs {base_name} {base_s * 1e6:.2f} us, paired ratio {ratio:.2f}")
    recorder.add(
        "host",
        {
            "group": f"host/{op}",
            "op": op,
            "impl": f"fused ({hk.get_backend(device)})",
            "baseline_impl": base_name,
            "shape": list(SHAPE),
            "dtype": "float32",
            "device": device_name(device),
            "median_s": fused_s,
            "host_us": fused_s * 1e6,
            "baseline_host_us": base_s * 1e6,
            "paired_ratio": ratio,
        },
    )


def _tiny_dit(device: str, tied: bool = True):
    from diffusers import DiTTransformer2DModel

    from harmonica.models import tie_dit_embedders

    torch.manual_seed(0)
    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        sample_size=8,
        patch_size=2,
    )
    model = DiTTransformer2DModel(**config)
    if tied:  # one embedder shared by all blocks, as in the released DiT checkpoints
        tie_dit_embedders(model)
    return model.to(device).eval().requires_grad_(False)


@pytest.mark.parametrize("embedders", ["tied", "untied"])
def test_reuse_step_host_cost(request, recorder, device, embedders):
    """A step that reuses every unit against the unpatched model's step, same inputs. ``untied``:
    each block keeps its own random conditioning embedder (diffusers' fresh DiT), so a reuse step
    still runs 28 embedding MLPs; ``tied``: the released checkpoints' structure (one shared)."""
    import copy

    from harmonica import CacheSchedule, enable_cache, units

    smoke = request.config.getoption("benchmark_disable")
    stock = _tiny_dit(device, tied=embedders == "tied")
    cached = copy.deepcopy(stock)
    num_units = len(units(cached))
    steps = 3
    handle = enable_cache(cached, CacheSchedule.fora(steps, num_units, steps))  # steps 1, 2 reuse all
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen).to(device)
    labels = torch.tensor([3, 1000], device=device)  # a class and the null class (CFG)
    t0, t_first, t1 = (torch.tensor([t, t], device=device) for t in (999, 974, 949))

    def stock_step():
        return stock(latents, timestep=t1, class_labels=labels).sample

    def reuse_step():
        return cached(latents, timestep=t1, class_labels=labels).sample

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ratios, reuse_s, stock_s = [], [], []
    pairs = 1 if smoke else 61
    with torch.inference_mode():
        for i in range(pairs + 1):
            handle.reset()
            cached(latents, timestep=t0, class_labels=labels)  # step 0 computes every unit
            cached(latents, timestep=t_first, class_labels=labels)  # a first reuse step, untimed
            seconds = {}
            for name, fn in (
                (("stock", stock_step), ("reuse", reuse_step))
                if i % 2
                else (("reuse", reuse_step), ("stock", stock_step))
            ):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                seconds[name] = time.perf_counter() - start
            if i:
                reuse_s.append(seconds["reuse"])
                stock_s.append(seconds["stock"])
                ratios.append(seconds["reuse"] / seconds["stock"])
    if smoke:
        return
    reuse_ms, stock_ms = statistics.median(reuse_s) * 1e3, statistics.median(stock_s) * 1e3
    ratio = statistics.median(ratios)
    print(
        f"\nreuse step ({embedders}) {reuse_ms:.2f} ms vs stock {stock_ms:.2f} ms, paired ratio {ratio:.3f}"
    )
    recorder.add(
        "host",
        {
            "group": f"host/reuse-step/{embedders}",
            "op": f"step reusing every unit: DiT 28 blocks ({embedders}), width 32, 16 tokens, 1+CFG",
            "impl": f"cached ({hk.get_backend(device)})",
            "baseline_impl": "unpatched diffusers step",
            "device": device_name(device),
            "median_s": statistics.median(reuse_s),
            "host_us": statistics.median(reuse_s) * 1e6,
            "baseline_host_us": statistics.median(stock_s) * 1e6,
            "paired_ratio": ratio,
        },
    )

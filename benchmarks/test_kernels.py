"""Fused ops vs the unfused torch sequences a diffusers block runs today.

Shapes (``HARMONICA_BENCH_SIZE``, see conftest.py): ``cpu`` and ``gpu`` use the activations of
DiT-XL/2 at 256² with batch 8 + CFG (B=16, N=256, D=1152) and PixArt-α at 1024² with batch 1 + CFG
(B=2, N=4096, D=1152); ``smoke`` a tiny one. Gates are strided ``chunk()`` views of an adaLN
output, as diffusers passes them. Each row records the shape, dtype, device, backend, the bytes the
op must move at least (each input read once, each output written once), GB/s and the share of this
machine's measured copy bandwidth; each group's ``speedup`` is against its unfused baseline in the
same run. On a CPU the fused row also records ``paired_speedups``: for each baseline, the median
ratio over 15 pairs of adjacent calls (:func:`conftest.interleaved_ratio`), which the README tables
show instead of the ratio of two rows timed seconds apart. On CUDA the fused ops run under both GPU
backends (``cuda`` extension and ``triton``), and the inputs rotate over enough copies to exceed the
L2 cache four times (a tensor re-read from L2 would overstate the bandwidth).

What each time measures: ``median_s`` is wall-clock per call (on CUDA 20 eager calls between two
events: whichever of host and device is slower); ``host_us`` is what issuing one call costs the
host (a loop of calls, no sync inside); on CUDA ``device_us_graph`` is the device alone (the call
replayed from a CUDA graph, ``triton.testing.do_bench_cudagraph``) and ``pct_copy_bandwidth_graph``
compares it with ``copy_`` of the same bytes timed the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import harmonica_kernels as hk
from harmonica_kernels._backend import backend_module

from .conftest import bench_size, graph_seconds_per_call, host_seconds_per_call, interleaved_ratio, measure

SHAPES = {
    "smoke": {"tiny": (2, 24, 72)},
    "cpu": {"dit-xl-256": (16, 256, 1152), "pixart-1024": (2, 4096, 1152)},
    "gpu": {"dit-xl-256": (16, 256, 1152), "pixart-1024": (2, 4096, 1152)},
}[bench_size()]
EPS = 1e-6


def inputs(shape, dtype, device):
    B, N, D = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x, y, cache = (torch.randn(B, N, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    emb = torch.randn(B, 6 * D, device=device, dtype=dtype, generator=gen)
    shift, scale, gate = emb.chunk(6, dim=1)[:3]  # strided views, as diffusers passes them
    r = torch.tensor(0.3, device=device)
    # The older history of a forecast read (c0 is `cache`), in the activations' dtype.
    c1, c2 = (torch.randn(B, N, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    coeffs = torch.tensor(FORECAST_COEFFS, device=device)
    return x, y, cache, gate, shift, scale, r, c1, c2, coeffs


# (a, b) of the forecast rows; the unfused baselines get them as Python floats (their cheapest form).
FORECAST_COEFFS = (0.5, 0.25)


def cases(x, y, cache, gate, shift, scale, r, c1, c2, coeffs):
    """op -> (fused call, {baseline name: unfused torch call}, tensors read, tensors written)."""
    g = gate.unsqueeze(1)
    grad = y
    D = x.shape[-1]

    def modulate(v):
        return F.layer_norm(v, (D,), eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def unfused_norm_update():
        out = x + g * y
        cache.copy_(y)
        return out, modulate(out)

    def unfused_routed_backward():
        mixed = r * y + (1 - r) * cache
        return g * grad * r, (grad * mixed).sum(1), (grad * g * (y - cache)).sum()

    def fused_backward():
        return backend_module(x.device).routed_gated_residual_backward(grad, gate, y, cache, r)

    a, b = FORECAST_COEFFS

    def forecast_order1():  # TaylorSeer's first-order read as diffusers-style torch code
        return cache + a * (cache - c1)

    def forecast_order2():
        return cache + a * (cache - c1) + b * (cache - 2 * c1 + c2)

    return {
        "cached_gated_residual": (
            lambda: hk.cached_gated_residual(x, gate, cache),
            {"unfused": lambda: x + g * cache, "addcmul": lambda: torch.addcmul(x, g, cache)},
            [x, cache],
            [x],
        ),
        "gated_residual_update_": (
            lambda: hk.gated_residual_update_(x, gate, y, cache),
            {"unfused": lambda: (x + g * y, cache.copy_(y))},
            [x, y],
            [x, cache],
        ),
        "routed_gated_residual": (
            lambda: hk.routed_gated_residual(x, gate, y, cache, r),
            {"unfused": lambda: x + g * (r * y + (1 - r) * cache)},
            [x, y, cache],
            [x],
        ),
        "routed_gated_residual_backward": (
            fused_backward,
            {"unfused": unfused_routed_backward},
            [grad, y, cache],
            [y],
        ),
        "gated_residual_norm_modulate[update]": (
            lambda: hk.gated_residual_norm_modulate(x, gate, y, shift, scale, EPS, cache=cache),
            {"unfused": unfused_norm_update},
            [x, y],
            [x, x, cache],
        ),
        "gated_residual_norm_modulate[reuse]": (
            lambda: hk.gated_residual_norm_modulate(
                x, gate, None, shift, scale, EPS, cache=cache, reuse=True
            ),
            {"unfused": lambda: modulate(x + g * cache)},
            [x, cache],
            [x, x],
        ),
        "forecast_gated_residual[order1]": (
            lambda: hk.forecast_gated_residual(x, gate, cache, c1, None, coeffs),
            {"unfused": lambda: x + g * forecast_order1()},
            [x, cache, c1],
            [x],
        ),
        "forecast_gated_residual[order2]": (
            lambda: hk.forecast_gated_residual(x, gate, cache, c1, c2, coeffs),
            {"unfused": lambda: x + g * forecast_order2()},
            [x, cache, c1, c2],
            [x],
        ),
        "forecast_residual_norm_modulate[order1]": (
            lambda: hk.forecast_residual_norm_modulate(x, gate, cache, c1, None, coeffs, shift, scale, EPS),
            {"unfused": lambda: modulate(x + g * forecast_order1())},
            [x, cache, c1],
            [x, x],
        ),
        "forecast_residual_norm_modulate[order2]": (
            lambda: hk.forecast_residual_norm_modulate(x, gate, cache, c1, c2, coeffs, shift, scale, EPS),
            {"unfused": lambda: modulate(x + g * forecast_order2())},
            [x, cache, c1, c2],
            [x, x],
        ),
    }


OPS = [
    "cached_gated_residual",
    "gated_residual_update_",
    "routed_gated_residual",
    "routed_gated_residual_backward",
    "gated_residual_norm_modulate[update]",
    "gated_residual_norm_modulate[reuse]",
    "forecast_gated_residual[order1]",
    "forecast_gated_residual[order2]",
    "forecast_residual_norm_modulate[order1]",
    "forecast_residual_norm_modulate[order2]",
]
# The read path is also held against torch's best single op for it. On CUDA the fused ops run under
# each GPU backend ("fused" is the default one, the cuda extension when built).
GPU_BACKENDS = ("triton",) if torch.cuda.is_available() else ()
VARIANTS = (
    [(op, impl) for op in OPS for impl in ("fused", "unfused")]
    + [("cached_gated_residual", "addcmul")]
    + [(op, f"fused:{name}") for name in GPU_BACKENDS for op in OPS]
)


def _input_sets(device: str, moved: int) -> int:
    """How many copies of the inputs to rotate over so that one pass exceeds 4x the L2 cache."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, math.ceil(4 * l2 / moved)))


def _copy_graph_seconds(moved: int, sets: int, device: str) -> float | None:
    """CUDA-graph device time of ``dst.copy_(src)`` moving ``moved`` bytes (read + write), rotating
    over ``sets`` buffer pairs as the op rotates over its inputs."""
    elements = max(1, moved // 8)  # fp32: moved / 2 bytes read, as many written
    pairs = [
        (torch.randn(elements, device=device), torch.empty(elements, device=device)) for _ in range(sets)
    ]
    rotation = itertools.cycle(pairs)

    def copy():
        src, dst = next(rotation)
        dst.copy_(src)

    return graph_seconds_per_call(copy, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("op", "impl"), VARIANTS)
def test_kernel(benchmark, recorder, device, copy_bandwidth, op, shape_name, dtype, impl):
    shape = SHAPES[shape_name]
    forced = impl.split(":", 1)[1] if impl.startswith("fused:") else None
    if forced is not None and forced not in hk.available_backends():
        pytest.skip(f"backend {forced} unavailable: {hk.missing_backends()[forced]}")
    fused, baselines, reads, writes = cases(*inputs(shape, dtype, device))[op]
    calls = [fused if impl.startswith("fused") else baselines[impl]]
    moved = sum(t.numel() * t.element_size() for t in reads + writes)
    sets = _input_sets(device, moved)
    for _ in range(sets - 1):
        fused, baselines, _, _ = cases(*inputs(shape, dtype, device))[op]
        calls.append(fused if impl.startswith("fused") else baselines[impl])
    rotation = itertools.cycle(calls)

    def fn():
        return next(rotation)()

    group = f"{op}/{shape_name}/{str(dtype)[6:]}"
    benchmark.group = group
    smoke = benchmark.disabled
    with hk.use_backend(forced) if forced else contextlib.nullcontext():
        backend = hk.get_backend(device) if impl.startswith("fused") else "torch"
        seconds = measure(benchmark, fn, device)
        # The host's share on its own (the smoke run exercises it with a few calls), and on CUDA
        # the device's alone: the call replayed from a CUDA graph, against copy_ timed the same way.
        host_s = host_seconds_per_call(fn, device, calls=2 if smoke else 200, rounds=1 if smoke else 5)
        graph_s = None if smoke else graph_seconds_per_call(fn, device)
    if seconds is None:
        return
    copy_graph_s = None if graph_s is None else _copy_graph_seconds(moved, sets, device)
    gbps = moved / seconds / 1e9
    row = {
        "group": group,
        "op": op,
        "impl": f"fused ({backend})" if impl.startswith("fused") else impl,
        "baseline": impl == "unfused",
        "backend": backend,
        "shape": list(shape),
        "shape_name": shape_name,
        "dtype": str(dtype)[6:],
        "device": device,
        "median_s": seconds,
        "bytes": moved,
        "input_sets": sets,
        "gbps": gbps,
        "copy_bandwidth_gbps": copy_bandwidth,
        "pct_copy_bandwidth": 100 * gbps / copy_bandwidth,
        "host_us": host_s * 1e6,
    }
    if graph_s is not None:
        row["device_us_graph"] = graph_s * 1e6
        row["copy_device_us_graph"] = copy_graph_s * 1e6
        row["pct_copy_bandwidth_graph"] = 100 * copy_graph_s / graph_s  # same bytes moved
    if device == "cpu" and impl == "fused":
        row["paired_speedups"] = {name: interleaved_ratio(base, fused) for name, base in baselines.items()}
    benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, dict)})
    recorder.add("kernels", row)

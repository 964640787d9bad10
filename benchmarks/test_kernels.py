"""Fused ops vs the unfused torch sequences a diffusers block runs today.

Shapes: DiT-XL/2 at 256² (B=16, N=256, D=1152) and PixArt-α at 1024² (B=2, N=4096, D=1152).
Each row records bytes moved (the minimum traffic of the op), GB/s and the share of this machine's
measured copy bandwidth; each group's `speedup` is against its unfused baseline in the same run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harmonica_kernels as hk

from .conftest import measure

SHAPES = {"dit-xl-256": (16, 256, 1152), "pixart-1024": (2, 4096, 1152)}
EPS = 1e-6


def inputs(shape, dtype, device):
    B, N, D = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x, y, cache = (torch.randn(B, N, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    emb = torch.randn(B, 6 * D, device=device, dtype=dtype, generator=gen)
    shift, scale, gate = emb.chunk(6, dim=1)[:3]  # strided views, as diffusers passes them
    r = torch.tensor(0.3, device=device)
    return x, y, cache, gate, shift, scale, r


def cases(x, y, cache, gate, shift, scale, r):
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

    backward_op = getattr(torch.ops.harmonica, "routed_gated_residual_backward", None)
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
            (lambda: backward_op(grad, gate, y, cache, r)) if backward_op is not None else None,
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
    }


OPS = [
    "cached_gated_residual",
    "gated_residual_update_",
    "routed_gated_residual",
    "routed_gated_residual_backward",
    "gated_residual_norm_modulate[update]",
    "gated_residual_norm_modulate[reuse]",
]
# The read path is also held against torch's best single op for it.
VARIANTS = [(op, impl) for op in OPS for impl in ("fused", "unfused")] + [
    ("cached_gated_residual", "addcmul")
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("op", "impl"), VARIANTS)
def test_kernel(benchmark, recorder, device, copy_bandwidth, op, shape_name, dtype, impl):
    fused, baselines, reads, writes = cases(*inputs(SHAPES[shape_name], dtype, device))[op]
    fn = fused if impl == "fused" else baselines[impl]
    if fn is None:
        pytest.skip("the backward op is registered by the C++ extension, which is not built")
    backend = hk.get_backend(device) if impl == "fused" else "torch"
    group = f"{op}/{shape_name}/{str(dtype)[6:]}"
    benchmark.group = group
    seconds = measure(benchmark, fn, device)
    if seconds is None:
        return
    moved = sum(t.numel() * t.element_size() for t in reads + writes)
    gbps = moved / seconds / 1e9
    row = {
        "group": group,
        "op": op,
        "impl": impl if impl != "fused" else f"fused ({backend})",
        "baseline": impl == "unfused",
        "shape": list(SHAPES[shape_name]),
        "dtype": str(dtype)[6:],
        "median_s": seconds,
        "bytes": moved,
        "gbps": gbps,
        "copy_bandwidth_gbps": copy_bandwidth,
        "pct_copy_bandwidth": 100 * gbps / copy_bandwidth,
    }
    benchmark.extra_info.update(row)
    recorder.add("kernels", row)

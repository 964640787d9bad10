"""Registered ops: opcheck, torch.compile, no hidden copies, and clear errors for bad input."""

from __future__ import annotations

import os

import pytest
import torch

import harmonica_kernels as hk

from .test_ops import make_inputs, make_row

# Registered op names per backend (the torch backend is plain torch code, nothing to register).
PREFIX = {"cpp": "", "cuda": "", "triton": "triton_"}


def registered(backend: str, name: str):
    if backend not in PREFIX:
        pytest.skip("the torch backend is the reference itself, not a registered op")
    return getattr(torch.ops.harmonica, PREFIX[backend] + name).default


def op_cases(device):
    x, gate, branch, cache = make_inputs((2, 5, 24), torch.float32, torch.float32, "chunk", device)
    gen = torch.Generator().manual_seed(3)
    shift = make_row("chunk", 2, 24, torch.float32, device, gen, 0)
    scale = make_row("chunk", 2, 24, torch.float32, device, gen, 1)
    r = torch.tensor(0.25, device=device)
    return {
        "cached_gated_residual": [(x, gate, cache), (x, None, cache)],
        "gated_residual_update_": [(x, gate, branch, cache), (x, None, branch, cache)],
        "routed_gated_residual": [
            tuple(t.clone().requires_grad_() for t in (x, gate, branch))
            + (cache, r.clone().requires_grad_()),
            (x, None, branch, cache, r),
        ],
        "routed_gated_residual_backward": [
            (torch.randn_like(x), gate, branch, cache, r),
            (x, None, branch, cache, r),
        ],
        "gated_residual_norm_modulate": [
            (x, gate, branch, shift, scale, 1e-6, None, False),
            (x, gate, branch, shift, scale, 1e-6, cache, False),
            (x, None, None, shift, scale, 1e-5, cache, True),
        ],
    }


@pytest.mark.parametrize(
    "name",
    [
        "cached_gated_residual",
        "gated_residual_update_",
        "routed_gated_residual",
        "routed_gated_residual_backward",
        "gated_residual_norm_modulate",
    ],
)
def test_opcheck(backend, device, name):
    op = registered(backend, name)
    for args in op_cases(device)[name]:
        torch.library.opcheck(op, args)


class TinyBlock(torch.nn.Module):
    """The op sequence a cached DiT block runs: update, fused norm, reuse, and the training blend."""

    def forward(self, x, emb, branch, cache_a, cache_f, r):
        shift, scale, gate, shift2, scale2, gate2 = emb.chunk(6, dim=1)
        x = hk.gated_residual_update_(x, gate, branch, cache_a)
        x, h = hk.gated_residual_norm_modulate(
            x, gate2, None, shift2, scale2, 1e-6, cache=cache_f, reuse=True
        )
        return hk.routed_gated_residual(x, gate, h, cache_a, r)


def test_compile_fullgraph(backend, device):
    B, N, D = 2, 5, 24
    gen = torch.Generator().manual_seed(0)
    x, branch, cache_f = (torch.randn(B, N, D, generator=gen).to(device) for _ in range(3))
    emb = torch.randn(B, 6 * D, generator=gen).to(device)
    r = torch.tensor(0.6, device=device, requires_grad=True)
    block = TinyBlock()
    cache_eager, cache_compiled = torch.zeros_like(x), torch.zeros_like(x)
    expected = block(x, emb, branch, cache_eager, cache_f, r)
    # aot_eager traces the ops through their fake impls and autograd into one graph without
    # inductor's C++ codegen, which would dominate the suite's time on 2 cores.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    actual = compiled(x, emb, branch, cache_compiled, cache_f, r)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(cache_compiled, cache_eager)
    actual.sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad)


def test_strided_gates_are_not_copied(backend, device):
    """chunk() views go straight to the kernel: the profiler must see no copy of them."""
    if backend == "torch":
        pytest.skip("the torch reference upcasts with .float(), which copies by design")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter copies every kernel argument to the host and back")
    x, gate, branch, cache = make_inputs((2, 5, 24), torch.float32, torch.float32, "chunk", device)
    assert not gate.is_contiguous()
    with torch.profiler.profile() as prof:
        hk.gated_residual_update_(x, gate, branch, cache)
        hk.cached_gated_residual(x, gate, cache)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::contiguous", "aten::clone", "aten::copy_", "aten::_to_copy"}, names


# --------------------------------------------------------------------------------------- bad input


def test_bad_input_messages(backend, device):
    x, gate, branch, cache = make_inputs((2, 5, 24), torch.float32, torch.float32, "chunk", device)
    with pytest.raises(ValueError, match=r"x must be \[B, N, D\]"):
        hk.cached_gated_residual(x[0], gate, cache[0])
    with pytest.raises(ValueError, match="cache must have x's shape"):
        hk.cached_gated_residual(x, gate, cache[:, :3])
    with pytest.raises(TypeError, match="branch has dtype torch.float16 but x has torch.float32"):
        hk.gated_residual_update_(x, gate, branch.half(), cache)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        hk.cached_gated_residual(x.int(), None, cache)
    with pytest.raises(ValueError, match=r"gate must be \[B, D\] or \[B, 1, D\]"):
        hk.cached_gated_residual(x, gate[:, :7], cache)
    with pytest.raises(ValueError, match="cache is on meta but x is on"):
        hk.cached_gated_residual(x, gate, cache.to("meta"))
    with pytest.raises(ValueError, match="cache shares memory with x"):
        hk.gated_residual_update_(x, gate, branch, x)
    with pytest.raises(ValueError, match="must be contiguous"):
        hk.gated_residual_update_(x, gate, branch, torch.empty(2, 24, 5, device=device).transpose(1, 2))
    with pytest.raises(ValueError, match="one-element"):
        hk.routed_gated_residual(x, gate, branch, cache, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="cache must be detached"):
        hk.routed_gated_residual(x, gate, branch, cache.requires_grad_(), torch.tensor(0.5, device=device))
    shift = scale = gate
    with pytest.raises(ValueError, match="reuse=True reads the branch from `cache`"):
        hk.gated_residual_norm_modulate(x, gate, branch, shift, scale, cache=None, reuse=True)
    with pytest.raises(ValueError, match="y .* is required"):
        hk.gated_residual_norm_modulate(x, gate, None, shift, scale)


def test_direct_op_calls_fail_cleanly(backend, device):
    """Callers that bypass the Python checks still get a clear error from the op's own checks
    (RuntimeError from C++ TORCH_CHECK, ValueError from the Triton wrappers)."""
    x, gate, branch, cache = make_inputs((2, 5, 24), torch.float32, torch.float32, "chunk", device)
    with pytest.raises((RuntimeError, ValueError), match="shape"):
        registered(backend, "cached_gated_residual")(x, gate, cache[:, :3].contiguous())
    with pytest.raises((RuntimeError, ValueError), match="shares memory|overlap"):
        registered(backend, "gated_residual_update_")(x, gate, branch, x)

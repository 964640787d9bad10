"""Every op on every backend that runs here, against the torch reference."""

from __future__ import annotations

import pytest
import torch

import harmonica_kernels as hk
from harmonica_kernels import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
GATES = ["none", "bd", "b1d", "broadcast", "chunk"]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def make_row(kind: str, B: int, D: int, dtype, device, gen, index: int = 2) -> torch.Tensor | None:
    """A per-sample vector in the layout diffusers hands over (see ops.py)."""
    if kind == "none":
        return None
    if kind == "bd":
        return torch.randn(B, D, generator=gen).to(device, dtype)
    if kind == "b1d":
        return torch.randn(B, 1, D, generator=gen).to(device, dtype)
    if kind == "broadcast":
        return torch.randn(1, D, generator=gen).to(device, dtype)
    if kind == "chunk":  # DiT's adaLN-Zero output chunked into 6 strided [B, D] views
        return torch.randn(B, 6 * D, generator=gen).to(device, dtype).chunk(6, dim=1)[index]
    raise ValueError(kind)


def make_inputs(shape, dtype, cache_dtype, gate_kind, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = shape

    def rand(dt):
        return torch.randn(B, N, D, generator=gen).to(device, dt)

    return rand(dtype), make_row(gate_kind, B, D, dtype, device, gen), rand(dtype), rand(cache_dtype)


def run_op(op: str, x, gate, branch, cache, *, impl):
    """Calls one op through `impl` (hk or ref) and returns (outputs..., cache after)."""
    B, _, D = x.shape
    if op == "cached":
        return (impl.cached_gated_residual(x, gate, cache), cache)
    if op == "update":
        return (impl.gated_residual_update_(x, gate, branch, cache), cache)
    if op == "routed":
        r = torch.full((), 0.3, device=x.device)
        return (impl.routed_gated_residual(x, gate, branch, cache, r), cache)
    gen = torch.Generator().manual_seed(1)
    shift = make_row("chunk", B, D, x.dtype, x.device, gen, index=0)
    scale = make_row("chunk", B, D, x.dtype, x.device, gen, index=1)
    if op == "norm":
        return (*impl.gated_residual_norm_modulate(x, gate, branch, shift, scale, 1e-6), cache)
    if op == "norm_update":
        return (*impl.gated_residual_norm_modulate(x, gate, branch, shift, scale, 1e-6, cache=cache), cache)
    if op == "norm_reuse":
        return (
            *impl.gated_residual_norm_modulate(x, gate, None, shift, scale, 1e-6, cache=cache, reuse=True),
            cache,
        )
    raise ValueError(op)


OPS = ["cached", "update", "routed", "norm", "norm_update", "norm_reuse"]


def check_against_reference(op, shape, dtype, cache_dtype, gate_kind, device):
    x, gate, branch, cache = make_inputs(shape, dtype, cache_dtype, gate_kind, device)
    x0, branch0 = x.clone(), branch.clone()
    expected = run_op(op, x.clone(), gate, branch.clone(), cache.clone(), impl=ref)
    actual = run_op(op, x, gate, branch, cache, impl=hk)
    for a, e in zip(actual[:-1], expected[:-1], strict=True):
        assert a.dtype == dtype and a.shape == x.shape and a.is_contiguous()
        close(a, e, dtype)
    torch.testing.assert_close(actual[-1], expected[-1], atol=0, rtol=0)  # cache: exact copy or untouched
    assert torch.equal(x, x0) and torch.equal(branch, branch0), "inputs must not be modified"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
def test_dtypes(backend, device, op, dtype, cache_dtype):
    check_against_reference(op, (3, 7, 37), dtype, cache_dtype, "chunk", device)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("gate_kind", GATES)
def test_gate_layouts(backend, device, op, gate_kind):
    check_against_reference(op, (2, 5, 24), torch.float32, torch.float32, gate_kind, device)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_width(backend, device, op, dtype):
    """D = 1152 (DiT-XL/2, PixArt) exercises the vectorised paths."""
    check_against_reference(op, (2, 3, 1152), dtype, dtype, "chunk", device)


@pytest.mark.parametrize("op", ["norm", "norm_update", "norm_reuse"])
@pytest.mark.parametrize("gate_kind", ["none", "broadcast", "chunk"])
def test_norm_rows_in_chunks(backend, device, op, gate_kind):
    """D = 192 = 3 * 64 pads a power-of-two tile by 25 %: Triton's chunked norm kernel, with a
    token count that leaves the last tile of rows partly empty."""
    check_against_reference(op, (2, 37, 192), torch.float32, torch.float32, gate_kind, device)


def test_norm_statistics_of_offset_rows(backend, device):
    """Rows far from zero mean (|mean| / std ~ 1e3): the chunk-by-chunk variance stays accurate."""
    x, gate, branch, cache = make_inputs((2, 5, 1152), torch.float32, torch.float32, "chunk", device)
    x = x + 1000.0
    gen = torch.Generator().manual_seed(1)
    shift = make_row("chunk", 2, 1152, x.dtype, x.device, gen, index=0)
    scale = make_row("chunk", 2, 1152, x.dtype, x.device, gen, index=1)
    expected = ref.gated_residual_norm_modulate(x, gate, branch, shift, scale, 1e-6)[1]
    actual = hk.gated_residual_norm_modulate(x, gate, branch, shift, scale, 1e-6)[1]
    # x_out itself is rounded to fp32 at magnitude 1e3 (ulp 6e-5, i.e. ~6e-5 of a unit-std row)
    torch.testing.assert_close(actual, expected, atol=2e-3, rtol=2e-3)


def test_update_writes_cache_in_place(backend, device):
    x, gate, branch, cache = make_inputs((2, 5, 40), torch.float32, torch.bfloat16, "chunk", device)
    storage = cache.data_ptr()
    hk.gated_residual_update_(x, gate, branch, cache)
    assert cache.data_ptr() == storage
    assert torch.equal(cache, branch.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_kind", ["none", "chunk", "broadcast", "b1d"])
@pytest.mark.parametrize("shape", [(3, 7, 37), (3, 70, 300)])
def test_routed_gradients(backend, device, dtype, gate_kind, shape, monkeypatch):
    """Gradients of x, gate, branch and r against autograd through the reference. At the second
    shape Triton's backward leaves 3 token tiles per sample and 3 feature tiles; the sums of its last
    arrivals run (at both shapes) on tiles small enough that their loops take several masked rounds."""
    if backend == "triton":
        from harmonica_kernels.triton import kernels

        for name, value in (("_SUM_BLOCK_R", 2), ("_SUM_BLOCK_P", 4)):
            monkeypatch.setattr(kernels, name, value)
    x, gate, branch, cache = make_inputs(shape, dtype, dtype, gate_kind, device)
    r = torch.tensor(0.3, device=device)

    def grads(impl):
        leaves = [t.detach().clone().requires_grad_() for t in (x, branch, r)]
        g = None if gate is None else gate.detach().clone().requires_grad_()
        out = impl.routed_gated_residual(leaves[0], g, leaves[1], cache, leaves[2])
        weight = torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape).to(dtype)
        (out.float() * weight.float()).sum().backward()
        return [t.grad for t in leaves] + ([] if g is None else [g.grad])

    for a, e in zip(grads(hk), grads(ref), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        # r's and gate's gradients are sums over many elements: scale the tolerance with them.
        close(a.float(), e.float(), dtype if a.numel() > 1 else torch.float16)


def test_gradcheck_fp64_reference():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    x, branch, cache = args
    gate = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    r = torch.tensor(0.4, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, gate, branch, r)]
    assert torch.autograd.gradcheck(
        lambda x, g, b, r: ref.routed_gated_residual(x, g, b, cache, r), leaves, eps=1e-6, atol=1e-8
    )


def test_gradcheck_cpp_path():
    """gradcheck of the C++ CPU op and its backward kernel. The kernels have no fp64 path, so this
    runs in fp32; the op is bilinear, so central differences are exact up to fp32 rounding."""
    if "cpp" not in hk.available_backends():
        pytest.skip(f"backend cpp unavailable: {hk.missing_backends()['cpp']}")
    gen = torch.Generator().manual_seed(0)
    x, branch, cache = (torch.randn(2, 3, 5, generator=gen) for _ in range(3))
    gate = torch.randn(2, 1, 5, generator=gen)
    r = torch.tensor(0.4)
    leaves = [t.requires_grad_() for t in (x, gate, branch, r)]
    with hk.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda x, g, b, r: hk.routed_gated_residual(x, g, b, cache, r),
            leaves,
            eps=1e-2,
            atol=2e-3,
            rtol=1e-2,
            fast_mode=False,
        )


def test_backward_op_matches_autograd_of_reference():
    """The explicit backward formula (used by every fused backend's autograd) is the true gradient."""
    gen = torch.Generator().manual_seed(0)
    x, branch, cache, grad_out = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(4))
    for gate in (
        None,
        torch.randn(2, 1, 5, generator=gen, dtype=torch.float64),
        torch.randn(1, 5, dtype=torch.float64),
    ):
        r = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        b = branch.clone().requires_grad_()
        g = None if gate is None else gate.clone().requires_grad_()
        ref.routed_gated_residual(x, g, b, cache, r).backward(grad_out)
        grad_branch, grad_gate, grad_r = ref.routed_gated_residual_backward(grad_out, gate, branch, cache, r)
        torch.testing.assert_close(grad_branch, b.grad)
        torch.testing.assert_close(grad_r, r.grad)
        if gate is not None:
            torch.testing.assert_close(grad_gate, g.grad)

"""The forecast reads (forecast_gated_residual, forecast_residual_norm_modulate) on every backend that
runs here, against the torch reference; their registration (opcheck, torch.compile) and bad input."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import harmonica_kernels as hk
from harmonica_kernels import reference as ref

from .test_ops import DTYPES, GATES, close, make_row
from .test_registration import PREFIX, registered

ORDERS = [0, 1, 2]
COEFFS = (0.7, -0.3)  # a, b: an extrapolation that weights every history entry differently


def make_forecast_inputs(shape, dtype, history_dtype, gate_kind, device, seed=0):
    """x, gate, [c0, c1, c2], shift, scale, coeffs (fp32 [2] on the device)."""
    gen = torch.Generator().manual_seed(seed)
    B, N, D = shape
    x = torch.randn(B, N, D, generator=gen).to(device, dtype)
    history = [torch.randn(B, N, D, generator=gen).to(device, history_dtype) for _ in range(3)]
    gate = make_row(gate_kind, B, D, dtype, device, gen)
    shift = make_row("chunk", B, D, dtype, device, gen, index=0)
    scale = make_row("chunk", B, D, dtype, device, gen, index=1)
    coeffs = torch.tensor(COEFFS, dtype=torch.float32, device=device)
    return x, gate, history, shift, scale, coeffs


def history_of(history, order):
    """(c0, c1, c2) for a forecast of ``order`` (None for the entries it does not read)."""
    return tuple(history[: order + 1]) + (None,) * (2 - order)


def run_forecast(op, impl, x, gate, history, shift, scale, coeffs, order):
    c0, c1, c2 = history_of(history, order)
    if op == "gated":
        return (impl.forecast_gated_residual(x, gate, c0, c1, c2, coeffs),)
    return tuple(impl.forecast_residual_norm_modulate(x, gate, c0, c1, c2, coeffs, shift, scale, 1e-6))


def check_forecast(op, shape, dtype, history_dtype, gate_kind, device, order):
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        shape, dtype, history_dtype, gate_kind, device
    )
    before = [t.clone() for t in (x, *history, coeffs)]
    expected = run_forecast(op, ref, x, gate, history, shift, scale, coeffs, order)
    actual = run_forecast(op, hk, x, gate, history, shift, scale, coeffs, order)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == dtype and a.shape == x.shape and a.is_contiguous()
        close(a, e, dtype)
    for t, t0 in zip((x, *history, coeffs), before, strict=True):
        assert torch.equal(t, t0), "inputs must not be modified"


@pytest.mark.parametrize("op", ["gated", "norm"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("history_dtype", DTYPES)
def test_dtypes(backend, device, op, order, dtype, history_dtype):
    check_forecast(op, (3, 7, 37), dtype, history_dtype, "chunk", device, order)


@pytest.mark.parametrize("op", ["gated", "norm"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("gate_kind", GATES)
def test_gate_layouts(backend, device, op, order, gate_kind):
    check_forecast(op, (2, 5, 24), torch.float32, torch.float32, gate_kind, device, order)


@pytest.mark.parametrize("op", ["gated", "norm"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(("dtype", "history_dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16,) * 2])
def test_model_width(backend, device, op, order, dtype, history_dtype):
    """D = 1152 (DiT-XL/2, PixArt): the vectorised paths and Triton's chunked norm kernel, with
    bf16 history under fp32 activations as the engine may store it."""
    check_forecast(op, (3, 7, 1152), dtype, history_dtype, "chunk", device, order)


@pytest.mark.parametrize("order", [1, 2])
def test_norm_rows_in_chunks(backend, device, order):
    """D = 192 = 3 * 64 with 37 tokens: Triton's chunked norm kernel with a partial last tile."""
    check_forecast("norm", (2, 37, 192), torch.float32, torch.float32, "broadcast", device, order)


def test_orders_reduce_to_reuse(backend, device):
    """Order 0 is plain reuse, bit for bit; zero coefficients forecast c0 itself."""
    x, gate, history, shift, scale, _ = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.float32, "chunk", device
    )
    c0, c1, c2 = history
    reuse = hk.cached_gated_residual(x, gate, c0)
    assert torch.equal(hk.forecast_gated_residual(x, gate, c0), reuse)
    assert torch.equal(hk.forecast_gated_residual(x, gate, c0, coeffs=(5.0, 5.0)), reuse)  # ignored
    zero = torch.zeros(2, device=device)
    close(hk.forecast_gated_residual(x, gate, c0, c1, c2, zero), reuse)
    norm_reuse = hk.gated_residual_norm_modulate(x, gate, None, shift, scale, cache=c0, reuse=True)
    forecast_norm = hk.forecast_residual_norm_modulate(x, gate, c0, None, None, None, shift, scale)
    for a, e in zip(forecast_norm, norm_reuse, strict=True):
        assert torch.equal(a, e)


def test_first_order_ignores_b(backend, device):
    x, gate, history, *_ = make_forecast_inputs((2, 5, 24), torch.float32, torch.float32, "chunk", device)
    c0, c1, _ = history
    a_only = hk.forecast_gated_residual(x, gate, c0, c1, None, torch.tensor([0.5, 0.0], device=device))
    assert torch.equal(hk.forecast_gated_residual(x, gate, c0, c1, None, (0.5, 123.0)), a_only)


def test_coefficients_as_a_pair_of_floats(backend, device):
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.float32, "chunk", device
    )
    expected = hk.forecast_gated_residual(x, gate, *history, coeffs)
    assert torch.equal(hk.forecast_gated_residual(x, gate, *history, coeffs=COEFFS), expected)
    assert torch.equal(hk.forecast_gated_residual(x, gate, *history, coeffs=list(COEFFS)), expected)
    expected_norm = hk.forecast_residual_norm_modulate(x, gate, *history, coeffs, shift, scale)
    actual_norm = hk.forecast_residual_norm_modulate(x, gate, *history, COEFFS, shift, scale)
    for a, e in zip(actual_norm, expected_norm, strict=True):
        assert torch.equal(a, e)


def test_inputs_the_op_does_not_take_are_normalised(backend, device):
    """A non-contiguous x or history is validated, made contiguous, and computed right."""
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.bfloat16, "bd", device
    )
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    c1_strided = history[1].transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_strided.is_contiguous() and not c1_strided.is_contiguous()
    actual = hk.forecast_gated_residual(x_strided, gate, history[0], c1_strided, history[2], coeffs)
    close(actual, ref.forecast_gated_residual(x, gate, *history, coeffs))


# --------------------------------------------------------------------------------------- registration


def op_cases(device):
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.bfloat16, "chunk", device
    )
    c0, c1, c2 = history
    return {
        "forecast_gated_residual": [
            (x, gate, c0, c1, c2, coeffs),
            (x, None, c0, c1, None, coeffs),
            (x, gate, c0, None, None, None),
        ],
        "forecast_residual_norm_modulate": [
            (x, gate, c0, c1, c2, coeffs, shift, scale, 1e-6),
            (x, None, c0, c1, None, coeffs, shift, scale, 1e-5),
            (x, gate, c0, None, None, None, shift, scale, 1e-6),
        ],
    }


@pytest.mark.parametrize("name", ["forecast_gated_residual", "forecast_residual_norm_modulate"])
def test_opcheck(backend, device, name):
    op = registered(backend, name)
    for args in op_cases(device)[name]:
        torch.library.opcheck(op, args)


class ForecastBlock(torch.nn.Module):
    """What a forecast step of a DiT block runs: the fused boundary, then the second unit."""

    def forward(self, x, emb, attn_history, ff_history, coeffs):
        shift, scale, gate, shift2, scale2, gate2 = emb.chunk(6, dim=1)
        x, h = hk.forecast_residual_norm_modulate(x, gate, *attn_history, coeffs, shift2, scale2, 1e-6)
        return hk.forecast_gated_residual(x, gate2, *ff_history, coeffs) + h


def test_compile_fullgraph(backend, device):
    """One graph serves every coefficient value: they are read from the device tensor."""
    B, N, D = 2, 5, 24
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=gen).to(device)
    emb = torch.randn(B, 6 * D, generator=gen).to(device)
    attn_history = [torch.randn(B, N, D, generator=gen).to(device, torch.bfloat16) for _ in range(3)]
    ff_history = [
        torch.randn(B, N, D, generator=gen).to(device),
        torch.randn(B, N, D, generator=gen).to(device),
    ]
    ff_history.append(None)  # first order
    coeffs = torch.tensor(COEFFS, device=device)
    block = ForecastBlock()
    torch._dynamo.reset()
    # aot_eager: the ops traced through their fakes, without inductor's slow C++ codegen
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter, dynamic=False)
    with torch.no_grad():
        for a, b in (COEFFS, (1.0, 0.5), (-0.25, 0.0)):
            coeffs.copy_(torch.tensor([a, b]))
            torch.testing.assert_close(
                compiled(x, emb, attn_history, ff_history, coeffs),
                block(x, emb, attn_history, ff_history, coeffs),
            )
    assert counter.frame_count == 1


def test_requires_grad_is_refused_clearly(backend, device):
    """Inference-only: the public functions refuse inputs that require grad (under grad mode) and
    run them under no_grad; a direct call of the registered op fails clearly at backward."""
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.float32, "chunk", device
    )
    x_grad = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="forecast_gated_residual is inference-only"):
        hk.forecast_gated_residual(x_grad, gate, *history, coeffs)
    with pytest.raises(RuntimeError, match="forecast_residual_norm_modulate is inference-only"):
        hk.forecast_residual_norm_modulate(x, gate, *history, coeffs.clone().requires_grad_(), shift, scale)
    with torch.no_grad():
        close(
            hk.forecast_gated_residual(x_grad, gate, *history, coeffs),
            ref.forecast_gated_residual(x, gate, *history, coeffs),
        )
    if backend in PREFIX:
        out = registered(backend, "forecast_gated_residual")(x_grad, gate, *history, coeffs)
        with pytest.raises(RuntimeError, match="inference-only"):
            out.sum().backward()


# --------------------------------------------------------------------------------------- bad input


def test_bad_input_messages(backend, device):
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.float32, "chunk", device
    )
    c0, c1, c2 = history
    f = hk.forecast_gated_residual
    with pytest.raises(ValueError, match="c2 given without c1"):
        f(x, gate, c0, None, c2, coeffs)
    with pytest.raises(ValueError, match="c2 given without c1"):
        hk.forecast_residual_norm_modulate(x, gate, c0, None, c2, coeffs, shift, scale)
    with pytest.raises(ValueError, match=r"coeffs \(a, b\) is required"):
        f(x, gate, c0, c1, c2)
    with pytest.raises(ValueError, match=r"coeffs must have shape \[2\]"):
        f(x, gate, c0, c1, c2, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match=r"coeffs must have shape \[2\]"):
        f(x, gate, c0, c1, c2, torch.zeros(1, 2, device=device))
    with pytest.raises(TypeError, match="coeffs must be float32"):
        f(x, gate, c0, c1, c2, coeffs.double())
    with pytest.raises(ValueError, match="coeffs is on meta but x is on"):
        f(x, gate, c0, c1, c2, coeffs.to("meta"))
    with pytest.raises(ValueError, match="coeffs must be a pair of floats"):
        f(x, gate, c0, c1, c2, (1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match="coeffs must be a float32 tensor"):
        f(x, gate, c0, c1, c2, "ab")
    with pytest.raises(ValueError, match="c0 shares memory with x"):
        f(x, gate, x, c1, c2, coeffs)
    with pytest.raises(ValueError, match="c1 shares memory with x"):
        hk.forecast_residual_norm_modulate(x, gate, c0, x[:, :], c2, coeffs, shift, scale)
    with pytest.raises(TypeError, match="c1 has dtype torch.bfloat16 but c0 has torch.float32"):
        f(x, gate, c0, c1.bfloat16(), c2, coeffs)
    with pytest.raises(ValueError, match="c2 must have x's shape"):
        f(x, gate, c0, c1, c2[:, :3], coeffs)
    with pytest.raises(ValueError, match="c1 is on meta but x is on"):
        f(x, gate, c0, c1.to("meta"), c2, coeffs)
    with pytest.raises(TypeError, match="c0 must be float32, float16 or bfloat16"):
        f(x, gate, c0.double(), c1.double(), None, coeffs)
    with pytest.raises(ValueError, match=r"x must be \[B, N, D\]"):
        f(x[0], gate, c0[0], c1[0], None, coeffs)
    with pytest.raises(ValueError, match=r"gate must be \[B, D\] or \[B, 1, D\]"):
        f(x, gate[:, :7], c0, c1, c2, coeffs)
    with pytest.raises(ValueError, match="shift is required"):
        hk.forecast_residual_norm_modulate(x, gate, c0, c1, c2, coeffs, None, scale)


def test_direct_op_calls_fail_cleanly(backend, device):
    """Callers that bypass the Python checks still get a clear error from the op's own checks."""
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.float32, "chunk", device
    )
    c0, c1, c2 = history
    op = registered(backend, "forecast_gated_residual")
    norm_op = registered(backend, "forecast_residual_norm_modulate")
    errors = (RuntimeError, ValueError)
    with pytest.raises(errors, match="c2 given without c1"):
        op(x, gate, c0, None, c2, coeffs)
    with pytest.raises(errors, match="coeffs"):
        op(x, gate, c0, c1, c2, None)
    with pytest.raises(errors, match="coeffs"):
        op(x, gate, c0, c1, c2, coeffs[:1].contiguous())
    with pytest.raises(errors, match="coeffs"):
        norm_op(x, gate, c0, c1, c2, coeffs.double(), shift, scale, 1e-6)
    with pytest.raises(errors, match="shares memory with x"):
        op(x, gate, x, c1, c2, coeffs)
    with pytest.raises(errors, match="shape"):
        norm_op(x, gate, c0, c1[:, :3].contiguous(), c2, coeffs, shift, scale, 1e-6)
    with pytest.raises(errors, match="store the history in one dtype"):
        op(x, gate, c0, c1.half(), c2, coeffs)


def test_eager_calls_skip_the_registered_op(backend, device):
    """Eager calls reach the backend directly: the Triton launcher without the triton_* custom_op
    (nothing registered shows up in the profile), the C++ op through its own dispatcher entry."""
    if backend not in PREFIX:
        pytest.skip("the torch backend is the reference itself, not a registered op")
    x, gate, history, shift, scale, coeffs = make_forecast_inputs(
        (2, 5, 24), torch.float32, torch.float32, "chunk", device
    )
    with torch.profiler.profile() as prof:
        hk.forecast_gated_residual(x, gate, *history, coeffs)
        hk.forecast_residual_norm_modulate(x, gate, *history, coeffs, shift, scale)
    names = {e.name for e in prof.events() if e.name.startswith("harmonica::")}
    if backend == "triton":
        assert not names, names
    else:
        assert names <= {
            "harmonica::forecast_gated_residual",
            "harmonica::forecast_residual_norm_modulate",
        }, names

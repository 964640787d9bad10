"""Pure-torch reference implementations of the harmonica ops.

This is the single oracle: the ``torch`` backend, the test reference and the benchmark
baseline all call these functions. Arithmetic is done in fp32 whatever the input dtype (fp64
for fp64 inputs, which only the reference accepts, for gradcheck) and rounded once to the output
dtype: the contract every fused backend follows.

Shapes: ``x``, ``branch``, ``y``, ``cache`` are ``[B, N, D]``; ``gate``, ``shift``, ``scale`` are
``[B, D]`` or ``[B, 1, D]`` (batch 1 broadcasts); ``r`` holds one element.

Forecasting (Taylor / finite differences in the step index). A unit's history is up to three
``[B, N, D]`` buffers ``c0`` (newest computed output), ``c1``, ``c2`` (oldest), in any of the three
float dtypes (bf16 history halves its memory), and ``coeffs``, an fp32 ``[2]`` tensor ``(a, b)``
on x's device, read by the kernels from device memory (no host sync; a CUDA graph or a compiled
graph serves every step, whatever the coefficients). The forecast read is

    v = c0 + a * (c0 - c1) + b * (c0 - 2 * c1 + c2),   out = x + gate * v

with order 0 (``c1 = c2 = None``: plain reuse, ``coeffs`` ignored), order 1 (``c2 = None``: ``b``
ignored) or order 2. There is no history-update op: a compute step writes its fresh output into
the *oldest* buffer with :func:`gated_residual_update_` (``out = x + gate * branch``,
``cache[:] = branch`` in the same pass) and the caller rotates its Python references
``(c0, c1, c2) <- (oldest, c0, c1)``: indices rotate, tensors never move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_row(v: torch.Tensor) -> torch.Tensor:
    """View a ``[B, D]`` or ``[B, 1, D]`` per-sample vector as ``[B, 1, D]`` (never a copy)."""
    return v.unsqueeze(1) if v.dim() == 2 else v


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: fp32, or fp64 for fp64 tensors."""
    return t if t.dtype == torch.float64 else t.float()


def _gated(x: torch.Tensor, gate: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``x + gate * value`` in the accumulation dtype (``x + value`` when gate is None)."""
    if gate is None:
        return _acc(x) + _acc(value)
    return torch.addcmul(_acc(x), _acc(as_row(gate)), _acc(value))


def cached_gated_residual(x: torch.Tensor, gate: torch.Tensor | None, cache: torch.Tensor) -> torch.Tensor:
    """``out = x + gate * cache``: the residual of a unit served from the cache."""
    return _gated(x, gate, cache).to(x.dtype)


def gated_residual_update_(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """``out = x + gate * branch`` and ``cache[:] = branch`` (rounded to the cache's dtype)."""
    out = _gated(x, gate, branch).to(x.dtype)
    cache.copy_(branch)
    return out


def routed_gated_residual(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """``out = x + gate * (r * branch + (1 - r) * cache)``; differentiable in x, gate, branch, r."""
    mixed = torch.lerp(_acc(cache), _acc(branch), _acc(r).reshape(()))
    return _gated(x, gate, mixed).to(x.dtype)


def routed_gated_residual_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor | None,
    branch: torch.Tensor,
    cache: torch.Tensor,
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_branch, grad_gate, grad_r)`` of :func:`routed_gated_residual`.

    ``grad_x`` is ``grad_out`` itself. ``grad_gate`` has the gate's shape (empty when gate is None);
    reductions over tokens and batch are accumulated in fp32.
    """
    g = _acc(grad_out)
    rf = _acc(r).reshape(())
    g_gated = g if gate is None else g * _acc(as_row(gate))
    grad_branch = (g_gated * rf).to(branch.dtype)
    grad_r = (g_gated * (_acc(branch) - _acc(cache))).sum().reshape(r.shape).to(r.dtype)
    if gate is None:
        grad_gate = grad_out.new_empty(0)
    else:
        mixed = torch.lerp(_acc(cache), _acc(branch), rf)
        per_row = (g * mixed).sum(dim=1, keepdim=True)  # [B, 1, D]
        if gate.shape[0] == 1:
            per_row = per_row.sum(dim=0, keepdim=True)
        grad_gate = per_row.reshape(gate.shape).to(gate.dtype)
    return grad_branch, grad_gate, grad_r


def gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    cache: torch.Tensor | None = None,
    reuse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-boundary fusion.

    ``x_out = x + gate * (cache if reuse else y)``; when ``cache`` is given and not ``reuse``,
    ``cache[:] = y``. Then ``h = LayerNorm(x_out) * (1 + scale) + shift`` over the last dim
    (no affine weights, biased variance). Returns ``(x_out, h)`` in x's dtype; ``h`` is computed
    from the fp32 ``x_out`` before rounding.
    """
    value = cache if reuse else y
    x_out = _gated(x, gate, value)
    if cache is not None and not reuse:
        cache.copy_(y)
    h = F.layer_norm(x_out, (x.shape[-1],), eps=eps)
    h = torch.addcmul(_acc(as_row(shift)), h, 1 + _acc(as_row(scale)))
    return x_out.to(x.dtype), h.to(x.dtype)


def _forecast(
    c0: torch.Tensor, c1: torch.Tensor | None, c2: torch.Tensor | None, coeffs: torch.Tensor | None
) -> torch.Tensor:
    """``c0 + a (c0 - c1) + b (c0 - 2 c1 + c2)`` in the accumulation dtype; order from which of
    c1/c2 are given (order 0: c0 itself)."""
    v0 = _acc(c0)
    if c1 is None:
        return v0
    a = _acc(coeffs[0])
    first = v0 - _acc(c1)  # c0 - c1
    if c2 is None:
        return v0 + a * first
    b = _acc(coeffs[1])
    second = first - (_acc(c1) - _acc(c2))  # c0 - 2 c1 + c2
    return v0 + a * first + b * second


def forecast_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    c0: torch.Tensor,
    c1: torch.Tensor | None = None,
    c2: torch.Tensor | None = None,
    coeffs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = x + gate * (c0 + a (c0 - c1) + b (c0 - 2 c1 + c2))`` with ``(a, b) = coeffs``:
    the residual of a unit forecast from its history (orders 0-2, see the module docstring)."""
    return _gated(x, gate, _forecast(c0, c1, c2, coeffs)).to(x.dtype)


def forecast_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    c0: torch.Tensor,
    c1: torch.Tensor | None,
    c2: torch.Tensor | None,
    coeffs: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forecast read fused with the block boundary: ``x_out`` as
    :func:`forecast_gated_residual`, then ``h = LayerNorm(x_out) * (1 + scale) + shift`` from the
    fp32 ``x_out`` (no affine, biased variance), as :func:`gated_residual_norm_modulate` with
    ``reuse=True``. Returns ``(x_out, h)`` in x's dtype."""
    x_out = _gated(x, gate, _forecast(c0, c1, c2, coeffs))
    h = F.layer_norm(x_out, (x.shape[-1],), eps=eps)
    h = torch.addcmul(_acc(as_row(shift)), h, 1 + _acc(as_row(scale)))
    return x_out.to(x.dtype), h.to(x.dtype)

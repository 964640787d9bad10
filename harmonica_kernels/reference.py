"""Pure-torch reference implementations of the harmonica ops.

This is the single oracle: the ``torch`` backend, the test reference and the benchmark
baseline all call these functions. Arithmetic is done in fp32 whatever the input dtype and
rounded once to the output dtype, which is the contract every fused backend follows.

Shapes: ``x``, ``branch``, ``y``, ``cache`` are ``[B, N, D]``; ``gate``, ``shift``, ``scale`` are
``[B, D]`` or ``[B, 1, D]`` (batch 1 broadcasts); ``r`` holds one element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_row(v: torch.Tensor) -> torch.Tensor:
    """View a ``[B, D]`` or ``[B, 1, D]`` per-sample vector as ``[B, 1, D]`` (never a copy)."""
    return v.unsqueeze(1) if v.dim() == 2 else v


def _gated(x: torch.Tensor, gate: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``x + gate * value`` in fp32 (``x + value`` when gate is None)."""
    if gate is None:
        return x.float() + value.float()
    return torch.addcmul(x.float(), as_row(gate).float(), value.float())


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
    rf = r.float().reshape(())
    mixed = torch.lerp(cache.float(), branch.float(), rf)
    return _gated(x, gate, mixed).to(x.dtype)


def routed_gated_residual_backward(
    grad_out: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_branch, grad_gate, grad_r)`` of :func:`routed_gated_residual`.

    ``grad_x`` is ``grad_out`` itself. ``grad_gate`` has the gate's shape (empty when gate is None);
    reductions over tokens and batch are accumulated in fp32.
    """
    g = grad_out.float()
    rf = r.float().reshape(())
    gate_f = as_row(gate).float() if gate is not None else None
    g_gated = g * gate_f if gate_f is not None else g
    grad_branch = (g_gated * rf).to(branch.dtype)
    grad_r = (g_gated * (branch.float() - cache.float())).sum().reshape(r.shape).to(r.dtype)
    if gate is None:
        grad_gate = grad_out.new_empty(0)
    else:
        mixed = torch.lerp(cache.float(), branch.float(), rf)
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
    h = torch.addcmul(as_row(shift).float(), h, 1 + as_row(scale).float())
    return x_out.to(x.dtype), h.to(x.dtype)


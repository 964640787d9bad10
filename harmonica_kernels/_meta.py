"""Fake (meta) implementations and autograd wiring shared by every registered backend.

The C++ ops (``harmonica::*``) and the Triton ops (``harmonica::triton_*``) have the same
signatures, so one set of fake functions and one backward formula serve both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _check_devices(x: torch.Tensor, *others: torch.Tensor | None) -> None:
    """Tensors on mixed devices where one is ``meta`` dispatch to these fakes, not to a device kernel
    that would reject them: refuse them here too (the public functions then explain)."""
    for t in others:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"harmonica: a tensor is on {t.device} but x is on {x.device}")


def fake_cached_gated_residual(x, gate, cache):
    _check_devices(x, gate, cache)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_gated_residual_update_(x, gate, branch, cache):
    _check_devices(x, gate, branch, cache)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_routed_gated_residual(x, gate, branch, cache, r):
    _check_devices(x, gate, branch, cache, r)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_routed_gated_residual_backward(grad_out, gate, branch, cache, r):
    grad_branch = torch.empty_like(branch, memory_format=torch.contiguous_format)
    if gate is None:
        grad_gate = grad_out.new_empty(0)
    else:
        grad_gate = gate.new_empty(gate.shape)
    grad_r = torch.empty_like(r, memory_format=torch.contiguous_format)
    return grad_branch, grad_gate, grad_r


def fake_gated_residual_norm_modulate(x, gate, y, shift, scale, eps, cache, reuse):
    _check_devices(x, gate, y, shift, scale, cache)
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x_out, h


def fake_forecast_gated_residual(x, gate, c0, c1, c2, coeffs):
    _check_devices(x, gate, c0, c1, c2, coeffs)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_forecast_residual_norm_modulate(x, gate, c0, c1, c2, coeffs, shift, scale, eps):
    _check_devices(x, gate, c0, c1, c2, coeffs, shift, scale)
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x_out, h


FAKES: dict[str, Callable] = {
    "cached_gated_residual": fake_cached_gated_residual,
    "gated_residual_update_": fake_gated_residual_update_,
    "routed_gated_residual": fake_routed_gated_residual,
    "routed_gated_residual_backward": fake_routed_gated_residual_backward,
    "gated_residual_norm_modulate": fake_gated_residual_norm_modulate,
    "forecast_gated_residual": fake_forecast_gated_residual,
    "forecast_residual_norm_modulate": fake_forecast_residual_norm_modulate,
}

# Inference-only ops: no gradient formula (the forecast reads serve cached steps of a sampler).
INFERENCE_ONLY = ("forecast_gated_residual", "forecast_residual_norm_modulate")


def register_fakes(prefix: str = "") -> None:
    """Register the fake impls for ``harmonica::{prefix}{name}`` for every op name."""
    for name, fn in FAKES.items():
        torch.library.register_fake(f"harmonica::{prefix}{name}", fn)


def register_inference_only(prefix: str = "") -> None:
    """Give the inference-only ops an autograd formula that refuses clearly: a direct call of
    ``torch.ops.harmonica.{prefix}forecast_*`` with inputs that require grad then fails at
    backward with this message, not with the dispatcher's generic one. (The public functions
    refuse such calls before running anything.)"""
    for name in INFERENCE_ONLY:

        def backward(ctx, *grads, _name=name):
            raise RuntimeError(
                f"harmonica: {_name} is inference-only and has no gradient formula; call it under "
                "torch.no_grad() or torch.inference_mode(), or pass detached tensors"
            )

        torch.library.register_autograd(f"harmonica::{prefix}{name}", backward)


def register_routed_autograd(prefix: str = "") -> None:
    """Make ``harmonica::{prefix}routed_gated_residual`` differentiable in x, gate, branch and r
    through its backward op ``harmonica::{prefix}routed_gated_residual_backward``.
    The cache gets no gradient (it holds detached values by design)."""
    backward_op = getattr(torch.ops.harmonica, f"{prefix}routed_gated_residual_backward").default

    def setup_context(ctx, inputs, output):
        _, gate, branch, cache, r = inputs
        ctx.has_gate = gate is not None
        ctx.save_for_backward(gate, branch, cache, r)

    def backward(ctx, grad_out):
        gate, branch, cache, r = ctx.saved_tensors
        grad_branch, grad_gate, grad_r = backward_op(grad_out.contiguous(), gate, branch, cache, r)
        return grad_out, (grad_gate if ctx.has_gate else None), grad_branch, None, grad_r

    torch.library.register_autograd(
        f"harmonica::{prefix}routed_gated_residual", backward, setup_context=setup_context
    )

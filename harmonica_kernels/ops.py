"""Public functions of the op layer: validate arguments, then call the active backend.

Every function follows the contract of :mod:`harmonica_kernels.reference` (which states the
maths): ``x``/``branch``/``y``/``cache`` are ``[B, N, D]``; ``gate``/``shift``/``scale`` are
``[B, D]`` or ``[B, 1, D]`` with batch B or 1, possibly strided views from ``chunk()`` (passed to
the kernels without a copy as long as their last dim has unit stride); fp32/fp16/bf16 with fp32
arithmetic; the cache may be stored in a different float dtype than the activations.

Forecasting: :func:`forecast_gated_residual` and :func:`forecast_residual_norm_modulate` read a
unit's history ``c0`` (newest) ``c1``, ``c2`` and the device-side coefficients ``coeffs = (a, b)``.
They are inference-only (no gradient formula). There is no history-update op: on a compute step
the engine writes the fresh output into its *oldest* history buffer with
:func:`gated_residual_update_` and rotates its Python references ``(c0, c1, c2) <- (oldest, c0,
c1)`` -- indices rotate, tensors never move or get copied.

Dispatch. Each call is validated once, then runs one of two paths:

- eager (the common case: not traced by ``torch.compile``, no gradient needed): the backend's
  function is called directly, without the ``custom_op``/``OpOverload`` layers (``_backend._eager``).
  The C++ ops (cpp, cuda backends) check their own arguments in C++ for memory safety, at no cost
  worth measuring, so with those backends the Python checks below run only when the op rejects its
  input: they then say what was wrong in the user's terms (or normalise an accepted input the op
  does not take, e.g. a non-contiguous x, and call again). The torch and triton backends' eager
  functions trust their caller: the Python checks run before them.
- traced or differentiable: the registered op (``torch.ops.harmonica.*``), which ``torch.compile``,
  ``opcheck`` and autograd need. Under ``torch.compile`` the Python checks run at trace time only.
"""

from __future__ import annotations

import torch

from . import _backend
from ._backend import backend_module

# A C++ op rejecting its input raises RuntimeError (TORCH_CHECK, a missing kernel) or, for the
# wrong Python types, TypeError; TORCH_CHECK_VALUE raises ValueError.
_OP_ERRORS = (RuntimeError, TypeError, ValueError)
_is_compiling = torch.compiler.is_compiling


def _self_checked(x: object):
    """The C++ eager functions for x's device when the active backend is cpp/cuda, else None.
    Only plain tensors in eager mode take this path (subclasses and traced calls are validated)."""
    if type(x) is torch.Tensor and not _is_compiling():
        return _backend.self_checked[x.is_cuda]
    return None


def _outside(cache: torch.Tensor, *rows: torch.Tensor | None) -> bool:
    """Whether no per-sample row starts inside ``cache`` (the C++ ops check x and the branch against
    the buffer they write, not the modulation rows; a row that does goes through full validation)."""
    start = cache.data_ptr()
    end = start + cache.numel() * cache.element_size()
    return all(r is None or not start <= r.data_ptr() < end for r in rows)


def _impl(x: torch.Tensor, *inputs: torch.Tensor | None):
    """After validation: the active backend's eager functions, or its registered ops when traced
    by torch.compile or when a gradient must flow through one of ``inputs``."""
    if _is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    ):
        return backend_module(x.device)
    eager = _backend.eager_for[x.is_cuda]
    # None: the forced backend cannot run on this device; backend_module raises the reason.
    return eager if eager is not None else backend_module(x.device)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_NAMES = "float32, float16 or bfloat16"


def _activation(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, D] (batch, tokens, width), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be {_FLOAT_NAMES}, got {x.dtype}; cast the model or inputs with .to()")
    return x.contiguous()


def _like_x(t: torch.Tensor, x: torch.Tensor, name: str, *, same_dtype: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move both to one device")
    if same_dtype and t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be {_FLOAT_NAMES}, got {t.dtype}")
    return t.contiguous()


def _written(cache: torch.Tensor, x: torch.Tensor, reads: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Checks a buffer that the op overwrites in place: x's shape, contiguous, not aliasing inputs."""
    _like_x(cache, x, "cache", same_dtype=False)
    if not cache.is_contiguous():
        raise ValueError(
            "cache is written in place and must be contiguous; allocate it with torch.empty_like(x)"
        )
    if not torch.compiler.is_compiling():
        start = cache.data_ptr()
        end = start + cache.numel() * cache.element_size()
        for name, t in reads.items():
            if not isinstance(t, torch.Tensor):  # None (no gate); other types fail their own check
                continue
            t_start = t.data_ptr()
            if t_start < end and start < t_start + t.numel() * t.element_size():
                raise ValueError(f"cache shares memory with {name}; pass a separate buffer ({name}.clone())")
    return cache


def _row(v: torch.Tensor | None, x: torch.Tensor, name: str, *, optional: bool = True) -> torch.Tensor | None:
    """A per-sample vector [B, D] / [B, 1, D]; kept as the caller's (strided) view when possible."""
    if v is None:
        if optional:
            return None
        raise ValueError(f"{name} is required")
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    batch, width = x.shape[0], x.shape[2]
    shape_ok = (v.dim() == 2 and v.shape[1] == width) or (
        v.dim() == 3 and v.shape[1] == 1 and v.shape[2] == width
    )
    if not shape_ok or v.shape[0] not in (batch, 1):
        raise ValueError(
            f"{name} must be [B, D] or [B, 1, D] with B={batch} (or 1) and D={width}, got {tuple(v.shape)}"
        )
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}; move both to one device")
    if v.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {v.dtype} but x has {x.dtype}; they must match")
    return v if v.stride(-1) == 1 else v.contiguous()


def cached_gated_residual(x: torch.Tensor, gate: torch.Tensor | None, cache: torch.Tensor) -> torch.Tensor:
    """``out = x + gate * cache`` — a unit served from the cache (its branch is not run).

    Args:
        x: ``[B, N, D]`` residual stream, fp32/fp16/bf16.
        gate: ``[B, D]``/``[B, 1, D]`` in x's dtype (strided views accepted), or None for ``x + cache``.
        cache: ``[B, N, D]`` cached branch output, any of the three float dtypes.
    Returns:
        A new contiguous ``[B, N, D]`` tensor in x's dtype.
    """
    checked = _self_checked(x)
    if checked is not None:
        try:
            return checked.cached_gated_residual(x, gate, cache)
        except _OP_ERRORS:
            pass  # validated below: a clear error, or a normalised input the op accepts
    x = _activation(x)
    cache = _like_x(cache, x, "cache", same_dtype=False)
    gate = _row(gate, x, "gate")
    return _impl(x, x, gate, cache).cached_gated_residual(x, gate, cache)


def gated_residual_update_(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """``out = x + gate * branch`` and ``cache[:] = branch``, in one pass over memory.

    ``cache`` (``[B, N, D]``, contiguous, any float dtype, not aliasing x or branch) is overwritten
    in place; x and branch are only read. Returns a new tensor in x's dtype.
    """
    checked = _self_checked(x)
    if checked is not None and _outside(cache, gate):
        try:
            return checked.gated_residual_update_(x, gate, branch, cache)
        except _OP_ERRORS:
            pass  # validated below: a clear error, or a normalised input the op accepts
    x = _activation(x)
    branch = _like_x(branch, x, "branch", same_dtype=True)
    cache = _written(cache, x, {"x": x, "branch": branch, "gate": gate})
    gate = _row(gate, x, "gate")
    return _impl(x, x, gate, branch).gated_residual_update_(x, gate, branch, cache)


def routed_gated_residual(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Training blend ``out = x + gate * (r * branch + (1 - r) * cache)``.

    Differentiable in x, gate, branch and r (a one-element tensor, e.g. a router's sigmoid); the
    cache holds detached values and receives no gradient, and it is not written here.
    """
    x = _activation(x)
    branch = _like_x(branch, x, "branch", same_dtype=True)
    cache = _like_x(cache, x, "cache", same_dtype=False)
    if cache.requires_grad:
        raise ValueError("cache must be detached (cache.detach()): no gradient flows into cached values")
    if not isinstance(r, torch.Tensor) or r.numel() != 1 or not r.is_floating_point():
        raise ValueError(f"r must be a one-element floating tensor, got {r!r}")
    if r.device != x.device:
        raise ValueError(f"r is on {r.device} but x is on {x.device}; move both to one device")
    gate = _row(gate, x, "gate")
    return _impl(x, x, gate, branch, r).routed_gated_residual(x, gate, branch, cache, r)


def gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    cache: torch.Tensor | None = None,
    reuse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual + LayerNorm + adaLN modulate at a block boundary, in one pass.

    ``x_out = x + gate * v`` where ``v = cache`` if ``reuse`` else ``y`` (and ``cache[:] = y`` when a
    cache is given without ``reuse``); then ``h = LayerNorm(x_out) * (1 + scale) + shift`` over D,
    without affine weights. Returns ``(x_out, h)``, both new ``[B, N, D]`` tensors in x's dtype.
    """
    checked = _self_checked(x)
    if checked is not None and (reuse or cache is None or _outside(cache, gate, shift, scale)):
        try:
            return checked.gated_residual_norm_modulate(
                x, gate, y, shift, scale, float(eps), cache, bool(reuse)
            )
        except _OP_ERRORS:
            pass  # validated below: a clear error, or a normalised input the op accepts
    x = _activation(x)
    if reuse:
        if cache is None or y is not None:
            raise ValueError("reuse=True reads the branch from `cache`: pass cache=... and y=None")
        cache = _like_x(cache, x, "cache", same_dtype=False)
    else:
        if y is None:
            raise ValueError("y (the branch output) is required unless reuse=True")
        y = _like_x(y, x, "y", same_dtype=True)
        if cache is not None:
            cache = _written(cache, x, {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale})
    gate = _row(gate, x, "gate")
    shift = _row(shift, x, "shift", optional=False)
    scale = _row(scale, x, "scale", optional=False)
    return _impl(x, x, gate, y, shift, scale).gated_residual_norm_modulate(
        x, gate, y, shift, scale, float(eps), cache, bool(reuse)
    )


# ---- forecasting -----------------------------------------------------------------------------


def _inference_only(name: str, *tensors: object) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"harmonica: {name} is inference-only and has no gradient formula; call it under "
            "torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )


def _history(
    x: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor | None, c2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The history buffers: x's shape and device, one float dtype for all three (x's or another),
    none of them sharing memory with x."""
    if c2 is not None and c1 is None:
        raise ValueError("c2 given without c1: a second-order forecast needs c0, c1 and c2 (pass c1)")
    checked = []
    for name, c in (("c0", c0), ("c1", c1), ("c2", c2)):
        if c is None:
            checked.append(None)
            continue
        c = _like_x(c, x, name, same_dtype=False)
        if c.dtype != c0.dtype:
            raise TypeError(
                f"{name} has dtype {c.dtype} but c0 has {c0.dtype}; store the history in one dtype"
            )
        if not _is_compiling():
            start, t_start = x.data_ptr(), c.data_ptr()
            end, t_end = start + x.numel() * x.element_size(), t_start + c.numel() * c.element_size()
            if t_start < end and start < t_end:
                raise ValueError(
                    f"{name} shares memory with x; the history holds the unit's cached outputs, not the "
                    "residual stream"
                )
        checked.append(c)
    return checked[0], checked[1], checked[2]


def _coeff_tensor(coeffs: object, x: torch.Tensor) -> torch.Tensor:
    """``coeffs`` as the fp32 ``[2]`` device tensor the kernels read; a tuple/list is converted."""
    if coeffs is None:
        raise ValueError("coeffs (a, b) is required for a forecast of order 1 or 2 (c1 given)")
    if isinstance(coeffs, (tuple, list)):
        return _coeffs_from_sequence(coeffs, x)
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(
            f"coeffs must be a float32 tensor of shape [2] or a pair of floats, got {type(coeffs).__name__}"
        )
    if coeffs.shape != (2,):
        raise ValueError(f"coeffs must have shape [2] (a, b), got {tuple(coeffs.shape)}")
    if coeffs.dtype != torch.float32:
        raise TypeError(f"coeffs must be float32, got {coeffs.dtype}")
    if coeffs.device != x.device:
        raise ValueError(
            f"coeffs is on {coeffs.device} but x is on {x.device}; keep the coefficients on x's device "
            "(the kernel reads them there, without a host sync)"
        )
    return coeffs.contiguous()


def _coeffs_from_sequence(coeffs: tuple | list, x: torch.Tensor) -> torch.Tensor:
    if len(coeffs) != 2 or not all(isinstance(c, (int, float)) for c in coeffs):
        raise ValueError(f"coeffs must be a pair of floats (a, b), got {coeffs!r}")
    return torch.tensor([float(c) for c in coeffs], dtype=torch.float32, device=x.device)


def forecast_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    c0: torch.Tensor,
    c1: torch.Tensor | None = None,
    c2: torch.Tensor | None = None,
    coeffs: torch.Tensor | tuple[float, float] | list[float] | None = None,
) -> torch.Tensor:
    """``out = x + gate * (c0 + a (c0 - c1) + b (c0 - 2 c1 + c2))`` in one pass over memory.

    The residual of a unit forecast from its last computed outputs (TaylorSeer-style finite
    differences in the step index). Inference-only: inputs that require grad (with grad enabled)
    are refused.

    Args:
        x: ``[B, N, D]`` residual stream, fp32/fp16/bf16.
        gate: ``[B, D]``/``[B, 1, D]`` in x's dtype (batch B or 1, strided views accepted), or None.
        c0, c1, c2: ``[B, N, D]`` history, newest first, in one float dtype (may differ from x's,
            e.g. bf16 history under fp32 activations). ``c1 = c2 = None``: plain reuse
            (``x + gate * c0``, ``coeffs`` ignored); ``c2 = None``: first order (``b`` ignored);
            all three: second order. ``c2`` without ``c1`` is an error.
        coeffs: ``(a, b)`` as a float32 tensor of shape ``[2]`` on x's device, read by the kernel
            from device memory, so a CUDA graph or compiled graph needs nothing recompiled or
            re-captured when the coefficients change between steps. A Python pair of floats is
            also accepted and converted here, which on a GPU costs a host-to-device copy per call
            (and cannot be captured in a CUDA graph): keep a device tensor per step instead.
    Returns:
        A new contiguous ``[B, N, D]`` tensor in x's dtype; nothing is written in place.
    """
    _inference_only("forecast_gated_residual", x, gate, c0, c1, c2, coeffs)
    if c1 is None:
        if c2 is not None:
            raise ValueError("c2 given without c1: a second-order forecast needs c0, c1 and c2 (pass c1)")
        return cached_gated_residual(x, gate, c0)
    checked = _self_checked(x)
    if checked is not None:
        try:
            device_coeffs = _coeffs_from_sequence(coeffs, x) if isinstance(coeffs, (tuple, list)) else coeffs
            return checked.forecast_gated_residual(x, gate, c0, c1, c2, device_coeffs)
        except _OP_ERRORS:
            pass  # validated below: a clear error, or a normalised input the op accepts
    x = _activation(x)
    c0, c1, c2 = _history(x, c0, c1, c2)
    coeffs = _coeff_tensor(coeffs, x)
    gate = _row(gate, x, "gate")
    return _impl(x).forecast_gated_residual(x, gate, c0, c1, c2, coeffs)


def forecast_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    c0: torch.Tensor,
    c1: torch.Tensor | None,
    c2: torch.Tensor | None,
    coeffs: torch.Tensor | tuple[float, float] | list[float] | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forecast read fused with the block boundary, in one pass over memory.

    ``x_out = x + gate * (c0 + a (c0 - c1) + b (c0 - 2 c1 + c2))`` as
    :func:`forecast_gated_residual` (same orders, history and ``coeffs`` conventions), then
    ``h = LayerNorm(x_out) * (1 + scale) + shift`` over D from the fp32 ``x_out`` (no affine
    weights, biased variance), as :func:`gated_residual_norm_modulate` with ``reuse=True``.
    ``shift``/``scale`` like gate, but required. Inference-only. Returns ``(x_out, h)``, both new
    contiguous ``[B, N, D]`` tensors in x's dtype.
    """
    _inference_only("forecast_residual_norm_modulate", x, gate, c0, c1, c2, coeffs, shift, scale)
    if c1 is None:
        if c2 is not None:
            raise ValueError("c2 given without c1: a second-order forecast needs c0, c1 and c2 (pass c1)")
        return gated_residual_norm_modulate(x, gate, None, shift, scale, eps, cache=c0, reuse=True)
    checked = _self_checked(x)
    if checked is not None:
        try:
            device_coeffs = _coeffs_from_sequence(coeffs, x) if isinstance(coeffs, (tuple, list)) else coeffs
            return checked.forecast_residual_norm_modulate(
                x, gate, c0, c1, c2, device_coeffs, shift, scale, float(eps)
            )
        except _OP_ERRORS:
            pass  # validated below: a clear error, or a normalised input the op accepts
    x = _activation(x)
    c0, c1, c2 = _history(x, c0, c1, c2)
    coeffs = _coeff_tensor(coeffs, x)
    gate = _row(gate, x, "gate")
    shift = _row(shift, x, "shift", optional=False)
    scale = _row(scale, x, "scale", optional=False)
    return _impl(x).forecast_residual_norm_modulate(x, gate, c0, c1, c2, coeffs, shift, scale, float(eps))

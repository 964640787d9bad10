"""Public functions of the op layer: validate arguments, then call the active backend.

Every function follows the contract of :mod:`harmonica_kernels.reference` (which states the
maths): ``x``/``branch``/``y``/``cache`` are ``[B, N, D]``; ``gate``/``shift``/``scale`` are
``[B, D]`` or ``[B, 1, D]`` with batch B or 1, possibly strided views from ``chunk()`` (passed to
the kernels without a copy as long as their last dim has unit stride); fp32/fp16/bf16 with fp32
arithmetic; the cache may be stored in a different float dtype than the activations.

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

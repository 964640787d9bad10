"""Public functions of the op layer: validate arguments, then call the active backend.

Every function follows the contract of :mod:`harmonica_kernels.reference` (which states the
maths): ``x``/``branch``/``y``/``cache`` are ``[B, N, D]``; ``gate``/``shift``/``scale`` are
``[B, D]`` or ``[B, 1, D]`` with batch B or 1, possibly strided views from ``chunk()`` (passed to
the kernels without a copy as long as their last dim has unit stride); fp32/fp16/bf16 with fp32
arithmetic; the cache may be stored in a different float dtype than the activations.
"""

from __future__ import annotations

import torch

from ._backend import backend_module

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
    x = _activation(x)
    cache = _like_x(cache, x, "cache", same_dtype=False)
    return backend_module(x.device).cached_gated_residual(x, _row(gate, x, "gate"), cache)


def gated_residual_update_(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """``out = x + gate * branch`` and ``cache[:] = branch``, in one pass over memory.

    ``cache`` (``[B, N, D]``, contiguous, any float dtype, not aliasing x or branch) is overwritten
    in place; x and branch are only read. Returns a new tensor in x's dtype.
    """
    x = _activation(x)
    branch = _like_x(branch, x, "branch", same_dtype=True)
    cache = _written(cache, x, {"x": x, "branch": branch, "gate": gate})
    return backend_module(x.device).gated_residual_update_(x, _row(gate, x, "gate"), branch, cache)


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
    return backend_module(x.device).routed_gated_residual(x, _row(gate, x, "gate"), branch, cache, r)


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
    return backend_module(x.device).gated_residual_norm_modulate(
        x,
        _row(gate, x, "gate"),
        y,
        _row(shift, x, "shift", optional=False),
        _row(scale, x, "scale", optional=False),
        float(eps),
        cache,
        bool(reuse),
    )

"""The Triton backend's entry points: eager functions, and the registered ops ``harmonica::triton_*``.

Each op is a ``torch.library.custom_op`` with the signature of its C++ twin in
``csrc/bindings.cpp``; fake impls and the autograd formula are shared with the C++ backend
(``harmonica_kernels._meta``). ``custom_op`` + an explicit fake passes ``opcheck`` and
``torch.compile(fullgraph=True)`` under ``TRITON_INTERPRET=1``, where ``triton_op`` + ``wrap_triton``
fails opcheck's fake-tensor test.

The eager functions (named like the reference's, collected in ``EAGER``) trust their caller, the
public functions of ``harmonica_kernels.ops``, which validate once; they allocate every output
(contiguous, x's dtype, never a view of an input) and launch one kernel; per-sample vectors are
passed with their batch stride, never copied. The registered ops validate their arguments (clear
``ValueError``s) and then run the eager function.
"""

import contextlib

import torch

from .._meta import register_fakes, register_inference_only, register_routed_autograd
from . import kernels

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# True under TRITON_INTERPRET=1: kernels run on the host over CPU tensors.
INTERPRETED = kernels.INTERPRETED


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 3:
        raise ValueError(f"harmonica: {name} must be [B, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"harmonica: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if not INTERPRETED and x.device.type == "cpu":
        raise ValueError(
            "harmonica: the triton backend needs GPU tensors (set TRITON_INTERPRET=1 before importing "
            "triton to run its kernels on the CPU); use the cpp or torch backend for CPU tensors"
        )


def _check_like_x(t: torch.Tensor, x: torch.Tensor, name: str, same_dtype: bool, x_name: str = "x") -> None:
    if t.shape != x.shape:
        raise ValueError(
            f"harmonica: {name} must have {x_name}'s shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"harmonica: {name} is on {t.device} but {x_name} is on {x.device}")
    if same_dtype and t.dtype != x.dtype:
        raise ValueError(f"harmonica: {name} has dtype {t.dtype} but {x_name} has {x.dtype}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"harmonica: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _row_vector_batch_stride(v: torch.Tensor, x: torch.Tensor, name: str) -> int:
    """Validate a per-sample vector ([B, D] or [B, 1, D], batch B or 1, x's dtype/device, unit
    stride along D) and return its batch stride in elements (0 when it broadcasts)."""
    B, _, D = x.shape
    ok_shape = (v.dim() == 2 and v.shape[1] == D) or (v.dim() == 3 and v.shape[1] == 1 and v.shape[2] == D)
    if not ok_shape or v.shape[0] not in (B, 1):
        raise ValueError(
            f"harmonica: {name} must be [B, D] or [B, 1, D] with B={B} (or 1) and D={D}, got {tuple(v.shape)}"
        )
    if v.device != x.device:
        raise ValueError(f"harmonica: {name} is on {v.device} but x is on {x.device}")
    if v.dtype != x.dtype:
        raise ValueError(f"harmonica: {name} has dtype {v.dtype} but x has {x.dtype}")
    if D > 1 and v.stride(-1) != 1:
        raise ValueError(f"harmonica: {name} must have unit stride along D, got strides {v.stride()}")
    return 0 if v.shape[0] == 1 else v.stride(0)


def _check_r(r: torch.Tensor, x: torch.Tensor) -> None:
    if r.numel() != 1:
        raise ValueError(f"harmonica: r must hold exactly one element, got shape {tuple(r.shape)}")
    if r.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"harmonica: r must be a floating tensor, got {r.dtype}")
    if r.device != x.device:
        raise ValueError(f"harmonica: r is on {r.device} but x is on {x.device}")


def _check_writable_cache(
    cache: torch.Tensor, x: torch.Tensor, reads: dict[str, torch.Tensor | None]
) -> None:
    """The cache is written in place: it must be contiguous and must not share memory with
    anything the kernel reads (other programs may still be reading it)."""
    _check_like_x(cache, x, "cache", same_dtype=False)
    if not cache.is_contiguous():
        raise ValueError(
            "harmonica: cache is written in place and must be contiguous; allocate it with "
            "torch.empty_like(x) (or call .contiguous() once and keep that buffer)"
        )
    for name, t in reads.items():
        if t is not None and torch._C._overlaps(cache, t):
            raise ValueError(
                f"harmonica: cache shares memory with {name}; pass a separate buffer (e.g. {name}.clone())"
            )


def _check_forecast(
    x: torch.Tensor,
    c0: torch.Tensor,
    c1: torch.Tensor | None,
    c2: torch.Tensor | None,
    coeffs: torch.Tensor | None,
) -> None:
    """The history of a forecast read (x's shape and device, one float dtype, not sharing memory
    with x; c2 only with c1) and, from order 1 on, coeffs: fp32 [2] on x's device."""
    if c2 is not None and c1 is None:
        raise ValueError("harmonica: c2 given without c1: a second-order forecast needs c0, c1 and c2")
    for name, c in (("c0", c0), ("c1", c1), ("c2", c2)):
        if c is None:
            continue
        _check_like_x(c, x, name, same_dtype=False)
        if c.dtype != c0.dtype:
            raise ValueError(
                f"harmonica: {name} has dtype {c.dtype} but c0 has {c0.dtype}; store the history in one dtype"
            )
        if torch._C._overlaps(c, x):
            raise ValueError(
                f"harmonica: {name} shares memory with x; the history holds the unit's cached outputs"
            )
    if c1 is None:
        return
    if coeffs is None:
        raise ValueError("harmonica: coeffs (a, b) is required for a forecast of order 1 or 2")
    if coeffs.shape != (2,) or coeffs.dtype != torch.float32 or coeffs.device != x.device:
        raise ValueError(
            f"harmonica: coeffs must be a float32 tensor of shape [2] on {x.device}, got "
            f"{coeffs.dtype} {tuple(coeffs.shape)} on {coeffs.device}"
        )


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make x's GPU current for the launch (triton launches on the current device); no switch, and
    no context manager state, when it already is (the common case: one GPU per process)."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _gate_stride(gate: torch.Tensor | None, x: torch.Tensor) -> int:
    return 0 if gate is None else _row_vector_batch_stride(gate, x, "gate")


def _batch_stride(v: torch.Tensor | None) -> int:
    """Batch stride in elements of an already validated per-sample vector (0 when it broadcasts)."""
    return 0 if v is None or v.shape[0] == 1 else v.stride(0)


# ----------------------------------------------------------------------------------------------
# Eager entry points: what the public functions of harmonica_kernels.ops call outside torch.compile
# and autograd. They trust their caller (the public function has validated and normalised every
# argument: activations contiguous, per-sample vectors with unit stride along D), allocate the
# outputs and launch one kernel.


def cached_gated_residual(x: torch.Tensor, gate: torch.Tensor | None, cache: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with _on_device(x):
        kernels.launch_gated_residual(x, gate, _batch_stride(gate), cache, out, None)
    return out


def gated_residual_update_(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with _on_device(x):
        kernels.launch_gated_residual(x, gate, _batch_stride(gate), branch, out, cache)
    return out


def routed_gated_residual(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with _on_device(x):
        kernels.launch_routed_gated_residual(x, gate, _batch_stride(gate), branch, cache, r, out)
    return out


def routed_gated_residual_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor | None,
    branch: torch.Tensor,
    cache: torch.Tensor,
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_branch = torch.empty_like(branch, memory_format=torch.contiguous_format)
    grad_gate = None if gate is None else gate.new_empty(gate.shape[0], gate.shape[-1])
    grad_r = torch.empty((), dtype=r.dtype, device=r.device)
    with _on_device(grad_out):
        kernels.launch_routed_gated_residual_backward(
            grad_out, gate, _batch_stride(gate), branch, cache, r, grad_branch, grad_gate, grad_r
        )
    grad_gate = grad_out.new_empty(0) if grad_gate is None else grad_gate.reshape(gate.shape)
    return grad_branch, grad_gate, grad_r.reshape(r.shape)


def gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    cache: torch.Tensor | None,
    reuse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    value, cache_out = (cache, None) if reuse else (y, cache)
    return _norm_modulate(x, gate, value, shift, scale, eps, cache_out)


def _norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    value: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    cache_out: torch.Tensor | None,
    history: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``(x_out, h)`` and launch the norm kernel (``history``: the forecast's c1, c2, coeffs)."""
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    with _on_device(x):
        kernels.launch_gated_residual_norm_modulate(
            x,
            gate,
            _batch_stride(gate),
            value,
            shift,
            _batch_stride(shift),
            scale,
            _batch_stride(scale),
            float(eps),
            x_out,
            h,
            cache_out,
            history,
        )
    return x_out, h


def forecast_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    c0: torch.Tensor,
    c1: torch.Tensor | None,
    c2: torch.Tensor | None,
    coeffs: torch.Tensor | None,
) -> torch.Tensor:
    if c1 is None:  # order 0: plain reuse
        return cached_gated_residual(x, gate, c0)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with _on_device(x):
        kernels.launch_gated_residual(x, gate, _batch_stride(gate), c0, out, None, (c1, c2, coeffs))
    return out


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
    if c1 is None:  # order 0: plain reuse
        return gated_residual_norm_modulate(x, gate, None, shift, scale, eps, c0, True)
    return _norm_modulate(x, gate, c0, shift, scale, eps, None, (c1, c2, coeffs))


EAGER = {
    "cached_gated_residual": cached_gated_residual,
    "gated_residual_update_": gated_residual_update_,
    "routed_gated_residual": routed_gated_residual,
    "routed_gated_residual_backward": routed_gated_residual_backward,
    "gated_residual_norm_modulate": gated_residual_norm_modulate,
    "forecast_gated_residual": forecast_gated_residual,
    "forecast_residual_norm_modulate": forecast_residual_norm_modulate,
}


# ----------------------------------------------------------------------------------------------
# Registered ops: what torch.compile graphs, opcheck, autograd and direct ``torch.ops.harmonica``
# callers run. Signatures mirror csrc/bindings.cpp exactly (names, order, types, no defaults).
# Like the C++ ops they check their arguments themselves (a Triton kernel given a wrong shape reads
# out of bounds): in a compiled graph the public function's validation ran at trace time only, so
# each call is still validated once.


@torch.library.custom_op("harmonica::triton_cached_gated_residual", mutates_args=())
def triton_cached_gated_residual(
    x: torch.Tensor, gate: torch.Tensor | None, cache: torch.Tensor
) -> torch.Tensor:
    """out = x + gate * cache. x, cache [B, N, D] (cache in any float dtype); gate [B, D] or
    [B, 1, D] (batch B or 1, any batch stride) or None; out contiguous in x's dtype."""
    _check_x(x)
    _check_like_x(cache, x, "cache", same_dtype=False)
    _gate_stride(gate, x)
    return cached_gated_residual(x.contiguous(), gate, cache.contiguous())


@torch.library.custom_op("harmonica::triton_gated_residual_update_", mutates_args=("cache",))
def triton_gated_residual_update_(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """out = x + gate * branch and cache[:] = branch (rounded to cache's dtype), one pass.
    cache must be contiguous and must not overlap x, gate or branch."""
    _check_x(x)
    _check_like_x(branch, x, "branch", same_dtype=True)
    _gate_stride(gate, x)
    _check_writable_cache(cache, x, {"x": x, "gate": gate, "branch": branch})
    return gated_residual_update_(x.contiguous(), gate, branch.contiguous(), cache)


@torch.library.custom_op("harmonica::triton_routed_gated_residual", mutates_args=())
def triton_routed_gated_residual(
    x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor, cache: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """out = x + gate * (r * branch + (1 - r) * cache); r a one-element tensor read by the kernel."""
    _check_x(x)
    _check_like_x(branch, x, "branch", same_dtype=True)
    _check_like_x(cache, x, "cache", same_dtype=False)
    _check_r(r, x)
    _gate_stride(gate, x)
    return routed_gated_residual(x.contiguous(), gate, branch.contiguous(), cache.contiguous(), r)


@torch.library.custom_op("harmonica::triton_routed_gated_residual_backward", mutates_args=())
def triton_routed_gated_residual_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor | None,
    branch: torch.Tensor,
    cache: torch.Tensor,
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_branch, grad_gate, grad_r) of routed_gated_residual, sums accumulated in fp32.

    grad_branch = grad_out * gate * r (branch's dtype); grad_gate = sum over tokens (and over the
    batch when gate's batch is 1) of grad_out * mixed, in gate's shape and dtype, or an empty
    tensor when gate is None; grad_r = sum(grad_out * gate * (branch - cache)) in r's shape/dtype.
    """
    _check_x(grad_out, "grad_out")
    _check_like_x(branch, grad_out, "branch", same_dtype=False, x_name="grad_out")
    _check_like_x(cache, grad_out, "cache", same_dtype=False, x_name="grad_out")
    _check_r(r, grad_out)
    _gate_stride(gate, grad_out)
    return routed_gated_residual_backward(
        grad_out.contiguous(), gate, branch.contiguous(), cache.contiguous(), r
    )


@torch.library.custom_op("harmonica::triton_gated_residual_norm_modulate", mutates_args=("cache",))
def triton_gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    cache: torch.Tensor | None,
    reuse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_out = x + gate * (cache if reuse else y), cache[:] = y when given and not reuse; then
    h = LayerNorm(x_out) * (1 + scale) + shift over D (no affine, biased variance, from the fp32
    x_out). shift/scale like gate ([B, D] or [B, 1, D], batch B or 1, any batch stride).
    Returns (x_out, h), contiguous in x's dtype."""
    _check_x(x)
    if reuse:
        if cache is None:
            raise ValueError("harmonica: reuse=True needs a cache to read from")
        if y is not None:
            raise ValueError("harmonica: reuse=True reads the cache; pass y=None")
    elif y is None:
        raise ValueError("harmonica: y is required unless reuse=True")
    _gate_stride(gate, x)
    _row_vector_batch_stride(shift, x, "shift")
    _row_vector_batch_stride(scale, x, "scale")
    if reuse:
        _check_like_x(cache, x, "cache", same_dtype=False)
        cache = cache.contiguous()
    else:
        _check_like_x(y, x, "y", same_dtype=True)
        y = y.contiguous()
        if cache is not None:
            _check_writable_cache(cache, x, {"x": x, "gate": gate, "y": y, "shift": shift, "scale": scale})
    return gated_residual_norm_modulate(x.contiguous(), gate, y, shift, scale, eps, cache, reuse)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@torch.library.custom_op("harmonica::triton_forecast_gated_residual", mutates_args=())
def triton_forecast_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    c0: torch.Tensor,
    c1: torch.Tensor | None,
    c2: torch.Tensor | None,
    coeffs: torch.Tensor | None,
) -> torch.Tensor:
    """out = x + gate * (c0 + a (c0 - c1) + b (c0 - 2 c1 + c2)), (a, b) = coeffs (fp32 [2] on x's
    device, read by the kernel). c1 = c2 = None: plain reuse; c2 = None: first order. c0/c1/c2 of
    x's shape in one float dtype; gate as in triton_cached_gated_residual."""
    _check_x(x)
    _check_forecast(x, c0, c1, c2, coeffs)
    _gate_stride(gate, x)
    return forecast_gated_residual(
        x.contiguous(), gate, c0.contiguous(), _contiguous(c1), _contiguous(c2), _contiguous(coeffs)
    )


@torch.library.custom_op("harmonica::triton_forecast_residual_norm_modulate", mutates_args=())
def triton_forecast_residual_norm_modulate(
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
    """x_out = the forecast read of triton_forecast_gated_residual; h = LayerNorm(x_out) * (1 + scale)
    + shift over D (no affine, biased variance, from the fp32 x_out). Returns (x_out, h)."""
    _check_x(x)
    _check_forecast(x, c0, c1, c2, coeffs)
    _gate_stride(gate, x)
    _row_vector_batch_stride(shift, x, "shift")
    _row_vector_batch_stride(scale, x, "scale")
    return forecast_residual_norm_modulate(
        x.contiguous(),
        gate,
        c0.contiguous(),
        _contiguous(c1),
        _contiguous(c2),
        _contiguous(coeffs),
        shift,
        scale,
        eps,
    )


register_fakes("triton_")
register_routed_autograd("triton_")
register_inference_only("triton_")

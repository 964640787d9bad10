"""Which implementation runs each op: discovery, the reasons a backend is missing, and choice.

Backends: ``cuda`` (C++/CUDA extension, CUDA tensors), ``triton`` (CUDA tensors; CPU tensors only
under ``TRITON_INTERPRET=1``), ``cpp`` (C++ extension, CPU tensors), ``torch`` (the pure-torch
reference; always there). Default for CUDA tensors: cuda, else triton, else torch; for CPU
tensors: cpp, else torch. ``HARMONICA_BACKEND`` or :func:`set_backend` force one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import torch

from . import reference

BACKENDS = ("cuda", "triton", "cpp", "torch")

_missing: dict[str, str] = {}
_modules: dict[str, ModuleType | None] = {"torch": reference}
# Per backend, the functions the public functions call in eager mode (no torch.compile tracing, no
# gradient needed), under the reference's names: the reference itself, the Triton launchers without
# the custom_op dispatch, or the C++ ops' raw dispatcher entries (skipping OpOverload.__call__).
_eager: dict[str, ModuleType | SimpleNamespace] = {"torch": reference}
_forced: str | None = None
_loaded = False

# The eager fast path, indexed by ``tensor.is_cuda`` (0: CPU and other devices, 1: CUDA) so that a
# call finds its backend without building a torch.device: ``eager_for[i]`` is the active backend's
# eager functions for that device kind, or None when the forced backend cannot run there (the slow
# path then raises get_backend's error); ``self_checked[i]`` is the same for the C++ backends only,
# whose ops check their own arguments, or None. Refreshed by set_backend and on first load.
eager_for: list[ModuleType | SimpleNamespace | None] = [None, None]
self_checked: list[SimpleNamespace | None] = [None, None]


_OP_NAMES = (
    "cached_gated_residual",
    "gated_residual_update_",
    "routed_gated_residual",
    "routed_gated_residual_backward",
    "gated_residual_norm_modulate",
    "forecast_gated_residual",
    "forecast_residual_norm_modulate",
)


class _ExtensionOps(ModuleType):
    """The C++ ops (``torch.ops.harmonica.*``) under the reference's function names."""

    def __init__(self) -> None:
        super().__init__("harmonica_kernels._C_ops")
        for name in _OP_NAMES:
            setattr(self, name, getattr(torch.ops.harmonica, name).default)


def _raw_entries(ops: ModuleType) -> SimpleNamespace:
    """The dispatcher entries behind ``ops``' OpOverloads (what ``OpOverload.__call__`` forwards to,
    one Python frame less per call); the overloads themselves if a torch lacks ``_op``."""
    overloads = {name: getattr(ops, name) for name in _OP_NAMES}
    return SimpleNamespace(**{name: getattr(op, "_op", op) for name, op in overloads.items()})


def _has_kernel(device_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("harmonica::cached_gated_residual", device_key)


def _load_extension() -> None:
    if os.environ.get("HARMONICA_NO_EXT", "0") == "1":
        reason = "disabled by HARMONICA_NO_EXT=1"
        _missing["cpp"] = _missing["cuda"] = reason
        return
    try:
        importlib.import_module("harmonica_kernels._C")
    except ImportError as err:
        reason = (
            f"the C++ extension harmonica_kernels._C did not import ({err}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
        _missing["cpp"] = _missing["cuda"] = reason
        return
    from . import _meta

    _meta.register_fakes()
    _meta.register_routed_autograd()
    _meta.register_inference_only()
    ops = _ExtensionOps()
    raw = _raw_entries(ops)
    if _has_kernel("CPU"):
        _modules["cpp"] = ops
        _eager["cpp"] = raw
    else:
        _missing["cpp"] = "the extension was built without CPU kernels"
    if _has_kernel("CUDA"):
        _modules["cuda"] = ops
        _eager["cuda"] = raw
    else:
        _missing["cuda"] = (
            "the extension was built without CUDA kernels (a CPU torch, or no nvcc at build time; "
            "rebuild with a CUDA torch, or FORCE_CUDA=1)"
        )


def _load_triton() -> None:
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        _missing["triton"] = "no CUDA device and TRITON_INTERPRET is not 1"
        return
    try:
        module = importlib.import_module("harmonica_kernels.triton")
        _modules["triton"] = module
        _eager["triton"] = module.eager
    except ImportError as err:
        _missing["triton"] = f"triton is not usable: {err}"


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        _load_extension()
        _load_triton()
        _refresh_fast_path()


def _refresh_fast_path() -> None:
    for index, device_type in enumerate(("cpu", "cuda")):
        try:
            name = get_backend(device_type)
        except RuntimeError:  # a forced backend that cannot run on this device kind
            eager_for[index] = self_checked[index] = None
            continue
        eager_for[index] = _eager[name]
        self_checked[index] = _eager[name] if name in ("cpp", "cuda") else None


def available_backends() -> list[str]:
    """Names of the backends usable in this process, in order of preference."""
    _ensure_loaded()
    return [name for name in BACKENDS if name in _modules]


def missing_backends() -> dict[str, str]:
    """Backends that cannot run here, each with the reason."""
    _ensure_loaded()
    return dict(_missing)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown harmonica backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    _ensure_loaded()
    if name not in _modules:
        raise RuntimeError(f"harmonica backend {name!r} is not available: {_missing[name]}")


def set_backend(name: str | None) -> None:
    """Force every op onto backend ``name``; ``None`` or ``"auto"`` restores the per-device default."""
    global _forced
    if name in (None, "auto"):
        _forced = None
    else:
        _check_name(name)
        _forced = name
    if _loaded:
        _refresh_fast_path()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _default_for(device_type: str) -> str:
    if device_type == "cuda":
        order = ("cuda", "triton", "torch")
    else:
        order = ("cpp", "torch")
    return next(name for name in order if name in _modules)


def get_backend(device: torch.device | str = "cpu") -> str:
    """The backend that runs ops on tensors of ``device``."""
    _ensure_loaded()
    device_type = torch.device(device).type
    if _forced is None:
        return _default_for(device_type)
    supported = {"cuda": ("cuda",), "cpp": ("cpu",), "triton": ("cuda", "cpu"), "torch": None}[_forced]
    if supported is not None and device_type not in supported:
        raise RuntimeError(
            f"harmonica backend {_forced!r} cannot run on {device_type} tensors; "
            f"call harmonica_kernels.set_backend('auto') or move the tensors"
        )
    return _forced


def backend_module(device: torch.device | str) -> ModuleType:
    """The module whose functions implement the ops for ``device`` (reference signatures)."""
    return _modules[get_backend(device)]


_env_choice = os.environ.get("HARMONICA_BACKEND")
if _env_choice:
    set_backend(_env_choice)

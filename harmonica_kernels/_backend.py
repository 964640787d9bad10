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
from types import ModuleType

import torch

from . import reference

BACKENDS = ("cuda", "triton", "cpp", "torch")

_missing: dict[str, str] = {}
_modules: dict[str, ModuleType | None] = {"torch": reference}
_forced: str | None = None
_loaded = False


class _ExtensionOps(ModuleType):
    """The C++ ops (``torch.ops.harmonica.*``) under the reference's function names."""

    def __init__(self) -> None:
        super().__init__("harmonica_kernels._C_ops")
        ops = torch.ops.harmonica
        self.cached_gated_residual = ops.cached_gated_residual.default
        self.gated_residual_update_ = ops.gated_residual_update_.default
        self.routed_gated_residual = ops.routed_gated_residual.default
        self.routed_gated_residual_backward = ops.routed_gated_residual_backward.default
        self.gated_residual_norm_modulate = ops.gated_residual_norm_modulate.default


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
    ops = _ExtensionOps()
    if _has_kernel("CPU"):
        _modules["cpp"] = ops
    else:
        _missing["cpp"] = "the extension was built without CPU kernels"
    if _has_kernel("CUDA"):
        _modules["cuda"] = ops
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
        _modules["triton"] = importlib.import_module("harmonica_kernels.triton")
    except ImportError as err:
        _missing["triton"] = f"triton is not usable: {err}"


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        _load_extension()
        _load_triton()


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
        return
    _check_name(name)
    _forced = name


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

"""Triton backend of the harmonica ops (GPU; runs on the CPU under ``TRITON_INTERPRET=1``).

Importing this module registers ``harmonica::triton_*`` (same signatures as the C++ ops in
``csrc/bindings.cpp``, shared fakes and autograd from ``harmonica_kernels._meta``) and raises
``ImportError`` with the reason when triton cannot be imported. The module-level callables below
are the ops' ``.default`` overloads, named like the reference functions so that the dispatcher can
swap backend modules; ``eager`` holds the unregistered functions that the public functions call
outside ``torch.compile`` and autograd (no dispatcher, no second validation).
``TRITON_INTERPRET`` must be set before triton is first imported.
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing at import time
    raise ImportError(f"harmonica triton backend unavailable: cannot import triton ({exc!r})") from exc

from types import SimpleNamespace

import torch

from . import ops
from .ops import INTERPRETED

eager = SimpleNamespace(**ops.EAGER)

cached_gated_residual = torch.ops.harmonica.triton_cached_gated_residual.default
gated_residual_update_ = torch.ops.harmonica.triton_gated_residual_update_.default
routed_gated_residual = torch.ops.harmonica.triton_routed_gated_residual.default
routed_gated_residual_backward = torch.ops.harmonica.triton_routed_gated_residual_backward.default
gated_residual_norm_modulate = torch.ops.harmonica.triton_gated_residual_norm_modulate.default
forecast_gated_residual = torch.ops.harmonica.triton_forecast_gated_residual.default
forecast_residual_norm_modulate = torch.ops.harmonica.triton_forecast_residual_norm_modulate.default

__all__ = [
    "INTERPRETED",
    "cached_gated_residual",
    "gated_residual_update_",
    "routed_gated_residual",
    "routed_gated_residual_backward",
    "gated_residual_norm_modulate",
    "forecast_gated_residual",
    "forecast_residual_norm_modulate",
    "eager",
    "ops",
]

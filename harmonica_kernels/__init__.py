"""harmonica_kernels: fused ops for feature caching in Diffusion Transformers.

Ops (registered as ``torch.ops.harmonica.*`` by the C++ extension, ``torch.ops.harmonica.triton_*``
by the Triton backend): :func:`cached_gated_residual`, :func:`gated_residual_update_`,
:func:`routed_gated_residual`, :func:`gated_residual_norm_modulate`, and the forecast reads
:func:`forecast_gated_residual`, :func:`forecast_residual_norm_modulate` (inference-only). See
:mod:`.reference` for the maths and ``python -m harmonica_kernels.info`` for what is built here.
"""

from ._backend import (
    _ensure_loaded,
    available_backends,
    get_backend,
    missing_backends,
    set_backend,
    use_backend,
)
from .ops import (
    cached_gated_residual,
    forecast_gated_residual,
    forecast_residual_norm_modulate,
    gated_residual_norm_modulate,
    gated_residual_update_,
    routed_gated_residual,
)

# Load the extension (and register its fakes and autograd) now rather than on the first op call,
# which may happen inside a region that torch.compile traces.
_ensure_loaded()

__all__ = [
    "available_backends",
    "cached_gated_residual",
    "forecast_gated_residual",
    "forecast_residual_norm_modulate",
    "gated_residual_norm_modulate",
    "gated_residual_update_",
    "get_backend",
    "missing_backends",
    "routed_gated_residual",
    "set_backend",
    "use_backend",
]

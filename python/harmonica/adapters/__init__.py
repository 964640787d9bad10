"""Block adapters, one per transformer family (see :mod:`harmonica.adapters.base`).

:func:`adapter_for` finds the adapter of a model; :data:`ADAPTERS` lists them in the order they are
tried. A family whose diffusers classes the installed diffusers lacks is left out.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import BlockAdapter, CachedBlock, UnsupportedModelError
from .basic import BasicBlockAdapter

__all__ = ["ADAPTERS", "BlockAdapter", "CachedBlock", "UnsupportedModelError", "adapter_for", "register"]

ADAPTERS: list[BlockAdapter] = [BasicBlockAdapter()]
"""The registered adapters, tried in order."""

# The other built-in families, each skipped if the installed diffusers lacks its classes.
for _module, _name in (
    ("flux", "FluxAdapter"),
    ("sd3", "SD3Adapter"),
    ("wan", "WanAdapter"),
    ("qwenimage", "QwenImageAdapter"),
    ("flux2", "Flux2Adapter"),
):
    try:
        ADAPTERS.append(getattr(importlib.import_module(f"{__name__}.{_module}"), _name)())
    except ImportError:
        pass

HOW_TO_ADD = (
    "To support another family, write an adapter: a harmonica.adapters.base.BlockAdapter subclass "
    "(its units, and a CachedBlock that applies them through the CacheHandle) in "
    "python/harmonica/adapters/<family>.py, then register it with harmonica.adapters.register(...)"
)


def register(adapter: BlockAdapter) -> BlockAdapter:
    """Add ``adapter`` in front of the registered ones (so it can refine an existing family)."""
    ADAPTERS.insert(0, adapter)
    return adapter


def supported_classes() -> tuple[type[nn.Module], ...]:
    """Every transformer class some adapter caches, in registration order (the built-ins first)."""
    seen: list[type[nn.Module]] = []
    for adapter in ADAPTERS:
        for cls in adapter.model_classes:
            if cls not in seen:
                seen.append(cls)
    return tuple(seen)


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter that caches ``model``.

    Raises:
        UnsupportedModelError: no adapter knows the model's class; the message names the supported
            classes and families and how to add an adapter.
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    names = ", ".join(cls.__name__ for cls in supported_classes())
    families = "; ".join(a.family for a in ADAPTERS)
    raise UnsupportedModelError(
        f"harmonica supports {names} (families: {families}); got {type(model).__name__}. Pass the "
        f"pipeline or its `.transformer`. {HOW_TO_ADD}"
    )

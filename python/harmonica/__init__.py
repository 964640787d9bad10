"""harmonica: learned feature caching for Diffusion Transformers.

Inference: ``enable_cache(pipe, CacheSchedule.fora(T, len(units(pipe.transformer)), 2))`` (or a
trained :class:`Router`) makes sampling skip the scheduled units; ``disable_cache(pipe)`` undoes it.
Training: ``train_router(pipe, num_steps=T).router`` learns a router (SDT + IEPO, or L2C);
``search_schedule(pipe, num_steps=T, target_cur=0.4).schedule`` searches one on final-image errors.
Forecasting: ``CacheSchedule.fora(T, U, 2, order=2, scheduler=pipe.scheduler)`` extrapolates skipped
units instead of reusing them; ``fit_forecast(pipe, schedule=...)`` fits the extrapolation coefficients
on the model's own run.

The names below are imported on first use (PEP 562), so ``harmonica --help`` does not pay for
torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CacheHandle": ".cache",
    "CacheSchedule": ".schedule",
    "Router": ".router",
    "SearchResult": ".search",
    "TrainingResult": ".training",
    "disable_cache": ".cache",
    "enable_cache": ".cache",
    "ForecastFit": ".forecast",
    "fit_forecast": ".forecast",
    "search_schedule": ".search",
    "train_router": ".training",
    "units": ".models",
}

__all__ = [
    "CacheHandle",
    "CacheSchedule",
    "ForecastFit",
    "Router",
    "SearchResult",
    "TrainingResult",
    "disable_cache",
    "enable_cache",
    "fit_forecast",
    "search_schedule",
    "train_router",
    "units",
]

if TYPE_CHECKING:
    from .cache import CacheHandle, disable_cache, enable_cache
    from .forecast import ForecastFit, fit_forecast
    from .models import units
    from .router import Router
    from .schedule import CacheSchedule
    from .search import SearchResult, search_schedule
    from .training import TrainingResult, train_router


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harmonica' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

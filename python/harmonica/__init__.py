"""harmonica: learned feature caching for Diffusion Transformers.

Inference: ``enable_cache(pipe, CacheSchedule.fora(T, len(units(pipe.transformer)), 2))`` (or a
trained :class:`Router`) makes sampling skip the scheduled units; ``disable_cache(pipe)`` undoes it.
Training: ``train_router(pipe, num_steps=T).router`` learns a router (SDT + IEPO, or L2C);
``search_schedule(pipe, num_steps=T, target_cur=0.4).schedule`` searches one on final-image errors.
"""

from .cache import CacheHandle, disable_cache, enable_cache
from .models import units
from .router import Router
from .schedule import CacheSchedule
from .search import SearchResult, search_schedule
from .training import TrainingResult, train_router

__version__ = "0.1.0"

__all__ = [
    "CacheHandle",
    "CacheSchedule",
    "Router",
    "SearchResult",
    "TrainingResult",
    "disable_cache",
    "enable_cache",
    "search_schedule",
    "train_router",
    "units",
]

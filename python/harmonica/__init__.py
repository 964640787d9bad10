"""harmonica: learned feature caching for Diffusion Transformers.

Inference: ``enable_cache(pipe, CacheSchedule.fora(T, len(units(pipe.transformer)), 2))`` (or a
trained :class:`Router`) makes sampling skip the scheduled units; ``disable_cache(pipe)`` undoes it.
"""

from .cache import CacheHandle, disable_cache, enable_cache
from .models import units
from .router import Router
from .schedule import CacheSchedule

# (lead) reference / eval / sampling exports go here.

__version__ = "0.1.0"

__all__ = ["CacheHandle", "CacheSchedule", "Router", "disable_cache", "enable_cache", "units"]

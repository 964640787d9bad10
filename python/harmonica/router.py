"""The router: a static matrix of logits ``[T, U]`` that becomes a cache schedule (METHOD.md §2)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from ._checks import check_output_file
from ._io import atomic_write
from .models import describe_fingerprint, fingerprint, fingerprint_mismatch, units
from .schedule import CacheSchedule

__all__ = ["FIRST_STEP_LOGIT", "LOGIT_BOUND", "Router", "RouterMismatchError", "sampler_info"]

FIRST_STEP_LOGIT = 5.0
"""Logit of every unit at step 0 (sigmoid ≈ 0.993: always computed, the cache is empty there)."""
LOGIT_BOUND = 5.0
"""Logits are kept in ``[-LOGIT_BOUND, LOGIT_BOUND]`` by :meth:`Router.clamp_`."""

_METADATA_KEY = "harmonica.router"
_FORMAT_VERSION = 1


class RouterMismatchError(ValueError):
    """A router was made for a model of another shape than the one it is applied to."""


def sampler_info(scheduler: Any) -> dict[str, Any]:
    """What a router records about its sampler: the scheduler's class name and JSON-able config."""
    config = dict(getattr(scheduler, "config", {}) or {})
    kept = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        kept[key] = value
    return {"class": type(scheduler).__name__, "config": kept}


class Router(nn.Module):
    """Learnable per-(step, unit) compute probabilities ``r = sigmoid(logits)``, ``logits: [T, U]``.

    Row 0 (and any row in ``pinned_steps``, e.g. L2C's full-refresh steps) is fixed at
    :data:`FIRST_STEP_LOGIT`; the other rows start N(0, 1) from ``seed``. At
    inference unit k is computed at step t iff ``r[t, k] > threshold`` (:meth:`to_schedule`).

    Besides the logits a router carries what it was made for: the model's :func:`fingerprint`
    (class and shapes, unit names), the sampler (:func:`sampler_info`) and free-form training
    settings; :meth:`save` stores them as safetensors metadata and :meth:`load` checks them.

    A router may also carry a forecasting schedule (:attr:`forecast`: its compute table, forecast
    orders and fitted coefficients): :meth:`to_schedule` then forecasts every reused entry, with the
    stored orders and coefficients where the thresholded table is the stored one.
    """

    def __init__(
        self,
        num_steps: int,
        num_units: int,
        *,
        unit_names: list[str] | None = None,
        model_fingerprint: dict[str, Any] | None = None,
        sampler: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        seed: int = 0,
        pinned_steps: list[int] | None = None,
    ) -> None:
        super().__init__()
        if num_steps < 1 or num_units < 1:
            raise ValueError(
                f"a router needs num_steps >= 1 and num_units >= 1, got {num_steps} and {num_units}"
            )
        if unit_names is not None and len(unit_names) != num_units:
            raise ValueError(f"unit_names has {len(unit_names)} entries but num_units is {num_units}")
        pinned = sorted({0, *(pinned_steps or [])})
        if pinned[-1] >= num_steps or pinned[0] < 0:
            raise ValueError(f"pinned_steps must lie in [0, {num_steps - 1}], got {pinned_steps}")
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(num_steps, num_units, generator=generator)
        logits[pinned] = FIRST_STEP_LOGIT
        self.logits = nn.Parameter(logits)
        self.pinned_steps = pinned
        self.unit_names = list(unit_names) if unit_names is not None else None
        self.model_fingerprint = model_fingerprint
        self.sampler = sampler
        self.training_settings = dict(training or {})
        self.forecast: CacheSchedule | None = None

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        num_steps: int,
        *,
        scheduler: Any = None,
        training: dict[str, Any] | None = None,
        seed: int = 0,
        pinned_steps: list[int] | None = None,
    ) -> Router:
        """A fresh router for ``model`` (a supported transformer) and ``num_steps`` sampling steps."""
        names = units(model)
        return cls(
            num_steps,
            len(names),
            unit_names=names,
            model_fingerprint=fingerprint(model),
            sampler=sampler_info(scheduler) if scheduler is not None else None,
            training=training,
            seed=seed,
            pinned_steps=pinned_steps,
        )

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    @property
    def num_units(self) -> int:
        return self.logits.shape[1]

    def probabilities(self) -> torch.Tensor:
        """``sigmoid(logits)``, ``[T, U]``, differentiable."""
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def clamp_(self) -> Router:
        """Clamp logits to ``[-LOGIT_BOUND, LOGIT_BOUND]`` and re-pin the pinned rows (after every
        optimizer step)."""
        self.logits.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
        self.logits[self.pinned_steps] = FIRST_STEP_LOGIT
        return self

    @property
    def max_age(self) -> int | None:
        """The cache-age cap the router was trained with (``training_settings["max_age"]``), if any."""
        return self.training_settings.get("max_age")

    @torch.no_grad()
    def to_schedule(self, threshold: float = 0.1, *, max_age: int | None = None) -> CacheSchedule:
        """Hard schedule: compute iff ``sigmoid(logit) > threshold``; pinned rows (row 0) always compute.

        Reuses of entries older than ``max_age`` steps (default: :attr:`max_age`, the cap the router
        was trained with) become computes (:meth:`CacheSchedule.with_max_age`).
        """
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold is a probability in [0, 1), got {threshold}")
        compute = self.probabilities().detach().cpu() > threshold
        compute[self.pinned_steps] = True
        schedule = CacheSchedule(compute).with_max_age(max_age if max_age is not None else self.max_age)
        forecast = self.forecast
        if forecast is None:
            return schedule
        if torch.equal(schedule.compute, forecast.compute):
            return forecast
        order = int(forecast.orders.max())
        warnings.warn(
            f"the router thresholded at {threshold} computes other entries than the schedule its "
            f"forecast coefficients were fitted for; forecasting at order {order} with step-distance "
            "coefficients (refit with harmonica.fit_forecast for this threshold)",
            stacklevel=2,
        )
        return schedule.with_forecast(order)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`RouterMismatchError` unless this router was made for ``model``'s shape."""
        actual = fingerprint(model)
        expected = self.model_fingerprint
        if expected is None:
            if self.num_units != len(actual["units"]):
                raise RouterMismatchError(
                    f"the router has {self.num_units} units but the model {describe_fingerprint(actual)} "
                    f"has {len(actual['units'])}"
                )
            return
        differing = fingerprint_mismatch(expected, actual)
        if differing:
            raise RouterMismatchError(
                f"the router was made for {describe_fingerprint(expected)} but the model is "
                f"{describe_fingerprint(actual)} (differs in {', '.join(differing)}); "
                "train or load a router for this model"
            )

    def steps_mismatch(self, num_steps: int) -> str | None:
        """Why a run of ``num_steps`` sampling steps cannot use this router (another step count), else
        None; the text follows the router's name."""
        if num_steps == self.num_steps:
            return None
        return (
            f"was trained for {self.num_steps} sampling steps but {num_steps} were asked for; sample with "
            f"num_inference_steps={self.num_steps} (CLI: --steps {self.num_steps}) or use a router "
            f"trained for {num_steps} steps"
        )

    def sampler_mismatch(self, scheduler: Any) -> str | None:
        """Why ``scheduler`` may not suit this router's schedule (another sampler class), else None."""
        made_for = (self.sampler or {}).get("class")
        if made_for is None or made_for == type(scheduler).__name__:
            return None
        return (
            f"the router was trained with {made_for} but the pipeline samples with "
            f"{type(scheduler).__name__}; its schedule may not suit this sampler"
        )

    def metadata(self) -> dict[str, Any]:
        """Everything :meth:`save` writes besides the logits."""
        return {
            "format_version": _FORMAT_VERSION,
            "num_steps": self.num_steps,
            "num_units": self.num_units,
            "unit_names": self.unit_names,
            "fingerprint": self.model_fingerprint,
            "sampler": self.sampler,
            "training": self.training_settings,
            "pinned_steps": self.pinned_steps,
            "forecast": self.forecast is not None,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the logits and :meth:`metadata` to a safetensors file, atomically (a killed save
        leaves the old file, or none, and no temporary file).

        Raises:
            ValueError: the logits contain NaN or infinity (a diverged training run), or ``path`` is
                a folder.
            FileNotFoundError: ``path``'s folder does not exist.
        """
        path = Path(path)
        logits = self.logits.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(logits).all():
            raise ValueError(
                f"refusing to save a router whose logits contain NaN or infinity to {path}: the training "
                "diverged (lower lr, or check guidance_scale and the model's outputs for inf/NaN)"
            )
        check_output_file(path, "router file")
        tensors = {"logits": logits}
        if self.forecast is not None:
            tensors.update(
                forecast_compute=self.forecast.compute.to(torch.uint8),
                forecast_orders=self.forecast.orders,
                forecast_coefficients=self.forecast.coefficients,
            )
        data = save(tensors, metadata={_METADATA_KEY: json.dumps(self.metadata())})
        atomic_write(path, lambda file: file.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: nn.Module | None = None) -> Router:
        """Read a router written by :meth:`save`; with ``model``, also check it fits (:meth:`check_model`).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a readable safetensors file or not a harmonica router.
            RouterMismatchError: ``model`` has another shape than the router was made for.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no router file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_METADATA_KEY)
                logits = f.get_tensor("logits") if "logits" in f.keys() else None
                forecast_parts = [
                    f.get_tensor(name) if name in f.keys() else None
                    for name in ("forecast_compute", "forecast_orders", "forecast_coefficients")
                ]
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupted"
            ) from err
        if raw is None or logits is None:
            raise ValueError(
                f"{path} is a safetensors file but not a harmonica router "
                f"(no '{_METADATA_KEY}' metadata or no logits)"
            )
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: the router metadata is not valid JSON ({err})") from err
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path}: router format version {meta.get('format_version')!r} is not {_FORMAT_VERSION}"
            )
        expected_shape = (meta.get("num_steps"), meta.get("num_units"))
        if logits.dim() != 2 or tuple(logits.shape) != expected_shape:
            raise ValueError(
                f"{path}: logits have shape {tuple(logits.shape)} but the metadata says {expected_shape}"
            )
        if not torch.isfinite(logits).all():
            raise ValueError(f"{path}: the logits contain NaN or infinity")
        router = cls(
            logits.shape[0],
            logits.shape[1],
            unit_names=meta.get("unit_names"),
            model_fingerprint=meta.get("fingerprint"),
            sampler=meta.get("sampler"),
            training=meta.get("training"),
            pinned_steps=meta.get("pinned_steps"),
        )
        with torch.no_grad():
            router.logits.copy_(logits)
        if meta.get("forecast"):
            if any(part is None for part in forecast_parts):
                raise ValueError(
                    f"{path}: the metadata announces a forecast schedule but its tensors are missing"
                )
            compute, orders, coefficients = forecast_parts
            try:
                router.forecast = CacheSchedule(compute.bool(), orders, coefficients)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: the stored forecast schedule is invalid ({err})") from err
            if router.forecast.num_steps != router.num_steps or router.forecast.num_units != router.num_units:
                raise ValueError(f"{path}: the forecast schedule's shape does not match the logits")
        if model is not None:
            router.check_model(model)
        return router

    def extra_repr(self) -> str:
        made_for = describe_fingerprint(self.model_fingerprint) if self.model_fingerprint else "unknown model"
        return f"num_steps={self.num_steps}, num_units={self.num_units}, for={made_for}"

"""Forecast coefficients fitted on the model's own trajectories (least squares, seconds).

A forecast entry extrapolates a unit's output from its last computed outputs ``c0`` (newest),
``c1``, ``c2`` as ``c0 + a·(c0 − c1) + b·(c0 − 2c1 + c2)``. The step-distance rules of
:func:`harmonica.schedule.forecast_coefficients` assume the outputs follow a low-order polynomial in
the step index; :func:`fit_forecast` instead chooses ``(a, b)`` per (step, unit) to minimise the
squared error of the forecast against the unit's true output, measured while sampling with the
schedule itself:

    (a, b) = argmin Σ ‖y_t − c0 − a·d1 − b·d2‖² + μ·‖(a, b) − (a₀, b₀)‖²,  d1 = c0 − c1, d2 = c0 − 2c1 + c2

over a batch of samples, where ``y_t`` is the unit's output at step t (computed for the fit only),
the history is the one the cached run itself holds, and ``(a₀, b₀)`` are the rule's coefficients (the
ridge μ, relative to the Gram matrix's mean diagonal, keeps a nearly collinear history from producing
large coefficients). The fit runs step by step on the cached trajectory (each forecast uses its
fitted coefficients before the next unit runs), so later entries are fitted on the inputs they will
see at inference. Cost: one sampling run of the batch with every unit computed (the branches of
forecast entries run for the fit and are then discarded), plus a 2×2 solve per forecast entry.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .cache import (
    _STAGE_NAMES,
    CacheHandle,
    CacheStateError,
    _two_stage_transformers,
    attach_handle,
    disable_cache,
    stage_pair,
    step_stages,
)
from .models import single_transformer, supported_class, units
from .schedule import CacheSchedule

__all__ = ["ForecastFit", "fit_forecast"]

DEFAULT_RIDGE = 0.1


class ForecastFit:
    """What :func:`fit_forecast` returns: ``schedule`` (the input schedule with the fitted
    coefficients), ``rule_schedule`` (the input), the fit's relative residuals per forecast entry
    (``residual[t, k]`` = fitted error / rule error, NaN where nothing is forecast) and ``seconds``."""

    def __init__(
        self, schedule: CacheSchedule, rule_schedule: CacheSchedule, residual: torch.Tensor, seconds: float
    ) -> None:
        self.schedule = schedule
        self.rule_schedule = rule_schedule
        self.residual = residual
        self.seconds = seconds

    @property
    def mean_error_ratio(self) -> float:
        """Mean over forecast entries of the fitted forecast's squared error over the rule's, on the
        fit batch (NaN when nothing is forecast)."""
        finite = self.residual[torch.isfinite(self.residual)]
        return finite.mean().item() if finite.numel() else float("nan")

    def __repr__(self) -> str:
        return (
            f"ForecastFit({self.schedule!r}, mean error ratio fitted/rule={self.mean_error_ratio:.3f}, "
            f"seconds={self.seconds:.1f})"
        )


def ridge_solve(gram: torch.Tensor, moment: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """The forecast coefficients minimising ``‖target − X·w‖² + μ‖w − prior‖²`` from the normal
    equations (``gram = XᵀX``, ``moment = Xᵀtarget``), with μ = ``ridge`` × the Gram matrix's mean
    diagonal, so the ridge does not depend on the activations' scale."""
    mu = ridge * gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + mu * eye, moment + mu * prior)


class _FittingHandle(CacheHandle):
    """Inference handle that, at each forecast entry, also runs the branch, fits ``(a, b)`` to it on
    the current batch, writes them into the step's device coefficients, then forecasts as usual."""

    def __init__(self, transformer: Any, schedule: CacheSchedule, ridge: float) -> None:
        super().__init__(transformer, schedule)
        self.ridge = ridge
        # (step, unit) -> (fitted, rule) squared errors, kept on the device until the run ends
        self.errors: dict[tuple[int, int], torch.Tensor] = {}

    def _fit(self, unit: int, branch: Any) -> None:
        y = branch().double()
        c0 = self._buffers[unit].double()
        c1, c2, coefficients = self._history(unit)
        d1 = c0 - c1.double()
        features = [d1] if c2 is None else [d1, d1 - (c1.double() - c2.double())]
        target = (y - c0).flatten()
        X = torch.stack([f.flatten() for f in features], dim=1)
        prior = coefficients[: len(features)].double()
        solution = ridge_solve(X.T @ X, X.T @ target, prior, self.ridge)
        rule_error = (target - X @ prior).square().sum()
        fit_error = (target - X @ solution).square().sum()
        self.errors[self._step, unit] = torch.stack([fit_error, rule_error])
        coefficients[: len(features)] = solution.to(coefficients.dtype)

    def computes(self, unit: int) -> bool:
        # Every branch may run (the blocks prepare its input); the schedule's row decides below.
        super().computes(unit)
        return True

    def unit_residual(self, unit, x, gate, branch):  # type: ignore[override]
        if self._row[unit]:
            return super().unit_residual(unit, x, gate, branch)
        if self._order_row[unit]:
            self._fit(unit, branch)
        return self._reuse(unit, x, gate)

    def unit_residual_norm_modulate(self, unit, x, gate, branch, shift, scale, eps):  # type: ignore[override]
        if self._row[unit]:
            return super().unit_residual_norm_modulate(unit, x, gate, branch, shift, scale, eps)
        if self._order_row[unit]:
            self._fit(unit, branch)
        return self._reuse_norm_modulate(unit, x, gate, shift, scale, eps)


def fit_forecast(
    pipe_or_transformer: Any,
    scheduler: Any = None,
    schedule: CacheSchedule | None = None,
    *,
    batch_size: int = 16,
    guidance_scale: float = 1.5,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
    class_labels: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    latent_size: int | None = None,
    distilled_guidance: float | None = None,
    guidance_scale_2: float | None = None,
    progress: bool = True,
) -> ForecastFit | tuple[ForecastFit, ForecastFit]:
    """Fit the forecast coefficients of ``schedule`` by least squares on one batch of its own run.

    A pipeline with two transformers (Wan 2.2: ``transformer`` for the high-noise steps,
    ``transformer_2`` for the low-noise ones) takes one schedule per transformer, as
    :func:`enable_cache` does, and one sampling run fits both: it returns a pair of fits, enabled with
    ``enable_cache(pipe, tuple(fit.schedule for fit in fits))``.

    Args:
        pipe_or_transformer: a supported transformer (or a pipeline holding one or two), not cached.
        scheduler: the sampler (default: the pipeline's); copied, never modified.
        schedule: a schedule with forecast entries (e.g. ``CacheSchedule.fora(T, U, 2, order=2)``); for
            a two-transformer pipeline a pair ``(for_transformer, for_transformer_2)`` or a dict with
            those keys, each with as many steps as its transformer runs
            (:func:`harmonica.cache.stage_steps`), at least one of them forecasting.
        batch_size: samples the fit sees (one class or prompt each, drawn from ``seed``); CFG doubles
            the transformer batch. 2 parameters per entry against B·N·D values: a small batch is
            plenty.
        guidance_scale: CFG scale as at inference.
        guidance_scale_2: a two-transformer pipeline's CFG scale on the low-noise steps (WanPipeline's
            ``guidance_scale_2``; default ``guidance_scale``).
        ridge: μ relative to the mean diagonal of each entry's Gram matrix, pulling towards the
            step-distance rule's coefficients.
        class_labels, prompt_embeds, …, latent_size, distilled_guidance: the conditions to draw from
            and the flow-matching families' latent size and guidance, as for :func:`train_router`.
        progress: a tqdm bar over the steps.

    Returns:
        A :class:`ForecastFit`; ``.schedule`` enables like any schedule.

    Raises:
        ValueError: no schedule, a schedule without forecast entries or of another model's shape,
            ``batch_size`` < 1, ``ridge`` < 0.
    """
    from .training import _conditioning_for, _Group, _Setup

    stages = _two_stage_transformers(pipe_or_transformer)
    if stages is None:
        if guidance_scale_2 is not None:
            raise ValueError(
                "guidance_scale_2 is the low-noise stage's scale of a two-transformer pipeline (Wan 2.2); "
                "this runs one transformer: pass guidance_scale only"
            )
        transformers = (single_transformer(pipe_or_transformer, "fit forecast coefficients"),)
        schedules: tuple[Any, ...] = (schedule,)
        scales = (guidance_scale,)
    else:
        transformers, schedules = stages, stage_pair(schedule, "schedule")
        scales = (guidance_scale, guidance_scale if guidance_scale_2 is None else guidance_scale_2)
    for transformer, given, name in zip(transformers, schedules, _STAGE_NAMES, strict=False):
        supported_class(transformer)
        if not isinstance(given, CacheSchedule):
            raise ValueError(f"pass the CacheSchedule whose forecasts to fit, got {type(given).__name__}")
        num_units = len(units(transformer))
        if given.num_units != num_units:
            which = f" for {name}" if stages is not None else ""
            raise ValueError(f"the schedule{which} has {given.num_units} units but the model has {num_units}")
        if transformer.__dict__.get("_harmonica_cache") is not None:
            raise CacheStateError("disable_cache() before fitting forecasts on this transformer")
    if not any(given.forecasts for given in schedules):
        raise ValueError(
            "the schedule forecasts no entry: nothing to fit. Make one with CacheSchedule.fora(T, U, N, "
            "order=1 or 2) or schedule.with_forecast(order)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    if scheduler is None:
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
        if scheduler is None:
            raise ValueError("pass the scheduler: fit_forecast(transformer, scheduler, schedule)")
    scheduler = copy.deepcopy(scheduler)
    stage_of = None
    if stages is not None:
        sizes = tuple(given.num_steps for given in schedules)
        stage_of = step_stages(pipe_or_transformer, scheduler, sum(sizes))
        runs = (stage_of.count(0), stage_of.count(1))
        if runs != sizes:
            raise ValueError(
                f"this pipeline's {sum(sizes)} steps run {runs[0]} on transformer and {runs[1]} on "
                f"transformer_2, but the schedules have {sizes[0]} and {sizes[1]} steps; make each "
                "transformer's schedule for the steps it runs (harmonica.cache.stage_steps(pipe, T)); "
                "a transformer that runs no step is fitted alone with scheduler=pipe.scheduler"
            )

    conditioning = _conditioning_for(
        transformers[0],
        class_labels,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        latent_size,
        distilled_guidance,
    )
    setups = [
        _Setup(
            model=transformer,
            handle=None,  # type: ignore[arg-type]
            scheduler=scheduler,  # one sampler state across the stages
            conditioning=conditioning,
            cfg=scale > 1,
            guidance_scale=scale,
            device=next(transformer.parameters()).device,
            group=_Group(),
        )
        for transformer, scale in zip(transformers, scales, strict=True)
    ]
    fits = fit_stages(
        setups, schedules, stage_of, batch_size=batch_size, seed=seed, ridge=ridge, progress=progress
    )
    return fits[0] if stages is None else (fits[0], fits[1])


def fit_on(
    setup: Any, schedule: CacheSchedule, *, batch_size: int, seed: int, ridge: float, progress: bool
) -> ForecastFit:
    """:func:`fit_forecast` on a prepared sampling set-up (model, scheduler, conditions, CFG)."""
    return fit_stages(
        [setup], (schedule,), None, batch_size=batch_size, seed=seed, ridge=ridge, progress=progress
    )[0]


def fit_stages(
    setups: list[Any],
    schedules: tuple[CacheSchedule, ...],
    stage_of: list[int] | None,
    *,
    batch_size: int,
    seed: int,
    ridge: float,
    progress: bool,
) -> list[ForecastFit]:
    """One fit per set-up from one sampling run: step i runs ``setups[stage_of[i]]`` (all the first
    without ``stage_of``), whose handle counts only its own steps. The set-ups share the scheduler."""
    from .training import _advance, _draw, _generator

    began = time.perf_counter()
    handles = [
        _FittingHandle(setup.model, schedule, ridge)
        for setup, schedule in zip(setups, schedules, strict=True)
    ]
    first = setups[0]
    x, cond = _draw(first, _generator(seed, 5, 0), batch_size)
    total = len(stage_of) if stage_of is not None else schedules[0].num_steps
    first.scheduler.set_timesteps(total, device=first.device)
    timesteps = first.scheduler.timesteps
    steps = range(total)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="fit forecasts", unit="step")
    try:
        for setup, handle in zip(setups, handles, strict=True):
            attach_handle(setup.model, handle)
        with torch.no_grad():
            for handle in handles:
                handle.reset()
            for i in steps:
                setup = setups[stage_of[i] if stage_of is not None else 0]
                pred = setup.conditioning.call(setup.model, x, timesteps[i], cond, setup.cfg)
                x = _advance(setup, pred, timesteps[i], x)
            fitted = [
                fitted_schedule(schedule, handle._coefficients)
                for schedule, handle in zip(schedules, handles, strict=True)
            ]
    finally:
        for setup in setups:
            disable_cache(setup.model)
    seconds = time.perf_counter() - began
    fits = []
    for schedule, handle, schedule_fitted in zip(schedules, handles, fitted, strict=True):
        residual = torch.full(schedule.compute.shape, float("nan"))
        for (t, k), (fit_error, rule_error) in handle.errors.items():
            residual[t, k] = (fit_error / rule_error).item()
        fits.append(ForecastFit(schedule_fitted, schedule, residual, seconds))
    return fits


def fitted_schedule(schedule: CacheSchedule, coefficients: torch.Tensor) -> CacheSchedule:
    """``schedule`` with the coefficients a :class:`_FittingHandle` run left (``[T, U, 2]``), zero where
    an entry does not forecast at that order."""
    fitted = coefficients.double().cpu()
    orders = schedule.orders
    fitted[orders == 0] = 0
    fitted[..., 1][orders == 1] = 0
    return schedule.with_coefficients(fitted)

"""Schedules searched on the final image: greedy reuse by measured final-sample error per FLOP saved.

By default the search reuses whole steps (every unit of a step together, so the step's features stay
consistent with each other; reusing single units one at a time by their isolated costs measured
3–4 dB below evenly spaced whole-step reuse on the reference model), and single units only for a remainder
smaller than a step (``granularity="unit"`` searches units throughout).

``search_schedule(model, scheduler, num_steps=T, target_cur=0.4)`` builds a hard ``[T, U]`` schedule
without training a router. It starts from every unit computed (or from a router's or schedule's own
table, to polish it to an exact usage) and grows the reused set in rounds. Each round runs the
current schedule once from a fixed batch of noise, keeping the state and cache before every step,
then, for every entry that could change, runs the rest of the sampling from that step with that one
entry flipped, and measures the final sample's mean squared distance to the uncached sample. The
entries whose reuse costs the least final-image error per FLOP saved are taken (the entries whose
compute gains the most, when the start caches more than the target), the round's share at a time,
under an optional cap on the age of reused entries. Two neighbouring steps of one unit are never
taken in the same round (their costs interact: reusing both makes a stale chain); the next round
measures again in the new context.

Exchanges. Greedy growth takes steps one at a time by their isolated costs and never moves a compute
it has placed. ``exchanges=N`` then runs up to N passes at the reached usage, each sampling every swap
of one computed and one reused whole step and keeping the best one that lowers the final error
(:func:`exchange_steps`); ``train_router`` polishes its trained schedule the same way, starting from
the best of it and the static schedules of its usage (:func:`static_starts`).

Cost: every candidate runs from the first step it changes, from the state the current schedule's
run left there (with forecasting, one saved engine state at a time). A round that can flip E entries
runs ``Σ_t E_t · (T − t)`` sampling forwards of the batch, about ``E · T / 2``; later rounds in the
same direction measure only the 3·chunk entries that ranked cheapest in the round before (lazy
greedy). :attr:`SearchResult.forwards` counts them.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .cache import CacheHandle, CacheStateError, attach_handle, disable_cache
from .models import flop_profile, single_transformer, supported_class, units
from .router import FIRST_STEP_LOGIT, Router
from .schedule import DEFAULT_WARMUP, CacheSchedule, _check_max_age, _check_order
from .training import (
    _advance,
    _conditioning_for,
    _draw,
    _generator,
    _Group,
    _predict,
    _RoutedHandle,
    _Setup,
)

__all__ = ["SearchResult", "exchange_steps", "final_error", "search_schedule", "static_starts"]


@dataclass
class SearchResult:
    """What :func:`search_schedule` returns.

    ``schedule`` is the schedule at the (last) target; ``schedules`` maps every requested target to
    its schedule (targets are visited in order, so each one extends or trims the one before);
    ``router`` encodes ``schedule`` as router logits (±5) with the model's fingerprint, the sampler
    and the search settings, so it saves, loads and enables like a trained router. ``history`` has
    one record per round (cache usage, final-sample MSE to the uncached sample, forwards so far).
    """

    schedule: CacheSchedule
    schedules: dict[float, CacheSchedule]
    router: Router
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    forwards: int = 0


def search_schedule(
    pipe_or_transformer: Any,
    scheduler: Any = None,
    *,
    num_steps: int,
    target_cur: float | Sequence[float],
    start: Router | CacheSchedule | None = None,
    threshold: float = 0.1,
    max_age: int | None = None,
    granularity: Literal["step", "unit"] = "step",
    forecast_order: int = 0,
    fit_coefficients: bool = True,
    rounds: int = 4,
    exchanges: int = 0,
    batch_size: int | None = None,
    guidance_scale: float = 1.5,
    seed: int = 0,
    class_labels: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    latent_size: int | None = None,
    distilled_guidance: float | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search a cache schedule on final-sample error at one or more target cache usage ratios.

    Args:
        pipe_or_transformer: a supported transformer (or a pipeline holding one), not cached.
        scheduler: the sampler the schedule is for (default: the pipeline's); copied, never modified.
        num_steps: T.
        target_cur: the cache usage ratio to reach, in (0, 1), or several (visited in order).
        start: a trained :class:`Router` (thresholded at ``threshold``) or a :class:`CacheSchedule` to
            polish to the target usage; default: every unit computed.
        max_age: cap on the age of a reused entry in steps (None: none). Entries of ``start`` over the
            cap are computed first.
        granularity: ``"step"`` flips whole steps (every unit of a step reused together, the
            features of one step stay consistent), one step per round, then single units for a
            remainder smaller than a step; ``"unit"`` flips single units, ``rounds`` batches.
        forecast_order: 1 or 2: every reused entry is forecast at that order (as its history allows,
            :meth:`CacheSchedule.with_forecast`) while the costs are measured, so the search places
            the computes where forecasting needs them; each cost is then a sampling run with the
            engine from the flipped step on, and the result's schedules forecast. 0: plain reuse.
        fit_coefficients: with forecasting, every candidate schedule gets least-squares coefficients
            (as :func:`harmonica.fit_forecast`, on the batch its error is measured on, in the run that
            measures it: the branches of forecast entries run too, so that run costs every unit)
            before its error is counted, so the search chooses the computes for the fitted forecasts
            that will run; False: step-distance rule.
        rounds: unit granularity: cost measurements on the way to the last target (more:
            interactions seen sooner, proportionally more forwards).
        exchanges: at each target, up to this many passes of whole-step exchanges at the same usage
            (:func:`exchange_steps`): each pass samples every (computed step, reused step) pair
            swapped and keeps the best swap if it lowers the error; C·R runs per pass.
        batch_size: noise samples (one class or prompt each, drawn from ``seed``) the errors are
            measured on; CFG doubles the transformer batch. Default 8, and 16 with ``exchanges``:
            each pass keeps the best of C·R measured swaps, and the best of many noisy errors is
            biased low (at 45 % on the reference model 8 samples kept a third swap that lost
            2.6 dB against 16 samples' on 48 others; README "Learned routers").
        guidance_scale: CFG scale as at inference.
        class_labels, prompt_embeds, …: the conditions to draw from, as for :func:`train_router`
            (with ``pooled_prompt_embeds``, ``latent_size`` and ``distilled_guidance`` for the
            flow-matching families).
        progress: a tqdm bar over the flipped-entry runs.

    Returns:
        A :class:`SearchResult`.

    Raises:
        ValueError: a target outside (0, 1), ``max_age`` < 1, ``rounds`` or ``batch_size`` < 1, a
            ``start`` of another shape or for another model.
        UnsupportedModelError: the model has no routable units.
    """
    transformer = single_transformer(pipe_or_transformer, "search a schedule")
    supported_class(transformer)
    names = units(transformer)
    targets = [target_cur] if isinstance(target_cur, (int, float)) else list(target_cur)
    if not targets:
        raise ValueError("target_cur needs at least one cache usage ratio")
    for target in targets:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"target_cur must be a cache usage ratio in (0, 1), got {target!r}")
    if max_age is not None:
        _check_max_age(max_age)
    if granularity not in ("step", "unit"):
        raise ValueError(f"granularity must be 'step' or 'unit', got {granularity!r}")
    _check_order(forecast_order)
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (step 0 only fills the cache), got {num_steps!r}")
    if batch_size is None:
        batch_size = 16 if exchanges else 8
    for name, value in (("rounds", rounds), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(exchanges, bool) or not isinstance(exchanges, int) or exchanges < 0:
        raise ValueError(f"exchanges is a number of exchange passes, an int >= 0, got {exchanges!r}")
    if scheduler is None:
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
        if scheduler is None:
            raise ValueError(
                "pass the scheduler the schedule is for: search_schedule(transformer, scheduler, ...)"
            )
    if transformer.__dict__.get("_harmonica_cache") is not None:
        raise CacheStateError("disable_cache() before searching a schedule on this transformer")
    mask = _start_mask(start, transformer, num_steps, len(names), threshold)
    if max_age is not None:
        mask = CacheSchedule(mask).with_max_age(max_age).compute

    conditioning = _conditioning_for(
        transformer,
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
    handle = _RoutedHandle(transformer, num_steps, write_threshold=0.5)
    setup = _Setup(
        model=transformer,
        handle=handle,
        scheduler=copy.deepcopy(scheduler),
        conditioning=conditioning,
        cfg=guidance_scale > 1,
        guidance_scale=guidance_scale,
        device=next(transformer.parameters()).device,
        group=_Group(),
    )
    flops = torch.tensor(flop_profile(transformer).units, dtype=torch.float64)
    total = num_steps * len(names)
    began = time.perf_counter()
    runner = make_runner(setup, num_steps, seed, batch_size, forecast_order, fit=fit_coefficients)
    as_schedule = runner.schedule

    history: list[dict[str, float]] = []
    schedules: dict[float, CacheSchedule] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="search schedule", unit="run")
    try:
        reference = runner.final(torch.ones(num_steps, len(names), dtype=torch.bool))
        distance = sum(
            abs(round(b * total) - round(a * total))
            for a, b in zip([1 - mask.float().mean().item(), *targets[:-1]], targets, strict=True)
        )
        chunk = max(1, math.ceil(distance / rounds))
        shortlist: tuple[bool, list[tuple[int, int]]] | None = None
        for target in targets:
            goal = round(target * total)
            while (reused := int((~mask).sum())) != goal:
                need = goal - reused
                grow = need > 0
                whole = granularity == "step" and abs(need) >= len(names)
                # Lazy greedy (units): after a round in the same direction only the entries that ranked
                # among the cheapest (3 rounds' worth) are measured again: an expensive entry rarely
                # becomes cheap as the schedule fills, and measuring every entry is the whole cost.
                only = None
                if not whole and shortlist is not None and shortlist[0] == grow:
                    only = shortlist[1]
                measure = functools.partial(
                    flip_costs,
                    runner,
                    mask,
                    reference,
                    grow=grow,
                    max_age=max_age,
                    whole_steps=whole,
                    bar=bar,
                )
                costs = measure(only=only)
                if not costs and only is not None:
                    costs = measure()
                if not costs:
                    break  # nothing left that may flip (the age cap binds)
                sign = 1 if grow else -1
                ranked = sorted(costs, key=lambda e: sign * costs[e] / _flops_of(mask, e, grow, flops))
                taken, flipped = 0, set()
                for t, k in ranked:
                    if taken >= min(1 if whole else chunk, abs(need)):
                        break
                    if (t - 1, k) in flipped or (t + 1, k) in flipped:
                        continue  # neighbours in one chain interact: measure them apart
                    trial = _flipped(mask, (t, k), grow)
                    size = int((trial != mask).sum())
                    if size > abs(need) or (max_age is not None and CacheSchedule(trial).max_age() > max_age):
                        continue
                    mask, taken = trial, taken + (1 if whole else size)
                    flipped.add((t, k))
                shortlist = None if whole else (grow, [e for e in ranked if e not in flipped][: 3 * chunk])
                error = F.mse_loss(runner.final(mask), reference).item()
                history.append(
                    {
                        "cur": as_schedule(mask).cache_usage_ratio,
                        "mse": error,
                        "forwards": float(runner.forwards),
                        "seconds": time.perf_counter() - began,
                    }
                )
                if bar is not None:
                    bar.set_postfix(cur=f"{history[-1]['cur']:.1%}", mse=f"{error:.3g}")
                if taken == 0:
                    break
            if exchanges:
                mask = exchange_steps(
                    runner,
                    mask,
                    reference,
                    passes=exchanges,
                    max_age=max_age,
                    bar=bar,
                    history=history,
                    began=began,
                )
            schedules[float(target)] = as_schedule(mask)
            if int((~mask).sum()) != goal:
                reached = schedules[float(target)].cache_usage_ratio
                warnings.warn(
                    f"search_schedule reached a cache usage of {reached:.1%} for the target {target:.1%}: "
                    f"no entry may flip further (max_age={max_age}); raise max_age or lower the target",
                    stacklevel=2,
                )
    finally:
        if bar is not None:
            bar.close()
        if transformer.__dict__.get("_harmonica_cache") is not None:
            disable_cache(transformer)
    schedule = schedules[float(targets[-1])]
    settings = {
        "method": "search",
        "target_cur": targets[-1],
        "max_age": max_age,
        "granularity": granularity,
        "forecast_order": forecast_order,
        "fit_coefficients": bool(forecast_order and fit_coefficients),
        "rounds": rounds,
        "exchanges": exchanges,
        "batch_size": batch_size,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "start": None if start is None else type(start).__name__,
        "cur": schedule.cache_usage_ratio,
        "search_seconds": round(time.perf_counter() - began, 3),
        "forwards": runner.forwards,
    }
    return SearchResult(
        schedule=schedule,
        schedules=schedules,
        router=schedule_router(transformer, schedule, scheduler, settings),
        history=history,
        seconds=time.perf_counter() - began,
        forwards=runner.forwards,
    )


def exchange_steps(
    runner: Any,
    mask: torch.Tensor,
    reference: torch.Tensor,
    *,
    passes: int,
    max_age: int | None = None,
    bar: Any = None,
    history: list[dict[str, float]] | None = None,
    began: float | None = None,
) -> torch.Tensor:
    """Exchange local search at a fixed usage: each pass samples ``mask`` with every pair of one
    wholly computed step and one wholly reused step (of steps 1…T−1) swapped, and keeps the swap
    that lowers :func:`final_error` most; a pass with no such swap ends the search. Steps whose units
    are partly reused stay as they are; swaps over ``max_age`` are not tried. Greedy growth adds
    steps one at a time by their isolated costs, which cannot see that moving a compute elsewhere
    helps once the schedule is full. A pass costs C·R runs (C computed, R reused steps), each sampled
    from the first step its swap changes, min(i, j), on."""
    began = time.perf_counter() if began is None else began
    current = final_error(runner.final(mask), reference)
    for index in range(passes):
        steps = range(1, mask.shape[0])
        computed = [t for t in steps if bool(mask[t].all())]
        reused = [t for t in steps if not bool(mask[t].any())]
        trials = []
        for i in computed:
            for j in reused:
                trial = mask.clone()
                trial[i], trial[j] = False, True
                if max_age is None or CacheSchedule(trial).max_age() <= max_age:
                    trials.append(trial)
        _, finals = runner.finals(mask, trials, bar)
        errors = [final_error(final, reference) for final in finals]
        if not errors or min(errors) >= current:
            break
        chosen = min(range(len(errors)), key=errors.__getitem__)
        mask, current = trials[chosen], errors[chosen]
        if history is not None:
            history.append(
                {
                    "cur": float((~mask).float().mean()),
                    "mse": F.mse_loss(finals[chosen], reference).item(),
                    "error": current,
                    "exchange": float(index + 1),
                    "forwards": float(runner.forwards),
                    "seconds": time.perf_counter() - began,
                }
            )
        if bar is not None:
            bar.set_postfix(cur=f"{float((~mask).float().mean()):.1%}", error=f"{current:.3g}")
    return mask


def static_starts(mask: torch.Tensor, order: int, max_age: int | None) -> dict[str, torch.Tensor]:
    """The static whole-step schedules that reuse as many steps as ``mask`` does, named: FORA N (in
    TaylorSeer's form with its warm-up when ``order`` forecasts) and the same count spread evenly,
    after step 0 and after the warm-up; those over ``max_age`` are left out. Empty when ``mask`` has
    a partly reused step (no whole-step schedule has its usage)."""
    num_steps, num_units = mask.shape
    whole = mask.all(1) | ~mask.any(1)
    if not bool(whole.all()):
        return {}
    reused = int((~mask[:, 0]).sum())
    warmups = (1, DEFAULT_WARMUP) if order else (1,)
    forms = {
        f"FORA N={n}": CacheSchedule.fora(num_steps, num_units, n, order=order).compute
        for n in range(2, num_steps)
    }
    forms.update(
        {
            f"even steps after step {w - 1}": CacheSchedule.even_steps(
                num_steps, num_units, reused / num_steps, warmup=w
            ).compute
            for w in warmups
            if w < num_steps
        }
    )
    starts: dict[str, torch.Tensor] = {}
    for name, form in forms.items():
        if int((~form[:, 0]).sum()) != reused or any(torch.equal(form, s) for s in (mask, *starts.values())):
            continue
        if max_age is None or CacheSchedule(form).max_age() <= max_age:
            starts[name] = form
    return starts


def final_error(final: torch.Tensor, reference: torch.Tensor) -> float:
    """What the exchanges minimise: the mean over samples of ln(MSE to the uncached sample), i.e.
    −mean PSNR up to a constant, the figure ``harmonica compare`` reports. The pooled MSE is ruled by
    the worst few samples of a small batch: on the reference model a swap that halved it on 8 samples
    changed the PSNR of 48 others by −0.1 dB."""
    per_sample = (final - reference).pow(2).flatten(1).mean(1)
    return float(per_sample.clamp_min(1e-30).log().mean())


def schedule_router(transformer: Any, schedule: CacheSchedule, scheduler: Any, settings: dict) -> Router:
    """A :class:`Router` whose hard schedule (at any threshold) is ``schedule``: logits ±5, and
    ``schedule`` itself as the router's forecast when it forecasts."""
    router = Router.for_model(transformer, schedule.num_steps, scheduler=scheduler, training=settings)
    with torch.no_grad():
        router.logits.copy_(torch.where(schedule.compute, FIRST_STEP_LOGIT, -FIRST_STEP_LOGIT))
    if schedule.forecasts:
        router.forecast = schedule
    return router


def _start_mask(
    start: Any, transformer: Any, num_steps: int, num_units: int, threshold: float
) -> torch.Tensor:
    if start is None:
        return torch.ones(num_steps, num_units, dtype=torch.bool)
    if isinstance(start, Router):
        start.check_model(transformer)
        start = start.to_schedule(threshold)
    if not isinstance(start, CacheSchedule):
        raise TypeError(f"start must be a Router, a CacheSchedule or None, got {type(start).__name__}")
    if (start.num_steps, start.num_units) != (num_steps, num_units):
        raise ValueError(
            f"start is a schedule of {start.num_steps} steps × {start.num_units} units but the search is "
            f"for {num_steps} steps × {num_units} units"
        )
    return start.compute


def make_runner(
    setup: _Setup, num_steps: int, seed: int, batch_size: int, order: int, *, fit: bool
) -> _Runner | _EngineRunner:
    """The runs a search measures on: whole engine runs when forecasting at ``order`` (the training
    handle cannot forecast), else the training handle's runs with the state before every step kept
    (attached to the model here; the caller disables the cache when done)."""
    if order:
        return _EngineRunner(setup, num_steps, seed, batch_size, order, fit=fit)
    attach_handle(setup.model, setup.handle)
    return _Runner(setup, num_steps, seed, batch_size)


class _Runner:
    """Hard-schedule sampling runs from a fixed batch, with the state before every step kept."""

    def __init__(self, setup: _Setup, num_steps: int, seed: int, batch_size: int) -> None:
        self.setup = setup
        self.num_steps = num_steps
        self.x, self.cond = _draw(setup, _generator(seed, 4, 0), batch_size)
        self.forwards = 0

    def schedule(self, mask: torch.Tensor) -> CacheSchedule:
        """The schedule ``mask`` runs as (plain reuse)."""
        return CacheSchedule(mask)

    def _run(self, mask: torch.Tensor, start: int, x: torch.Tensor, on_step=None) -> torch.Tensor:
        setup = self.setup
        timesteps = setup.scheduler.timesteps
        rows = mask.float().to(x.device)
        for i in range(start, self.num_steps):
            if on_step is not None:
                on_step(i, x)
            if i == 0:
                setup.handle.set_mode("fill")
            else:
                setup.handle.set_soft(rows[i], defer_writes=False)
            pred = _predict(setup, x, timesteps[i], self.cond, i)
            x = _advance(setup, pred, timesteps[i], x)
            self.forwards += 1
        return x

    @torch.no_grad()
    def final(self, mask: torch.Tensor) -> torch.Tensor:
        self.setup.scheduler.set_timesteps(self.num_steps, device=self.setup.device)
        self.setup.handle.reset()
        return self._run(mask, 0, self.x).double()

    @torch.no_grad()
    def finals(
        self, base: torch.Tensor, trials: Sequence[torch.Tensor], bar: Any = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final samples of ``base`` and of each of ``trials``; a trial runs from the first step
        where it differs from ``base``, from the state the run of ``base`` kept before that step."""
        setup = self.setup
        states: dict[int, tuple[torch.Tensor, list, Any]] = {}

        def keep(i: int, x: torch.Tensor) -> None:
            states[i] = (x.clone(), setup.handle.snapshot(), copy.deepcopy(setup.scheduler))

        setup.scheduler.set_timesteps(self.num_steps, device=setup.device)
        setup.handle.reset()
        final = self._run(base, 0, self.x, on_step=keep).double()
        results = []
        for trial in trials:
            start = _first_difference(base, trial)
            if start == self.num_steps:
                results.append(final)
            else:
                x, buffers, scheduler = states[start]
                setup.scheduler = copy.deepcopy(scheduler)
                setup.handle.restore(buffers)
                results.append(self._run(trial, start, x).double())
            if bar is not None:
                bar.update(1)
        return final, results


class _EngineRunner:
    """Sampling runs of a fixed batch through the inference engine (forecast schedules: the training
    handle cannot forecast). Same batch as :class:`_Runner`. With ``fit``, a run fits its schedule's
    forecast coefficients on the batch it samples (:class:`harmonica.forecast._FittingHandle`: each
    forecast entry also runs its branch, fits, then forecasts with what it fitted), so one run both
    fits a candidate and samples it as the fitted schedule runs at inference."""

    def __init__(
        self, setup: _Setup, num_steps: int, seed: int, batch_size: int, order: int, *, fit: bool
    ) -> None:
        self.setup = setup
        self.num_steps = num_steps
        self.order = order
        self.fit = fit
        self.x, self.cond = _draw(setup, _generator(seed, 4, 0), batch_size)
        self.forwards = 0
        self._fitted: dict[bytes, CacheSchedule] = {}

    def schedule(self, mask: torch.Tensor) -> CacheSchedule:
        """``mask`` forecast at the search's order, with the coefficients fitted on the search's batch
        when ``fit`` (kept per mask from the run that measured it)."""
        schedule = CacheSchedule(mask).with_forecast(self.order)
        if not self.fit or not schedule.forecasts:
            return schedule
        key = mask.numpy().tobytes()
        if key not in self._fitted:
            self.final(mask)
        return self._fitted[key]

    def final(self, mask: torch.Tensor) -> torch.Tensor:
        """The final sample of the batch under :meth:`schedule` of ``mask``."""
        return self.finals(mask, [])[0]

    @torch.no_grad()
    def finals(
        self, base: torch.Tensor, trials: Sequence[torch.Tensor], bar: Any = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As :meth:`_Runner.finals`: the run of ``base`` saves the engine's generation before the
        first step where a trial differs, and the trial continues from a copy of it (its coefficients
        of the steps before are the ones ``base`` fitted there: the same, since a fit only sees the
        steps before it). One saved generation is held at a time."""
        setup = self.setup
        rules = [CacheSchedule(mask).with_forecast(self.order) for mask in (base, *trials)]
        starts: dict[int, list[int]] = {}
        for index, rule in enumerate(rules[1:]):
            start = _first_difference(base, trials[index])
            if rule.history_sizes != rules[0].history_sizes:
                start = 0  # caches of other sizes: nothing to continue from
            starts.setdefault(start, []).append(index)
        results: list[torch.Tensor | None] = [None] * len(trials)
        setup.scheduler.set_timesteps(self.num_steps, device=setup.device)
        timesteps = setup.scheduler.timesteps
        x = self.x
        handle = self._attach(rules[0])
        try:
            for i in range(self.num_steps):
                if i in starts:
                    state, scheduler = handle._save_generation(), setup.scheduler
                    disable_cache(setup.model)
                    for index in starts[i]:
                        setup.scheduler = copy.deepcopy(scheduler)
                        results[index] = self._resume(rules[index + 1], trials[index], i, state, x)
                        if bar is not None:
                            bar.update(1)
                    setup.scheduler = scheduler
                    handle = self._attach(rules[0], state)
                pred = setup.conditioning.call(setup.model, x, timesteps[i], self.cond, setup.cfg)
                x = _advance(setup, pred, timesteps[i], x)
                self.forwards += 1
            self._keep_fit(rules[0], base, handle)
        finally:
            disable_cache(setup.model)
        final = x.double()
        return final, [final if result is None else result for result in results]

    def _attach(self, rule: CacheSchedule, state: dict | None = None) -> Any:
        """A handle for ``rule`` attached to the model (fitting when ``fit``, else the rule's or the
        already fitted coefficients), continuing ``state`` if given."""
        from .forecast import DEFAULT_RIDGE, _FittingHandle

        if self.fit and rule.forecasts:
            handle = _FittingHandle(self.setup.model, rule, DEFAULT_RIDGE)
        else:
            handle = CacheHandle(self.setup.model, rule)
        attach_handle(self.setup.model, handle)
        handle.reset()
        if state is not None:
            handle._load_generation(state)
            step = state["_step"]
            if rule.forecasts and step:
                coefficients = rule.coefficients.to(device=self.setup.device, dtype=torch.float32)
                coefficients[:step] = state["_coefficients"][:step]
                handle._coefficients = coefficients
        return handle

    def _resume(self, rule: CacheSchedule, mask: torch.Tensor, start: int, state: dict, x: torch.Tensor):
        """The final sample of ``mask``, sampled from step ``start`` on from ``state`` and ``x``."""
        setup = self.setup
        timesteps = setup.scheduler.timesteps
        handle = self._attach(rule, state if start else None)
        try:
            for i in range(start, self.num_steps):
                pred = setup.conditioning.call(setup.model, x, timesteps[i], self.cond, setup.cfg)
                x = _advance(setup, pred, timesteps[i], x)
            self.forwards += self.num_steps - start
            self._keep_fit(rule, mask, handle)
        finally:
            disable_cache(setup.model)
        return x.double()

    def _keep_fit(self, rule: CacheSchedule, mask: torch.Tensor, handle: Any) -> None:
        if self.fit and rule.forecasts:
            from .forecast import fitted_schedule

            self._fitted[mask.numpy().tobytes()] = fitted_schedule(rule, handle._coefficients)


def flip_costs(
    runner: _Runner | _EngineRunner,
    mask: torch.Tensor,
    reference: torch.Tensor,
    *,
    grow: bool,
    max_age: int | None,
    whole_steps: bool = False,
    only: list[tuple[int, int]] | None = None,
    bar: Any = None,
) -> dict[tuple[int, int], float]:
    """Final-sample MSE change of flipping each eligible entry (compute → reuse when ``grow``), or
    each eligible entry of ``only``. With ``whole_steps`` a candidate is every flippable unit of
    one step, keyed ``(t, -1)``."""
    candidates = list(_candidates(mask, grow=grow, max_age=max_age, whole_steps=whole_steps, only=only))
    base, finals = runner.finals(mask, [trial for _, trial in candidates], bar)
    error = F.mse_loss(base, reference).item()
    return {
        key: F.mse_loss(final, reference).item() - error
        for (key, _), final in zip(candidates, finals, strict=True)
    }


def _first_difference(base: torch.Tensor, trial: torch.Tensor) -> int:
    """The first step whose row differs between two masks (T when none does)."""
    differs = (base != trial).any(dim=1).nonzero()
    return int(differs[0]) if len(differs) else base.shape[0]


def _candidates(
    mask: torch.Tensor,
    *,
    grow: bool,
    max_age: int | None,
    whole_steps: bool,
    only: list[tuple[int, int]] | None,
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """``(key, flipped mask)`` for every entry (or whole step, key ``(t, -1)``) of steps 1…T−1 that
    may flip: it changes the mask, respects the age cap when growing, and is in ``only`` if given."""
    wanted = None if only is None else set(only)
    for t in range(1, mask.shape[0]):
        for key in [(t, -1)] if whole_steps else [(t, k) for k in range(mask.shape[1])]:
            if wanted is not None and key not in wanted:
                continue
            trial = _flipped(mask, key, grow)
            if torch.equal(trial, mask):
                continue
            if grow and max_age is not None and CacheSchedule(trial).max_age() > max_age:
                continue
            yield key, trial


def _flipped(mask: torch.Tensor, key: tuple[int, int], grow: bool) -> torch.Tensor:
    """``mask`` with entry ``(t, k)``, or every unit of step t for ``k = -1``, set to reuse (``grow``)
    or compute."""
    t, k = key
    trial = mask.clone()
    if k < 0:
        trial[t] = False if grow else True
    else:
        trial[t, k] = not grow
    return trial


def _flops_of(mask: torch.Tensor, key: tuple[int, int], grow: bool, flops: torch.Tensor) -> float:
    """FLOPs a flip saves (or spends): its units' FLOPs."""
    changed = (_flipped(mask, key, grow) != mask).any(dim=0)
    return float(flops[changed].sum()) or 1.0

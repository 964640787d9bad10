"""Cache schedules: which unit is computed, reused or forecast at which denoising step
(METHOD.md §1–2, §7)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .models import DEFAULT_TEXT_TOKENS, flop_profile, units

__all__ = [
    "CacheSchedule",
    "FORECAST_RULES",
    "FORECAST_TIMES",
    "forecast_coefficients",
    "log_snr_times",
    "times_keywords",
]

MAX_ORDER = 2
FORECAST_RULES = ("taylor", "newton")
DEFAULT_RULE = "taylor"
FORECAST_TIMES = ("blend", "step", "log-snr")
"""Where the forecast rule measures step distances, by name (:func:`times_keywords`)."""
DEFAULT_WARMUP = 3
"""Fully computed first steps of a forecasting :meth:`CacheSchedule.fora` (diffusers' TaylorSeer
default): the outputs change fastest there, and the history fills at unit spacing."""


class CacheSchedule:
    """An immutable boolean table ``compute[T, U]``: unit k is computed at step t iff ``compute[t, k]``.

    Step t is the t-th transformer call of a generation (one call per denoising step, classifier-
    free guidance batched into that call); unit k is column k of :func:`harmonica.units`. A unit
    that is not computed is *reused*: its branch is skipped and its cached output (from the last
    step that computed it) enters the residual with the current step's gate. Row 0 must compute
    every unit, because the cache is empty at the first step.

    A reused entry may instead be *forecast* (``orders[t, k]`` = 1 or 2): the unit's output is
    extrapolated from its last ``order + 1`` computed outputs ``c0`` (newest), ``c1``, ``c2`` as
    ``c0 + a·(c0 − c1) + b·(c0 − 2c1 + c2)``, with ``(a, b) = coefficients[t, k]``. By default the
    coefficients follow from the step distances (:func:`forecast_coefficients`); learned ones can
    replace them (:meth:`with_coefficients`). An order-k entry needs k + 1 earlier computes of its
    unit; the constructor refuses one that has fewer, and :meth:`fora` / :meth:`with_forecast` lower
    such entries to the order their history allows (plain reuse right after the first compute).

    Nothing in a schedule depends on the input, so the whole run is known before it starts.
    """

    __slots__ = ("_compute", "_rows", "_orders", "_order_rows", "_coefficients")

    def __init__(self, compute: Any, orders: Any = None, coefficients: Any = None) -> None:
        mask = torch.as_tensor(compute).detach().to("cpu")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(
                    f"a cache schedule is boolean; got {mask.dtype}. Threshold probabilities first "
                    "(e.g. Router.to_schedule(threshold))"
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("an integer schedule mask may only hold 0 (reuse) and 1 (compute)")
            mask = mask.bool()
        if mask.dim() != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
            raise ValueError(
                f"a cache schedule is [T, U] (steps, units) with T, U >= 1; got shape {tuple(mask.shape)}"
            )
        if not bool(mask[0].all()):
            missing = [k for k in range(mask.shape[1]) if not bool(mask[0, k])]
            raise ValueError(
                f"step 0 must compute every unit (the cache is empty then), but units {missing} are "
                "marked for reuse; set mask[0] = True"
            )
        self._compute = mask.clone()
        # Equal rows share one tuple object: per-step decisions are host constants, and a compiled
        # transformer sees one graph per distinct row.
        interned: dict[tuple, tuple] = {}
        self._rows = tuple(interned.setdefault(row, row) for row in map(tuple, mask.tolist()))
        self._orders = _check_orders(orders, mask)
        # (its own table: a row of 0s equals a row of Falses in Python)
        interned_orders: dict[tuple, tuple] = {}
        self._order_rows = tuple(
            interned_orders.setdefault(row, row) for row in map(tuple, self._orders.tolist())
        )
        if coefficients is None:
            self._coefficients = forecast_coefficients(mask, self._orders) if self.forecasts else None
        else:
            self._coefficients = _check_coefficients(coefficients, mask, self._orders)

    @classmethod
    def from_mask(cls, mask: Any) -> CacheSchedule:
        """A schedule from a ``[T, U]`` boolean (or 0/1 integer) mask; True = compute.

        Raises ``ValueError`` unless row 0 is all True.
        """
        return cls(mask)

    @classmethod
    def full(cls, num_steps: int, num_units: int) -> CacheSchedule:
        """Every unit computed at every step: no reuse, the uncached model's output."""
        _check_size(num_steps, num_units)
        return cls(torch.ones(num_steps, num_units, dtype=torch.bool))

    @classmethod
    def fora(
        cls,
        num_steps: int,
        num_units: int,
        interval: int,
        order: int = 0,
        *,
        warmup: int | None = None,
        rule: str = DEFAULT_RULE,
        times: Any = None,
        scheduler: Any = None,
    ) -> CacheSchedule:
        """FORA (METHOD.md §7): all units computed on steps ``t % interval == 0``, reused otherwise.

        ``order`` 1 or 2 forecasts the skipped steps from the last computed outputs instead of reusing
        them, in TaylorSeer's static form: the first ``warmup`` steps (default 3 when forecasting, 0
        for plain reuse) are computed, then every ``interval``-th step from step ``warmup + 1`` (step
        ``warmup`` itself is already forecast from the warm-up steps). Entries with less history than
        the order asks use the highest order their history allows. ``times`` and ``scheduler`` (the
        pipeline's sampler, worth passing when forecasting): see :meth:`with_forecast`.
        """
        _check_size(num_steps, num_units)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        order = _check_order(order)
        if warmup is None:
            warmup = DEFAULT_WARMUP if order else 0
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup is a number of fully computed first steps, an int >= 0, got {warmup!r}")
        t = torch.arange(num_steps)
        steps = t % interval == 0 if warmup == 0 else (t < warmup) | ((t - warmup - 1) % interval == 0)
        mask = steps[:, None].expand(num_steps, num_units)
        return cls(mask).with_forecast(order, rule=rule, times=times, scheduler=scheduler)

    @classmethod
    def even_steps(cls, num_steps: int, num_units: int, usage: float, *, warmup: int = 1) -> CacheSchedule:
        """Every unit reused on ``round(usage · T)`` steps spread evenly over steps ``warmup``…T−1
        (whole-step reuse at a chosen cache usage ratio; at usage 0.5 and even T this is FORA N=2).
        ``warmup``: the first steps computed (≥ 1: step 0 fills the cache; 3 is TaylorSeer's
        warm-up for order-2 forecasts)."""
        _check_size(num_steps, num_units)
        if not 0 <= usage < 1:
            raise ValueError(f"usage is a cache usage ratio in [0, 1), got {usage!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup < num_steps:
            raise ValueError(f"warmup is a number of computed first steps in 1…T−1, got {warmup!r}")
        count = min(round(usage * num_steps), num_steps - warmup)
        mask = torch.ones(num_steps, num_units, dtype=torch.bool)
        if count:
            spacing = (num_steps - warmup) / count
            mask[[warmup + int((i + 0.5) * spacing) for i in range(count)]] = False  # centred in its span
        return cls(mask)

    def with_forecast(
        self, order: int, *, rule: str = DEFAULT_RULE, times: Any = None, scheduler: Any = None
    ) -> CacheSchedule:
        """This schedule with every reused entry forecast at ``order`` (0 = plain reuse), lowered where
        the unit has fewer than ``order + 1`` earlier computes; coefficients from ``rule``.

        The rule measures the distances between steps in ``times`` (one value per step, e.g. the
        sampler's :func:`log_snr_times`; None: the step index, TaylorSeer's). With ``scheduler`` (the
        sampler the schedule will run with, e.g. ``pipe.scheduler``; exclusive with ``times``) each
        forecast is the mean of the rule's forecasts in step index and in the sampler's log-SNR (one
        fused read all the same: the forecast is linear in its coefficients). Each of those two times
        loses to the other on some models; their mean kept more than the step index in 13 of 17 model ×
        interval × step-count cases and at most 0.5 dB less in the others (README "The rule in
        log-SNR")."""
        order = _check_order(order)
        if scheduler is not None and times is not None:
            raise ValueError(
                "pass times= or scheduler=, not both (scheduler= blends the step index with its log-SNR)"
            )
        orders = torch.where(self._compute, 0, available_orders(self._compute).clamp(0, order))
        coefficients = forecast_coefficients(self._compute, orders, rule=rule, times=times)
        if scheduler is not None and order:
            in_lsnr = log_snr_times(scheduler, self.num_steps)
            coefficients = (
                coefficients + forecast_coefficients(self._compute, orders, rule=rule, times=in_lsnr)
            ) / 2
        return CacheSchedule(self._compute, orders, coefficients)

    def with_coefficients(self, coefficients: Any) -> CacheSchedule:
        """This schedule with forecast coefficients ``[T, U, 2]`` (``a``, ``b`` per entry) replaced,
        e.g. by ones fitted on teacher trajectories; entries that are not forecast must hold zeros."""
        return CacheSchedule(self._compute, self._orders, coefficients)

    def with_max_age(self, max_age: int | None) -> CacheSchedule:
        """This schedule with every reuse of an entry older than ``max_age`` steps turned into a compute.

        The age of a reused entry at step t is t minus the last step that computed the unit; FORA N
        reuses entries up to N − 1 steps old. ``None`` returns the schedule unchanged.
        """
        if max_age is None:
            return self
        _check_max_age(max_age)
        mask = self._compute.clone()
        last = torch.zeros(mask.shape[1], dtype=torch.long)
        for t in range(1, mask.shape[0]):
            mask[t] |= t - last > max_age
            last[mask[t]] = t
        orders = torch.where(mask, 0, self._orders)
        return (
            CacheSchedule(mask, orders, forecast_coefficients(mask, orders))
            if self.forecasts
            else CacheSchedule(mask)
        )

    def max_age(self) -> int:
        """The oldest cache entry the schedule reuses, in steps (0 when nothing is reused)."""
        oldest = 0
        last = torch.zeros(self.num_units, dtype=torch.long)
        for t in range(1, self.num_steps):
            row = self._compute[t]
            if not bool(row.all()):
                oldest = max(oldest, int((t - last[~row]).max()))
            last[row] = t
        return oldest

    @property
    def compute(self) -> torch.Tensor:
        """A copy of the ``[T, U]`` bool table (CPU)."""
        return self._compute.clone()

    @property
    def num_steps(self) -> int:
        """T, the number of transformer calls (denoising steps) the schedule covers."""
        return self._compute.shape[0]

    @property
    def num_units(self) -> int:
        """U, the number of units (columns)."""
        return self._compute.shape[1]

    @property
    def rows(self) -> tuple[tuple[bool, ...], ...]:
        """The table as Python bools, one tuple per step (equal rows are the same object)."""
        return self._rows

    @property
    def orders(self) -> torch.Tensor:
        """A copy of the ``[T, U]`` forecast orders (int8; 0 at computed and plainly reused entries)."""
        return self._orders.clone()

    @property
    def order_rows(self) -> tuple[tuple[int, ...], ...]:
        """The orders as Python ints, one tuple per step (equal rows are the same object)."""
        return self._order_rows

    @property
    def forecasts(self) -> bool:
        """Whether any entry is forecast (order ≥ 1)."""
        return bool(self._orders.any())

    @property
    def coefficients(self) -> torch.Tensor:
        """A copy of the ``[T, U, 2]`` forecast coefficients ``(a, b)`` (float64; zeros where no
        entry is forecast)."""
        if self._coefficients is None:
            return torch.zeros(*self._compute.shape, 2, dtype=torch.float64)
        return self._coefficients.clone()

    @property
    def history_sizes(self) -> tuple[int, ...]:
        """Per unit: how many computed outputs the cache must hold (0 for a unit never reused, 1 for
        plain reuse, order + 1 for forecasting)."""
        reused = ~self._compute.all(dim=0)
        sizes = torch.where(reused, self._orders.amax(dim=0).long() + 1, 0)
        return tuple(sizes.tolist())

    @property
    def reused_units(self) -> tuple[bool, ...]:
        """Per unit: whether any step reuses it (such units need a cache buffer)."""
        return tuple(not bool(col) for col in self._compute.all(dim=0).tolist())

    @property
    def cache_usage_ratio(self) -> float:
        """CUR: the share of (step, unit) pairs served from the cache."""
        return 1.0 - self._compute.float().mean().item()

    def ideal_speedup(self, model: nn.Module, *, text_tokens: int = DEFAULT_TEXT_TOKENS) -> float:
        """FLOP ratio uncached / cached over the whole run: ``T·F_full / (T·F_always + Σ_t Σ_k c[t,k]·F_k)``.

        ``F_k`` are the units' FLOPs and ``F_always`` those of everything that runs every step, from
        :func:`harmonica.models.flop_profile` at the model's native token count. This is an upper
        bound from arithmetic alone, not a measured speedup.
        """
        names = units(model)
        if len(names) != self.num_units:
            raise ValueError(f"the schedule has {self.num_units} units but the model has {len(names)}")
        profile = flop_profile(model, text_tokens=text_tokens)
        unit_flops = torch.tensor(profile.units, dtype=torch.float64)
        computed = (self._compute.double() * unit_flops).sum().item()
        cached_cost = self.num_steps * profile.always + computed
        return self.num_steps * profile.total / cached_cost

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CacheSchedule):
            return NotImplemented
        return (
            self._rows == other._rows
            and self._order_rows == other._order_rows
            and torch.equal(self.coefficients, other.coefficients)
        )

    def __hash__(self) -> int:
        return hash((self._rows, self._order_rows))

    def __repr__(self) -> str:
        forecast = f", max_order={int(self._orders.max())}" if self.forecasts else ""
        return (
            f"CacheSchedule(num_steps={self.num_steps}, num_units={self.num_units}, "
            f"cache_usage_ratio={self.cache_usage_ratio:.3f}{forecast})"
        )


def available_orders(compute: torch.Tensor) -> torch.Tensor:
    """``[T, U]``: the highest forecast order each entry's history allows (computes of its unit
    before step t, minus one; −1 where there is none)."""
    before = compute.long().cumsum(dim=0) - compute.long()
    return (before - 1).clamp(max=MAX_ORDER)


def forecast_coefficients(
    compute: torch.Tensor, orders: torch.Tensor, *, rule: str = DEFAULT_RULE, times: Any = None
) -> torch.Tensor:
    """``[T, U, 2]`` coefficients ``(a, b)`` of ``c0 + a·(c0 − c1) + b·(c0 − 2c1 + c2)`` from the step
    distances: ``d = t − s0`` to the newest compute ``s0``, ``h0 = s0 − s1``, ``h1 = s1 − s2`` between
    the computes before it, in step index, or with ``times`` (one strictly monotonic value per step)
    between those steps' times.

    - ``"taylor"`` (TaylorSeer): a Taylor series around ``s0`` whose derivatives are backward
      differences, each order divided by the latest distance ``h0``:
      ``c0 + d·Δ1 + d²/2·Δ2``, ``Δ1 = (c0 − c1)/h0``, ``Δ2 = ((c0 − c1)/h0 − (c1 − c2)/h1)/h0``.
    - ``"newton"``: the polynomial through the last ``order + 1`` computed points, evaluated at t.

    Order 1 is the same under both rules (``a = d/h0``).
    """
    if rule not in FORECAST_RULES:
        raise ValueError(f"rule must be one of {FORECAST_RULES}, got {rule!r}")
    steps, num_units = compute.shape
    times = _check_times(times, steps)
    table = torch.zeros(steps, num_units, 2, dtype=torch.float64)
    for k in range(num_units):
        computed: list[int] = []
        for t in range(steps):
            if bool(compute[t, k]):
                computed.append(t)
                continue
            order = int(orders[t, k])
            if order == 0:
                continue
            table[t, k, 0], table[t, k, 1] = rule_coefficients(t, computed[::-1][: order + 1], rule, times)
    return table


def rule_coefficients(
    step: int, computed: list[int], rule: str = DEFAULT_RULE, times: list[float] | None = None
) -> tuple[float, float]:
    """``(a, b)`` of the forecast at ``step`` from the steps that wrote its history, newest first
    (``[s0]`` reuses, ``[s0, s1]`` order 1, ``[s0, s1, s2]`` order 2), distances in ``times`` (None:
    the step index); see :func:`forecast_coefficients`."""
    if len(computed) < 2:
        return 0.0, 0.0
    at = (lambda i: float(i)) if times is None else times.__getitem__
    s0, s1 = at(computed[0]), at(computed[1])
    d, h0 = at(step) - s0, s0 - s1
    if len(computed) == 2:
        return d / h0, 0.0
    h1 = s1 - at(computed[2])
    if rule == "taylor":
        A, B = d / h0 + d * d / (2 * h0 * h0), -d * d / (2 * h0 * h1)
    else:
        A = d / h0 + d * (d + h0) / (h0 * (h0 + h1))
        B = -d * (d + h0) / (h1 * (h0 + h1))
    # c0 + A·(c0 − c1) + B·(c1 − c2), with c1 − c2 = (c0 − c1) − (c0 − 2c1 + c2)
    return A + B, -B


def _check_times(times: Any, num_steps: int) -> list[float] | None:
    if times is None:
        return None
    values = torch.as_tensor(times, dtype=torch.float64).flatten().tolist()
    if len(values) != num_steps:
        raise ValueError(f"times holds one value per step: {num_steps} expected, got {len(values)}")
    gaps = [values[i + 1] - values[i] for i in range(len(values) - 1)]
    if not all(math.isfinite(v) for v in values) or not (
        all(g > 0 for g in gaps) or all(g < 0 for g in gaps)
    ):
        raise ValueError(
            "times must be finite and strictly monotonic (one value per step, e.g. log_snr_times(scheduler, "
            f"num_steps)), got {[round(v, 4) for v in values]}"
        )
    return values


def log_snr_times(scheduler: Any, num_steps: int) -> list[float]:
    """The log signal-to-noise ratio ``λ = log(α/σ)`` of the sample at each of ``num_steps`` steps of
    ``scheduler`` (a copy of it is set up; the scheduler itself is untouched), for ``times=`` of the
    forecasting schedules: the variable in which DPM-Solver integrates the noise prediction.

    Schedulers with ``alphas_cumprod`` (DDIM, DDPM, DPM-Solver, …): ``½·ln(ᾱ_t / (1 − ᾱ_t))`` at each
    timestep. Flow matching (``sigmas``, x_t = (1 − σ)·x0 + σ·noise: the FlowMatch schedulers, and
    UniPC / DPM-Solver with ``use_flow_sigmas`` or ``prediction_type="flow_prediction"``, as Wan's,
    whose ``alphas_cumprod`` does not describe the run): ``ln((1 − σ)/σ)``, with σ kept in
    [1e-4, 1 − 1e-4] (the first step's σ = 1 has λ = −∞). A scheduler whose ``set_timesteps`` needs
    more than the step count (FLUX's resolution-dependent ``mu``) is refused: pass its λ yourself."""
    steps = copy.deepcopy(scheduler)
    try:
        type(steps).set_timesteps(steps, num_steps)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"cannot set {type(scheduler).__name__} up for {num_steps} steps on its own ({err}); compute "
            "the log-SNR of its steps yourself and pass it as times="
        ) from None
    config = getattr(steps, "config", {})
    flow = bool(config.get("use_flow_sigmas")) or config.get("prediction_type") == "flow_prediction"
    if not flow and getattr(steps, "alphas_cumprod", None) is not None:
        alphas = steps.alphas_cumprod.double()[steps.timesteps.cpu().round().long()][:num_steps]
        return (0.5 * torch.log(alphas / (1 - alphas))).tolist()
    sigmas = getattr(steps, "sigmas", None)
    if sigmas is None:
        raise ValueError(
            f"{type(scheduler).__name__} has neither alphas_cumprod nor sigmas: pass the log-SNR of its "
            "steps as times="
        )
    sigma = sigmas.double().cpu()[:num_steps].clamp(1e-4, 1 - 1e-4)
    return torch.log((1 - sigma) / sigma).tolist()


def times_keywords(name: str, scheduler: Any, num_steps: int) -> dict[str, Any]:
    """The keywords of :meth:`CacheSchedule.fora` / :meth:`~CacheSchedule.with_forecast` for a time by
    name: ``"blend"`` (``scheduler=``: the mean of the rule in step index and in the sampler's
    log-SNR), ``"step"`` (none: the step index) or ``"log-snr"`` (``times=`` the sampler's log-SNR)."""
    if name not in FORECAST_TIMES:
        raise ValueError(f"forecast times must be one of {FORECAST_TIMES}, got {name!r}")
    if name == "blend":
        return {"scheduler": scheduler}
    return {"times": log_snr_times(scheduler, num_steps)} if name == "log-snr" else {}


def _check_order(order: Any) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(
            f"order is the forecast order: 0 (plain reuse), 1 or 2 (Taylor forecasting), got {order!r}"
        )
    return order


def _check_orders(orders: Any, compute: torch.Tensor) -> torch.Tensor:
    if orders is None:
        return torch.zeros(compute.shape, dtype=torch.int8)
    table = torch.as_tensor(orders).detach().to("cpu")
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise TypeError(f"forecast orders are integers 0–{MAX_ORDER}, got dtype {table.dtype}")
    if table.shape != compute.shape:
        raise ValueError(
            f"orders must match the schedule's shape {tuple(compute.shape)}, got {tuple(table.shape)}"
        )
    if bool(((table < 0) | (table > MAX_ORDER)).any()):
        raise ValueError(
            "forecast orders must be 0 (plain reuse), 1 or 2; got values "
            f"{sorted(set(table.unique().tolist()))}"
        )
    table = table.to(torch.int8)
    if bool((table[compute] != 0).any()):
        t, k = (table.ne(0) & compute).nonzero()[0].tolist()
        raise ValueError(
            f"entry (step {t}, unit {k}) is computed but has forecast order {int(table[t, k])}; "
            "orders apply to reused entries only (set them to 0 where the mask computes)"
        )
    short = (table > 0) & (table.long() > available_orders(compute))
    if bool(short.any()):
        t, k = short.nonzero()[0].tolist()
        have = int((compute[:t, k]).sum())
        raise ValueError(
            f"entry (step {t}, unit {k}) asks for an order-{int(table[t, k])} forecast but its unit was "
            f"computed only {have} time(s) before; an order-k forecast needs k + 1 earlier computes. Lower "
            "that entry's order, or build the orders with CacheSchedule.with_forecast(order), which does"
        )
    return table


def _check_coefficients(
    coefficients: Any, compute: torch.Tensor, orders: torch.Tensor
) -> torch.Tensor | None:
    table = torch.as_tensor(coefficients).detach().to("cpu")
    if not table.is_floating_point():
        raise TypeError(f"forecast coefficients are floats, got dtype {table.dtype}")
    if table.shape != (*compute.shape, 2):
        raise ValueError(
            f"forecast coefficients are [T, U, 2] = {(*compute.shape, 2)} (a, b per entry), "
            f"got {tuple(table.shape)}"
        )
    table = table.to(torch.float64)
    if not bool(torch.isfinite(table).all()):
        raise ValueError("forecast coefficients must be finite")
    if bool((table[orders == 0] != 0).any()):
        raise ValueError("forecast coefficients must be zero at entries that are not forecast (order 0)")
    if bool((table[orders == 1][:, 1] != 0).any()):
        raise ValueError("an order-1 entry has no second difference: its coefficient b must be zero")
    return table.clone() if bool(orders.any()) else None


def _check_max_age(max_age: Any) -> None:
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
        raise ValueError(
            f"max_age is the oldest cache entry a schedule may reuse, in steps: an int >= 1 "
            f"(1 = never reuse an entry twice in a row), got {max_age!r}"
        )


def _check_size(num_steps: int, num_units: int) -> None:
    for name, value in (("num_steps", num_steps), ("num_units", num_units)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

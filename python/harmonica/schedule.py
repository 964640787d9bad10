"""Cache schedules: which unit is computed at which denoising step (METHOD.md §1–2, §7)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import DEFAULT_TEXT_TOKENS, flop_profile, units

__all__ = ["CacheSchedule"]


class CacheSchedule:
    """An immutable boolean table ``compute[T, U]``: unit k is computed at step t iff ``compute[t, k]``.

    Step t is the t-th transformer call of a generation (one call per denoising step, classifier-
    free guidance batched into that call); unit k is column k of :func:`harmonica.units`. A unit
    that is not computed is *reused*: its branch is skipped and its cached output (from the last
    step that computed it) enters the residual with the current step's gate. Row 0 must compute
    every unit, because the cache is empty at the first step.

    Nothing in a schedule depends on the input, so the whole run is known before it starts.
    """

    __slots__ = ("_compute", "_rows")

    def __init__(self, compute: Any) -> None:
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
        interned: dict[tuple[bool, ...], tuple[bool, ...]] = {}
        self._rows = tuple(interned.setdefault(row, row) for row in map(tuple, mask.tolist()))

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
    def fora(cls, num_steps: int, num_units: int, interval: int) -> CacheSchedule:
        """FORA (METHOD.md §7): all units computed on steps ``t % interval == 0``, reused otherwise."""
        _check_size(num_steps, num_units)
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        steps = torch.arange(num_steps) % interval == 0
        return cls(steps[:, None].expand(num_steps, num_units))

    @classmethod
    def even_steps(cls, num_steps: int, num_units: int, usage: float) -> CacheSchedule:
        """Every unit reused on ``round(usage · T)`` steps spread evenly over steps 1…T−1 (whole-step
        reuse at a chosen cache usage ratio; at usage 0.5 and even T this is FORA N=2)."""
        _check_size(num_steps, num_units)
        if not 0 <= usage < 1:
            raise ValueError(f"usage is a cache usage ratio in [0, 1), got {usage!r}")
        count = min(round(usage * num_steps), num_steps - 1)
        mask = torch.ones(num_steps, num_units, dtype=torch.bool)
        if count:
            spacing = (num_steps - 1) / count
            mask[[1 + int((i + 0.5) * spacing) for i in range(count)]] = False  # centred in its span
        return cls(mask)

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
        return CacheSchedule(mask)

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
        return self._rows == other._rows

    def __hash__(self) -> int:
        return hash(self._rows)

    def __repr__(self) -> str:
        return (
            f"CacheSchedule(num_steps={self.num_steps}, num_units={self.num_units}, "
            f"cache_usage_ratio={self.cache_usage_ratio:.3f})"
        )


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

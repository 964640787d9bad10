"""Router training: Step-wise Denoising Training with the Image-Error Proxy objective, and L2C.

``train_router(transformer, scheduler, num_steps=T)`` learns the logits ``L[T, U]`` of a
:class:`Router` with the backbone frozen (METHOD.md §2–6):

- ``method="harmonica"`` (SDT + IEPO). Image-free trajectories: pure noise and random classes (or
  prompts), classifier-free guidance batched as at inference. Step 0 computes every unit and fills
  the cache. At every later step t the **teacher** (all units computed, cache untouched, no autograd)
  and the **student** (each unit blended ``r·branch + (1 − r)·cache`` with ``r = sigmoid(L[t])``) run
  on the same state x_t; loss ``λ_t · MSE(teacher, student) + β · Σ_k r[t, k]``; one AdamW step on the
  logits; clamp to [-5, 5]; the student's detached blend is written to the cache where r > 0.1; x_t
  advances with the student's (guided) prediction. ``λ`` is re-estimated every ``lambda_every``
  iterations from final-image errors (:func:`estimate_lambda`); ``lambda_variant="none"`` is the
  SDT-only ablation (λ ≡ 1).
- ``method="l2c"`` (Learning-to-Cache). Real samples noised to a random even step, one full step
  fills the cache, the next (odd) step trains in isolation with λ ≡ 1. Even steps are pinned to
  compute, so inference alternates full and cached steps as L2C does.

Memory. Only the student's forward keeps activations (one step of the backbone, parameters frozen);
the teacher runs without autograd, no gradient crosses steps (cache and x_t are detached).

Defaults. SDT trains straight-through (the hard forward of inference, each row's gradient taken
where it is reused), with reused entries at most 2 steps old, one logit per step (``tie_steps``) and
every reused step forecast at order 2 with coefficients fitted on the training calls, then the trained
schedule polished by whole-step exchanges judged on the final image (``exchanges``), which measured
best on the reference model; ``straight_through=False, max_age=None, tie_steps=False,
forecast_order=0, exchanges=0`` is the published method.

Budget mode. ``target_cur`` steers β after every trajectory by bisection in log β (×2 steps, halved
at every crossing of the target), then one constant shift of the trained logits sets the router's
hard schedule (threshold τ) to the closest reachable cache usage ratio; this is how routers of
different methods are compared at the same compute. Without a given β, the first trajectory trains
fidelity alone and measures, at each step, λ_t · MSE(all units cached, teacher) / U: the mean
per-unit cost of caching; β starts at its mean.

Multi-process. Under ``torchrun`` (or any initialised ``torch.distributed`` group; gloo on CPU, nccl
on CUDA) every rank draws the same global batch from the seed and keeps its shard; gradients of the
logits and the λ estimates are all-reduced (mean), so W processes compute what one process with the
same global batch computes. Rank 0 writes checkpoints and the router.

Checkpoints. With ``checkpoint_dir`` the state (logits, optimizer, β, λ, counters, history) is
written atomically after every trajectory; a killed run started again with the same arguments
resumes from there, losing at most the unfinished trajectory (≤ T − 1 iterations).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harmonica_kernels import available_backends, cached_gated_residual, routed_gated_residual

from ._checks import check_output_dir, digest_module, digest_tensors, scheduler_key
from ._io import atomic_write
from .adapters import adapter_for
from .cache import CacheHandle, CacheStateError, _as_row, attach_handle, disable_cache
from .models import (
    default_latent_size,
    fingerprint,
    single_transformer,
    supported_class,
    units,
)
from .router import LOGIT_BOUND, Router
from .schedule import DEFAULT_RULE, CacheSchedule, _check_order, rule_coefficients

__all__ = ["TrainingConfig", "TrainingResult", "estimate_lambda", "train_router"]

Method = Literal["harmonica", "l2c"]
LambdaVariant = Literal["marginal", "leave_one_out", "none"]
LambdaOn = Literal["soft", "hard"]
GradientAt = Literal["reuse", "hard"]

DEFAULT_FORECAST_ORDER = 2
"""``train_router``'s cached path for SDT: order-2 forecasts of reused units (README "Learned routers")."""

DEFAULT_EXCHANGES = 3
"""``train_router``'s SDT default: passes of whole-step exchanges on the final image after training."""

DEFAULT_TARGET_CUR = 0.35
"""Budget of a run given neither ``beta`` nor ``target_cur``: β is a scale that fits only the model
it was tuned on, so without one the trainer aims at this cache usage ratio instead."""

_CHECKPOINT_NAME = "router-training.pt"
_CHECKPOINT_VERSION = 2


@dataclass
class TrainingConfig:
    """Every setting of a training run (METHOD.md §5 defaults; L2C's own where ``method="l2c"``).

    ``iterations`` counts trained denoising steps (T − 1 per SDT trajectory, one per L2C sample
    batch). ``batch_size`` is the global number of noise samples per iteration (doubled by CFG).
    ``lr`` defaults to the authors' 0.01 for HarmoniCa and 1e-3 for L2C when each row gets at least
    500 (5 000 for L2C) updates, and to ``5 / updates per row`` for shorter runs, so that a row can
    cross half the logit range within the run (1 000 iterations at T = 20: lr ≈ 0.1). A given
    ``beta`` without ``target_cur`` is the paper's fixed-β mode (the authors used 7e-8 on DiT-XL/2,
    L2C 1e-6: scales that fit only the model they were tuned on); with neither, the run is in budget
    mode at :data:`DEFAULT_TARGET_CUR`.
    ``lambda_on="hard"`` measures λ on the router's hard schedule (what inference runs) instead of its
    soft blend; ``straight_through`` trains on the hard forward with the soft gradient; ``max_age``
    caps the age of a reused cache entry, in training and in the router's schedule; ``gradient_at``
    says where the straight-through gradient is taken; ``tie_steps`` shares one logit per step
    among its units. ``forecast_order`` (1 or 2) trains with the cached
    path forecasting each reused unit from its last writes (the router then carries a forecasting
    schedule, its coefficients fitted by least squares after training when ``fit_coefficients``).
    """

    num_steps: int
    method: Method = "harmonica"
    iterations: int = 1_000
    batch_size: int = 16
    guidance_scale: float = 1.5
    lr: float | None = None
    beta: float | None = None
    target_cur: float | None = None
    lambda_every: int = 500
    lambda_variant: LambdaVariant = "marginal"
    lambda_batch_size: int | None = None
    lambda_on: LambdaOn = "soft"
    straight_through: bool | None = None
    max_age: int | None | Literal["auto"] = "auto"
    tie_steps: bool | None = None
    gradient_at: GradientAt = "reuse"
    forecast_order: int | None = None
    fit_coefficients: bool = True
    exchanges: int | None = None
    write_threshold: float = 0.1
    threshold: float = 0.1
    seed: int = 0

    def resolved(self) -> TrainingConfig:
        """A copy with the method-dependent defaults filled in, validated."""
        cfg = copy.copy(self)
        if cfg.method not in ("harmonica", "l2c"):
            raise ValueError(f"method must be 'harmonica' or 'l2c', got {cfg.method!r}")
        if cfg.lambda_variant not in ("marginal", "leave_one_out", "none"):
            raise ValueError(
                f"lambda_variant must be 'marginal', 'leave_one_out' or 'none', got {cfg.lambda_variant!r}"
            )
        if cfg.lambda_on not in ("soft", "hard"):
            raise ValueError(f"lambda_on must be 'soft' or 'hard', got {cfg.lambda_on!r}")
        if cfg.gradient_at not in ("reuse", "hard"):
            raise ValueError(f"gradient_at must be 'reuse' or 'hard', got {cfg.gradient_at!r}")
        is_l2c = cfg.method == "l2c"
        if cfg.forecast_order is None:
            cfg.forecast_order = 0 if is_l2c else DEFAULT_FORECAST_ORDER
        _check_order(cfg.forecast_order)
        if is_l2c and cfg.forecast_order:
            raise ValueError(
                "forecast_order needs the step-wise trajectories of method='harmonica': L2C trains each "
                "cached step in isolation, with no history to forecast from"
            )
        # Defaults by measurement (README "Learned routers"): for SDT, whole steps reused together,
        # trained on the hard forward, entries at most 2 steps old; L2C keeps its own form.
        if cfg.straight_through is None:
            cfg.straight_through = not is_l2c
        if cfg.tie_steps is None:
            cfg.tie_steps = not is_l2c
        if cfg.exchanges is None:
            cfg.exchanges = 0 if is_l2c else DEFAULT_EXCHANGES
        if isinstance(cfg.exchanges, bool) or not isinstance(cfg.exchanges, int) or cfg.exchanges < 0:
            raise ValueError(f"exchanges is a number of exchange passes, an int >= 0, got {cfg.exchanges!r}")
        if is_l2c and cfg.exchanges:
            raise ValueError(
                "exchanges polish an SDT router's whole steps; L2C pins every even step to compute"
            )
        if cfg.max_age == "auto":
            cfg.max_age = None if is_l2c else 2
        if cfg.max_age is not None:
            from .schedule import _check_max_age

            _check_max_age(cfg.max_age)
        if cfg.lr is None:
            # The authors' lr (0.01; L2C 1e-3) over their ~1 000 updates per row, or as much as lets a
            # row cross half the logit range in the updates this run gives it, whichever is larger.
            trained_rows = (cfg.num_steps // 2) if is_l2c else cfg.num_steps - 1
            updates_per_row = max(cfg.iterations / max(trained_rows, 1), 1.0)
            cfg.lr = max(1e-3 if is_l2c else 0.01, LOGIT_BOUND / updates_per_row)
        if cfg.beta is None and cfg.target_cur is None:
            cfg.target_cur = DEFAULT_TARGET_CUR
        if is_l2c:
            cfg.lambda_variant = "none"
        if cfg.lambda_batch_size is None:
            cfg.lambda_batch_size = cfg.batch_size
        checks = [
            (
                cfg.num_steps >= 2,
                f"num_steps must be >= 2 (step 0 only fills the cache), got {cfg.num_steps}",
            ),
            (not is_l2c or cfg.num_steps >= 2, "L2C needs at least 2 steps"),
            (cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}"),
            (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
            (cfg.guidance_scale >= 1, f"guidance_scale must be >= 1, got {cfg.guidance_scale}"),
            (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
            (cfg.beta is None or cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}"),
            (cfg.lambda_every >= 1, f"lambda_every must be >= 1, got {cfg.lambda_every}"),
            (cfg.lambda_batch_size >= 1, f"lambda_batch_size must be >= 1, got {cfg.lambda_batch_size}"),
            (0 <= cfg.write_threshold < 1, f"write_threshold must be in [0, 1), got {cfg.write_threshold}"),
            (0 <= cfg.threshold < 1, f"threshold must be in [0, 1), got {cfg.threshold}"),
        ]
        if cfg.target_cur is not None:
            limit = 0.5 if is_l2c else 1.0
            checks.append(
                (
                    isinstance(cfg.target_cur, (int, float)) and 0 < cfg.target_cur < limit,
                    f"target_cur must be in (0, {limit}) for method {cfg.method!r} (a cache usage "
                    f"ratio), got {cfg.target_cur}",
                )
            )
            if cfg.beta == 0:
                raise ValueError("budget mode scales beta multiplicatively: give beta > 0 or None (auto)")
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return cfg


@dataclass
class TrainingResult:
    """What :func:`train_router` returns: the router, its per-trajectory history and timings."""

    router: Router
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------------
# The blending handle


class _RoutedHandle(CacheHandle):
    """A :class:`CacheHandle` whose units run in one of three modes, chosen by the trainer per call.

    - ``fill``: every unit computed, its cache written (the first step of a trajectory, and the steps
      of λ's runs that compute every unit);
    - ``teacher``: every unit computed, the cache neither read nor written (the uncached model);
    - ``soft``: every unit computed and blended ``r·branch + (1 − r)·cache`` with ``r = self.r[k]``
      (differentiable), the detached blend written to the cache where ``r > write_threshold``.
      With ``defer_writes`` the writes wait for :meth:`commit_writes` (after the backward pass,
      which still needs the old cache).

    With ``forecast_order`` k > 0 the cache path is the unit's forecast instead of its last write:
    each unit keeps its last k + 1 writes and the steps that made them, and ``cache`` above is
    ``c0 + a·(c0 − c1) + b·(c0 − 2c1 + c2)`` at the highest order its history allows (what inference
    runs with ``schedule.with_forecast(k)``). The coefficients are the step-distance ``rule``'s, or,
    with ``collect``, fitted by least squares on the trajectories trained so far: every student call
    adds, per (step, unit, history steps), the normal equations of ``y − c0 ≈ a·d1 + b·d2`` against
    the branch output y it computes anyway (:meth:`merge_statistics` folds a trajectory's sums in,
    averaged over processes), and the read solves them with :data:`~harmonica.forecast.DEFAULT_RIDGE`
    towards the rule, as :func:`harmonica.fit_forecast` does.

    The trainer sets ``step`` itself: a teacher and a student call share one denoising step.
    """

    def __init__(
        self,
        transformer: nn.Module,
        num_steps: int,
        write_threshold: float,
        forecast_order: int = 0,
        rule: str = DEFAULT_RULE,
    ) -> None:
        num_units = len(units(transformer))
        super().__init__(transformer, CacheSchedule.full(num_steps, num_units))
        self._history_sizes = (forecast_order + 1,) * num_units
        self._all_units = (True,) * num_units
        self.forecast_order = forecast_order
        self.rule = rule
        # _written[k]: the steps whose outputs unit k's history holds, newest first.
        self._written: list[list[int]] = [[] for _ in range(num_units)]
        # (step, unit, history steps) -> [G11, G12, G22, r1, r2] (float64) of the least-squares fit
        self.collect = False
        self.statistics: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
        self.pending_statistics: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
        self.write_threshold = write_threshold
        self.mode = "fill"
        self.r: torch.Tensor | None = None
        self.r_host: list[float] = []
        self.branches_without_graph = False
        self.write = True
        self.defer_writes = False
        self.pending: dict[int, torch.Tensor] = {}
        # the teacher's branch outputs, kept when asked (a computed row whose gradient is taken at reuse)
        self.keep_teacher = False
        self.kept: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        super().reset()
        self._written = [[] for _ in self._written]

    def set_soft(self, r: torch.Tensor, *, defer_writes: bool, write: bool = True) -> None:
        """Blend with ``r``; ``write=False``: leave the cache alone (a forward for the gradient only)."""
        self.mode = "soft"
        self.r = r
        self.r_host = r.detach().float().cpu().tolist()
        self.write = write
        self.defer_writes = defer_writes
        # Every unit blended at 0 with a gradient (the gradient taken at reuse, or a reused row of the
        # straight-through forward): the output does not depend on the branches' values, and what the
        # backward sends into them is multiplied by that 0. So they run without autograd, keeping
        # none of their activations; the gradient in r needs only their values.
        self.branches_without_graph = r.requires_grad and not any(self.r_host)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.r = None

    def _write_slot(self, unit: int) -> torch.Tensor | None:
        written = self._written[unit]
        written.insert(0, self._step)
        del written[self.forecast_order + 1 :]
        return super()._write_slot(unit)

    def _read(self, unit: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple]:
        """``(value, c0, differences, key)``: what a reuse of ``unit`` reads at the current step (its
        last write, or its forecast), the last write, the forecast's ``(d1[, d2])`` and its key."""
        c0 = self._cached(unit, self._buffers[unit])
        written = tuple(self._written[unit][: self.forecast_order + 1])
        key = (self._step, unit, written)
        if len(written) < 2:
            return c0, c0, (), key
        c1 = self._older[unit][0]
        d1 = c0 - c1
        terms = (d1,) if len(written) == 2 else (d1, d1 - (c1 - self._older[unit][1]))
        value = c0
        for coefficient, term in zip(self._fitted_coefficients(key), terms, strict=False):
            value = value + coefficient * term
        return value, c0, terms, key

    def _fitted_coefficients(self, key: tuple) -> tuple[Any, Any]:
        step, _, written = key
        prior = rule_coefficients(step, list(written), self.rule)
        sums = self.statistics.get(key)
        if sums is None:
            return prior
        from .forecast import DEFAULT_RIDGE, ridge_solve

        n = len(written) - 1
        gram = torch.stack([sums[0], sums[1], sums[1], sums[2]]).reshape(2, 2)[:n, :n]
        prior_t = torch.tensor(prior[:n], dtype=gram.dtype, device=gram.device)
        solution = ridge_solve(gram, sums[3 : 3 + n], prior_t, DEFAULT_RIDGE)
        return tuple(solution.to(self._buffers[key[1]].dtype)) + (0.0,) * (2 - n)

    def _gather(self, key: tuple, y: torch.Tensor, c0: torch.Tensor, terms: tuple[torch.Tensor, ...]) -> None:
        """Add one call's normal equations of ``y − c0 ≈ a·d1 + b·d2`` to this trajectory's sums."""
        target = (y.detach() - c0).double().flatten()
        X = torch.stack([t.double().flatten() for t in terms], dim=1)
        gram, moment = X.T @ X, X.T @ target
        sums = torch.zeros(5, dtype=torch.float64, device=y.device)
        sums[0] = gram[0, 0]
        sums[3] = moment[0]
        if len(terms) == 2:
            sums[1], sums[2], sums[4] = gram[0, 1], gram[1, 1], moment[1]
        if key in self.pending_statistics:
            self.pending_statistics[key] += sums
        else:
            self.pending_statistics[key] = sums

    def merge_statistics(self, group: Any) -> None:
        """Fold this trajectory's sums into the fit (every process has the same keys: they follow the
        shared logits), averaged over processes."""
        if not self.pending_statistics:
            return
        keys = list(self.pending_statistics)
        stacked = group.mean_(torch.stack([self.pending_statistics[k] for k in keys]))
        for key, sums in zip(keys, stacked, strict=True):
            self.statistics[key] = self.statistics[key] + sums if key in self.statistics else sums
        self.pending_statistics = {}

    def unit_residual(self, unit, x, gate, branch):  # type: ignore[override]
        if self.mode == "fill":
            return super().unit_residual(unit, x, gate, branch)
        if self.mode == "soft" and self.r_host[unit] == 0.0 and not self.r.requires_grad:
            # A hard reuse (λ on the hard schedule, schedule search): the branch is not run at all.
            return cached_gated_residual(x, gate, self._read(unit)[0])
        if self.mode == "soft" and self.branches_without_graph:
            with torch.no_grad():
                y = branch()
        else:
            y = branch()
        if self.mode == "teacher":
            if self.keep_teacher:
                self.kept[unit] = y.detach()
            return y + x if gate is None else _as_row(gate) * y + x
        cache, c0, terms, key = self._read(unit)
        if self.collect and terms and self.r.requires_grad:
            self._gather(key, y, c0, terms)
        r = self.r[unit]
        out = routed_gated_residual(x, gate, y, cache, r)
        if self.write and self.r_host[unit] > self.write_threshold:
            with torch.no_grad():
                mixed = torch.lerp(cache, y.detach().to(cache.dtype), r.detach().to(cache.dtype))
            if self.defer_writes:
                self.pending[unit] = mixed
            else:
                self._write_slot(unit).copy_(mixed)
        return out

    def unit_residual_norm_modulate(self, unit, x, gate, branch, shift, scale, eps):  # type: ignore[override]
        if self.mode == "fill":
            return super().unit_residual_norm_modulate(unit, x, gate, branch, shift, scale, eps)
        x = self.unit_residual(unit, x, gate, branch)
        h = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + _as_row(scale)) + _as_row(shift)
        return x, h

    def commit_writes(self) -> None:
        with torch.no_grad():
            for unit, mixed in self.pending.items():
                self._write_slot(unit).copy_(mixed)
        self.pending = {}

    def snapshot(self) -> Any:
        """The cache state (histories and the steps that wrote them), copied."""
        return _copy_cache_state((self._buffers, self._older, self._written))

    def restore(self, state: Any) -> None:
        self._buffers, self._older, self._written = _copy_cache_state(state)

    def _begin_step(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        layout = self._layout_of(model, args, kwargs)
        if self._layout is None:
            if any(b is None for b in self._buffers):
                self._allocate(layout)
            else:  # buffers restored from a snapshot
                self._layout = layout
        elif layout != self._layout:
            raise CacheStateError(
                "the training batch changed shape within a trajectory; this is a bug in the trainer"
            )
        self._row = self._all_units

    def _end_step(self) -> None:
        self._row = None


def _copy_cache_state(state: Any) -> tuple[list, list, list]:
    buffers, older, written = state

    def copied(b: torch.Tensor | None) -> torch.Tensor | None:
        return b.clone() if b is not None else None

    return [copied(b) for b in buffers], [[copied(b) for b in o] for o in older], [list(w) for w in written]


# ---------------------------------------------------------------------------------------------------
# Conditioning: how one CFG-batched transformer call is made for a model class


class _Conditioning:
    """Draws conditions and makes the CFG-batched transformer call for one model class."""

    channels: int
    size: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the initial noise."""
        return (self.channels, self.size, self.size)

    def draw(self, generator: torch.Generator, batch: int) -> Any: ...

    def shard(self, cond: torch.Tensor, rows: slice) -> torch.Tensor:
        """This process's rows of globally drawn conditions (indices or labels, one per sample)."""
        return cond[rows]

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any, cfg: bool) -> torch.Tensor:
        """Model prediction (eps channels) for the CFG-doubled batch ``[2B or B, C, H, W]``."""
        ...


class _ClassConditioning(_Conditioning):
    def __init__(self, transformer: nn.Module, class_labels: torch.Tensor | None) -> None:
        from .sampling import null_class_id

        self.null_id = null_class_id(transformer)
        self.channels = int(transformer.config.in_channels)
        self.size = int(transformer.config.sample_size)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.null_id:
                raise ValueError(f"class_labels must be a non-empty set of ids in [0, {self.null_id - 1}]")
        else:
            labels = torch.arange(self.null_id)
        self.labels = labels

    def draw(self, generator: torch.Generator, batch: int) -> torch.Tensor:
        return self.labels[torch.randint(0, self.labels.numel(), (batch,), generator=generator)]

    def call(self, model, x, t, cond, cfg):
        labels = cond.to(x.device)
        if cfg:
            x = torch.cat([x, x])
            labels = torch.cat([labels, torch.full_like(labels, self.null_id)])
        dtype = next(model.parameters()).dtype
        out = model(x.to(dtype), timestep=t.reshape(1).to(x.device).expand(x.shape[0]), class_labels=labels)
        return out.sample[:, : self.channels].float()


class _PromptConditioning(_Conditioning):
    """PixArt: conditions are rows of a user-given pool of text embeddings (no text encoder needed)."""

    def __init__(
        self,
        transformer: nn.Module,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
    ) -> None:
        config = transformer.config
        self.channels = int(config.in_channels)
        self.size = int(config.sample_size)
        width = int(config.caption_channels)
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != width:
            raise ValueError(
                f"prompt_embeds must be [P, L, {width}] (caption_channels), got {tuple(prompt_embeds.shape)}"
            )
        num, length, _ = prompt_embeds.shape
        mask = prompt_attention_mask if prompt_attention_mask is not None else torch.ones(num, length)
        if negative_prompt_embeds is None:
            negative_prompt_embeds = torch.zeros(1, length, width, dtype=prompt_embeds.dtype)
            negative_prompt_attention_mask = torch.ones(1, length)
        if tuple(negative_prompt_embeds.shape[1:]) != (length, width):
            raise ValueError(
                f"negative_prompt_embeds must be [1, {length}, {width}], "
                f"got {tuple(negative_prompt_embeds.shape)}"
            )
        self.embeds = prompt_embeds
        self.mask = mask
        self.negative = negative_prompt_embeds[:1]
        neg_mask = negative_prompt_attention_mask
        self.negative_mask = neg_mask[:1] if neg_mask is not None else torch.ones(1, length)
        self.extra_conditions = bool(getattr(transformer, "use_additional_conditions", False))

    def draw(self, generator: torch.Generator, batch: int) -> torch.Tensor:
        return torch.randint(0, self.embeds.shape[0], (batch,), generator=generator)

    def call(self, model, x, t, cond, cfg):
        dtype = next(model.parameters()).dtype
        emb = self.embeds[cond].to(x.device, dtype)
        mask = self.mask[cond].to(x.device)
        if cfg:
            x = torch.cat([x, x])
            emb = torch.cat([emb, self.negative.to(x.device, dtype).expand_as(emb)])
            mask = torch.cat([mask, self.negative_mask.to(x.device).expand_as(mask)])
        added = {"resolution": None, "aspect_ratio": None}
        if self.extra_conditions:
            side = float(self.size * 8)  # pixels: PixArt's VAE downsamples by 8
            added = {
                "resolution": torch.tensor([[side, side]], device=x.device, dtype=dtype).expand(
                    x.shape[0], 2
                ),
                "aspect_ratio": torch.ones(x.shape[0], 1, device=x.device, dtype=dtype),
            }
        out = model(
            x.to(dtype),
            encoder_hidden_states=emb,
            encoder_attention_mask=mask,
            timestep=t.reshape(1).to(x.device).expand(x.shape[0]),
            added_cond_kwargs=added,
        )
        return out.sample[:, : self.channels].float()


class _FlowConditioning(_Conditioning):
    """Text-conditioned flow-matching families (FLUX.1/.2, SD3, Wan, Qwen-Image): prompts drawn from a
    pool of prompt embeddings ``[P, L, C]`` (with pooled embeddings ``[P, D]`` for FLUX.1 and SD3),
    CFG batched against a negative embedding (zeros by default), and the transformer called as the
    family's pipeline calls it (its adapter's ``predict``: velocity prediction)."""

    def __init__(
        self,
        transformer: nn.Module,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        latent_size: int,
        distilled_guidance: float | None,
    ) -> None:
        adapter = adapter_for(transformer)
        name = type(transformer).__name__
        if prompt_embeds is None or prompt_embeds.dim() != 3:
            got = None if prompt_embeds is None else tuple(prompt_embeds.shape)
            raise ValueError(
                f"{name} conditions are drawn from a pool of prompt embeddings: pass prompt_embeds "
                f"[P, L, C] (e.g. from the pipeline's encode_prompt), got {got}"
            )
        if pooled_prompt_embeds is not None and pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError("pooled_prompt_embeds must have one row per prompt_embeds row")
        if not isinstance(latent_size, int) or latent_size < 1:
            raise ValueError(f"latent_size (image tokens per side) must be an int >= 1, got {latent_size!r}")
        self.adapter = adapter
        self.shape = adapter.noise_shape(transformer, latent_size)
        self.embeds = prompt_embeds
        self.pooled = pooled_prompt_embeds
        self.negative = (
            negative_prompt_embeds[:1]
            if negative_prompt_embeds is not None
            else torch.zeros_like(prompt_embeds[:1])
        )
        if tuple(self.negative.shape[1:]) != tuple(prompt_embeds.shape[1:]):
            raise ValueError(
                f"negative_prompt_embeds must be [1, {prompt_embeds.shape[1]}, {prompt_embeds.shape[2]}], "
                f"got {tuple(negative_prompt_embeds.shape)}"
            )
        self.negative_pooled = None
        if pooled_prompt_embeds is not None:
            self.negative_pooled = (
                negative_pooled_prompt_embeds[:1]
                if negative_pooled_prompt_embeds is not None
                else torch.zeros_like(pooled_prompt_embeds[:1])
            )
        self.guidance = distilled_guidance

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def draw(self, generator: torch.Generator, batch: int) -> torch.Tensor:
        return torch.randint(0, self.embeds.shape[0], (batch,), generator=generator)

    def call(self, model, x, t, cond, cfg):
        dtype = next(model.parameters()).dtype
        emb = self.embeds[cond].to(x.device, dtype)
        pooled = None if self.pooled is None else self.pooled[cond].to(x.device, dtype)
        if cfg:
            x = torch.cat([x, x])
            emb = torch.cat([emb, self.negative.to(x.device, dtype).expand_as(emb)])
            if pooled is not None:
                pooled = torch.cat([pooled, self.negative_pooled.to(x.device, dtype).expand_as(pooled)])
        timestep = t.reshape(1).to(x.device).expand(x.shape[0])
        return self.adapter.predict(model, x.to(dtype), timestep, emb, pooled, self.guidance).float()


def _conditioning_for(
    transformer: nn.Module,
    class_labels: torch.Tensor | None,
    prompt_embeds: torch.Tensor | None,
    prompt_attention_mask: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    negative_prompt_attention_mask: torch.Tensor | None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    latent_size: int | None = None,
    distilled_guidance: float | None = None,
) -> _Conditioning:
    if latent_size is None:
        latent_size = default_latent_size(transformer)
    if supported_class(transformer).__name__ not in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        return _FlowConditioning(
            transformer,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
            latent_size,
            distilled_guidance,
        )
    if supported_class(transformer).__name__ == "PixArtTransformer2DModel":
        if prompt_embeds is None:
            raise ValueError(
                "PixArt conditions are drawn from a pool of text embeddings: pass prompt_embeds "
                "[P, L, caption_channels] (e.g. from pipe.encode_prompt)"
            )
        return _PromptConditioning(
            transformer,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        )
    return _ClassConditioning(transformer, class_labels)


def _guide(pred: torch.Tensor, scale: float, cfg: bool) -> torch.Tensor:
    if not cfg:
        return pred
    cond, uncond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


# ---------------------------------------------------------------------------------------------------
# Distributed helpers (a no-op group of one when torch.distributed is not initialised)


class _Group:
    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        if not dist.is_available() or not dist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world > 1 and dist.is_available():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend)
                self.owns_group = True
            else:
                self.owns_group = False
        else:
            self.owns_group = False
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @classmethod
    def single(cls) -> _Group:
        """A group of this process alone (work every rank repeats on the whole batch)."""
        group = cls.__new__(cls)
        group._dist, group.owns_group, group.active, group.rank, group.world = None, False, False, 0, 1
        return group

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active and self.world > 1:
            self._dist.all_reduce(tensor)
            tensor.div_(self.world)
        return tensor

    def shard(self, global_batch: int) -> slice:
        if global_batch % self.world:
            raise ValueError(
                f"the global batch {global_batch} does not split evenly over {self.world} processes; "
                "pick a batch size divisible by the number of processes"
            )
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.active and self.world > 1:
            self._dist.barrier()


# ---------------------------------------------------------------------------------------------------
# Trajectories


@dataclass
class _Setup:
    model: nn.Module
    handle: _RoutedHandle
    scheduler: Any
    conditioning: _Conditioning
    cfg: bool
    guidance_scale: float
    device: torch.device
    group: _Group


def _noise(setup: _Setup, generator: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randn(batch, *setup.conditioning.sample_shape, generator=generator)


def _predict(setup: _Setup, x: torch.Tensor, t: torch.Tensor, cond: Any, step: int) -> torch.Tensor:
    setup.handle._step = step
    return setup.conditioning.call(setup.model, x, t, cond, setup.cfg)


def _start(setup: _Setup, num_steps: int) -> torch.Tensor:
    setup.scheduler.set_timesteps(num_steps, device=setup.device)
    setup.handle.reset()
    return setup.scheduler.timesteps


def _advance(setup: _Setup, pred: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    eps = _guide(pred, setup.guidance_scale, setup.cfg)
    scheduler = setup.scheduler
    if hasattr(scheduler, "_init_step_index"):
        # Schedulers that count their steps (flow-matching Euler) find the step from t instead: λ's
        # sampling runs restart mid-trajectory.
        scheduler._step_index = None
    return scheduler.step(eps, t, x, return_dict=False)[0]


@torch.no_grad()
def _sample(
    setup: _Setup,
    x: torch.Tensor,
    cond: Any,
    probabilities: torch.Tensor,
    soft_steps: Callable[[int], bool],
    *,
    start: int = 0,
    buffers: Any = None,
    timesteps: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    stop: int | None = None,
) -> torch.Tensor:
    """Run the sampler from step ``start`` (state ``x``, cache ``buffers``) to the end, or to the
    state before step ``stop``.

    Steps where ``soft_steps(i)`` is true blend with ``probabilities[i]``; the others compute every
    unit and refresh the cache (step 0 always does). ``on_step(i, x)`` sees the state before step i.
    """
    handle = setup.handle
    if timesteps is None:
        timesteps = _start(setup, probabilities.shape[0])
    if buffers is not None:
        handle.restore(buffers)
    for i in range(start, len(timesteps) if stop is None else stop):
        if on_step is not None:
            on_step(i, x)
        if i > 0 and soft_steps(i):
            handle.set_soft(probabilities[i], defer_writes=False)
        else:
            handle.set_mode("fill")
        pred = _predict(setup, x, timesteps[i], cond, i)
        x = _advance(setup, pred, timesteps[i], x)
    return x


def estimate_lambda(
    setup: _Setup,
    probabilities: torch.Tensor,
    x_T: torch.Tensor,
    cond: Any,
    variant: LambdaVariant,
) -> torch.Tensor:
    """IEPO weights ``λ[T]`` (λ_0 = 0: step 0 is never trained) from final-sample distances, no autograd.

    Write ``x0^{S}`` for the final sample of a run from ``x_T`` whose steps in S blend with
    ``probabilities`` (0/1 rows make it a hard schedule) and whose other steps compute every unit.

    - ``marginal`` (the authors' released code): ``λ_t = MSE(x0^{1…t}, x0^{1…t−1})``, the distance
      between the final samples of two runs that enable the router on steps 1…t and on 1…t−1
      (``x0^{∅}`` is the uncached sample). The runs share their prefix: ~T²/2 forwards in all.
    - ``leave_one_out`` (the poster): ``λ_t = MSE(x0^{all}, x0^{all∖t})`` where the second run computes
      every unit at step t (refreshing its cache). Each starts from the routed run's state before t:
      the caches are kept every ⌊√(T−1)⌋ steps and the routed steps between are run again (~T√T/2
      forwards more than keeping a copy per step, with ~√T copies instead of T).

    A step whose distance is 0 (e.g. a step the hard schedule computes whole) would carry no fidelity
    term at all and be cached freely; λ is floored at 1 % of its mean so every step keeps some.
    Distances are means over all elements, averaged over processes.
    """
    num_steps = probabilities.shape[0]
    x_states: dict[int, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}
    handle = setup.handle
    timesteps = _start(setup, num_steps)
    keep_cache = variant == "leave_one_out"
    stride = max(math.isqrt(num_steps - 1), 1)

    def remember(i: int, x: torch.Tensor) -> None:
        if not keep_cache:
            x_states[i] = (x.clone(), [])
        elif i % stride == 0:
            x_states[i] = (x.clone(), handle.snapshot())

    routed_final = _sample(
        setup, x_T, cond, probabilities, lambda i: True, timesteps=timesteps, on_step=remember
    )
    lam = torch.zeros(num_steps, dtype=torch.float64, device=setup.device)
    if variant == "marginal":
        previous = _sample(setup, x_T, cond, probabilities, lambda i: False)
        for t in range(1, num_steps):
            if t == num_steps - 1:
                final = routed_final
            else:  # the routed run's state before step t + 1, then every unit computed
                timesteps = _start(setup, num_steps)
                x, _ = x_states[t + 1]
                final = _sample(
                    setup, x, cond, probabilities, lambda i: False, start=t + 1, timesteps=timesteps
                )
            lam[t] = F.mse_loss(final.double(), previous.double())
            previous = final
    else:
        for t in range(1, num_steps):
            timesteps = _start(setup, num_steps)
            kept = t - t % stride
            x, buffers = x_states[kept]
            if kept < t:  # the routed steps from the kept state to t; the handle then holds t's cache
                x = _sample(
                    setup, x, cond, probabilities, lambda i: True,
                    start=kept, buffers=buffers, timesteps=timesteps, stop=t,
                )  # fmt: skip
                buffers = None
            final = _sample(
                setup,
                x,
                cond,
                probabilities,
                lambda i, t=t: i != t,
                start=t,
                buffers=buffers,
                timesteps=timesteps,
            )
            lam[t] = F.mse_loss(final.double(), routed_final.double())
    setup.group.mean_(lam)
    positive = lam[1:]
    floor = 0.01 * positive.mean() if positive.mean() > 0 else torch.tensor(1.0, dtype=lam.dtype)
    lam[1:] = positive.clamp_min(floor)
    return lam.float().cpu()


# ---------------------------------------------------------------------------------------------------
# The trainer


def train_router(
    pipe_or_transformer: Any,
    scheduler: Any = None,
    *,
    num_steps: int,
    method: Method = "harmonica",
    iterations: int = 1_000,
    batch_size: int = 16,
    guidance_scale: float = 1.5,
    lr: float | None = None,
    beta: float | None = None,
    target_cur: float | None = None,
    lambda_every: int = 500,
    lambda_variant: LambdaVariant = "marginal",
    lambda_batch_size: int | None = None,
    lambda_on: LambdaOn = "soft",
    straight_through: bool | None = None,
    max_age: int | None | Literal["auto"] = "auto",
    tie_steps: bool | None = None,
    gradient_at: GradientAt = "reuse",
    forecast_order: int | None = None,
    fit_coefficients: bool = True,
    exchanges: int | None = None,
    write_threshold: float = 0.1,
    threshold: float = 0.1,
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
    data: Any = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train a :class:`Router` for ``pipe_or_transformer`` sampled with ``scheduler`` in ``num_steps``.

    Args:
        pipe_or_transformer: a diffusers ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` or a
            pipeline holding one (its ``scheduler`` is used when ``scheduler`` is None). Its weights
            are frozen during training and restored to their ``requires_grad`` state after.
        scheduler: the diffusers scheduler the router is for (copied, never modified).
        num_steps: T, the number of sampling steps.
        method: ``"harmonica"`` (SDT + IEPO) or ``"l2c"``.
        iterations: trained denoising steps; SDT trains T − 1 per trajectory. The default (1 000) trains
            a router for the reference model in ~5 minutes on 2 CPU cores (plus ~10 for the default
            exchanges); the authors used 20 000.
        batch_size: global noise samples (or data samples for L2C) per iteration; CFG doubles it
            (default 16; the authors used 32).
        guidance_scale: CFG scale as at inference (1 = no guidance).
        lr, beta: AdamW learning rate on the logits (one optimizer state per step; default: see
            :class:`TrainingConfig`) and the weight of ``Σ r``. A given β without ``target_cur`` is
            held fixed (the paper's mode).
        target_cur: budget mode: β is adapted after every trajectory towards this cache usage ratio,
            then one constant shift of the trained logits sets the hard schedule's usage to the
            closest reachable value. Default when neither β nor ``target_cur`` is given:
            :data:`DEFAULT_TARGET_CUR` (β is a scale that transfers between models only by luck).
        lambda_every: C, iterations between λ re-estimations (IEPO).
        lambda_variant: ``"marginal"`` (released code, default), ``"leave_one_out"`` (poster) or
            ``"none"`` (λ ≡ 1: the SDT-only ablation). ``"leave_one_out"`` keeps a copy of the
            caches every ⌊√(T−1)⌋ steps for its estimate (at T = 20 before steps 4, 8, 12 and 16, the
            one before step 0 being empty; with order-2 forecasting at DiT-XL/2, batch 16 + CFG,
            bf16, 3.2 GB each).
        lambda_batch_size: noise samples for λ's sampling runs (default: the trajectory's own batch).
        lambda_on: ``"soft"`` measures λ with the soft router (the paper), ``"hard"`` with its hard
            schedule at ``threshold`` (what inference runs). Same cost: ~T²/2 sampling forwards.
        straight_through: train on the hard forward (units computed iff r > ``threshold``, the
            trajectory inference runs) with the soft gradient through r. Default: on for
            ``"harmonica"``, off for L2C.
        gradient_at: with ``straight_through``, where a row's gradient is taken: ``"reuse"``
            (default) from the forward with the row reused, i.e. the fidelity cost of caching it, for
            computed rows too; ``"hard"`` at the hard decision, where a computed row's student equals
            the teacher and only β moves it. Either way x advances with the hard schedule. A row
            whose forward reuses every unit runs its branches without autograd (their gradient is
            0), so ``"reuse"`` holds no branch activations for the backward.
        max_age: cap on the age of a reused cache entry in steps (None: no cap); over it a unit
            computes, in training and in the router's schedule. Default ``"auto"``: 2 for
            ``"harmonica"``, none for L2C.
        tie_steps: one logit per step shared by its units (the row moves as its mean): the router
            reuses whole steps, whose features stay consistent with each other. Default: on for
            ``"harmonica"``, off for L2C. The paper's method is ``straight_through=False,
            max_age=None, tie_steps=False, forecast_order=0``; with reuse only these defaults measured
            39.6 against its 32.9 dB at 40 % usage on the reference model, with forecasting 46.8
            (README "Learned routers").
        forecast_order: the cached path training sees and the router runs: 1 or 2 forecasts every
            reused unit from its last writes at that order (lower where its history is shorter), so
            the router learns where to compute for the forecasts inference will run, and carries that
            forecasting schedule (:attr:`Router.forecast`); 0 is the published path, reuse of the last
            write. Default: 2 for ``"harmonica"``, 0 for L2C.
        fit_coefficients: with forecasting, fit the forecast coefficients by least squares: during
            training on the student's own calls (no extra forwards), and for the router on one batch
            of its final schedule (:func:`harmonica.fit_forecast`, one sampling run). False keeps the
            step-distance rule.
        exchanges: after training, up to this many passes of whole-step exchanges at the trained usage
            (:func:`harmonica.search.exchange_steps`): every swap of one computed and one reused step
            is sampled on a batch of ``batch_size`` (with the forecasts fitted, as inference runs them)
            and the best swap that lowers the final-sample error is kept; C·R sampling runs per pass
            (C computed, R reused steps: ~90 at T = 20, 40 %), each from the first step it changes.
            They start from the best of the trained schedule and the static whole-step schedules of
            its usage (:func:`harmonica.search.static_starts`; which one and every start's error:
            ``training_settings["polish_start"]``). Default: 3 for ``"harmonica"`` (README "Learned
            routers"), 0 for L2C and the published method.
        write_threshold: the student's blend is written to the cache where r exceeds it.
        threshold: τ of the saved router's schedule (used for the reported CUR and budget mode).
        seed: seeds the router's initial logits and every draw of noise, classes and data.
        class_labels: DiT: the classes to draw from (default: all).
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask:
            PixArt: a pool of text-encoder outputs ``[P, L, caption_channels]`` to draw prompts from,
            and the unconditional embedding for CFG (default: zeros). FLUX.1/.2, SD3, Wan, Qwen-Image
            (flow matching, e.g. with ``FlowMatchEulerDiscreteScheduler``): ``prompt_embeds``
            ``[P, L, C]`` and the negative embedding for true CFG (``guidance_scale > 1``).
        pooled_prompt_embeds, negative_pooled_prompt_embeds: FLUX.1 and SD3: the pooled embeddings
            ``[P, D]`` of the same prompts (default: zeros).
        latent_size: flow-matching families: image tokens per side of the trained resolution
            (default: :func:`harmonica.models.default_latent_size`, SD3's native size, else 32: FLUX
            at 512 px).
        distilled_guidance: guidance-distilled FLUX: the guidance the model is conditioned on
            (default 3.5 for FLUX.1, 4.0 for FLUX.2); use ``guidance_scale=1`` with it.
        data: L2C only: real samples in the model's input space, a tensor ``[N, C, H, W]``, a pair
            ``(samples, class_labels)`` or a path (:func:`load_samples`). Default for the reference
            model: its training digits.
        checkpoint_dir: folder for the resumable training state (written after every trajectory).
        resume: continue from ``checkpoint_dir``'s state when it exists (it must be from the same run:
            settings, model and weights digest, sampler, conditioning); False moves it aside.
        progress: show a tqdm bar with loss, CUR, λ and β.
        callback: called with each trajectory's history record.

    Returns:
        A :class:`TrainingResult` whose ``router`` carries in its metadata the model fingerprint, the
        sampler, and the training settings (method, T, β, C, τ, CUR, time, …); save it with
        ``result.router.save(path)`` and pass it to :func:`harmonica.enable_cache`.

    Raises:
        ValueError: bad settings, a batch not divisible by the number of processes, missing or
            mismatched conditioning/data, or a checkpoint from another run.
        UnsupportedModelError: the model cannot be cached.
    """
    config = TrainingConfig(
        num_steps=num_steps,
        method=method,
        iterations=iterations,
        batch_size=batch_size,
        guidance_scale=guidance_scale,
        lr=lr,
        beta=beta,
        target_cur=target_cur,
        lambda_every=lambda_every,
        lambda_variant=lambda_variant,
        lambda_batch_size=lambda_batch_size,
        lambda_on=lambda_on,
        straight_through=straight_through,
        max_age=max_age,
        tie_steps=tie_steps,
        gradient_at=gradient_at,
        forecast_order=forecast_order,
        fit_coefficients=fit_coefficients,
        exchanges=exchanges,
        write_threshold=write_threshold,
        threshold=threshold,
        seed=seed,
    ).resolved()
    if beta is None and target_cur is None and progress:
        print(
            f"train_router: no beta or target_cur given; budget mode at a cache usage ratio of "
            f"{DEFAULT_TARGET_CUR} (pass target_cur= or beta= to choose)",
            file=sys.stderr,
        )
    transformer = single_transformer(pipe_or_transformer, "train a router")
    supported_class(transformer)
    if scheduler is None:
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
        if scheduler is None:
            raise ValueError(
                "pass the scheduler the router is for: train_router(transformer, scheduler, ...)"
            )
    if transformer.__dict__.get("_harmonica_cache") is not None:
        raise CacheStateError("disable_cache() before training a router on this transformer")

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

    samples = labels = None
    if config.method == "l2c":
        from diffusers import DDIMScheduler

        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(
                f"L2C trains on one step from a noised real sample, which needs a single-step sampler such "
                f"as DDIMScheduler; got {type(scheduler).__name__}"
            )
        samples, labels = _l2c_data(data, transformer, conditioning)

    group = _Group()
    device = next(transformer.parameters()).device
    available_backends()
    handle = _RoutedHandle(transformer, config.num_steps, config.write_threshold, config.forecast_order)
    setup = _Setup(
        model=transformer,
        handle=handle,
        scheduler=copy.deepcopy(scheduler),
        conditioning=conditioning,
        cfg=config.guidance_scale > 1,
        guidance_scale=config.guidance_scale,
        device=device,
        group=group,
    )
    pinned = list(range(0, config.num_steps, 2)) if config.method == "l2c" else [0]
    router = Router.for_model(
        transformer, config.num_steps, scheduler=scheduler, seed=config.seed, pinned_steps=pinned
    )
    if config.tie_steps:
        with torch.no_grad():
            router.logits.copy_(router.logits.mean(dim=1, keepdim=True).expand_as(router.logits))
    router.to(device)
    optimizer = RowAdamW(router.logits, lr=config.lr)
    state = _State(beta=config.beta, lam=torch.ones(config.num_steps))
    state.lam[0] = 0.0

    checkpoint = _prepare_checkpoint(checkpoint_dir, resume)  # before any work; never deletes one
    resumed_from = None
    run_key = None
    if checkpoint is not None:
        run_key = _run_key(config, transformer, scheduler, conditioning, samples, labels)
    if checkpoint is not None and resume and checkpoint.is_file():
        _load_checkpoint(checkpoint, run_key, router, optimizer, state)
        resumed_from = state.iteration
    handle.collect = bool(config.forecast_order and config.fit_coefficients)
    handle.statistics = state.forecast_statistics

    frozen = [(p, p.requires_grad) for p in transformer.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    attach_handle(transformer, handle)
    bar = None
    if progress and group.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.iterations, initial=state.iteration, desc=f"train {config.method}", unit="it")
    start_time = time.perf_counter() - state.elapsed
    try:
        while state.iteration < config.iterations:
            if config.method == "harmonica":
                losses = _sdt_trajectory(setup, router, optimizer, config, state, bar)
            else:
                losses = _l2c_round(setup, router, optimizer, config, state, samples, labels, bar)
            state.trajectory += 1
            cur = router.to_schedule(config.threshold, max_age=config.max_age).cache_usage_ratio
            if state.beta is None:
                state.beta = sum(state.beta_probes) / len(state.beta_probes) or 1e-12
            elif config.target_cur is not None:
                _steer_beta(state, config.target_cur - cur)
            state.elapsed = time.perf_counter() - start_time
            record = {
                "iteration": float(state.iteration),
                "loss": float(sum(losses) / max(len(losses), 1)),
                "cur": float(cur),
                "beta": state.beta,
                "lambda_mean": float(state.lam[1:].mean()),
                "seconds": state.elapsed,
            }
            state.history.append(record)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.3g}",
                    cur=f"{cur:.1%}",
                    lam=f"{record['lambda_mean']:.2g}",
                    beta=f"{state.beta:.2g}",
                )
            if checkpoint is not None and group.rank == 0:
                _save_checkpoint(checkpoint, run_key, router, optimizer, state)
            if callback is not None:
                callback(record)
    finally:
        if bar is not None:
            bar.close()
        disable_cache(transformer)
        for p, flag in frozen:
            p.requires_grad_(flag)
        if group.owns_group:
            group._dist.destroy_process_group()

    offset = None
    if config.target_cur is not None:
        offset = _calibrate(router, config.target_cur, config.threshold, config.max_age)
    polish: list[dict[str, float]] = []
    polish_start: dict[str, Any] = {}
    if config.exchanges:
        schedule, polish_start = _polish(setup, router, config, polish, progress and group.rank == 0)
    else:
        schedule = router.to_schedule(config.threshold, max_age=config.max_age)
        if config.forecast_order:
            schedule = schedule.with_forecast(config.forecast_order)
            if config.fit_coefficients:
                schedule = _fit(setup, schedule, config)
    if config.forecast_order:
        router.forecast = schedule
    settings = asdict(config)
    settings.update(
        beta_final=state.beta,
        calibration_offset=offset,
        cur=schedule.cache_usage_ratio,
        training_seconds=round(state.elapsed, 3),
        world_size=group.world,
        lambda_final=[round(v, 8) for v in state.lam.tolist()],
        polish=polish,
        polish_start=polish_start,
    )
    router.training_settings = settings
    router.to("cpu")
    _check_finite(router, config)
    return TrainingResult(
        router=router,
        history=state.history,
        seconds=state.elapsed,
        iterations=state.iteration,
        resumed_from=resumed_from,
    )


def _steer_beta(state: _State, error: float) -> None:
    """Budget mode's β control, a bisection in log β: β is multiplied (usage under the target) or
    divided (over it) by ``exp(step)``; the step starts at log 2 and halves whenever the error changes
    sign, so β brackets its value instead of swinging past it (a fixed ×2 gain swung β by 10⁹). The
    usage answers β only as fast as the logits move (lr per update), so the step never grows: a
    galloping step ran β to 10⁴¹ before the logits had moved. Within one point of the target β is
    kept. The exact budget is set after training."""
    if abs(error) < 0.01:
        return
    sign = 1 if error > 0 else -1
    if state.beta_sign is not None and sign != state.beta_sign:
        state.beta_step /= 2
    state.beta_sign = sign
    state.beta = min(max(state.beta * math.exp(sign * state.beta_step), 1e-30), 1e30)


@torch.no_grad()
def _calibrate(router: Router, target: float, threshold: float, max_age: int | None) -> float:
    """Shift the trained rows' logits by one constant so the hard schedule's cache usage is the closest
    reachable to ``target``; returns the shift. Training sets the order of the entries, this the
    budget: one offset keeps the order, so ties (logits at the clamp) are the only limit on precision.
    """
    trained = [t for t in range(router.num_steps) if t not in router.pinned_steps]
    original = router.logits[trained].clone()

    def usage(offset: float) -> float:
        router.logits[trained] = original + offset
        return router.to_schedule(threshold, max_age=max_age).cache_usage_ratio

    candidates = {0.0}
    cut = math.log(threshold / (1 - threshold)) if threshold > 0 else -LOGIT_BOUND * 4
    for value in torch.unique(original).tolist():  # every offset that moves one entry across τ
        candidates.update((cut - value + 1e-4, cut - value - 1e-4))
    best = min(sorted(candidates), key=lambda o: (round(abs(usage(o) - target), 9), abs(o)))
    router.logits[trained] = original + best
    return best


@dataclass
class _State:
    beta: float | None
    lam: torch.Tensor
    iteration: int = 0
    trajectory: int = 0
    lambda_at: int | None = None
    beta_probes: list[float] = field(default_factory=list)
    beta_step: float = math.log(2)
    beta_sign: int | None = None
    elapsed: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # forecast_order with fit_coefficients: the least-squares sums of the training forecasts
    forecast_statistics: dict[tuple, torch.Tensor] = field(default_factory=dict)


def _generator(seed: int, *stream: int) -> torch.Generator:
    # Independent, reproducible streams per (purpose, index), the same on every process.
    value = seed
    for s in stream:
        value = (value * 1_000_003 + s) % (2**62)
    return torch.Generator().manual_seed(value)


def _draw(setup: _Setup, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, Any]:
    cond = setup.conditioning.draw(generator, batch)
    noise = _noise(setup, generator, batch)
    rows = setup.group.shard(batch)
    x = noise[rows].to(setup.device) * getattr(setup.scheduler, "init_noise_sigma", 1.0)  # flow matching: 1
    return x, setup.conditioning.shard(cond, rows)


def _refresh_lambda(
    setup: _Setup, router: Router, config: TrainingConfig, state: _State, x: torch.Tensor, cond: Any
) -> torch.Tensor:
    """λ on the trajectory's own noise and conditions (or a batch of ``lambda_batch_size`` drawn for it)."""
    if config.lambda_batch_size != config.batch_size:
        x, cond = _draw(setup, _generator(config.seed, 2, state.iteration), config.lambda_batch_size)
    if config.lambda_on == "hard":
        probabilities = router.to_schedule(config.threshold, max_age=config.max_age).compute.float()
        probabilities = probabilities.to(setup.device)
    else:
        with torch.no_grad():
            probabilities = router.probabilities().detach()
    return estimate_lambda(setup, probabilities, x, cond, config.lambda_variant)


class RowAdamW:
    """AdamW (weight decay 0) on the router's logits with one state per row (denoising step).

    An iteration trains one step t, so only row t has a gradient; a single AdamW over the whole
    ``[T, U]`` tensor would also move every other row on its stale momentum. Here ``step_row(t, g)``
    updates row t's moments, bias corrections and logits and nothing else, as the authors keep one
    parameter (and optimizer state) per step.
    """

    def __init__(self, logits: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.logits = logits
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(logits, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros_like(logits, dtype=torch.float32)
        self.steps = [0] * logits.shape[0]

    @torch.no_grad()
    def step_row(self, row: int, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps[row] += 1
        k = self.steps[row]
        m, v = self.exp_avg[row], self.exp_avg_sq[row]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**k)).add_(self.eps)
        self.logits[row].addcdiv_(m, denom, value=-self.lr / (1 - beta1**k))

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(), "steps": list(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps = list(state["steps"])


def _train_step(
    setup: _Setup,
    router: Router,
    optimizer: RowAdamW,
    config: TrainingConfig,
    state: _State,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    step: int,
    weight: float,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Teacher and student at state x (step ``step``); one optimizer step on row ``step``.

    The fidelity term compares the guided predictions (what advances the sampler). ``forced`` units
    (over the cache-age cap) compute whatever r says. Returns (student's raw prediction, loss, the
    units whose cache the student wrote).
    """
    handle = setup.handle
    guide = lambda pred: _guide(pred, setup.guidance_scale, setup.cfg)  # noqa: E731
    r = router.probabilities()[step]
    if forced is None:
        forced = torch.zeros_like(r, dtype=torch.bool)
    at_reuse = config.straight_through and config.gradient_at == "reuse"
    hard = (r.detach() > config.threshold) | forced
    with torch.no_grad():
        handle.set_mode("teacher")
        handle.keep_teacher = at_reuse and bool(hard.all())
        teacher_prediction = _predict(setup, x, t, cond, step)
        handle.keep_teacher = False
        teacher = guide(teacher_prediction)
    if state.beta is None:
        # Budget mode without a starting β: the first round trains fidelity only and probes the
        # per-unit cost of caching everything at each step; β starts at its mean (see train_router).
        with torch.no_grad():
            handle.set_soft(torch.zeros_like(r), defer_writes=True)
            cached = guide(_predict(setup, x, t, cond, step))
            handle.pending = {}
            cost = weight * F.mse_loss(cached, teacher) / r.numel()
        state.beta_probes.append(float(setup.group.mean_(cost.reshape(1))))
    if at_reuse:
        # The gradient where every unit of the row is reused: d loss/d r is the cost of caching the
        # row, which a computed row (whose student equals the teacher) would otherwise never see.
        # x advances, and the cache is written, as the hard schedule does (below).
        blend = r - r.detach()
    elif config.straight_through:  # the hard forward of inference, the soft gradient
        blend = hard.to(r.dtype) + r - r.detach()
    else:
        blend = torch.where(forced, torch.ones_like(r), r)
    handle.set_soft(blend, defer_writes=True, write=not at_reuse)
    student = _predict(setup, x, t, cond, step)
    fidelity = weight * F.mse_loss(guide(student), teacher)
    router.logits.grad = None
    fidelity.backward()
    grad = setup.group.mean_(router.logits.grad[step].clone())
    beta = state.beta or 0.0
    grad.add_(beta * (r * (1 - r)).detach())  # the gradient of β · Σ_k r[t, k]
    loss = fidelity.detach() + beta * r.detach().sum()
    optimizer.step_row(step, grad)
    if config.tie_steps:  # one decision per step: the row's logits move together (their mean)
        with torch.no_grad():
            router.logits[step] = router.logits[step].mean()
    router.logits.grad = None
    router.clamp_()
    if at_reuse and bool(hard.all()):  # the teacher is the computed row
        student = teacher_prediction
        handle.pending = {k: y.to(handle._buffers[k].dtype) for k, y in handle.kept.items()}
        handle.kept = {}
    elif at_reuse and bool(hard.any()):  # a row computed in part (untied steps): its hard forward
        with torch.no_grad():
            handle.set_soft(hard.to(r.dtype), defer_writes=True)
            student = _predict(setup, x, t, cond, step)
    written = hard.cpu() if at_reuse else torch.tensor(handle.r_host) > handle.write_threshold
    handle.commit_writes()
    state.iteration += 1
    return student.detach(), float(loss), written


def _polish(
    setup: _Setup, router: Router, config: TrainingConfig, history: list[dict[str, float]], progress: bool
) -> tuple[CacheSchedule, dict[str, Any]]:
    """Whole-step exchanges on the final image (:func:`harmonica.search.exchange_steps`) at the
    trained usage; the router's logits are set to the result (±bound where an entry changed), which
    is returned as it runs (forecast, with coefficients fitted on the polish batch when
    ``fit_coefficients``), with the start's name and every start's error. Training orders the steps by
    a local proxy (λ-weighted one-step error); the exchanges judge swaps by the final-sample error the
    proxy stands for. They are a local search, so they start from the best, on that error, of the
    router's hard schedule and the static whole-step schedules of its usage
    (:func:`harmonica.search.static_starts`): at 55 % on the reference model the trained schedule's
    neighbourhood held nothing as good as TaylorSeer's static form. Every process polishes the same
    batch alone, so all agree."""
    from .search import exchange_steps, final_error, make_runner, static_starts

    single = replace(setup, group=_Group.single())
    start = router.to_schedule(config.threshold, max_age=config.max_age).compute
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="polish (exchanges)", unit="run")
    runner = make_runner(
        single,
        config.num_steps,
        config.seed,
        config.batch_size,
        config.forecast_order,
        fit=config.fit_coefficients,
    )
    try:
        reference = runner.final(torch.ones_like(start))
        starts = {"trained": start, **static_starts(start, config.forecast_order, config.max_age)}
        trained, others = runner.finals(start, list(starts.values())[1:], bar)
        errors = dict(zip(starts, (final_error(f, reference) for f in (trained, *others)), strict=True))
        chosen = min(errors, key=errors.__getitem__)
        polished = exchange_steps(
            runner,
            starts[chosen],
            reference,
            passes=config.exchanges,
            max_age=config.max_age,
            bar=bar,
            history=history,
        )
        schedule = runner.schedule(polished)
    finally:
        if bar is not None:
            bar.close()
        if setup.model.__dict__.get("_harmonica_cache") is not None:
            disable_cache(setup.model)
    with torch.no_grad():
        raw = router.probabilities() > config.threshold  # before the age cap
        raw[router.pinned_steps] = True
        target = polished.to(router.logits.device)
        changed = raw != target
        router.logits[changed] = torch.where(target[changed], LOGIT_BOUND, -LOGIT_BOUND).to(
            router.logits.dtype
        )
    if not torch.equal(router.to_schedule(config.threshold, max_age=config.max_age).compute, polished):
        raise AssertionError("internal: the polished router does not encode the polished schedule")
    return schedule, {"start": chosen, "start_errors": errors}


def _fit(setup: _Setup, schedule: CacheSchedule, config: TrainingConfig) -> CacheSchedule:
    """``schedule`` with least-squares forecast coefficients (:func:`harmonica.fit_forecast` on one
    batch of its own run). Every process fits on the whole batch, so all hold the same router."""
    if not schedule.forecasts:
        return schedule
    from .forecast import DEFAULT_RIDGE, fit_on

    single = replace(setup, group=_Group.single())
    fit = fit_on(
        single, schedule, batch_size=config.batch_size, seed=config.seed, ridge=DEFAULT_RIDGE, progress=False
    )
    return fit.schedule


def _sdt_trajectory(setup, router, optimizer, config, state, bar) -> list[float]:
    generator = _generator(config.seed, 1, state.trajectory)
    x, cond = _draw(setup, generator, config.batch_size)
    if config.lambda_variant != "none" and (
        state.lambda_at is None or state.iteration - state.lambda_at >= config.lambda_every
    ):
        state.lam = _refresh_lambda(setup, router, config, state, x, cond)
        state.lambda_at = state.iteration
    timesteps = _start(setup, config.num_steps)
    last_computed = torch.zeros(router.num_units, dtype=torch.long)
    losses = []
    for i, t in enumerate(timesteps):
        if i == 0:
            with torch.no_grad():
                setup.handle.set_mode("fill")
                pred = _predict(setup, x, t, cond, 0)
        else:
            if state.iteration >= config.iterations:
                break
            forced = None if config.max_age is None else (i - last_computed > config.max_age).to(x.device)
            pred, loss, written = _train_step(
                setup, router, optimizer, config, state, x, t, cond, i, float(state.lam[i]), forced
            )
            last_computed[written] = i
            losses.append(loss)
            if bar is not None:
                bar.update(1)
        with torch.no_grad():
            x = _advance(setup, pred, t, x)
    setup.handle.merge_statistics(setup.group)
    return losses


def _l2c_round(setup, router, optimizer, config, state, samples, labels, bar) -> list[float]:
    """T − 1 L2C iterations (or what is left): one round, like one SDT trajectory, between β updates."""
    losses = []
    for _ in range(min(config.num_steps - 1, config.iterations - state.iteration)):
        losses.append(_l2c_iteration(setup, router, optimizer, config, state, samples, labels))
        if bar is not None:
            bar.update(1)
    return losses


def _l2c_iteration(setup, router, optimizer, config, state, samples, labels) -> float:
    generator = _generator(config.seed, 3, state.iteration)
    batch = config.batch_size
    index = torch.randint(0, samples.shape[0], (batch,), generator=generator)
    noise = torch.randn(batch, *samples.shape[1:], generator=generator)
    odd_steps = list(range(1, config.num_steps, 2))
    step = odd_steps[int(torch.randint(0, len(odd_steps), (1,), generator=generator))]
    rows = setup.group.shard(batch)
    x0 = samples[index][rows].to(setup.device)
    if labels is not None:
        cond = labels[index][rows]
    else:
        cond = setup.conditioning.shard(setup.conditioning.draw(generator, batch), rows)
    timesteps = _start(setup, config.num_steps)
    previous = timesteps[step - 1]
    x = setup.scheduler.add_noise(x0, noise[rows].to(setup.device), previous.reshape(1))
    with torch.no_grad():
        setup.handle.set_mode("fill")
        pred = _predict(setup, x, previous, cond, step - 1)
        x = _advance(setup, pred, previous, x)
    _, loss, _ = _train_step(setup, router, optimizer, config, state, x, timesteps[step], cond, step, 1.0)
    return loss


def load_samples(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real samples for L2C from a file or folder, in the model's input space.

    - ``.safetensors`` / ``.pt``: tensor ``samples`` ``[N, C, H, W]`` (and optional int ``labels`` ``[N]``);
    - a folder of class sub-folders named by class id (``0/``, ``1/`` …) of images, or of images
      directly: read with Pillow as grey (C = 1) or RGB (C = 3), scaled to [-1, 1].
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(str(path))
        elif path.suffix in (".pt", ".pth"):
            content = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path}: expected a .safetensors or .pt file with 'samples' (and 'labels')")
        if not isinstance(content, dict) or "samples" not in content:
            raise ValueError(
                f"{path} must hold a tensor named 'samples' [N, C, H, W] (and optionally 'labels')"
            )
        return content["samples"].float(), content.get("labels")
    import numpy as np
    from PIL import Image

    images, labels = [], []
    entries = sorted(path.iterdir())
    class_dirs = [e for e in entries if e.is_dir()]
    sources = (
        [(int(d.name), f) for d in class_dirs if d.name.isdigit() for f in sorted(d.iterdir()) if f.is_file()]
        if class_dirs
        else [(None, f) for f in entries if f.is_file()]
    )
    for label, file in sources:
        try:
            with Image.open(file) as image:
                array = np.asarray(
                    image.convert("L" if image.mode in ("L", "1", "P") else "RGB"), dtype=np.float32
                )
        except OSError:
            continue
        tensor = torch.from_numpy(array)
        tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        images.append(tensor / 127.5 - 1.0)
        labels.append(label)
    if not images:
        raise ValueError(f"no readable images in {path}")
    if len({tuple(i.shape) for i in images}) != 1:
        raise ValueError(f"the images in {path} differ in size; resize them to the model's resolution first")
    label_tensor = torch.tensor(labels) if labels[0] is not None else None
    return torch.stack(images), label_tensor


def _l2c_data(data: Any, transformer: nn.Module, conditioning: _Conditioning) -> tuple[torch.Tensor, Any]:
    if data is None:
        if fingerprint(transformer) != _reference_fingerprint():
            raise ValueError(
                "L2C trains on real samples: pass data= (a tensor [N, C, H, W] in the model's input "
                "space, a (samples, labels) pair, or a file/folder path)"
            )
        from .reference import load_dataset

        data = load_dataset("train")
    if isinstance(data, (str, os.PathLike)):
        data = load_samples(data)
    samples, labels = data if isinstance(data, tuple) else (data, None)
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4:
        raise ValueError("L2C data must be a tensor [N, C, H, W] (or a (samples, labels) pair)")
    expected = (conditioning.channels, conditioning.size, conditioning.size)
    if tuple(samples.shape[1:]) != expected:
        raise ValueError(
            f"L2C data samples are {tuple(samples.shape[1:])} but the model takes {expected} "
            "(channels, height, width); encode images with the pipeline's VAE first for a latent model"
        )
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != samples.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {samples.shape[0]} samples")
        if not isinstance(conditioning, _ClassConditioning):
            labels = None
        elif labels.min() < 0 or labels.max() >= conditioning.null_id:
            raise ValueError(f"L2C labels must be class ids in [0, {conditioning.null_id - 1}]")
    return samples.float(), labels


def _reference_fingerprint() -> dict[str, Any] | None:
    try:
        from .reference import load_model

        return fingerprint(load_model())
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _run_key(
    config: TrainingConfig,
    transformer: nn.Module,
    scheduler: Any = None,
    conditioning: Any = None,
    samples: Any = None,
    labels: Any = None,
) -> dict[str, Any]:
    """Everything that changes the trained router: settings, model shape and weights, sampler,
    conditioning pool and (L2C) data. Not the process count: the same global batch may resume on
    another number of processes."""
    key = asdict(config)
    key["fingerprint"] = fingerprint(transformer)
    key["weights"] = digest_module(transformer)
    if scheduler is not None:
        key["scheduler"] = scheduler_key(scheduler)
    if conditioning is not None:
        key["conditioning"] = digest_tensors(*_conditioning_tensors(conditioning))
    if samples is not None:
        key["data"] = digest_tensors(samples, labels)
    return json.loads(json.dumps(key, default=str))


def _conditioning_tensors(conditioning: Any) -> list[Any]:
    """The tensors that define what a conditioning draws (class ids, or the prompt pool)."""
    return [v for _, v in sorted(vars(conditioning).items()) if isinstance(v, torch.Tensor)]


def _prepare_checkpoint(checkpoint_dir: Any, resume: bool) -> Path | None:
    """Check the checkpoint folder is writable before any work; with ``resume=False`` move an existing
    checkpoint aside (``router-training.pt`` → ``router-training.<n>.pt``), never delete it."""
    if checkpoint_dir is None:
        return None
    path = check_output_dir(checkpoint_dir) / _CHECKPOINT_NAME
    if not resume and path.exists():
        n = 1
        while (aside := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
            n += 1
        os.replace(path, aside)
        warnings.warn(
            f"resume=False: the existing checkpoint {path} was moved to {aside.name}; training starts over",
            stacklevel=3,
        )
    return path


def _check_finite(router: Router, config: TrainingConfig) -> None:
    if not torch.isfinite(router.logits).all():
        raise ValueError(
            f"training diverged: the router's logits contain NaN or infinity (lr={config.lr}, "
            f"guidance_scale={config.guidance_scale}, beta={config.beta}); lower lr, use a finite "
            "guidance_scale and check the model's outputs"
        )


def _save_checkpoint(path: Path, run_key, router: Router, optimizer, state: _State) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": _CHECKPOINT_VERSION,
        "run": run_key,
        "logits": router.logits.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "state": {
            "beta": state.beta,
            "beta_step": state.beta_step,
            "beta_sign": state.beta_sign,
            "lam": state.lam.cpu(),
            "iteration": state.iteration,
            "trajectory": state.trajectory,
            "lambda_at": state.lambda_at,
            "elapsed": state.elapsed,
            "history": state.history,
            "forecast_statistics": [(list(k), v.cpu()) for k, v in state.forecast_statistics.items()],
        },
    }
    if not torch.isfinite(payload["logits"]).all():
        raise ValueError(
            f"training diverged at iteration {state.iteration}: the router's logits contain NaN or "
            f"infinity, so {path} keeps the last good state; lower lr or check guidance_scale"
        )
    atomic_write(path, lambda file: torch.save(payload, file))


def _differences(saved: dict[str, Any], current: dict[str, Any], keys: list[str]) -> str:
    """``key: saved → now`` for each differing key (long values summarised)."""

    def short(value: Any) -> str:
        if isinstance(value, dict) and "class" in value:  # the scheduler
            return str(value["class"])
        text = json.dumps(value, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = []
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and a.get("class") == b.get("class"):
            sub = sorted(
                x
                for x in set(a.get("config", {})) | set(b.get("config", {}))
                if a.get("config", {}).get(x) != b.get("config", {}).get(x)
            )
            parts.append(f"{k}: config {', '.join(sub)}")
        else:
            parts.append(f"{k}: {short(a)} in the checkpoint, {short(b)} now")
    return "; ".join(parts)


def _load_checkpoint(path: Path, run_key, router: Router, optimizer, state: _State) -> None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(
            f"{path} is not a readable training checkpoint ({err}); delete it to start over"
        ) from err
    if not isinstance(payload, dict) or payload.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a harmonica training checkpoint of version {_CHECKPOINT_VERSION}")
    saved = payload["run"]
    differing = sorted(
        k for k in set(saved) | set(run_key) if saved.get(k) != run_key.get(k) and k != "iterations"
    )
    if differing:
        raise ValueError(
            f"{path} is from another training run (differs in {_differences(saved, run_key, differing)}); "
            "use another checkpoint_dir, or resume=False to move it aside and start over"
        )
    with torch.no_grad():
        router.logits.copy_(payload["logits"])
    optimizer.load_state_dict(payload["optimizer"])
    saved_state = payload["state"]
    state.beta = float(saved_state["beta"])
    state.beta_step = float(saved_state["beta_step"])
    state.beta_sign = saved_state["beta_sign"]
    state.lam = saved_state["lam"].float()
    state.iteration = int(saved_state["iteration"])
    state.trajectory = int(saved_state["trajectory"])
    state.lambda_at = saved_state["lambda_at"]
    state.elapsed = float(saved_state["elapsed"])
    state.history = list(saved_state["history"])
    state.forecast_statistics = {
        (int(k[0]), int(k[1]), tuple(int(s) for s in k[2])): v.to(router.logits.device)
        for k, v in saved_state.get("forecast_statistics", [])
    }

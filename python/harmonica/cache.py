"""The inference engine: cached transformer blocks driven by a :class:`CacheSchedule`.

``enable_cache(pipe_or_transformer, schedule_or_router)`` swaps every block of a supported
transformer for the cached block its family's adapter (:mod:`harmonica.adapters`) builds (DiT and
PixArt's ``BasicTransformerBlock``: :class:`CachedTransformerBlock`), which shares the original's
submodules (no weight copies), applies each unit through this module's :class:`CacheHandle` and
runs the fused residual ops of :mod:`harmonica_kernels`. At step t, unit k is computed iff
``schedule.compute[t, k]``: a computed unit's output overwrites its cache buffer in place; a reused
unit's module is not called and its cached output enters the residual with the current step's gate
(METHOD.md §1), or, for an entry the schedule forecasts, a Taylor extrapolation of its last computed
outputs (one fused read).

Step tracking. One transformer call is one denoising step (classifier-free guidance batched into
that call, as diffusers pipelines do). The step counter is a Python int on the
:class:`CacheHandle`, advanced by the transformer's ``__call__``; the per-step decisions are Python
bools taken from the schedule, so nothing in the step path reads device values on the host. A
pipeline call resets the counter (``pipe.scheduler.set_timesteps`` is wrapped, which also checks
the step count). Otherwise a call whose timestep is higher than the previous call's starts a new
generation (own loops need no ``handle.reset()``): once per transformer call, comparing positions
in the timestep array for device views of it (no host sync), values otherwise. One generation runs
at a time: a call from another thread mid-generation, or an overlapping call, is a
:class:`CacheStateError`.

torch.compile. The bookkeeping runs in the transformer's ``__call__`` outside the traced region
(``torch.compiler.disable(recursive=False)``); the traced forward only reads the current step's row
of the schedule. ``torch.compile(transformer, fullgraph=True)`` therefore compiles one graph per
*distinct row* of the schedule (2 for FORA N=2, up to T for a learned schedule), each reused on every
step with that row, never one per step; raise ``torch._dynamo.config.recompile_limit`` (default 8)
above the number of distinct rows when compiling with a learned schedule (with ``fullgraph=True``
dynamo raises instead of falling back once the limit is hit). The cache buffers are allocated in
that ``__call__`` too, so a compiled step only reads and overwrites tensors that exist before it runs.

The engine is for inference: run it under ``torch.no_grad()`` / ``torch.inference_mode()`` as the
diffusers pipelines do. With autograd on and anything requiring grad (weights or inputs) a call
raises :class:`CacheStateError` at once: the fused ops have no backward on this path, so gradients
would be missing or wrong.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from harmonica_kernels import (
    available_backends,
    cached_gated_residual,
    forecast_gated_residual,
    forecast_residual_norm_modulate,
    gated_residual_norm_modulate,
    gated_residual_update_,
)

from .adapters import adapter_for
from .adapters import basic as _basic
from .adapters.base import IMAGE, JOINT, TEXT, Branch, CachedBlock, CallState
from .adapters.base import as_row as _as_row
from .adapters.base import runs_plainly as _runs_plainly  # noqa: F401  (looked up here by adapters)
from .adapters.basic import CachedTransformerBlock, _ada_zero_chunks  # noqa: F401  (public before adapters)
from .models import supported_class, transformer_of, units
from .router import Router
from .schedule import CacheSchedule

__all__ = [
    "CacheHandle",
    "CacheStateError",
    "CachedTransformerBlock",
    "ScheduleMismatchError",
    "disable_cache",
    "enable_cache",
]

HANDLE_ATTR = "_harmonica_cache"
"""Attribute of the transformer that holds its :class:`CacheHandle` while caching is enabled."""

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_BRANCH_STATE = ("_buffers", "_older", "_layout")
"""CacheHandle attributes that hold one CFG branch's caches (swapped together between branches)."""

_GENERATION_STATE = (
    "_step",
    "_last_timestep",
    "_owner",
    "_by_scheduler",
    "_buffers",
    "_older",
    "_coefficients",
    "_layout",
    "_branch",
    "_active_branch",
    "_branch_states",
)
"""CacheHandle attributes that a generation changes between transformer calls (see ``_save_generation``)."""

MultiBranch = Callable[[], Sequence[torch.Tensor]]
"""One module call that feeds several units, returning one output per unit (in their order)."""


class CacheStateError(RuntimeError):
    """The cache cannot serve this call (too many steps, changed shapes, use outside a forward)."""


class ScheduleMismatchError(ValueError):
    """The schedule does not fit the sampling run (wrong number of steps or units)."""


class CacheHandle:
    """State of one cached transformer: schedule, step counter and cache buffers.

    ``transformer._harmonica_cache`` holds it while caching is enabled. Per step the transformer's
    ``__call__`` checks the step against the schedule, (at step 0) allocates the buffers, and
    selects the step's row; the cached blocks then ask :meth:`unit_residual` /
    :meth:`unit_residual_norm_modulate` to apply each unit. Those two methods (and :meth:`computes`)
    are the whole per-unit policy: a training mode overrides them to blend branch and cache with
    ``routed_gated_residual`` instead of choosing one.

    Buffers: one contiguous ``[B, N, D]`` tensor per unit that the schedule ever reuses (units
    computed at every step run the plain residual and need none), allocated at step 0 from the
    call's batch B, tokens N and width D, in ``cache_dtype`` (default: the activations' dtype),
    reused in place by every later step and freed by :meth:`reset` and ``disable_cache``. A unit
    the schedule forecasts at order k keeps its last k + 1 computed outputs: a compute writes the
    oldest of its buffers in place and the Python references rotate (newest first), so no tensor
    is ever copied; the forecast coefficients live on the device (``[T, U, 2]``), and each step
    selects its row outside any compiled region.
    """

    def __init__(
        self,
        transformer: nn.Module,
        schedule: CacheSchedule,
        *,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self._schedule = schedule
        self._rows = schedule.rows
        self._history_sizes = schedule.history_sizes
        self._order_rows = schedule.order_rows
        self._cache_dtype = cache_dtype
        # What a unit is and how its block runs: the model family's adapter (harmonica.adapters).
        self._adapter = adapter_for(transformer)
        self._width = self._adapter.width(transformer)
        self._unit_names = tuple(units(transformer))
        self._unit_streams = self._adapter.unit_streams(transformer)
        self._step = 0
        # Generation bookkeeping (once per transformer call, never per unit): the previous call's
        # timestep, the thread whose generation is in progress, and whether a pipeline's
        # set_timesteps started it (then the pipeline owns the boundaries).
        self._last_timestep: Any = None
        self._owner: int | None = None
        self._by_scheduler = False
        self._call_lock = threading.Lock()
        self._timestep_index = _timestep_position(type(transformer))
        # A subclass with its own step bookkeeping (router training) manages generations itself.
        self._inference_only = type(self)._begin_step is CacheHandle._begin_step
        self._row: tuple[bool, ...] | None = None
        self._order_row: tuple[int, ...] = self._order_rows[0]
        # _buffers[k]: unit k's newest computed output (what a reuse reads); _older[k]: the ones
        # before it, newest first (forecasting units only).
        self._buffers: list[torch.Tensor | None] = [None] * schedule.num_units
        self._older: list[list[torch.Tensor]] = [[] for _ in range(schedule.num_units)]
        self._coefficients: torch.Tensor | None = None
        self._step_coefficients: torch.Tensor | None = None
        self._layout: tuple[Any, ...] | None = None
        # Pipelines that run classifier-free guidance as separate calls (Wan, Qwen-Image, FLUX's true
        # CFG) make several calls per step on the same latents: call `branch` of the step. Each branch
        # has its own caches (its _BRANCH_STATE attributes, swapped in by _switch_branch).
        self._branch = 0
        self._active_branch = 0
        self._branch_states: dict[int, tuple[Any, ...]] = {}
        self._last_input: Any = None
        # What disable_cache undoes, kept as plain references (not closures) so that a deepcopy of
        # a cached model or pipeline gets a handle that undoes its own copy.
        self._original_class: type[nn.Module] = type(transformer)
        self._cached_blocks: list[CachedBlock] = []
        self._scheduler_hook: _ResetOnSetTimesteps | None = None
        # The adapter's per-call state (DiT: the conditioning embedding its blocks share).
        self._embeddings: CallState = CallState()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_call_lock")  # locks neither copy nor pickle; a copy gets its own
        state["_last_input"] = None  # a weak reference to the last call's latents
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._call_lock = threading.Lock()

    @property
    def schedule(self) -> CacheSchedule:
        """The schedule being applied."""
        return self._schedule

    @property
    def step(self) -> int:
        """Index of the next transformer call within the current generation (0 after a reset)."""
        return self._step

    @property
    def unit_names(self) -> tuple[str, ...]:
        """Unit names, one per schedule column."""
        return self._unit_names

    @property
    def cache_dtype(self) -> torch.dtype | None:
        """Dtype of the cache buffers; None means the activations' dtype."""
        return self._cache_dtype

    @property
    def cache_bytes(self) -> int:
        """Bytes currently held by cache buffers, forecast histories included, of every CFG branch
        (0 before step 0 and after a reset)."""
        states = [
            (self._buffers, self._older),
            *((state[0], state[1]) for state in self._branch_states.values()),
        ]
        held = [
            b
            for buffers, older in states
            for b in itertools.chain(buffers, itertools.chain.from_iterable(older))
            if b is not None
        ]
        return sum(b.numel() * b.element_size() for b in held)

    @torch.compiler.disable
    def reset(self) -> None:
        """Start a new generation: step 0 next, cache buffers freed.

        Rarely needed: a pipeline call resets by itself, and so does a transformer call whose
        timestep is higher than the previous call's (a user's loop starting over).
        """
        self._step = 0
        self._last_timestep = None
        self._owner = None
        self._by_scheduler = False
        self._row = None
        self._buffers = [None] * self._schedule.num_units
        self._older = [[] for _ in range(self._schedule.num_units)]
        self._coefficients = self._step_coefficients = None
        self._layout = None
        self._branch = 0
        self._active_branch = 0
        self._branch_states = {}
        self._last_input = None
        self._embeddings.end_call(last_step=True)

    def _save_generation(self) -> dict[str, Any]:
        """A copy of the generation in progress between two transformer calls (caches, histories,
        coefficients, step counter), for :meth:`_load_generation` into a handle whose schedule agrees
        with this one's on the steps run so far: a search resumes candidate schedules from the state
        their common prefix left instead of sampling that prefix again."""
        if self._row is not None:
            raise CacheStateError("internal: a generation is saved between transformer calls, not within one")
        return copy.deepcopy({name: getattr(self, name) for name in _GENERATION_STATE})

    def _load_generation(self, state: dict[str, Any]) -> None:
        """Continue the generation ``state`` was saved from (copied: ``state`` stays reusable). The
        caches must have this schedule's sizes; coefficients of the steps still to run are the caller's."""
        if state["_step"] and any(
            (b is None) != (not size) or len(older) != max(size - 1, 0)
            for b, older, size in zip(state["_buffers"], state["_older"], self._history_sizes, strict=True)
        ):
            raise CacheStateError("internal: a saved generation's caches do not fit this handle's schedule")
        for name, value in copy.deepcopy(state).items():
            setattr(self, name, value)
        self._row = None
        self._last_input = None

    def computes(self, unit: int) -> bool:
        """Whether ``unit`` is computed at the current step (a host-side constant)."""
        row = self._row
        if row is None:
            raise CacheStateError(
                "a cached block ran outside a call of its transformer; call the transformer, not its "
                "blocks. A model compiled before enable_cache bypasses the cache's bookkeeping: "
                "torch.compile the model after enable_cache (and again after disable_cache)"
            )
        return row[unit]

    def computes_none(self) -> bool:
        """Whether the current step computes no unit at all (a host-side constant)."""
        row = self._row
        return row is not None and not any(row)

    def unit_residual(
        self, unit: int, x: torch.Tensor, gate: torch.Tensor | None, branch: Branch
    ) -> torch.Tensor:
        """``x + gate * branch()`` if the unit is computed (writing its cache), else ``x + gate * cache``
        (or ``x + gate * forecast`` where the schedule forecasts the entry).

        ``x``: ``[B, N, D]``; ``gate``: ``[B, D]``/``[B, 1, D]`` or None (ungated).
        """
        if self.computes(unit):
            y = branch()
            cache = self._write_slot(unit)
            if cache is None:
                return y + x if gate is None else _as_row(gate) * y + x
            return gated_residual_update_(x, gate, y, cache)
        return self._reuse(unit, x, gate)

    def _reuse(self, unit: int, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        cache = self._cached(unit, self._buffers[unit])
        if self._order_row[unit]:
            return forecast_gated_residual(x, gate, cache, *self._history(unit))
        return cached_gated_residual(x, gate, cache)

    def unit_residual_norm_modulate(
        self,
        unit: int,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        branch: Branch,
        shift: torch.Tensor,
        scale: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`unit_residual` fused with the next ``h = LayerNorm(x) * (1 + scale) + shift``.

        Returns ``(x, h)``, both ``[B, N, D]``.
        """
        if self.computes(unit):
            y = branch()
            return gated_residual_norm_modulate(x, gate, y, shift, scale, eps, cache=self._write_slot(unit))
        return self._reuse_norm_modulate(unit, x, gate, shift, scale, eps)

    def _reuse_norm_modulate(
        self,
        unit: int,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        shift: torch.Tensor,
        scale: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cached(unit, self._buffers[unit])
        if self._order_row[unit]:
            c1, c2, coefficients = self._history(unit)
            return forecast_residual_norm_modulate(x, gate, cache, c1, c2, coefficients, shift, scale, eps)
        return gated_residual_norm_modulate(x, gate, None, shift, scale, eps, cache=cache, reuse=True)

    def _write_slot(self, unit: int) -> torch.Tensor | None:
        """The buffer a compute of ``unit`` writes: its oldest history entry, which becomes the newest
        (references rotate; with one buffer this is the buffer itself)."""
        older = self._older[unit]
        if not older:
            return self._buffers[unit]
        slot = older.pop()
        older.insert(0, self._buffers[unit])
        self._buffers[unit] = slot
        return slot

    def _history(self, unit: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(c1, c2, coefficients)`` for the current step's forecast of ``unit`` (c2 None at order 1)."""
        older = self._older[unit]
        c2 = older[1] if self._order_row[unit] == 2 else None
        return older[0], c2, self._step_coefficients[unit]

    def unit_residuals(
        self,
        units: Sequence[int],
        xs: Sequence[torch.Tensor],
        gates: Sequence[torch.Tensor | None],
        branch: MultiBranch,
        norms: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None] | None = None,
    ) -> tuple[Any, ...]:
        """Several units fed by one module call (a joint attention's image and text outputs).

        ``branch()`` returns one output per unit, in the order of ``units``; it runs at most once,
        and only if one of the units is computed. Each unit is then applied by :meth:`unit_residual`
        (or, where ``norms[i]`` is ``(shift, scale, eps)``, :meth:`unit_residual_norm_modulate`) on
        its own residual stream ``xs[i]`` with its own gate, so each keeps its own cache: a unit that
        is reused while another of the group is computed takes its cached value, not the fresh one.

        Returns one entry per unit: ``x``, or ``(x, h)`` where a norm was given.
        """
        outputs: list[torch.Tensor] = []

        def output(i: int) -> torch.Tensor:
            if not outputs:
                outputs.extend(branch())
            return outputs[i]

        norms = norms if norms is not None else (None,) * len(units)
        results = []
        for i, (unit, x, gate, norm) in enumerate(zip(units, xs, gates, norms, strict=True)):
            part = functools.partial(output, i)
            if norm is None:
                results.append(self.unit_residual(unit, x, gate, part))
            else:
                results.append(self.unit_residual_norm_modulate(unit, x, gate, part, *norm))
        return tuple(results)

    def _cached(self, unit: int, cache: torch.Tensor | None) -> torch.Tensor:
        if cache is None:
            raise CacheStateError(
                f"unit {self._unit_names[unit]} is reused at step {self._step} but its cache is empty; "
                "the first step of a generation must compute every unit"
            )
        return cache

    # -- per-call bookkeeping: runs in the transformer's __call__, never traced by dynamo (tracing
    # it would specialise on the step index and recompile every step) --

    @torch.compiler.disable
    def _begin_step(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        num_steps = self._schedule.num_steps
        if self._step >= num_steps:
            raise CacheStateError(
                f"the cache schedule was made for {num_steps} denoising steps, but this generation is "
                f"making transformer call {self._step + 1} with a timestep no higher than the last one, "
                f"so its loop runs at least {self._step + 1} steps. Enable the cache with a schedule (or "
                f"router) made for your number of steps, or sample with num_inference_steps={num_steps} "
                "(one transformer call per step, CFG batched). A new generation starts by itself when "
                "the timestep goes back up (or call handle.reset())"
            )
        if self._branch != self._active_branch:
            self._switch_branch()
        layout = self._layout_of(model, args, kwargs)
        if self._step == 0:
            self._allocate(layout)
        elif layout != self._layout:
            raise CacheStateError(
                f"step {self._step} runs batch, tokens, width, dtype, device = {_describe(layout)} but this "
                f"generation's cache was allocated at step 0 for {_describe(self._layout)}; call "
                "handle.reset() before changing batch size, resolution or dtype"
            )
        self._row = self._rows[self._step]
        self._order_row = self._order_rows[self._step]
        if self._coefficients is not None:
            self._step_coefficients = self._coefficients[self._step]

    @torch.compiler.disable
    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Per-call checks of an inference handle: autograd, threads, and generation boundaries."""
        if torch.is_grad_enabled():
            _refuse_autograd(module, args, kwargs)
        thread = threading.get_ident()
        if self._step and thread != self._owner:
            if self._step < self._schedule.num_steps:
                raise CacheStateError(
                    f"this cached model is at step {self._step} of {self._schedule.num_steps} of a "
                    "generation started by another thread; one cached model runs one generation at a "
                    "time. Give each thread its own model (copy.deepcopy(model) before enable_cache), "
                    "or call handle.reset() if that generation was abandoned"
                )
            self.reset()  # the other thread's generation is complete
        index = self._timestep_index
        timestep = kwargs.get("timestep") if index is None or len(args) <= index else args[index]
        if (
            self._step
            and (not self._by_scheduler or self._step >= self._schedule.num_steps)
            and _starts_over(self._last_timestep, timestep)
        ):
            self.reset()
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if self._step and self._repeats_step(hidden_states, timestep):
            self._step -= 1  # another call of the step just made: its next branch
            self._branch += 1
        else:
            self._branch = 0
        if self._step == 0:
            self._owner = thread
        self._last_timestep = timestep
        self._last_input = weakref.ref(hidden_states) if isinstance(hidden_states, torch.Tensor) else None

    def _repeats_step(self, hidden_states: Any, timestep: Any) -> bool:
        """Whether this call is another call of the previous call's step (CFG run as separate calls):
        the same latents tensor object at the same timestep. A loop's next step has new latents."""
        last = self._last_input() if self._last_input is not None else None
        return last is not None and last is hidden_states and _same_timestep(self._last_timestep, timestep)

    def _switch_branch(self) -> None:
        """Make the current call's branch's caches the active ones (see ``_branch``)."""
        self._branch_states[self._active_branch] = tuple(getattr(self, name) for name in _BRANCH_STATE)
        state = self._branch_states.pop(self._branch, None)
        if state is None:
            if self._step:
                raise CacheStateError(
                    f"step {self._step} made more transformer calls than step 0 of this generation; a "
                    "pipeline that runs CFG as separate calls must make the same calls at every step"
                )
            state = ([None] * self._schedule.num_units, [[] for _ in range(self._schedule.num_units)], None)
        for name, value in zip(_BRANCH_STATE, state, strict=True):
            setattr(self, name, value)
        self._active_branch = self._branch

    @torch.compiler.disable
    def _end_step(self) -> None:
        self._step += 1
        self._row = None

    def _layout_of(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """``(batch, tokens, width, dtype, device)`` of a call; tokens is the image token count, or
        ``(image, text)`` for a family with units on the text stream (from shapes: no device read)."""
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        batch, image, text = self._adapter.tokens(model, args, kwargs)
        tokens = image if text is None else (image, text)
        return (batch, tokens, self._width, hidden_states.dtype, hidden_states.device)

    def _allocate(self, layout: tuple[Any, ...]) -> None:
        batch, tokens, width, dtype, device = layout
        image, text = (tokens, 0) if isinstance(tokens, int) else tokens
        per_stream = {IMAGE: image, TEXT: text, JOINT: image + text}
        buffer_dtype = self._cache_dtype or dtype
        if buffer_dtype == torch.float16 and dtype != torch.float16:
            raise TypeError(
                f"cache_dtype float16 cannot hold {dtype} activations (its range ends at 65504, where "
                f"{dtype} goes to 3e38: large unit outputs would become inf); store the cache in "
                "torch.bfloat16 to halve its memory, or in the activations' dtype"
            )

        def new(stream: str) -> torch.Tensor:
            return torch.empty(batch, per_stream[stream], width, dtype=buffer_dtype, device=device)

        sizes = tuple(zip(self._history_sizes, self._unit_streams, strict=True))
        self._buffers = [new(stream) if size else None for size, stream in sizes]
        self._older = [[new(stream) for _ in range(size - 1)] for size, stream in sizes]
        if self._schedule.forecasts:
            self._coefficients = self._schedule.coefficients.to(device=device, dtype=torch.float32)
        self._layout = layout

    def _check_num_steps(self, num_calls: int) -> None:
        if num_calls != self._schedule.num_steps:
            raise ScheduleMismatchError(
                f"the cache schedule was made for {self._schedule.num_steps} denoising steps but the "
                f"scheduler was set up for {num_calls}; call the pipeline with "
                f"num_inference_steps={self._schedule.num_steps}, or enable the cache with a schedule "
                f"(or router) for {num_calls} steps"
            )

    def __repr__(self) -> str:
        return (
            f"CacheHandle({self._schedule!r}, step={self._step}, cache_bytes={self.cache_bytes}, "
            f"cache_dtype={self._cache_dtype})"
        )


def _describe(layout: tuple[Any, ...] | None) -> str:
    if layout is None:
        return "nothing"
    batch, tokens, width, dtype, device = layout
    if not isinstance(tokens, int):
        tokens = f"{tokens[0]} image + {tokens[1]} text tokens"
    return f"({batch}, {tokens}, {width}, {dtype}, {device})"


def _stepped_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose ``__call__`` advances the cache handle around each forward."""
    stepped = _STEPPED_CLASSES.get(cls)
    if stepped is not None:
        return stepped

    # Dynamo skips this frame but traces the forward it calls, so the step bookkeeping stays on the
    # host and out of any compiled graph (no guard on the step index).
    @torch.compiler.disable(recursive=False)
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        handle: CacheHandle | None = self.__dict__.get(HANDLE_ATTR)
        if handle is None:
            raise CacheStateError(_STALE_MODEL)
        if not handle._call_lock.acquire(blocking=False):
            raise CacheStateError(
                "this cached model is already running a call in another thread; one cached model runs "
                "one generation at a time. Give each thread its own model (copy.deepcopy(model) before "
                "enable_cache), or serialise the calls"
            )
        try:
            hidden_states = args[0] if args else kwargs.get("hidden_states")
            if handle._inference_only:
                handle._enter(self, args, kwargs)
            handle._begin_step(self, args, kwargs)
            try:
                handle._embeddings.begin_call(first_step=handle.step == 0)
                output = super(stepped, self).__call__(*args, **kwargs)
            except BaseException as err:
                if handle._inference_only:  # a half-run step leaves a half-written cache
                    handle.reset()
                device = getattr(hidden_states, "device", None)
                if (
                    isinstance(err, TypeError)
                    and device is not None
                    and torch.is_autocast_enabled(device.type)
                ):
                    raise TypeError(
                        f"{err} (under torch.autocast: the cached blocks' fused residual ops take the "
                        "branch and the residual stream in one dtype, which autocast breaks for this "
                        "model; cast the model instead, e.g. model.to(torch.bfloat16), or disable_cache)"
                    ) from err
                raise
            handle._embeddings.end_call(last_step=handle.step == handle._schedule.num_steps - 1)
            handle._end_step()
        finally:
            handle._call_lock.release()
        return output

    def __reduce_ex__(self: nn.Module, protocol: Any) -> Any:
        # pickle finds a class by module and qualname, which name the original class: rebuild the
        # stepped class from it instead (torch.save and copy.deepcopy of a cached model).
        reduced = super(stepped, self).__reduce_ex__(protocol)
        if isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[1] and reduced[1][0] is stepped:
            return (_new_stepped, (cls, *reduced[1][1:]), *reduced[2:])
        return reduced

    # Same name, module and qualname, so configs saved while caching is on name the real class.
    stepped = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__reduce_ex__": __reduce_ex__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    _STEPPED_CLASSES[cls] = stepped
    return stepped


_STEPPED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _new_stepped(cls: type[nn.Module], *args: Any) -> nn.Module:
    """Unpickling a cached model: an empty instance of ``cls``'s stepped class (state set after)."""
    stepped = _stepped_class(cls)
    return stepped.__new__(stepped, *args)


_STALE_MODEL = (
    "this model was compiled (or copied) while caching was enabled and caching has since been "
    "disabled; call the model itself, or torch.compile it again after enable_cache/disable_cache"
)


def _timestep_position(cls: type[nn.Module]) -> int | None:
    """Index of ``timestep`` among the positional arguments of ``cls.forward`` (after self)."""
    try:
        names = list(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return names.index("timestep") if "timestep" in names else None


def _refuse_autograd(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise if this call would build an autograd graph: the cache path has no backward."""
    tensors = itertools.chain(args, kwargs.values())
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors) or any(
        p.requires_grad for p in module.parameters()
    ):
        raise CacheStateError(
            "a cached transformer is inference-only: with autograd on, the fused cache ops would give "
            "missing or wrong gradients. Run it under torch.no_grad() or torch.inference_mode() (as "
            "diffusers pipelines do) or freeze it (model.requires_grad_(False)); to backpropagate "
            "through the model, disable_cache(model) first"
        )


def _scalar_view(t: Any) -> tuple[int, int] | None:
    """(storage, offset) of a device timestep that is one element of a longer timestep array.

    ``for t in scheduler.timesteps`` (and pipelines' ``t.expand(B)``) give such views: a later step
    has a higher offset, so comparing offsets needs no device read (no host sync).
    """
    if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
        return None
    if t.numel() != 1 and any(stride != 0 for stride in t.stride()):
        return None
    storage = t.untyped_storage()
    if storage.nbytes() <= t.element_size():
        return None
    return storage.data_ptr(), t.storage_offset()


def _starts_over(previous: Any, timestep: Any) -> bool:
    """Whether ``timestep`` is higher than ``previous`` (a new generation); False when unknown."""
    if previous is None or timestep is None:
        return False
    a, b = _scalar_view(previous), _scalar_view(timestep)
    if a is not None and b is not None and a[0] == b[0]:
        return b[1] < a[1]  # diffusers' timesteps decrease along the array
    return _first_value(timestep) > _first_value(previous)


def _same_timestep(previous: Any, timestep: Any) -> bool:
    """Whether two calls' timesteps are equal (the same element of one array, or equal values)."""
    if previous is None or timestep is None:
        return False
    if previous is timestep:
        return True
    a, b = _scalar_view(previous), _scalar_view(timestep)
    if a is not None and b is not None and a[0] == b[0]:
        return a[1] == b[1]
    return _first_value(timestep) == _first_value(previous)


def _first_value(t: Any) -> float:
    """A timestep's value on the host (a device read only off the fast paths of _starts_over)."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else float("nan")
    return float(t)


def enable_cache(
    pipe_or_transformer: Any,
    schedule_or_router: CacheSchedule | Router | tuple[Any, Any] | dict[str, Any],
    *,
    threshold: float = 0.1,
    cache_dtype: torch.dtype | None = None,
) -> CacheHandle | tuple[CacheHandle, CacheHandle]:
    """Make a supported diffusers transformer (or a pipeline holding one) skip units per a schedule.

    Args:
        pipe_or_transformer: a transformer of a supported family (``harmonica.models.SUPPORTED_MODELS``:
            DiT, PixArt, FLUX.1, FLUX.2, SD3, Wan, Qwen-Image), or a pipeline with one as
            ``.transformer`` (then ``pipe.scheduler.set_timesteps`` also resets the step counter at the
            start of every pipeline call and checks its step count). A pipeline with a second
            transformer (Wan 2.2's ``transformer_2`` for the low-noise steps) caches both.
        schedule_or_router: a :class:`CacheSchedule` ``[T, U]`` with U = ``len(harmonica.units(model))``,
            or a :class:`Router` (checked against the model's fingerprint, then thresholded). For a
            two-transformer pipeline, one per transformer: ``(for_transformer, for_transformer_2)`` or a
            dict with those keys, each with as many steps as its transformer runs (:func:`stage_steps`).
            A step is one transformer call, or several calls on the same latents at the same timestep
            (CFG run as separate calls), each of which keeps its own caches.
        threshold: a router's inference threshold τ: unit computed iff ``sigmoid(logit) > τ``.
        cache_dtype: dtype of the cache buffers and forecast histories (e.g. ``torch.bfloat16`` under
            an fp32 model to halve their memory); None stores them in the activations' dtype. float16
            only under float16 activations (its range cannot hold fp32/bf16 ones: refused at step 0).

    Returns:
        The :class:`CacheHandle`, also at ``transformer._harmonica_cache`` until :func:`disable_cache`
        (a pair of them for a two-transformer pipeline).

    Raises:
        UnsupportedModelError: the model or one of its blocks cannot be cached exactly; the message
            names the supported families and how to add an adapter.
        RouterMismatchError: the router was made for a model of another shape.
        ScheduleMismatchError: the schedule's unit count differs from the model's (at a pipeline call:
            its step count differs from the steps the transformer runs).
        CacheStateError: caching is already enabled on this transformer.
    """
    if cache_dtype is not None and cache_dtype not in _CACHE_DTYPES:
        raise TypeError(
            f"cache_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {cache_dtype}"
        )
    stages = _two_stage_transformers(pipe_or_transformer)
    if stages is not None:
        return _enable_two_stages(pipe_or_transformer, stages, schedule_or_router, threshold, cache_dtype)
    transformer = transformer_of(pipe_or_transformer)
    handle = _new_handle(transformer, schedule_or_router, threshold, cache_dtype, pipe_or_transformer)
    attach_handle(pipe_or_transformer, handle)
    return handle


def _new_handle(
    transformer: nn.Module,
    schedule_or_router: Any,
    threshold: float,
    cache_dtype: torch.dtype | None,
    pipe_or_transformer: Any,
    name: str = "",
) -> CacheHandle:
    """A checked CacheHandle for ``transformer`` (``name``: its pipeline attribute, for messages)."""
    model_class = supported_class(transformer)
    if isinstance(schedule_or_router, Router):
        schedule_or_router.check_model(transformer)
        _warn_on_other_sampler(schedule_or_router, pipe_or_transformer)
        schedule = schedule_or_router.to_schedule(threshold)
    elif isinstance(schedule_or_router, CacheSchedule):
        schedule = schedule_or_router
    else:
        raise TypeError(f"expected a CacheSchedule or a Router, got {type(schedule_or_router).__name__}")
    unit_names = units(transformer)
    if schedule.num_units != len(unit_names):
        which = f" for {name}" if name else ""
        raise ScheduleMismatchError(
            f"the schedule{which} has {schedule.num_units} units but {model_class.__name__} with "
            f"{len(adapter_for(transformer).blocks(transformer))} blocks has {len(unit_names)}; build it "
            "with num_units=len(harmonica.units(model))"
        )
    # Discover the op backends now (it imports the extensions), not inside a compiled first step.
    available_backends()
    return CacheHandle(transformer, schedule, cache_dtype=cache_dtype)


# -- pipelines with two transformers (Wan 2.2 A14B: `transformer` for the high-noise steps,
# `transformer_2` for the low-noise ones, switching at boundary_ratio * num_train_timesteps) --

_STAGE_NAMES = ("transformer", "transformer_2")


def _two_stage_transformers(pipe: Any) -> tuple[nn.Module, nn.Module] | None:
    if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is None:
        return None
    return pipe.transformer, pipe.transformer_2


def _enable_two_stages(
    pipe: Any,
    stages: tuple[nn.Module, nn.Module],
    schedules: Any,
    threshold: float,
    cache_dtype: torch.dtype | None,
) -> tuple[CacheHandle, CacheHandle]:
    """One handle per transformer, each with its own schedule; one pipeline step is one call of the
    transformer that serves it, so each schedule has as many steps as its transformer runs."""
    schedules = stage_pair(schedules, "schedule or router")
    for name, transformer in zip(_STAGE_NAMES, stages, strict=True):
        if transformer.__dict__.get(HANDLE_ATTR) is not None:
            raise CacheStateError(f"caching is already enabled on {name}; call disable_cache() first")
    handles = tuple(
        _new_handle(transformer, schedule, threshold, cache_dtype, pipe, name)
        for name, transformer, schedule in zip(_STAGE_NAMES, stages, schedules, strict=True)
    )
    for transformer, handle in zip(stages, handles, strict=True):
        attach_handle(transformer, handle)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        check = _StageSteps(pipe, handles)
        for handle in handles:
            handle._scheduler_hook = _ResetOnSetTimesteps(scheduler, handle, check)
            scheduler.set_timesteps = handle._scheduler_hook
    return handles


def stage_pair(values: Any, what: str) -> tuple[Any, Any]:
    """``(for_transformer, for_transformer_2)`` from a pair or a dict with those keys (TypeError naming
    both forms otherwise); ``what`` names one value in the message."""
    if isinstance(values, dict):
        if set(values) != set(_STAGE_NAMES):
            raise TypeError(
                f"pass them as {{'transformer': ..., 'transformer_2': ...}}, got keys {sorted(values)}"
            )
        values = tuple(values[name] for name in _STAGE_NAMES)
    if not isinstance(values, (tuple, list)) or len(values) != 2:
        raise TypeError(
            "this pipeline has two transformers (transformer for the high-noise steps, transformer_2 for "
            f"the low-noise ones): pass one {what} for each, as a pair (for_transformer, "
            "for_transformer_2) or a dict with those keys; each sized for the steps its transformer runs "
            "(harmonica.cache.stage_steps(pipe, num_inference_steps))"
        )
    return values[0], values[1]


def stage_steps(pipe: Any, num_inference_steps: int | None = None) -> tuple[int, int]:
    """How many of a two-transformer pipeline's steps each transformer runs: ``(transformer,
    transformer_2)``, from its scheduler's timesteps (set for ``num_inference_steps`` if given) and
    its ``boundary_ratio``, as the pipeline chooses (``t >= boundary`` runs ``transformer``)."""
    stages = step_stages(pipe, pipe.scheduler, num_inference_steps)
    return stages.count(0), stages.count(1)


def step_stages(pipe: Any, scheduler: Any, num_inference_steps: int | None = None) -> list[int]:
    """Which transformer runs each step of ``scheduler`` (set up on a copy for ``num_inference_steps``
    if given): 0 (``transformer``) where the timestep is at least the pipeline's ``boundary_ratio`` ×
    the training timesteps, else 1 (``transformer_2``); all 0 without a boundary."""
    if num_inference_steps is not None:
        scheduler = copy.deepcopy(scheduler)
        type(scheduler).set_timesteps(scheduler, num_inference_steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    ratio = pipe.config.get("boundary_ratio") if hasattr(pipe, "config") else None
    if ratio is None:
        return [0] * len(timesteps)
    boundary = ratio * scheduler.config.num_train_timesteps
    return [0 if t >= boundary else 1 for t in timesteps]


class _StageSteps:
    """Checks, when a pipeline sets its timesteps, that each transformer's schedule has as many steps
    as that transformer will run (naming both transformers' sizes otherwise)."""

    def __init__(self, pipe: Any, handles: tuple[CacheHandle, CacheHandle]) -> None:
        self.pipe = pipe
        self.handles = handles

    def __call__(self, handle: CacheHandle) -> None:
        runs = stage_steps(self.pipe)
        sizes = tuple(h._schedule.num_steps for h in self.handles)
        if all(size == run for size, run in zip(sizes, runs, strict=True) if run):
            return
        total = sum(runs)
        swapped = " (the two schedules look swapped)" if sizes == runs[::-1] else ""
        raise ScheduleMismatchError(
            f"this pipeline's {total} steps run {runs[0]} on transformer and {runs[1]} on transformer_2 "
            f"(boundary_ratio {self.pipe.config.get('boundary_ratio')}), but the schedules have {sizes[0]} "
            f"steps (transformer) and {sizes[1]} steps (transformer_2){swapped}; make each transformer's "
            "schedule for the steps it runs (harmonica.cache.stage_steps(pipe, num_inference_steps))"
        )


def attach_handle(pipe_or_transformer: Any, handle: CacheHandle) -> None:
    """Swap the transformer's blocks for cached blocks driven by ``handle`` (any CacheHandle subclass).

    The shared tail of :func:`enable_cache` and of router training, which attaches a handle that
    blends instead of choosing; :func:`disable_cache` undoes either.
    """
    transformer = transformer_of(pipe_or_transformer)
    if transformer.__dict__.get(HANDLE_ATTR) is not None:
        raise CacheStateError("caching is already enabled on this transformer; call disable_cache() first")
    adapter = handle._adapter
    index = {name: k for k, name in enumerate(units(transformer))}
    # Build every cached block first: an unsupported block raises before anything is modified.
    cached_blocks = []
    for list_name, prefix, i, block in adapter.blocks(transformer):
        adapter.check_block(list_name, block)
        branches = adapter.block_units(list_name, block)
        unit_ids = {branch: index[f"{prefix}.{i}.{branch}"] for branch in branches}
        cached_blocks.append(adapter.cached_block(list_name, i, block, handle, unit_ids))
    handle._cached_blocks = cached_blocks
    for cached in cached_blocks:
        list_name, i = cached._slot
        getattr(transformer, list_name)[i] = cached
    handle._embeddings = adapter.call_state(cached_blocks)
    setattr(transformer, HANDLE_ATTR, handle)
    transformer.__class__ = _stepped_class(handle._original_class)
    scheduler = (
        getattr(pipe_or_transformer, "scheduler", None) if pipe_or_transformer is not transformer else None
    )
    if scheduler is not None:
        handle._scheduler_hook = _ResetOnSetTimesteps(scheduler, handle)
        scheduler.set_timesteps = handle._scheduler_hook


def disable_cache(pipe_or_transformer: Any) -> None:
    """Undo :func:`enable_cache`: original blocks, class and scheduler restored, cache freed.

    A no-op when caching is not enabled.
    """
    stages = _two_stage_transformers(pipe_or_transformer)
    if stages is not None:
        # The later stage's scheduler hook wraps the earlier one's: unwrap in reverse order.
        for transformer in reversed(stages):
            _disable(transformer)
        return
    _disable(transformer_of(pipe_or_transformer))


def _disable(transformer: nn.Module) -> None:
    handle = transformer.__dict__.get(HANDLE_ATTR)
    if handle is None:
        return
    for cached in handle._cached_blocks:
        list_name, i = cached._slot
        getattr(transformer, list_name)[i] = cached.original()
    transformer.__class__ = handle._original_class
    del transformer.__dict__[HANDLE_ATTR]
    if handle._scheduler_hook is not None:
        handle._scheduler_hook.unwrap()
    handle._cached_blocks = []
    handle._embeddings.release()
    handle._embeddings = CallState()
    handle._scheduler_hook = None
    handle.reset()


class _ResetOnSetTimesteps:
    """Replaces ``scheduler.set_timesteps`` (called once at the start of every diffusers pipeline
    call): sets the timesteps as before, then resets the cache handle and checks the step count."""

    def __init__(
        self, scheduler: Any, handle: CacheHandle, check: Callable[[CacheHandle], None] | None = None
    ) -> None:
        self.scheduler = scheduler
        self.handle = handle
        # A two-transformer pipeline's handles check their share of the steps instead of all of them.
        self.check = check
        # A set_timesteps already patched on the instance by someone else is chained and restored.
        self.previous = scheduler.__dict__.get("set_timesteps")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.handle
        # Before touching the scheduler, which the other thread's generation is using.
        if 0 < handle._step < handle._schedule.num_steps and handle._owner != threading.get_ident():
            raise CacheStateError(
                f"this cached pipeline is at step {handle._step} of {handle._schedule.num_steps} of a "
                "generation run by another thread; one cached pipeline runs one generation at a time. "
                "Give each thread its own pipeline (copy.deepcopy(pipe) before enable_cache), or call "
                "handle.reset() if that generation was abandoned"
            )
        if self.previous is not None:
            result = self.previous(*args, **kwargs)
        else:
            result = type(self.scheduler).set_timesteps(self.scheduler, *args, **kwargs)
        handle.reset()
        if self.check is None:
            handle._check_num_steps(len(self.scheduler.timesteps))
        else:
            self.check(handle)
        handle._by_scheduler = True
        return result

    @property
    def __signature__(self) -> inspect.Signature:
        # Pipelines inspect set_timesteps for the arguments it takes (FLUX's and Qwen-Image's pass
        # sigmas= and mu= only where it accepts them): answer for the wrapped method.
        if self.previous is not None:
            return inspect.signature(self.previous)
        return inspect.signature(type(self.scheduler).set_timesteps.__get__(self.scheduler))

    def unwrap(self) -> None:
        if self.previous is None:
            del self.scheduler.set_timesteps
        else:
            self.scheduler.set_timesteps = self.previous


def _warn_on_other_sampler(router: Router, pipe_or_transformer: Any) -> None:
    scheduler = getattr(pipe_or_transformer, "scheduler", None)
    mismatch = None if scheduler is None else router.sampler_mismatch(scheduler)
    if mismatch is not None:
        warnings.warn(mismatch, stacklevel=3)


# DiT's shared embedding asks this module whether it may skip its embedder's module calls.
_basic._ENGINE = sys.modules[__name__]

"""The inference engine: cached transformer blocks driven by a :class:`CacheSchedule`.

``enable_cache(pipe_or_transformer, schedule_or_router)`` swaps every ``BasicTransformerBlock`` of
a ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel`` for a :class:`CachedTransformerBlock`
that shares the original's submodules (no weight copies) and runs the fused residual ops of
:mod:`harmonica_kernels`. At step t, unit k is computed iff ``schedule.compute[t, k]``: a computed
unit's output overwrites its cache buffer in place; a reused unit's module is not called and its
cached output enters the residual with the current step's gate (METHOD.md §1), or, for an entry
the schedule forecasts, a Taylor extrapolation of its last computed outputs (one fused read).

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

import functools
import inspect
import itertools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.embeddings import (
    CombinedTimestepLabelEmbeddings,
    LabelEmbedding,
    TimestepEmbedding,
    Timesteps,
)
from diffusers.models.normalization import AdaLayerNormZero
from torch import nn
from torch.nn import functional as F

from harmonica_kernels import (
    available_backends,
    cached_gated_residual,
    forecast_gated_residual,
    forecast_residual_norm_modulate,
    gated_residual_norm_modulate,
    gated_residual_update_,
)

from .models import UnsupportedModelError, supported_class, transformer_of, units
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

Branch = Callable[[], torch.Tensor]
"""A unit's module call with its inputs bound; invoked only when the unit is computed."""


class CacheStateError(RuntimeError):
    """The cache cannot serve this call (too many steps, changed shapes, use outside a forward)."""


class ScheduleMismatchError(ValueError):
    """The schedule does not fit the sampling run (wrong number of steps or units)."""


def _as_row(v: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` or ``[B, 1, D]`` per-sample vector as ``[B, 1, D]`` (a view)."""
    return v.unsqueeze(1) if v.dim() == 2 else v


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
        self._patch_size = int(transformer.config.patch_size)
        self._width = int(transformer.inner_dim)
        self._unit_names = tuple(units(transformer))
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
        # What disable_cache undoes, kept as plain references (not closures) so that a deepcopy of
        # a cached model or pipeline gets a handle that undoes its own copy.
        self._original_class: type[nn.Module] = type(transformer)
        self._cached_blocks: list[CachedTransformerBlock] = []
        self._scheduler_hook: _ResetOnSetTimesteps | None = None
        self._embeddings = _SharedEmbeddings([])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_call_lock")  # locks neither copy nor pickle; a copy gets its own
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
        """Bytes currently held by cache buffers, forecast histories included (0 before step 0 and
        after a reset)."""
        held = [b for b in self._buffers if b is not None] + [b for older in self._older for b in older]
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
        self._embeddings.end_call()

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
    def _begin_step(self, hidden_states: Any) -> None:
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
        layout = self._layout_of(hidden_states)
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
        if self._step == 0:
            self._owner = thread
        self._last_timestep = timestep

    @torch.compiler.disable
    def _end_step(self) -> None:
        self._step += 1
        self._row = None

    def _layout_of(self, hidden_states: Any) -> tuple[Any, ...]:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            shape = (
                tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            )
            raise ValueError(f"the transformer's hidden_states must be latents [B, C, H, W], got {shape}")
        batch, _, height, width = hidden_states.shape
        tokens = (height // self._patch_size) * (width // self._patch_size)
        return (batch, tokens, self._width, hidden_states.dtype, hidden_states.device)

    def _allocate(self, layout: tuple[Any, ...]) -> None:
        batch, tokens, width, dtype, device = layout
        buffer_dtype = self._cache_dtype or dtype
        if buffer_dtype == torch.float16 and dtype != torch.float16:
            raise TypeError(
                f"cache_dtype float16 cannot hold {dtype} activations (its range ends at 65504, where "
                f"{dtype} goes to 3e38: large unit outputs would become inf); store the cache in "
                "torch.bfloat16 to halve its memory, or in the activations' dtype"
            )

        def new() -> torch.Tensor:
            return torch.empty(batch, tokens, width, dtype=buffer_dtype, device=device)

        self._buffers = [new() if size else None for size in self._history_sizes]
        self._older = [[new() for _ in range(size - 1)] for size in self._history_sizes]
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
    return f"({batch}, {tokens}, {width}, {dtype}, {device})"


class CachedTransformerBlock(nn.Module):
    """``BasicTransformerBlock.forward`` for ``ada_norm_zero`` (DiT) and ``ada_norm_single`` (PixArt)
    with each unit applied through a :class:`CacheHandle`.

    It registers the original block's submodules and parameters under the same names (so the
    transformer's ``state_dict`` and ``.to()`` are unchanged, and no weight is copied) and computes
    exactly diffusers' maths, with the residual of the last unit before the feed-forward fused with
    the feed-forward's LayerNorm + modulation (DiT: after ``attn1``, with ``norm3``; PixArt: after
    ``attn2``, ungated, with ``norm2``). Affine LayerNorms fall back to the unfused sequence; chunked
    feed-forward, attention masks and ``cross_attention_kwargs`` pass through as in diffusers.
    Anything else raises :class:`UnsupportedModelError` when caching is enabled.
    """

    def __init__(
        self, block: BasicTransformerBlock, handle: CacheHandle, unit_ids: tuple[int, int | None, int]
    ) -> None:
        super().__init__()
        _check_block(block)
        self.norm_type = block.norm_type
        self.norm1 = block.norm1
        self.attn1 = block.attn1
        self.attn2 = block.attn2
        self.norm2 = block.norm2
        self.norm3 = getattr(block, "norm3", None)
        self.ff = block.ff
        if self.norm_type == "ada_norm_single":
            self.scale_shift_table = block.scale_shift_table
        # Held outside the module tree: its submodules are registered here already.
        object.__setattr__(self, "_original", block)
        self._handle = handle
        self._attn1_unit, self._attn2_unit, self._ff_unit = unit_ids
        # Set by _SharedEmbeddings: which DiT blocks share this one's conditioning embedding.
        self._embedding_key: tuple[tuple[Any, ...], int] | None = None
        self._embedding_trainable = False
        # Set by _SharedEmbeddings: see _plain_embedding (the embedding without module calls).
        self._embedding_plain: tuple[Any, ...] | None = None
        ff_norm = self._ff_norm()
        plain_norm = ff_norm.weight is None and ff_norm.bias is None
        # The fused op normalises without affine weights; affine norms take the unfused path.
        self._ff_norm_eps = float(ff_norm.eps) if plain_norm else None

    def _ff_norm(self) -> nn.LayerNorm:
        """The LayerNorm in front of the feed-forward: DiT's norm3, PixArt's norm2."""
        return self.norm3 if self.norm_type == "ada_norm_zero" else self.norm2

    def original(self) -> BasicTransformerBlock:
        """The block this one replaced, with any directly owned parameter re-synced to this one's."""
        block = self._original
        if self.norm_type == "ada_norm_single" and block.scale_shift_table is not self.scale_shift_table:
            block.scale_shift_table = self.scale_shift_table
        return block

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        """As ``BasicTransformerBlock.set_chunk_feed_forward`` (kept on the original block)."""
        self._original.set_chunk_feed_forward(chunk_size, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        handle = self._handle
        x = hidden_states
        attn_kwargs = dict(cross_attention_kwargs or {})
        if "gligen" in attn_kwargs:
            raise UnsupportedModelError(
                "GLIGEN (cross_attention_kwargs['gligen']) is not supported with caching"
            )

        # The adaLN modulation always runs; the normalised inputs of attn1 and ff are computed only
        # when those units are (a reused unit's input is dead work: a LayerNorm and two passes).
        ff_runs = handle.computes(self._ff_unit)
        if self.norm_type == "ada_norm_zero":
            # AdaLayerNormZero.forward, with its LayerNorm moved into the branch
            emb = handle._embeddings.conditioning(self, timestep, class_labels, x.dtype)
            needed = (handle.computes(self._attn1_unit), ff_runs)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero_chunks(
                self.norm1.linear, emb, needed
            )
        else:
            modulation = self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        attn1 = functools.partial(self._self_attention, x, shift_msa, scale_msa, attention_mask, attn_kwargs)
        if self.attn2 is None:
            x, h = self._residual_before_ff(
                self._attn1_unit, x, gate_msa, attn1, shift_mlp, scale_mlp, ff_runs
            )
        else:
            x = handle.unit_residual(self._attn1_unit, x, gate_msa, attn1)
            attn2 = functools.partial(
                self.attn2,
                x,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **attn_kwargs,
            )
            x, h = self._residual_before_ff(self._attn2_unit, x, None, attn2, shift_mlp, scale_mlp, ff_runs)

        return handle.unit_residual(self._ff_unit, x, gate_mlp, functools.partial(self._feed_forward, h))

    def _self_attention(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """attn1 on ``LN(x) * (1 + scale) + shift``, exactly as diffusers writes it per norm type."""
        if self.norm_type == "ada_norm_zero":
            h = self.norm1.norm(x) * (1 + scale[:, None]) + shift[:, None]
        else:
            h = self.norm1(x) * (1 + scale) + shift
        return self.attn1(h, encoder_hidden_states=None, attention_mask=attention_mask, **attn_kwargs)

    def _residual_before_ff(
        self,
        unit: int,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        branch: Branch,
        shift: torch.Tensor,
        scale: torch.Tensor,
        ff_runs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual of ``unit``, then (if the ff unit runs) its input ``h = LN(x) * (1 + scale) + shift``."""
        if not ff_runs:
            return self._handle.unit_residual(unit, x, gate, branch), None
        if self._ff_norm_eps is not None:
            return self._handle.unit_residual_norm_modulate(
                unit, x, gate, branch, shift, scale, self._ff_norm_eps
            )
        x = self._handle.unit_residual(unit, x, gate, branch)
        return x, self._ff_norm()(x) * (1 + _as_row(scale)) + _as_row(shift)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        chunk_size = self._original._chunk_size
        if chunk_size is not None:
            return _chunked_feed_forward(self.ff, h, self._original._chunk_dim, chunk_size)
        return self.ff(h)


def _ada_zero_chunks(
    linear: nn.Linear, emb: torch.Tensor, runs: tuple[bool, bool]
) -> list[torch.Tensor | None]:
    """AdaLayerNormZero's ``linear(emb).chunk(6, dim=1)``, projecting only the chunks a step uses.

    ``runs``: whether attn1 and ff are computed. Their shift and scale feed only their own inputs, so
    a reused unit's two chunks are dead (returned as None) and the weight rows behind them are not
    read: the adaLN projection is most of what a reuse step costs when it is bound by memory (a
    third of DiT's weights). Gates are always projected; adjacent needed chunks share one matmul, and
    the two gates alone (every unit reused) one batched matmul over their two row blocks (one launch
    instead of two: such a step is launch-bound on a GPU).
    """
    if all(runs):
        return list(linear(emb).chunk(6, dim=1))
    if not any(runs):
        # nn.Module attribute reads cost ~1 us each on the host: read the parameters once
        weight, bias = linear.weight, linear.bias
        if bias is not None and weight.is_contiguous() and bias.is_contiguous():
            return _ada_zero_gates(weight, bias, emb)
    attn_runs, ff_runs = runs
    needed = (attn_runs, attn_runs, True, ff_runs, ff_runs, True)
    width = linear.out_features // 6
    chunks: list[torch.Tensor | None] = [None] * 6
    start = 0
    while start < 6:
        if not needed[start]:
            start += 1
            continue
        end = start
        while end < 6 and needed[end]:
            end += 1
        rows = slice(start * width, end * width)
        bias = None if linear.bias is None else linear.bias[rows]
        chunks[start:end] = F.linear(emb, linear.weight[rows], bias).chunk(end - start, dim=1)
        start = end
    return chunks


def _ada_zero_gates(weight: torch.Tensor, bias: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor | None]:
    """:func:`_ada_zero_chunks` for the two gates only (chunks 2 and 5), as one ``baddbmm``."""
    width, dim = weight.shape[0] // 6, weight.shape[1]
    # The 6 chunks as [2, 3, W, D]: index 2 of the middle dim is chunk 2 and chunk 5 (views, no copy).
    rows = weight.view(2, 3, width, dim)[:, 2]
    shifts = bias.view(2, 3, 1, width)[:, 2]
    gate_msa, gate_mlp = torch.baddbmm(shifts, emb.expand(2, *emb.shape), rows.transpose(1, 2)).unbind(0)
    return [None, None, gate_msa, None, None, gate_mlp]


class _SharedEmbeddings:
    """DiT's conditioning embedding ``silu(norm1.emb(timestep, class_labels))``, computed once per
    transformer call for all blocks whose embedders compute the same function.

    diffusers' DiT gives every block its own ``CombinedTimestepLabelEmbeddings``, and its conversion
    of the original checkpoints copies the one timestep and class embedder into each of them, so at
    DiT-XL/2 all 28 blocks compute the same vector, each with a dozen small kernels: on a step that
    reuses every unit those are most of its launches. Blocks with equal embedders (same structure, equal
    weights) form a group and the first of them computes the group's embedding for the call; the
    parameter-free sinusoidal projection of the timestep is shared by all blocks with the same
    settings even when their weights differ. Each value is exactly what every block would have
    computed itself (same ops on the same inputs and weights).

    DiT's output layer calls block 0's embedder itself (``transformer_blocks[0].norm1.emb(...)``);
    while caching is enabled that embedder's ``forward`` is an instance attribute that returns the
    call's shared value once block 0 has computed it (removed again by ``disable_cache``).

    The groups are found when caching is enabled (comparing weights on the device) and found again
    at the first step of a generation if any embedder parameter was replaced or modified in place
    since (checked on the host through identity, storage and version counter, with no device read).
    An embedder of another type, in training mode (label dropout is random per block) or with
    trainable weights while autograd records (each block's weights get their own gradient) is called
    as diffusers calls it.
    """

    def __init__(self, blocks: list[CachedTransformerBlock]) -> None:
        self._blocks = [b for b in blocks if b.norm_type == "ada_norm_zero"]
        # cleared, never replaced (dynamo guards it): projections, and (embedding, silu(embedding))
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._state: tuple[Any, ...] | None = None
        self._served: nn.Module | None = None  # the embedder whose forward reads the memo
        self.begin_call(first_step=True)

    def release(self) -> None:
        """Give block 0's embedder its own forward back and drop the memo."""
        if self._served is not None:
            self._served.__dict__.pop("forward", None)
            self._served = None
        self._memo.clear()

    # Both run in the transformer's __call__, outside the traced region (as CacheHandle._begin_step).
    @torch.compiler.disable
    def begin_call(self, *, first_step: bool) -> None:
        self._memo.clear()
        if first_step:
            state = self._parameter_state()
            if state != self._state:
                self._group()
                self._state = state

    @torch.compiler.disable
    def end_call(self) -> None:
        self._memo.clear()

    def conditioning(
        self,
        block: CachedTransformerBlock,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``block.norm1.silu(block.norm1.emb(timestep, class_labels, hidden_dtype=dtype))``."""
        norm1 = block.norm1
        embedder = norm1.emb
        if not _shares_embedding(block):
            return norm1.silu(embedder(timestep, class_labels, hidden_dtype=dtype))
        key = block._embedding_key
        memo = self._memo
        shared = memo.get((key, dtype))
        if shared is None:
            projection_key = key[0]
            projection = memo.get(projection_key)
            if projection is None:
                projection = memo[projection_key] = embedder.time_proj(timestep)
            plain = block._embedding_plain
            if plain is not None and _runs_plainly(plain[1]):
                # The modules' own maths without their ~8 module calls, a few microseconds of host
                # time each (with untied embedders, every block of a reuse step pays them).
                (w1, b1, w2, b2, table), _ = plain
                t_emb = F.linear(F.silu(F.linear(projection.to(dtype=dtype), w1, b1)), w2, b2)
                conditioning = t_emb + F.embedding(class_labels, table)
                shared = memo[(key, dtype)] = (conditioning, F.silu(conditioning))
            else:
                # CombinedTimestepLabelEmbeddings.forward (checked to be that class in _group)
                t_emb = embedder.timestep_embedder(projection.to(dtype=dtype))
                conditioning = t_emb + embedder.class_embedder(class_labels)
                shared = memo[(key, dtype)] = (conditioning, norm1.silu(conditioning))
        return shared[1]

    def _serve(
        self, timestep: torch.Tensor, class_labels: torch.Tensor, hidden_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Block 0's embedder's forward while caching is on: the call's shared embedding if computed.

        Within one transformer call DiT passes every block and its output layer the same timestep
        and labels, and the memo lives for one call only.
        """
        embedder = self._served
        block = self._blocks[0]
        shared = self._memo.get((block._embedding_key, hidden_dtype)) if _shares_embedding(block) else None
        if shared is None:
            return type(embedder).forward(embedder, timestep, class_labels, hidden_dtype=hidden_dtype)
        return shared[0]

    def _parameter_state(self) -> tuple[Any, ...]:
        return tuple(
            (id(b.norm1.emb),)
            + tuple(
                (id(t), t.data_ptr(), _version(t), t.dtype, t.device, t.requires_grad)
                for t in itertools.chain(b.norm1.emb.parameters(), b.norm1.emb.buffers())
            )
            for b in self._blocks
        )

    def _group(self) -> None:
        self.release()
        leaders: list[nn.Module] = []  # the first embedder of each group
        for block in self._blocks:
            embedder = block.norm1.emb
            block._embedding_key = None
            proj = getattr(embedder, "time_proj", None)
            if type(embedder) is not CombinedTimestepLabelEmbeddings or type(proj) is not Timesteps:
                continue
            projection_key = (proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale)
            group = next((i for i, leader in enumerate(leaders) if _same_function(leader, embedder)), None)
            if group is None:
                group = len(leaders)
                leaders.append(embedder)
            block._embedding_key = (projection_key, group)
            block._embedding_trainable = any(p.requires_grad for p in embedder.parameters())
            block._embedding_plain = _plain_embedding(embedder, block.norm1)
        if self._blocks and self._blocks[0]._embedding_key is not None:
            self._served = self._blocks[0].norm1.emb
            self._served.forward = self._serve


def _plain_embedding(embedder: nn.Module, norm1: nn.Module) -> tuple[Any, ...] | None:
    """``((linear_1.weight, linear_1.bias, linear_2.weight, linear_2.bias, embedding weight),
    modules)`` when ``silu(embedder(t, labels))`` is exactly ``silu(linear_2(silu(linear_1(t))) +
    embedding(labels))`` (diffusers' DiT), else None. ``modules`` are the submodules whose calls
    this skips: _runs_plainly checks on each use that none of them is hooked, patched or training.
    The tensors are the parameters themselves: replacing one regroups (see _parameter_state)."""
    timestep_embedder = getattr(embedder, "timestep_embedder", None)
    class_embedder = getattr(embedder, "class_embedder", None)
    table = getattr(class_embedder, "embedding_table", None)
    act = getattr(timestep_embedder, "act", None)
    linears = (getattr(timestep_embedder, "linear_1", None), getattr(timestep_embedder, "linear_2", None))
    silu = getattr(norm1, "silu", None)
    plain = (
        type(timestep_embedder) is TimestepEmbedding
        and type(act) is nn.SiLU
        and type(silu) is nn.SiLU
        and getattr(timestep_embedder, "cond_proj", None) is None
        and getattr(timestep_embedder, "post_act", None) is None
        and all(type(linear) is nn.Linear for linear in linears)
        and type(class_embedder) is LabelEmbedding
        and type(table) is nn.Embedding
        and table.max_norm is None
    )
    if not plain:
        return None
    (w1, b1), (w2, b2) = ((linear.weight, linear.bias) for linear in linears)
    return (w1, b1, w2, b2, table.weight), (timestep_embedder, act, *linears, class_embedder, table, silu)


def _runs_plainly(modules: tuple[nn.Module, ...]) -> bool:
    """Whether calling ``modules`` would only run their maths: no hook (module or global, e.g.
    accelerate's offloading or a user's), no patched ``forward``, none training (label dropout)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for module in modules:
        state = module.__dict__  # written out, not a generator: this runs for every block and step
        if (
            module.training
            or "forward" in state
            or state["_forward_hooks"]
            or state["_forward_pre_hooks"]
            or state["_backward_hooks"]
            or state["_backward_pre_hooks"]
        ):
            return False
    return True


def _shares_embedding(block: CachedTransformerBlock) -> bool:
    """Whether the block may take its group's shared embedding in this call (see _SharedEmbeddings)."""
    return (
        block._embedding_key is not None
        and not block.norm1.emb.training
        and not (block._embedding_trainable and torch.is_grad_enabled())
    )


def _version(t: torch.Tensor) -> int | None:
    """A tensor's in-place modification counter; None for inference tensors, which have none."""
    return None if t.is_inference() else t._version


def _same_function(a: nn.Module, b: nn.Module) -> bool:
    """Whether two embedders have the same structure and settings and equal weights."""
    if repr(a) != repr(b) or a.class_embedder.dropout_prob != b.class_embedder.dropout_prob:
        return False
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        x.dtype == state_b[k].dtype and x.device == state_b[k].device and torch.equal(x, state_b[k])
        for k, x in state_a.items()
    )


def _check_block(block: nn.Module) -> None:
    """Raise UnsupportedModelError for any block whose forward CachedTransformerBlock would not reproduce."""
    if type(block) is not BasicTransformerBlock:
        raise UnsupportedModelError(f"expected diffusers BasicTransformerBlock, got {type(block).__name__}")
    reasons = []
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        reasons.append(f"norm_type {block.norm_type!r} (supported: 'ada_norm_zero', 'ada_norm_single')")
    if block.pos_embed is not None:
        reasons.append("per-block positional embeddings")
    if block.only_cross_attention:
        reasons.append("only_cross_attention=True")
    if hasattr(block, "fuser"):
        reasons.append("GLIGEN gated attention")
    if block.norm_type == "ada_norm_zero":
        if block.attn2 is not None:
            reasons.append("cross-attention in an ada_norm_zero block")
        if type(block.norm1) is not AdaLayerNormZero or block.norm1.emb is None:
            reasons.append("an ada_norm_zero block without diffusers' AdaLayerNormZero and its embedding")
    ff_norm = getattr(block, "norm3", None) if block.norm_type == "ada_norm_zero" else block.norm2
    if not isinstance(ff_norm, nn.LayerNorm):
        reasons.append(f"feed-forward norm {type(ff_norm).__name__} (expected nn.LayerNorm)")
    if reasons:
        raise UnsupportedModelError("this transformer block cannot be cached: " + "; ".join(reasons))


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
            handle._begin_step(hidden_states)
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
            handle._embeddings.end_call()
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


def _first_value(t: Any) -> float:
    """A timestep's value on the host (a device read only off the fast paths of _starts_over)."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else float("nan")
    return float(t)


def enable_cache(
    pipe_or_transformer: Any,
    schedule_or_router: CacheSchedule | Router,
    *,
    threshold: float = 0.1,
    cache_dtype: torch.dtype | None = None,
) -> CacheHandle:
    """Make a diffusers DiT or PixArt transformer (or a pipeline holding one) skip units per a schedule.

    Args:
        pipe_or_transformer: a ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel``, or a pipeline
            with one as ``.transformer`` (then ``pipe.scheduler.set_timesteps`` also resets the step
            counter at the start of every pipeline call and checks its step count).
        schedule_or_router: a :class:`CacheSchedule` ``[T, U]`` with U = ``len(harmonica.units(model))``,
            or a :class:`Router` (checked against the model's fingerprint, then thresholded).
        threshold: a router's inference threshold τ: unit computed iff ``sigmoid(logit) > τ``.
        cache_dtype: dtype of the cache buffers and forecast histories (e.g. ``torch.bfloat16`` under
            an fp32 model to halve their memory); None stores them in the activations' dtype. float16
            only under float16 activations (its range cannot hold fp32/bf16 ones: refused at step 0).

    Returns:
        The :class:`CacheHandle`, also at ``transformer._harmonica_cache`` until :func:`disable_cache`.

    Raises:
        UnsupportedModelError: the model or one of its blocks cannot be cached exactly.
        RouterMismatchError: the router was made for a model of another shape.
        ScheduleMismatchError: the schedule's unit count differs from the model's.
        CacheStateError: caching is already enabled on this transformer.
    """
    transformer = transformer_of(pipe_or_transformer)
    model_class = supported_class(transformer)
    if cache_dtype is not None and cache_dtype not in _CACHE_DTYPES:
        raise TypeError(
            f"cache_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {cache_dtype}"
        )

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
        raise ScheduleMismatchError(
            f"the schedule has {schedule.num_units} units but {model_class.__name__} with "
            f"{len(transformer.transformer_blocks)} blocks has {len(unit_names)}; build it with "
            "num_units=len(harmonica.units(model))"
        )

    # Discover the op backends now (it imports the extensions), not inside a compiled first step.
    available_backends()
    handle = CacheHandle(transformer, schedule, cache_dtype=cache_dtype)
    attach_handle(pipe_or_transformer, handle)
    return handle


def attach_handle(pipe_or_transformer: Any, handle: CacheHandle) -> None:
    """Swap the transformer's blocks for cached blocks driven by ``handle`` (any CacheHandle subclass).

    The shared tail of :func:`enable_cache` and of router training, which attaches a handle that
    blends instead of choosing; :func:`disable_cache` undoes either.
    """
    transformer = transformer_of(pipe_or_transformer)
    if transformer.__dict__.get(HANDLE_ATTR) is not None:
        raise CacheStateError("caching is already enabled on this transformer; call disable_cache() first")
    unit_names = units(transformer)
    # Build every cached block first: an unsupported block raises before anything is modified.
    index = {name: k for k, name in enumerate(unit_names)}
    handle._cached_blocks = [
        CachedTransformerBlock(
            block,
            handle,
            (index[f"blocks.{i}.attn1"], index.get(f"blocks.{i}.attn2"), index[f"blocks.{i}.ff"]),
        )
        for i, block in enumerate(transformer.transformer_blocks)
    ]
    for i, cached in enumerate(handle._cached_blocks):
        transformer.transformer_blocks[i] = cached
    handle._embeddings = _SharedEmbeddings(handle._cached_blocks)
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
    transformer = transformer_of(pipe_or_transformer)
    handle = transformer.__dict__.get(HANDLE_ATTR)
    if handle is None:
        return
    for i, cached in enumerate(handle._cached_blocks):
        transformer.transformer_blocks[i] = cached.original()
    transformer.__class__ = handle._original_class
    del transformer.__dict__[HANDLE_ATTR]
    if handle._scheduler_hook is not None:
        handle._scheduler_hook.unwrap()
    handle._cached_blocks = []
    handle._embeddings.release()
    handle._embeddings = _SharedEmbeddings([])
    handle._scheduler_hook = None
    handle.reset()


class _ResetOnSetTimesteps:
    """Replaces ``scheduler.set_timesteps`` (called once at the start of every diffusers pipeline
    call): sets the timesteps as before, then resets the cache handle and checks the step count."""

    def __init__(self, scheduler: Any, handle: CacheHandle) -> None:
        self.scheduler = scheduler
        self.handle = handle
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
        handle._check_num_steps(len(self.scheduler.timesteps))
        handle._by_scheduler = True
        return result

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

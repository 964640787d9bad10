"""What every block adapter provides, and the pieces the cached blocks share.

A **block adapter** describes one family of diffusers transformers (DiT/PixArt, FLUX.1, SD3, Wan,
...): which block lists the model runs, what the routable units of each block are (one residual
branch each: where its module, its gate and its residual are) and how a block runs when each unit
is applied through the :class:`~harmonica.cache.CacheHandle`. The engine (the handle, step
bookkeeping, ``enable_cache`` / ``disable_cache``), schedules, routers, training and FLOP profiles
only ever see unit names and unit indices; everything block-specific lives in the adapters.

Adding a family is one file in this package: a :class:`BlockAdapter` subclass with
``family``, ``model_classes``, ``block_lists``, :meth:`~BlockAdapter.block_units`,
:meth:`~BlockAdapter.cached_block`, :meth:`~BlockAdapter.tokens`, and for FLOP profiles
:meth:`~BlockAdapter.example_inputs` / :meth:`~BlockAdapter.native_tokens` (plus
:meth:`~BlockAdapter.unit_flops` when a unit is not exactly one submodule), for router training on
a text-conditioned family :meth:`~BlockAdapter.noise_shape` / :meth:`~BlockAdapter.predict` (the
transformer call as its pipeline makes it), optionally :meth:`~BlockAdapter.check_block`,
:meth:`~BlockAdapter.unit_stream` (image / text / joint tokens) and
:meth:`~BlockAdapter.call_state`, and one
:class:`CachedBlock` subclass whose ``forward`` reproduces the diffusers block with each unit
applied through the handle's per-unit methods only:

- ``handle.computes(unit)``: whether the unit runs this step (a host-side bool);
- ``handle.unit_residual(unit, x, gate, branch)``: ``x + gate * branch()`` or the cached value;
- ``handle.unit_residual_norm_modulate(unit, x, gate, branch, shift, scale, eps)``: the same, fused
  with the next ``LayerNorm(x) * (1 + scale) + shift``;
- ``handle.unit_residuals(units, xs, gates, branch)``: several units fed by one module call whose
  output is one tensor per unit (a joint attention's image and text streams).

An adapter never touches the cache buffers: what a unit's cache holds (one tensor, or a history for
forecasting) is the handle's business. Register the adapter in ``harmonica/adapters/__init__.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = [
    "IMAGE",
    "JOINT",
    "TEXT",
    "Branch",
    "BlockAdapter",
    "CachedBlock",
    "CallState",
    "UnsupportedModelError",
    "as_row",
    "call_argument",
    "joint_attention_flops",
    "joint_attention_modules",
    "mlp_norm",
    "plain_layer_norm_eps",
    "project_chunks",
    "runs_plainly",
    "shape_of",
    "with_mlp_input",
]

Branch = Callable[[], torch.Tensor]
"""A unit's module call with its inputs bound; invoked only when the unit is computed."""

IMAGE, TEXT, JOINT = "image", "text", "joint"
"""Token streams a unit's output lives on: image tokens, text tokens, or both concatenated
(text first, as FLUX's single blocks and the joint attentions order them)."""


class UnsupportedModelError(TypeError):
    """The model (or one of its blocks) is not something harmonica can cache exactly."""


def as_row(v: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` or ``[B, 1, D]`` per-sample vector as ``[B, 1, D]`` (a view)."""
    return v.unsqueeze(1) if v.dim() == 2 else v


@functools.lru_cache(maxsize=64)
def _parameter_names(cls: type[nn.Module]) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return ()


def call_argument(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    """The argument ``name`` of a call ``model(*args, **kwargs)`` (positional or keyword), or None."""
    if name in kwargs:
        return kwargs[name]
    names = _parameter_names(type(model))
    if name in names:
        position = names.index(name)
        if position < len(args):
            return args[position]
    return None


def runs_plainly(modules: tuple[nn.Module, ...]) -> bool:
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


def _unhooked(module: nn.Module) -> bool:
    """No module or global forward hook and no patched forward (training mode does not matter)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    state = module.__dict__
    return "forward" not in state and not state["_forward_hooks"] and not state["_forward_pre_hooks"]


def project_chunks(
    linear: nn.Module, emb: torch.Tensor, count: int, needed: tuple[bool, ...]
) -> list[torch.Tensor | None]:
    """``linear(emb).chunk(count, dim=1)`` (an adaLN modulation), projecting only the chunks ``needed``.

    A reused unit's shift and scale feed only its own (skipped) input, so their weight rows need not be
    read: on a reuse step the modulation projections are most of what a block costs. Adjacent needed
    chunks share one matmul; unneeded chunks are None. With every chunk needed, or a ``linear`` that is
    not a plain, unhooked ``nn.Linear`` (a LoRA layer, an offloading hook), the module itself runs.
    """
    if all(needed) or type(linear) is not nn.Linear or not _unhooked(linear):
        return list(linear(emb).chunk(count, dim=1))
    width = linear.out_features // count
    weight, bias = linear.weight, linear.bias
    chunks: list[torch.Tensor | None] = [None] * count
    start = 0
    while start < count:
        if not needed[start]:
            start += 1
            continue
        end = start
        while end < count and needed[end]:
            end += 1
        rows = slice(start * width, end * width)
        part = torch.nn.functional.linear(emb, weight[rows], None if bias is None else bias[rows])
        chunks[start:end] = part.chunk(end - start, dim=1)
        start = end
    return chunks


def plain_layer_norm_eps(norm: nn.Module) -> float | None:
    """The eps of a LayerNorm without affine weights, which the fused residual + norm op computes
    exactly (in fp32, as diffusers' ``FP32LayerNorm`` does too); None for anything else."""
    from diffusers.models.normalization import FP32LayerNorm

    if type(norm) in (nn.LayerNorm, FP32LayerNorm) and norm.weight is None and norm.bias is None:
        return float(norm.eps)
    return None


def mlp_norm(
    runs: bool, eps: float | None, shift: torch.Tensor | None, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The ``norms`` entry of :meth:`CacheHandle.unit_residuals` for a residual followed by an MLP:
    fuse its LayerNorm + modulation only when the MLP runs and its LayerNorm is plain (``eps``)."""
    return (shift, scale, eps) if runs and eps is not None else None


def with_mlp_input(
    result: Any, runs: bool, norm: nn.Module, shift: torch.Tensor | None, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, h)`` from a residual's result: the residual stream, and the MLP's input
    ``norm(x) * (1 + scale) + shift`` (fused already, computed here for an affine norm, or None
    when the MLP is reused)."""
    if isinstance(result, tuple):
        return result
    if not runs:
        return result, None
    return result, norm(result) * (1 + as_row(scale)) + as_row(shift)


def joint_stream_residuals(
    handle: CacheHandle,
    units: tuple[int, int, int, int],
    x: torch.Tensor,
    c: torch.Tensor,
    attention_gates: tuple[torch.Tensor | None, torch.Tensor | None],
    attention: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    streams: tuple[tuple[Any, ...], tuple[Any, ...]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The double-stream block tail shared by FLUX.1, FLUX.2 and Qwen-Image: the joint attention's
    two gated residuals (``units[0:2]``, one call feeding both), then each stream's MLP residual
    (``units[2:4]``). ``streams`` holds, for the image then the text stream, ``(mlp_gate, shift,
    scale, eps, norm, mlp)``: the MLP's gate and input modulation, its LayerNorm's eps (None: affine,
    not fused) and module, and the MLP. Returns the image and text residual streams ``(x, c)``."""
    attn, attn_context, mlp, mlp_context = units
    runs = (handle.computes(mlp), handle.computes(mlp_context))
    norms = tuple(
        mlp_norm(run, eps, shift, scale)
        for run, (_, shift, scale, eps, _, _) in zip(runs, streams, strict=True)
    )
    results = handle.unit_residuals((attn, attn_context), (x, c), attention_gates, attention, norms)
    out = []
    for unit, result, run, (gate, shift, scale, _, norm, module) in zip(
        (mlp, mlp_context), results, runs, streams, strict=True
    ):
        stream, h = with_mlp_input(result, run, norm, shift, scale)
        out.append(handle.unit_residual(unit, stream, gate, functools.partial(module, h)))
    return out[0], out[1]


def shape_of(value: Any) -> Any:
    """A tensor's shape as a tuple, or the type name of anything else (for error messages)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def joint_attention_flops(per_module: dict[str, int], attention: str) -> tuple[int, int]:
    """FLOPs of a joint attention's image and text units (diffusers' ``added_kv_proj_dim`` layout).

    Each stream owns its own projections (``to_q/k/v``, ``to_out`` and ``add_q/k/v_proj``,
    ``to_add_out``); the shared core (scores and weighted sum over all tokens) is split by queries,
    i.e. in the ratio of the two query projections (both ``D -> D``, so image N : text L).
    ``attention`` is the attention module's path in ``per_module``.
    """

    def flops(name: str) -> int:
        return int(per_module.get(f"{attention}.{name}", 0))

    image = sum(flops(m) for m in ("to_q", "to_k", "to_v", "to_out"))
    text = sum(flops(m) for m in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
    core = int(per_module.get(attention, 0)) - image - text
    q_image, q_text = flops("to_q"), flops("add_q_proj")
    image_core = round(core * q_image / (q_image + q_text)) if q_image + q_text else core // 2
    return image + image_core, text + core - image_core


def joint_attention_modules(attention: nn.Module, stream: str) -> tuple[nn.Module, ...]:
    """The layers of a joint attention (diffusers' ``added_kv_proj_dim`` layout) that serve one stream:
    :data:`TEXT` the ``add_*`` projections, ``to_add_out`` and ``norm_added_*``; :data:`IMAGE` the
    others. Both streams' layers run whenever the attention runs (they attend jointly)."""
    text = stream == TEXT
    return tuple(
        module
        for name, module in attention.named_children()
        if name.startswith(("add_", "to_add_", "norm_added_")) == text
    )


class CallState:
    """Per-transformer-call state an adapter may keep (e.g. DiT's shared conditioning embedding).

    The handle calls :meth:`begin_call` before each transformer forward (outside any compiled
    graph), :meth:`end_call` after it (``last_step``: the generation's last call) and on reset (as a
    last step), and :meth:`release` on ``disable_cache``.
    """

    def begin_call(self, *, first_step: bool) -> None:
        pass

    def end_call(self, *, last_step: bool = False) -> None:
        pass

    def release(self) -> None:
        pass


class CachedBlock(nn.Module):
    """Base of every cached block: a block that shares the original's submodules (no weight copies)
    and applies its units through ``handle``.

    ``unit_ids`` maps each of the block's branch names (:meth:`BlockAdapter.block_units`) to its
    schedule column. ``slot`` is ``(block list attribute, index)``, where ``disable_cache`` puts
    :meth:`original` back.
    """

    def __init__(
        self, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int], slot: tuple[str, int]
    ) -> None:
        super().__init__()
        # Held outside the module tree: its submodules are registered on this block under their names.
        object.__setattr__(self, "_original", block)
        self._handle = handle
        self._unit_ids = dict(unit_ids)
        self._slot = slot

    def _share(self, block: nn.Module, *names: str) -> None:
        """Register the original's submodules / parameters ``names`` on this block (same objects)."""
        for name in names:
            setattr(self, name, getattr(block, name))

    def original(self) -> nn.Module:
        """The block this one replaced, with directly owned parameters re-synced to this one's."""
        block = self._original
        for name, param in self._parameters.items():
            if getattr(block, name, None) is not param:
                setattr(block, name, param)
        return block


class BlockAdapter:
    """One family of diffusers transformers (see the module docstring for what to implement).

    Unit names are ``f"{prefix}.{i}.{branch}"`` for block i of each block list, in run order.
    """

    family: str = ""
    """Human name of the family, e.g. ``"FLUX.1"``."""
    model_classes: tuple[type[nn.Module], ...] = ()
    """The diffusers transformer classes this adapter caches."""
    block_lists: tuple[tuple[str, str], ...] = (("transformer_blocks", "blocks"),)
    """``(model attribute, unit-name prefix)`` of each block list the model runs, in order."""
    timestep_scale: float = 1.0
    """Scheduler timestep (0–1000) per unit of the transformer's ``timestep`` input: 1000 for
    families whose pipelines pass ``t / 1000`` (FLUX, Qwen-Image)."""

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes)

    def model_class(self, model: nn.Module) -> type[nn.Module]:
        return next(cls for cls in self.model_classes if isinstance(model, cls))

    def block_units(self, list_name: str, block: nn.Module) -> tuple[str, ...]:
        """The branch names of ``block`` (original or cached), in the order the block runs them."""
        raise NotImplementedError

    def unit_stream(self, list_name: str, branch: str) -> str:
        """The tokens a unit's output covers: :data:`IMAGE`, :data:`TEXT` or :data:`JOINT`."""
        return IMAGE

    def check_block(self, list_name: str, block: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if the cached block would not reproduce ``block``."""

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        raise NotImplementedError

    def call_state(self, cached_blocks: list[CachedBlock]) -> CallState:
        return CallState()

    def width(self, model: nn.Module) -> int:
        """Width D of every unit's output (the transformer's inner dimension)."""
        return int(model.inner_dim)

    def tokens(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, int, int | None]:
        """``(batch, image tokens, text tokens)`` of a transformer call, from its inputs' shapes only
        (no device read); text tokens are None for a family whose units never hold the text stream."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[tuple[str, str, int, nn.Module]]:
        """``(list attribute, prefix, index, block)`` for every block, in run order."""
        found = []
        for list_name, prefix in self.block_lists:
            for i, block in enumerate(getattr(model, list_name, None) or ()):
                found.append((list_name, prefix, i, block))
        return found

    def units(self, model: nn.Module) -> list[str]:
        return [
            f"{prefix}.{i}.{branch}"
            for list_name, prefix, i, block in self.blocks(model)
            for branch in self.block_units(list_name, block)
        ]

    def unit_streams(self, model: nn.Module) -> tuple[str, ...]:
        return tuple(
            self.unit_stream(list_name, branch)
            for list_name, _, _, block in self.blocks(model)
            for branch in self.block_units(list_name, block)
        )

    def unit_modules(self, list_name: str, block: nn.Module, branch: str) -> tuple[nn.Module, ...]:
        """The modules that run when unit ``branch`` of ``block`` (original or cached) is computed, for
        counting what ran (:class:`harmonica.peers.UnitCounter` hooks their parametrised layers).
        Default: the submodule named ``branch``."""
        module = getattr(block, branch, None)
        return () if module is None else (module,)

    # -- FLOP profiles (harmonica.models.flop_profile), run on a meta-device copy --

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        """Batch-1 keyword inputs at the native resolution, created under the caller's device."""
        raise NotImplementedError

    def native_tokens(self, model: nn.Module) -> int:
        """Image tokens of :meth:`example_inputs`."""
        raise NotImplementedError

    def unit_flops(
        self, per_module: dict[str, int], path: str, list_name: str, block: nn.Module, branch: str
    ) -> int:
        """FLOPs of one unit from ``per_module`` (FlopCounterMode's counts by module path, parents
        including children); ``path`` is the block's path. Default: the submodule named ``branch``."""
        return int(per_module.get(f"{path}.{branch}", 0))

    # -- sampling conventions (router training and sampling on text-conditioned flow-matching models) --

    def noise_shape(self, model: nn.Module, side: int) -> tuple[int, ...]:
        """Per-sample shape of the initial latents with ``side x side`` image tokens."""
        raise NotImplementedError(f"{self.family}: no text-conditioned sampling convention")

    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> Any:
        """One transformer call as the family's diffusers pipeline makes it: the model's prediction
        (a flow-matching velocity) for ``latents`` at the scheduler's ``timestep`` (one per sample, in
        the scheduler's 0-1000 scale) with prompt embeddings ``[B, L, C]`` (and pooled ``[B, P]``
        where the family takes them; ``guidance``: a guidance-distilled model's guidance scale)."""
        raise NotImplementedError(f"{self.family}: no text-conditioned sampling convention")

    def fingerprint_extra(self, model: nn.Module) -> dict[str, Any]:
        """Family-specific fingerprint keys (recorded, not compared)."""
        return {}

"""DiT and PixArt: diffusers' ``BasicTransformerBlock`` (``ada_norm_zero`` / ``ada_norm_single``).

Units of block i (METHOD.md §1): ``blocks.{i}.attn1`` (gated self-attention), ``blocks.{i}.attn2``
(PixArt's ungated cross-attention, only if the block has one), ``blocks.{i}.ff`` (gated MLP).
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
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

from .base import (
    BlockAdapter,
    Branch,
    CachedBlock,
    CallState,
    UnsupportedModelError,
    _unhooked,
    project_chunks,
)
from .base import as_row as _as_row

if TYPE_CHECKING:
    from ..cache import CacheHandle

__all__ = ["BasicBlockAdapter", "CachedTransformerBlock"]

_ENGINE: Any = None
"""The ``harmonica.cache`` module, set when it is imported (it imports this one)."""

# Text tokens assumed for PixArt's cross-attention FLOPs (PixArt-α's T5 length, max_sequence_length).
DEFAULT_TEXT_TOKENS = 120


class CachedTransformerBlock(CachedBlock):
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
        self,
        block: BasicTransformerBlock,
        handle: CacheHandle,
        unit_ids: dict[str, int],
        slot: tuple[str, int] = ("transformer_blocks", 0),
    ) -> None:
        _check_block(block)
        super().__init__(block, handle, unit_ids, slot)
        self.norm_type = block.norm_type
        self.norm1 = block.norm1
        self.attn1 = block.attn1
        self.attn2 = block.attn2
        self.norm2 = block.norm2
        self.norm3 = getattr(block, "norm3", None)
        self.ff = block.ff
        if self.norm_type == "ada_norm_single":
            self.scale_shift_table = block.scale_shift_table
        self._attn1_unit, self._attn2_unit, self._ff_unit = (
            unit_ids["attn1"],
            unit_ids.get("attn2"),
            unit_ids["ff"],
        )
        # Set by _SharedEmbeddings: which DiT blocks share this one's conditioning embedding.
        self._embedding_key: tuple[tuple[Any, ...], int] | None = None
        self._embedding_trainable = False
        # Set by _SharedEmbeddings: see _plain_embedding (the embedding without module calls).
        self._embedding_plain: tuple[Any, ...] | None = None
        # Set by _gates: (weight, bias, their data pointers, _gate_rows views of them).
        self._gate_views: tuple[Any, ...] | None = None
        ff_norm = self._ff_norm()
        plain_norm = ff_norm.weight is None and ff_norm.bias is None
        # The fused op normalises without affine weights; affine norms take the unfused path.
        self._ff_norm_eps = float(ff_norm.eps) if plain_norm else None

    def _ff_norm(self) -> nn.LayerNorm:
        """The LayerNorm in front of the feed-forward: DiT's norm3, PixArt's norm2."""
        return self.norm3 if self.norm_type == "ada_norm_zero" else self.norm2

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
            if any(needed):
                chunks = _ada_zero_chunks(self.norm1.linear, emb, needed)
            else:
                chunks = self._gates(emb)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
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

    def _gates(self, emb: torch.Tensor) -> list[torch.Tensor | None]:
        """:func:`_ada_zero_chunks` with no unit computed (only the two gates), from views of the
        projection's gate rows made once per generation and kept while its weight and bias stay the
        same tensors with the same storage (a reuse step of a small model is bound by host time, and
        building the views is a third of this projection's); dropped after the generation's last
        step (:meth:`_SharedEmbeddings.end_call`), so they never keep moved weights alive."""
        linear = self.norm1.linear
        if torch.compiler.is_compiling() or type(linear) is not nn.Linear or not _unhooked(linear):
            return _ada_zero_chunks(linear, emb, (False, False))  # traced: no host-side memo
        weight, bias = linear.weight, linear.bias
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return _ada_zero_gates(*_gate_rows(weight, bias), emb)  # the kept views are detached
        views = self._gate_views
        if (
            views is None
            or views[0] is not weight
            or views[1] is not bias
            or views[2] != weight.data_ptr()
            or views[3] != (None if bias is None else bias.data_ptr())
        ):
            pointers = (weight.data_ptr(), None if bias is None else bias.data_ptr())
            detached = (weight.detach(), None if bias is None else bias.detach())  # no autograd view link
            views = self._gate_views = (weight, bias, *pointers, *_gate_rows(*detached))
        return _ada_zero_gates(views[4], views[5], emb)

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
    attn_runs, ff_runs = runs
    if any(runs) or type(linear) is not nn.Linear or not _unhooked(linear):
        return project_chunks(linear, emb, 6, (attn_runs, attn_runs, True, ff_runs, ff_runs, True))
    return _ada_zero_gates(*_gate_rows(linear.weight, linear.bias), emb)


def _gate_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views of an adaLN-Zero projection's two gate chunks (2 and 5): their weight rows transposed,
    ``[2, D, W]``, and their biases ``[2, 1, W]`` (None without bias), for one batched matmul."""
    width = weight.shape[0] // 6
    # The 6 chunks as [2, 3, W, ...]: index 2 of the middle dim is chunk 2 and chunk 5 (views, no copy).
    rows = weight.unflatten(0, (2, 3, width))[:, 2]
    shifts = None if bias is None else bias.unflatten(0, (2, 3, 1, width))[:, 2]
    return rows.transpose(1, 2), shifts


def _ada_zero_gates(
    rows_t: torch.Tensor, shifts: torch.Tensor | None, emb: torch.Tensor
) -> list[torch.Tensor | None]:
    """:func:`_ada_zero_chunks` for the two gates only, from :func:`_gate_rows`, in one launch."""
    if shifts is None:
        gate_msa, gate_mlp = torch.matmul(emb, rows_t).unbind(0)
    else:
        gate_msa, gate_mlp = torch.baddbmm(shifts, emb.expand(2, *emb.shape), rows_t).unbind(0)
    return [None, None, gate_msa, None, None, gate_mlp]


class _SharedEmbeddings(CallState):
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
        # Set by _group: (key, _plain_embedding) of each group's first embedder.
        self._leaders: list[tuple[tuple[Any, ...], tuple[Any, ...] | None]] = []
        # _StackedEmbedders for the generation in progress; False: the groups cannot be stacked.
        self._stack: _StackedEmbedders | bool | None = None
        self.begin_call(first_step=True)

    def release(self) -> None:
        """Give block 0's embedder its own forward back and drop the memo."""
        if self._served is not None:
            self._served.__dict__.pop("forward", None)
            self._served = None
        self._memo.clear()
        self._stack = None

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
    def end_call(self, *, last_step: bool = False) -> None:
        self._memo.clear()
        if last_step:  # the kept gate views and stack would hold weights a later .to() moves away
            self._stack = None
            for block in self._blocks:
                block.__dict__["_gate_views"] = None  # not nn.Module.__setattr__: 28 of them per step

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
            if (
                self._stack is not False
                and block._handle.computes_none()
                and self._stacked(projection, class_labels, dtype)
            ):
                shared = memo[(key, dtype)]
            # looked up on harmonica.cache at each call: the engine's hook point (tests spy on it)
            elif plain is not None and _ENGINE._runs_plainly(plain[1]):
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

    def _stacked(self, projection: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> bool:
        """Every group's embedding of this call at once, into the memo, from the groups' weights
        stacked (:class:`_StackedEmbedders`); False (nothing computed) where they cannot be.

        Used on steps that compute no unit: there the embeddings and gates are all a step does,
        and with untied embedders (a DiT trained from scratch in diffusers) the per-group MLPs are
        most of its host time. Batched matmuls may round differently from ``F.linear``, so steps
        that compute a unit keep the per-block maths (the full schedule stays bit-exact).
        """
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(block._embedding_trainable for block in self._blocks)
        ):
            return False
        stack = self._stack
        if stack is None:
            stack = self._stack = _StackedEmbedders.build(self._leaders) or False
        if stack is False or not _ENGINE._runs_plainly(stack.modules):
            return False
        values = stack(projection.to(dtype=dtype), class_labels)
        for (key, _), value in zip(self._leaders, values, strict=True):
            self._memo[(key, dtype)] = value
        return True

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
        self._leaders = []
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
            if group == len(self._leaders):
                self._leaders.append((block._embedding_key, block._embedding_plain))
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


class _StackedEmbedders:
    """The weights of DiT's per-group embedding MLPs stacked along a new leading dim, so that one
    call computes every group's ``(embedding, silu(embedding))`` in 7 launches instead of 6 per
    group. A copy of the embedders' weights (at DiT-XL/2 with 28 untied embedders, 0.3 GB in fp32),
    held from a generation's first step that reuses every unit to its end (see end_call)."""

    def __init__(self, tensors: list[tuple[torch.Tensor, ...]], modules: tuple[nn.Module, ...]) -> None:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: usable under autograd
            w1, b1, w2, b2, table = (torch.stack(column) for column in zip(*tensors, strict=True))
        self.w1, self.w2 = w1.transpose(1, 2), w2.transpose(1, 2)  # [G, in, out], as F.linear's
        self.b1, self.b2, self.table = b1.unsqueeze(1), b2.unsqueeze(1), table
        self.modules = modules

    @classmethod
    def build(cls, leaders: list[tuple[tuple[Any, ...], tuple[Any, ...] | None]]) -> _StackedEmbedders | None:
        """None unless there are several groups, all plain (:func:`_plain_embedding`) with biases,
        one timestep projection, and equal shapes, dtypes and devices."""
        plains = [plain for _, plain in leaders]
        if len(plains) < 2 or any(plain is None for plain in plains):
            return None
        if len({key[0] for key, _ in leaders}) != 1:
            return None
        tensors = [plain[0] for plain in plains]
        first = tensors[0]
        if any(
            t is None or (t.shape, t.dtype, t.device) != (f.shape, f.dtype, f.device)
            for row in tensors
            for t, f in zip(row, first, strict=True)
        ):
            return None
        return cls(tensors, tuple(m for plain in plains for m in plain[1]))

    def __call__(
        self, projection: torch.Tensor, class_labels: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        hidden = F.silu(torch.baddbmm(self.b1, projection.expand(len(self.w1), *projection.shape), self.w1))
        labels = self.table.index_select(1, class_labels.reshape(-1))  # no host sync on CUDA
        labels = labels.reshape(len(self.table), *class_labels.shape, -1)
        conditioning = torch.baddbmm(self.b2, hidden, self.w2) + labels
        return list(zip(conditioning.unbind(0), F.silu(conditioning).unbind(0), strict=True))


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


class BasicBlockAdapter(BlockAdapter):
    """``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` (``BasicTransformerBlock``)."""

    family = "DiT / PixArt (BasicTransformerBlock)"
    model_classes = (DiTTransformer2DModel, PixArtTransformer2DModel)
    block_lists = (("transformer_blocks", "blocks"),)

    def block_units(self, list_name: str, block: nn.Module) -> tuple[str, ...]:
        if getattr(block, "attn2", None) is not None:
            return ("attn1", "attn2", "ff")
        return ("attn1", "ff")

    def check_block(self, list_name: str, block: nn.Module) -> None:
        _check_block(block)

    def cached_block(
        self, list_name: str, index: int, block: nn.Module, handle: CacheHandle, unit_ids: dict[str, int]
    ) -> CachedBlock:
        return CachedTransformerBlock(block, handle, unit_ids, (list_name, index))

    def call_state(self, cached_blocks: list[CachedBlock]) -> CallState:
        return _SharedEmbeddings(cached_blocks)

    def tokens(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, int, int | None]:
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            shape = (
                tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            )
            raise ValueError(f"the transformer's hidden_states must be latents [B, C, H, W], got {shape}")
        batch, _, height, width = hidden_states.shape
        patch = int(model.config.patch_size)
        return batch, (height // patch) * (width // patch), None

    def native_tokens(self, model: nn.Module) -> int:
        side = model.config.sample_size // model.config.patch_size
        return side * side

    def example_inputs(self, model: nn.Module, text_tokens: int) -> dict[str, Any]:
        config = model.config
        size = config.sample_size
        inputs: dict[str, Any] = {
            "hidden_states": torch.empty(1, config.in_channels, size, size),
            "timestep": torch.zeros(1, dtype=torch.long),
        }
        if isinstance(model, DiTTransformer2DModel):
            inputs["class_labels"] = torch.zeros(1, dtype=torch.long)
        else:
            text_width = config.caption_channels or config.cross_attention_dim
            if text_width is not None:
                inputs["encoder_hidden_states"] = torch.empty(1, text_tokens, text_width)
            inputs["added_cond_kwargs"] = {"resolution": torch.empty(1, 2), "aspect_ratio": torch.empty(1, 1)}
        return inputs

"""Triton kernels and their launchers for the harmonica ops.

Every kernel walks ``[B, N, D]`` tensors in tiles of ``[BLOCK_N, BLOCK_D]`` that never cross a
sample boundary: program ``(pid_bn, pid_d)`` covers sample ``b = pid_bn // n_tiles``, tokens
``(pid_bn % n_tiles) * BLOCK_N + [0, BLOCK_N)`` and features ``pid_d * BLOCK_D + [0, BLOCK_D)``.
Keeping a tile inside one sample makes the per-sample vectors (gate, shift, scale) a single
``[BLOCK_D]`` row load, lets ``grad_gate`` be reduced per tile without floating-point atomics, and
keeps every row segment contiguous for coalesced, vectorised loads.

Per-sample vectors are read as ``ptr + b * stride_b + d`` with the batch stride passed in (``0``
broadcasts a batch-1 vector), so the strided views that ``chunk()`` returns are used in place.
Loads are upcast to fp32, arithmetic is fp32, stores round once to the destination's dtype.

The launchers take tensors that the op layer (``ops.py``) has already validated: activations and
outputs contiguous ``[B, N, D]``, per-sample vectors with unit stride along D.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

# Elements per program: 4096 at 8 warps is 16 per thread, i.e. a few 16-byte vector loads in flight
# per tensor per thread. Compiled for sm_90 this needs 39-64 registers in the elementwise kernels
# (no spills); 4 warps at this tile needed up to 128 registers (backward), halving occupancy.
_TILE_ELEMENTS = 4096
# Widest feature tile of the elementwise kernels; a row segment of 128 elements is 256-512
# contiguous bytes, and D = 1152 (DiT-XL, PixArt) splits into 9 full tiles.
_MAX_BLOCK_D = 128


@triton.jit
def _probe():
    pass


# Decided by triton when a kernel is decorated: with TRITON_INTERPRET=1 (set before triton's first
# import) kernels run on the host over CPU tensors; otherwise they need GPU tensors.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)

if INTERPRETED:

    @triton.jit
    def _cast_for_store(v, dst: tl.constexpr):
        """The interpreter (triton 3.9) truncates fp32 -> bf16 where the GPU rounds to nearest even;
        round explicitly so interpreted results match the GPU and torch bit for bit."""
        if dst == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(dst)

else:

    @triton.jit
    def _cast_for_store(v, dst: tl.constexpr):
        return v.to(dst)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula, exact at both ends: weight 1 gives `end` itself, so r = 1 reproduces
    the compute path bit for bit (start + weight * (end - start) need not)."""
    diff = end - start
    return tl.where(tl.abs(weight) < 0.5, tl.fma(weight, diff, start), tl.fma(-diff, 1.0 - weight, end))


@triton.jit
def _load_row(ptr, b, stride_b, d, d_mask):
    """Sample b's segment d of a per-sample vector (gate, shift, scale), in fp32. evict_last: every
    tile of the sample reads it again, while the streamed tensors are read once."""
    row = tl.load(ptr + b * stride_b + d, mask=d_mask, other=0.0, eviction_policy="evict_last")
    return row.to(tl.float32)


@triton.jit
def _load_coeffs(coeffs_ptr, ORDER: tl.constexpr):
    """The forecast coefficients (a, b), read from device memory once per program (no host sync: a
    CUDA graph replays with whatever the buffer holds); b is 0 below ORDER 2 and not read."""
    a = 0.0
    b = 0.0
    if ORDER >= 1:
        a = tl.load(coeffs_ptr, eviction_policy="evict_last")
    if ORDER == 2:
        b = tl.load(coeffs_ptr + 1, eviction_policy="evict_last")
    return a, b


@triton.jit
def _forecast(c0_ptr, c1_ptr, c2_ptr, a, b, offsets, mask, ORDER: tl.constexpr):
    """The Taylor forecast c0 + a (c0 - c1) [+ b ((c0 - c1) - (c1 - c2)) at ORDER 2] in fp32, from the
    history c0, c1, c2."""
    c0 = tl.load(c0_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c1_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    first = c0 - c1
    value = c0 + a * first
    if ORDER == 2:
        c2 = tl.load(c2_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        value = value + b * (first - (c1 - c2))
    return value


@triton.jit
def _tile_offsets(N, D, n_tiles, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sample index, flat [BLOCK_N, BLOCK_D] offsets into a [B, N, D] tensor, the feature offsets
    and the in-bounds mask of this program's tile."""
    pid_bn = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid_bn // n_tiles
    n = (pid_bn % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    mask = (n < N)[:, None] & d_mask[None, :]
    # int64 before scaling by D: B * N * D may exceed 2**31 for large batches of long sequences.
    rows = (b * N + n).to(tl.int64)
    offsets = rows[:, None] * D + d[None, :]
    return b, offsets, d, d_mask, mask


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    gate_ptr,
    value_ptr,
    out_ptr,
    cache_ptr,
    c1_ptr,
    c2_ptr,
    coeffs_ptr,
    N,
    D,
    gate_stride_b,
    n_tiles,
    HAS_GATE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ORDER: tl.constexpr,
):
    """out = x + gate * value; with WRITE_CACHE also cache = value (same pass). ORDER 1 or 2: value
    is the forecast from the history value (c0), c1[, c2] with the coefficients at coeffs_ptr."""
    coef_a, coef_b = _load_coeffs(coeffs_ptr, ORDER)
    b, offsets, d, d_mask, mask = _tile_offsets(N, D, n_tiles, BLOCK_N, BLOCK_D)
    if ORDER == 0:
        value = tl.load(value_ptr + offsets, mask=mask, other=0.0)
    else:
        value = _forecast(value_ptr, c1_ptr, c2_ptr, coef_a, coef_b, offsets, mask, ORDER)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = _load_row(gate_ptr, b, gate_stride_b, d, d_mask)
        out = tl.fma(gate[None, :], value.to(tl.float32), x)
    else:
        out = x + value.to(tl.float32)
    tl.store(out_ptr + offsets, _cast_for_store(out, out_ptr.dtype.element_ty), mask=mask)
    if WRITE_CACHE:
        tl.store(cache_ptr + offsets, _cast_for_store(value, cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _routed_gated_residual_kernel(
    x_ptr,
    gate_ptr,
    branch_ptr,
    cache_ptr,
    r_ptr,
    out_ptr,
    N,
    D,
    gate_stride_b,
    n_tiles,
    HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = x + gate * (r * branch + (1 - r) * cache); r read from device memory (no host sync)."""
    b, offsets, d, d_mask, mask = _tile_offsets(N, D, n_tiles, BLOCK_N, BLOCK_D)
    r = tl.load(r_ptr).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    branch = tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    cache = tl.load(cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mixed = _lerp(cache, branch, r)
    if HAS_GATE:
        gate = _load_row(gate_ptr, b, gate_stride_b, d, d_mask)
        out = tl.fma(gate[None, :], mixed, x)
    else:
        out = x + mixed
    tl.store(out_ptr + offsets, _cast_for_store(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _routed_gated_residual_backward_kernel(
    grad_out_ptr,
    gate_ptr,
    branch_ptr,
    cache_ptr,
    r_ptr,
    grad_branch_ptr,
    grad_gate_ptr,
    grad_r_ptr,
    partial_gate_ptr,
    partial_r_ptr,
    arrivals_ptr,
    N,
    D,
    gate_stride_b,
    n_tiles,
    gate_rows,
    HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The whole backward in one launch. Each program stores grad_branch = g * gate * r for its tile
    and fp32 partial sums: of g * mixed over its tokens (-> partial_gate[pid_bn, d]) and of
    g * gate * (branch - cache) over its tile (-> partial_r[program]). Then it counts itself in
    ``arrivals`` (int32, zero on entry; slot 0 for r, 1 + row * n_d_tiles + pid_d for each feature
    tile of each grad_gate row): the last program of a grad_gate tile sums that tile's ``gate_rows``
    partial rows (a sample's token tiles, or every sample's for a broadcast gate), the last program
    of the grid sums r's partials, and each sets its slot back to zero for the next launch. The
    arrival is an acquire-release atomic after a barrier, so the partials of every earlier arrival
    are visible to the program that sums them; they are read through L2 (``.cg``). The sums run in
    a fixed order whichever program arrives last: the result is deterministic."""
    b, offsets, d, d_mask, mask = _tile_offsets(N, D, n_tiles, BLOCK_N, BLOCK_D)
    pid_bn = tl.program_id(0)
    pid_d = tl.program_id(1)
    program = pid_bn * tl.num_programs(1) + pid_d
    r = tl.load(r_ptr).to(tl.float32)
    g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    branch = tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    cache = tl.load(cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    diff = branch - cache
    if HAS_GATE:
        gate = _load_row(gate_ptr, b, gate_stride_b, d, d_mask)
        g_gated = g * gate[None, :]
        mixed = _lerp(cache, branch, r)
        tl.store(partial_gate_ptr + pid_bn.to(tl.int64) * D + d, tl.sum(g * mixed, axis=0), mask=d_mask)
    else:
        g_gated = g
    tl.store(
        grad_branch_ptr + offsets, _cast_for_store(g_gated * r, grad_branch_ptr.dtype.element_ty), mask=mask
    )
    tl.store(partial_r_ptr + program, tl.sum(tl.sum(g_gated * diff, axis=1), axis=0))
    tl.debug_barrier()  # every thread's partials are stored before the program counts itself
    if HAS_GATE:
        row = pid_bn // gate_rows
        slot = arrivals_ptr + 1 + row * tl.num_programs(1) + pid_d
        if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == gate_rows - 1:
            rows = tl.arange(0, BLOCK_R)
            base = row.to(tl.int64) * gate_rows
            acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            for start in range(0, gate_rows, BLOCK_R):
                part = start + rows
                part_mask = (part < gate_rows)[:, None] & d_mask[None, :]
                acc += tl.load(
                    partial_gate_ptr + (base + part)[:, None] * D + d[None, :],
                    mask=part_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            tl.store(
                grad_gate_ptr + row.to(tl.int64) * D + d,
                _cast_for_store(tl.sum(acc, axis=0), grad_gate_ptr.dtype.element_ty),
                mask=d_mask,
            )
            tl.store(slot, 0)
    n_programs = tl.num_programs(0) * tl.num_programs(1)
    if tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu") == n_programs - 1:
        index = tl.arange(0, BLOCK_P)
        acc_r = tl.zeros([BLOCK_P], dtype=tl.float32)
        for start in range(0, n_programs, BLOCK_P):
            acc_r += tl.load(
                partial_r_ptr + start + index,
                mask=start + index < n_programs,
                other=0.0,
                cache_modifier=".cg",
            )
        tl.store(grad_r_ptr, _cast_for_store(tl.sum(acc_r, axis=0), grad_r_ptr.dtype.element_ty))
        tl.store(arrivals_ptr, 0)


@triton.jit
def _gated_residual_norm_modulate_kernel(
    x_ptr,
    gate_ptr,
    value_ptr,
    shift_ptr,
    scale_ptr,
    x_out_ptr,
    h_ptr,
    cache_ptr,
    c1_ptr,
    c2_ptr,
    coeffs_ptr,
    N,
    D,
    gate_stride_b,
    shift_stride_b,
    scale_stride_b,
    n_tiles,
    eps,
    HAS_GATE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ORDER: tl.constexpr,
):
    """x_out = x + gate * value (cache = value with WRITE_CACHE); h = LayerNorm(x_out) * (1 + scale)
    + shift over D, biased variance, from the fp32 x_out. BLOCK_D covers the whole row. ORDER 1 or
    2: value is the forecast from the history value (c0), c1[, c2] (see _forecast)."""
    coef_a, coef_b = _load_coeffs(coeffs_ptr, ORDER)
    b, offsets, d, d_mask, mask = _tile_offsets(N, D, n_tiles, BLOCK_N, BLOCK_D)
    if ORDER == 0:
        value = tl.load(value_ptr + offsets, mask=mask, other=0.0)
    else:
        value = _forecast(value_ptr, c1_ptr, c2_ptr, coef_a, coef_b, offsets, mask, ORDER)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = _load_row(gate_ptr, b, gate_stride_b, d, d_mask)
        x_out = tl.fma(gate[None, :], value.to(tl.float32), x)
    else:
        x_out = x + value.to(tl.float32)
    tl.store(x_out_ptr + offsets, _cast_for_store(x_out, x_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_CACHE:
        tl.store(cache_ptr + offsets, _cast_for_store(value, cache_ptr.dtype.element_ty), mask=mask)

    # Two-pass statistics on the registers already holding the row (masked lanes are 0 in x_out
    # and are zeroed again after centring).
    mean = tl.sum(x_out, axis=1) / D
    centred = tl.where(mask, x_out - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = _load_row(shift_ptr, b, shift_stride_b, d, d_mask)
    scale = _load_row(scale_ptr, b, scale_stride_b, d, d_mask)
    h = tl.fma(centred * rstd[:, None], 1.0 + scale[None, :], shift[None, :])
    tl.store(h_ptr + offsets, _cast_for_store(h, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_norm_modulate_chunked_kernel(
    x_ptr,
    gate_ptr,
    value_ptr,
    shift_ptr,
    scale_ptr,
    x_out_ptr,
    h_ptr,
    cache_ptr,
    c1_ptr,
    c2_ptr,
    coeffs_ptr,
    N,
    D,
    gate_stride_b,
    shift_stride_b,
    scale_stride_b,
    n_tiles,
    eps,
    HAS_GATE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    ORDER: tl.constexpr,
):
    """The norm kernel for rows of NUM_CHUNKS * BLOCK_D = D elements that a power-of-two tile would
    pad heavily (D = 1152 = 9 * 128 in a 2048 tile: 44 % of the lanes idle). Pass 1 walks the row in
    [BLOCK_N, BLOCK_D] chunks: x_out (and the cache) are stored and the row statistics merged chunk
    by chunk (Chan et al.'s pairwise update of mean and sum of squared deviations, each chunk's own
    two-pass, as stable as the one-tile kernel). Pass 2 recomputes each chunk's fp32 x_out from x and
    the value (re-read while still in L1/L2: no extra DRAM traffic at these tile sizes; reading the
    stored x_out back would round it to x's dtype first) and writes h. ORDER 1 or 2: the value is the
    forecast from the history value (c0), c1[, c2] (see _forecast), recomputed in pass 2 likewise."""
    coef_a, coef_b = _load_coeffs(coeffs_ptr, ORDER)
    pid = tl.program_id(0)
    b = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = n < N
    rows = (b * N + n).to(tl.int64)
    mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in tl.range(0, NUM_CHUNKS):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        mask = row_mask[:, None] & d_mask[None, :]
        offsets = rows[:, None] * D + d[None, :]
        if ORDER == 0:
            value = tl.load(value_ptr + offsets, mask=mask, other=0.0)
        else:
            value = _forecast(value_ptr, c1_ptr, c2_ptr, coef_a, coef_b, offsets, mask, ORDER)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate = _load_row(gate_ptr, b, gate_stride_b, d, d_mask)
            x_out = tl.fma(gate[None, :], value.to(tl.float32), x)
        else:
            x_out = x + value.to(tl.float32)
        tl.store(x_out_ptr + offsets, _cast_for_store(x_out, x_out_ptr.dtype.element_ty), mask=mask)
        if WRITE_CACHE:
            tl.store(cache_ptr + offsets, _cast_for_store(value, cache_ptr.dtype.element_ty), mask=mask)
        chunk_mean = tl.sum(x_out, axis=1) / BLOCK_D
        deviation = x_out - chunk_mean[:, None]
        chunk_m2 = tl.sum(deviation * deviation, axis=1)
        seen = c * 1.0  # chunks merged so far (a float in the compiled kernel and the interpreter)
        delta = chunk_mean - mean
        mean += delta / (seen + 1.0)
        m2 += chunk_m2 + delta * delta * (seen * BLOCK_D / (seen + 1.0))
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    for c in tl.range(0, NUM_CHUNKS):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        mask = row_mask[:, None] & d_mask[None, :]
        offsets = rows[:, None] * D + d[None, :]
        if ORDER == 0:
            value = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            value = _forecast(value_ptr, c1_ptr, c2_ptr, coef_a, coef_b, offsets, mask, ORDER)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate = _load_row(gate_ptr, b, gate_stride_b, d, d_mask)
            x_out = tl.fma(gate[None, :], value, x)
        else:
            x_out = x + value
        shift = _load_row(shift_ptr, b, shift_stride_b, d, d_mask)
        scale = _load_row(scale_ptr, b, scale_stride_b, d, d_mask)
        h = tl.fma((x_out - mean[:, None]) * rstd[:, None], 1.0 + scale[None, :], shift[None, :])
        tl.store(h_ptr + offsets, _cast_for_store(h, h_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers. Shapes are [B, N, D]; `*_stride_b` are batch strides in elements (0 = broadcast).


def _num_warps(tile_elements: int) -> int:
    """16 elements per thread, 1 to 8 warps (16 warps for the largest norm rows)."""
    return min(16, max(1, tile_elements // 512))


@functools.lru_cache(maxsize=256)
def elementwise_config(
    B: int, N: int, D: int, tile: int = _TILE_ELEMENTS, warps: int | None = None
) -> tuple[tuple[int, int], int, int, int, int]:
    """(grid, BLOCK_N, BLOCK_D, n_tiles, num_warps) of the elementwise kernels for [B, N, D], with
    tiles of about ``tile`` elements and ``warps`` warps (None: 16 elements per thread); memoised:
    a model calls its ops with a handful of shapes, and the launch should not redo this."""
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D)
    block_n = min(triton.next_power_of_2(N), max(1, tile // block_d))
    n_tiles = triton.cdiv(N, block_n)
    grid = (B * n_tiles, triton.cdiv(D, block_d))
    return grid, block_n, block_d, n_tiles, warps or _num_warps(block_n * block_d)


# The chunked norm kernel takes rows whose power-of-two tile would leave more than this share of
# lanes idle, when D splits into chunks of at least _MIN_NORM_CHUNK (a power of two dividing D).
_MAX_NORM_PADDING = 0.125
_MIN_NORM_CHUNK = 64


@functools.lru_cache(maxsize=256)
def norm_config(
    B: int, N: int, D: int, tile: int = _TILE_ELEMENTS, warps: int | None = None
) -> tuple[tuple[int, int], int, int, int, int, int]:
    """(grid, BLOCK_N, BLOCK_D, n_tiles, num_warps, NUM_CHUNKS) of the norm kernels.

    NUM_CHUNKS = 0: the one-tile kernel, BLOCK_D covering a whole row (next power of two); a few
    short rows per program so that small D still moves a useful amount per program, long rows one
    row each and more warps. NUM_CHUNKS > 0: the chunked kernel, D = NUM_CHUNKS * BLOCK_D exactly
    (BLOCK_D the largest power of two dividing D, at most _MAX_BLOCK_D), rows stacked to a tile of
    about ``tile`` elements (``warps`` as in elementwise_config)."""
    block_d = triton.next_power_of_2(D)
    chunk = min(D & -D, _MAX_BLOCK_D)  # largest power of two dividing D
    if 1 - D / block_d > _MAX_NORM_PADDING and chunk >= _MIN_NORM_CHUNK:
        block_n = min(triton.next_power_of_2(N), max(1, tile // chunk))
        n_tiles = triton.cdiv(N, block_n)
        num_warps = warps or _num_warps(block_n * chunk)
        return (B * n_tiles, 1), block_n, chunk, n_tiles, num_warps, D // chunk
    block_n = min(triton.next_power_of_2(N), max(1, tile // block_d))
    n_tiles = triton.cdiv(N, block_n)
    return (B * n_tiles, 1), block_n, block_d, n_tiles, warps or _num_warps(block_n * block_d), 0


# ---- autotuning: (tile elements, warps) per shape and dtypes, timed once on the GPU -------------

# Candidates; the first is the default (what the interpreter, HARMONICA_TRITON_AUTOTUNE=0 and a first
# call during CUDA-graph capture use). Each compiles for sm_90 with 128-bit accesses and no spills
# (tests/kernels/test_triton_codegen.py), so a choice only changes speed, never results.
TUNING_CANDIDATES: tuple[tuple[int, int | None], ...] = ((_TILE_ELEMENTS, None), (2048, None), (8192, 8))
_AUTOTUNE = os.environ.get("HARMONICA_TRITON_AUTOTUNE", "1") != "0"
_tuned: dict[tuple, tuple[int, int | None]] = {}


def _tuned_choice(key: tuple, launch) -> tuple[int, int | None]:
    """The (tile, warps) for ``key`` (kernel, shape, dtypes, flags, device): on the first call on a
    GPU each candidate is timed with ``triton.testing.do_bench`` on the call's own arguments (every
    kernel here is idempotent: it writes only outputs derived from its inputs) and the fastest is
    kept for the process; a dictionary lookup afterwards."""
    choice = _tuned.get(key)
    if choice is not None:
        return choice
    choice = TUNING_CANDIDATES[0]
    if not _AUTOTUNE or INTERPRETED:
        _tuned[key] = choice
        return choice
    if torch.cuda.is_current_stream_capturing():  # timing would break the capture: tune later
        return choice
    try:
        from triton.testing import do_bench

        times = {c: do_bench(lambda c=c: launch(*c), warmup=3, rep=10) for c in TUNING_CANDIDATES}
        choice = min(times, key=times.get)
    except Exception as err:  # tuning is an optimisation: never fail the op for it
        warnings.warn(
            f"harmonica: Triton autotuning failed ({err!r}); using the default launch", stacklevel=3
        )
    _tuned[key] = choice
    return choice


def _forecast_args(
    history: tuple | None, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(c1, c2, coeffs, ORDER) kernel arguments for ``history = (c1, c2 or None, coeffs)`` or None
    (plain value, ORDER 0); absent tensors are replaced by ``fallback``, which the kernel never reads."""
    if history is None:
        return fallback, fallback, fallback, 0
    c1, c2, coeffs = history
    return c1, (c2 if c2 is not None else c1), coeffs, (1 if c2 is None else 2)


def launch_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    gate_stride_b: int,
    value: torch.Tensor,
    out: torch.Tensor,
    cache_out: torch.Tensor | None,
    history: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> None:
    """out = x + gate * value; cache_out[:] = value when given. With ``history = (c1, c2, coeffs)``
    (c2 None at order 1), value is the forecast from c0 = value, c1, c2 (no cache_out then)."""
    B, N, D = x.shape
    if x.numel() == 0:
        return
    c1, c2, coeffs, order = _forecast_args(history, x)

    def launch(tile: int, warps: int | None) -> None:
        grid, block_n, block_d, n_tiles, num_warps = elementwise_config(B, N, D, tile, warps)
        _gated_residual_kernel[grid](
            x,
            gate if gate is not None else x,
            value,
            out,
            cache_out if cache_out is not None else out,
            c1,
            c2,
            coeffs,
            N,
            D,
            gate_stride_b,
            n_tiles,
            HAS_GATE=gate is not None,
            WRITE_CACHE=cache_out is not None,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            ORDER=order,
            num_warps=num_warps,
        )

    cache_dtype = None if cache_out is None else cache_out.dtype
    key = (
        "gated",
        B,
        N,
        D,
        x.dtype,
        value.dtype,
        cache_dtype,
        gate is None,
        gate_stride_b == 0,
        x.device,
        order,
    )
    launch(*_tuned_choice(key, launch))


def launch_routed_gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    gate_stride_b: int,
    branch: torch.Tensor,
    cache: torch.Tensor,
    r: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out = x + gate * (r * branch + (1 - r) * cache)."""
    B, N, D = x.shape
    if x.numel() == 0:
        return

    def launch(tile: int, warps: int | None) -> None:
        grid, block_n, block_d, n_tiles, num_warps = elementwise_config(B, N, D, tile, warps)
        _routed_gated_residual_kernel[grid](
            x,
            gate if gate is not None else x,
            branch,
            cache,
            r,
            out,
            N,
            D,
            gate_stride_b,
            n_tiles,
            HAS_GATE=gate is not None,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )

    key = ("routed", B, N, D, x.dtype, cache.dtype, r.dtype, gate is None, gate_stride_b == 0, x.device)
    launch(*_tuned_choice(key, launch))


def launch_routed_gated_residual_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor | None,
    gate_stride_b: int,
    branch: torch.Tensor,
    cache: torch.Tensor,
    r: torch.Tensor,
    grad_branch: torch.Tensor,
    grad_gate: torch.Tensor | None,
    grad_r: torch.Tensor,
) -> None:
    """Writes grad_branch, grad_gate (contiguous ``[B or 1 (gate's batch), D]`` in the gate's
    dtype; None without a gate) and grad_r (one element in r's dtype), in one launch: the last
    program to finish each output tile reduces the others' fp32 partials (no host sync, no
    floating-point atomics: the result is deterministic)."""
    B, N, D = grad_out.shape
    device = grad_out.device
    if grad_out.numel() == 0:
        if grad_gate is not None:
            grad_gate.zero_()
        grad_r.zero_()
        return
    grid, block_n, block_d, n_tiles, num_warps = elementwise_config(B, N, D)
    partial_r = torch.empty(grid, dtype=torch.float32, device=device)
    gate_outputs = 0 if gate is None else gate.shape[0]  # a broadcast gate sums over the batch too
    partial_gate = (
        torch.empty(B * n_tiles, D, dtype=torch.float32, device=device) if gate is not None else partial_r
    )
    _routed_gated_residual_backward_kernel[grid](
        grad_out,
        gate if gate is not None else grad_out,
        branch,
        cache,
        r,
        grad_branch,
        grad_gate if grad_gate is not None else grad_r,
        grad_r,
        partial_gate,
        partial_r,
        _arrivals(device, 1 + gate_outputs * grid[1]),
        N,
        D,
        gate_stride_b,
        n_tiles,
        B * n_tiles // max(gate_outputs, 1),
        HAS_GATE=gate is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_R=_SUM_BLOCK_R,
        BLOCK_P=_SUM_BLOCK_P,
        num_warps=num_warps,
    )


# Tiles of the backward's last-arrival reductions: [8, BLOCK_D] partials of the gate (fp32 rows of
# up to 512 contiguous bytes), 1024 partials of r at a time.
_SUM_BLOCK_R, _SUM_BLOCK_P = 8, 1024

# Arrival counters of the backward, per (device, stream): zeroed once, and every launch leaves them
# at zero (each slot's last arrival resets it), so launches need no memset. Launches on one stream
# run in order; another stream gets its own counters.
_arrival_counters: dict[tuple, torch.Tensor] = {}


def _arrivals(device: torch.device, size: int) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a graph gets counters of its own (zeroed by a memset node), so that graphs replayed on
        # different streams never share them
        return torch.zeros(size, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _arrival_counters.get(key)
    if counters is None or counters.numel() < size:
        counters = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _arrival_counters[key] = counters
    return counters


def launch_gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    gate_stride_b: int,
    value: torch.Tensor,
    shift: torch.Tensor,
    shift_stride_b: int,
    scale: torch.Tensor,
    scale_stride_b: int,
    eps: float,
    x_out: torch.Tensor,
    h: torch.Tensor,
    cache_out: torch.Tensor | None,
    history: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> None:
    """x_out = x + gate * value (cache_out[:] = value when given); h = LN(x_out) * (1 + scale) + shift.
    With ``history`` the value is the forecast, as in :func:`launch_gated_residual`."""
    B, N, D = x.shape
    if x.numel() == 0:
        return
    c1, c2, coeffs, order = _forecast_args(history, x)

    def launch(tile: int, warps: int | None) -> None:
        grid, block_n, block_d, n_tiles, num_warps, num_chunks = norm_config(B, N, D, tile, warps)
        if num_chunks:
            kernel, chunks = _gated_residual_norm_modulate_chunked_kernel, {"NUM_CHUNKS": num_chunks}
        else:
            kernel, chunks = _gated_residual_norm_modulate_kernel, {}
        kernel[grid](
            x,
            gate if gate is not None else x,
            value,
            shift,
            scale,
            x_out,
            h,
            cache_out if cache_out is not None else x_out,
            c1,
            c2,
            coeffs,
            N,
            D,
            gate_stride_b,
            shift_stride_b,
            scale_stride_b,
            n_tiles,
            eps,
            HAS_GATE=gate is not None,
            WRITE_CACHE=cache_out is not None,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            ORDER=order,
            num_warps=num_warps,
            **chunks,
        )

    cache_dtype = None if cache_out is None else cache_out.dtype
    key = ("norm", B, N, D, x.dtype, value.dtype, cache_dtype, gate is None, x.device, order)
    launch(*_tuned_choice(key, launch))

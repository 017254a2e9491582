"""FP8 (e4m3) block quantization: ``x ~= q * scale`` with one float32 scale per block of
``BLOCK_ROWS x block_cols`` elements, bit for bit the recipes of ``ops/fp8.py`` (amax / 448, or a
power of two read from amax's exponent bits for MX).

A program quantizes a tile of several blocks in one pass (``quantize_blocks``, also the GEMM
epilogue's; a whole row is one block when it fits in registers), or blocks as wide as a longer row
in two sweeps (their maximum, then the values).
``quantize_segments`` quantizes a weight gradient's operands: rows sorted by expert, blocked
along the rows within each expert's segment.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import cdiv, interpreting, launchable, next_power_of_2
from .activations import CODES, load_operand_rows
from .align import max_tiles, tile_starts


class Quantized(NamedTuple):
    """An FP8 GEMM operand: e4m3 ``values`` with a float32 scale per block of ``block`` (rows,
    cols) elements along its last two dims; ``scales`` ``[..., ceil(rows / r), ceil(cols / c)]``
    (``quantize_segments``: per expert segment, see there). ``power_of_two``: MX scales, so
    ``values * scale`` is exact in bfloat16."""

    values: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int]
    power_of_two: bool = False


@triton.jit
def _round_to_e4m3(v):
    """``v`` (within +-448) rounded to nearest even on the e4m3 grid, in float32. Triton 3.9's
    interpreter casts to fp8 without carrying a rounded-up mantissa into the exponent (124.5 ->
    64) and misrounds subnormals; after this its cast is exact. Not needed on a GPU."""
    a = tl.abs(v)
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: 2**-6's ulp
    ulp = tl.exp2((exponent - 3).to(tl.float32))
    rounded = ((a / ulp + 8388608.0) - 8388608.0) * ulp  # adding 2**23 rounds to an integer, half to even
    # v's sign bit, so that -0.0 stays -0.0 (Triton 3.6's interpreter negates 0.0 to 0.0)
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def scale_of(amax, POW2: tl.constexpr):
    """The float32 scale of blocks with absolute maximum ``amax``: amax / 448 (at least float32's
    smallest normal), or for MX ``2 ** (floor(log2(amax)) - 8)`` from amax's exponent bits."""
    if POW2:
        exponent = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 8
        exponent = tl.minimum(tl.maximum(exponent, -127), 127)
        # 2 ** exponent from its bits: a GPU's exp2 flushes 2 ** -127 (subnormal) to zero
        scale = tl.where(exponent > -127, (exponent + 127) << 23, 1 << 22).to(tl.float32, bitcast=True)
    else:
        scale = tl.maximum(amax / 448.0, 1.1754943508222875e-38)
    return scale


@triton.jit
def to_e4m3(x, scale, ROUND_FIRST: tl.constexpr):
    """``x / scale`` saturated and rounded to nearest even into e4m3 (an IEEE division: a GPU's
    default one is approximate and flushes subnormals)."""
    scaled = tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale), -448.0), 448.0)
    if ROUND_FIRST:
        scaled = _round_to_e4m3(scaled)
    return scaled.to(tl.float8e4nv)


@triton.jit
def quantize_blocks(x, BLOCK: tl.constexpr, SHARED: tl.constexpr, POW2: tl.constexpr, ROUND_FIRST: tl.constexpr):
    """A float32 tile ``[R, C]`` quantized in blocks of BLOCK of its columns, each one row (or, if
    SHARED, all R rows): (e4m3 values ``[R, C]``, scales ``[R or 1, C / BLOCK]``)."""
    blocks = tl.reshape(x, (x.shape[0], x.shape[1] // BLOCK, BLOCK))
    amax = tl.max(tl.abs(blocks), axis=2)
    if SHARED:
        amax = tl.max(amax, axis=0, keep_dims=True)
    scales = scale_of(amax, POW2)
    return tl.reshape(to_e4m3(blocks, scales[:, :, None], ROUND_FIRST), x.shape), scales


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, M, K,
    stride_xb, stride_xm, stride_xk, stride_qb, stride_qm, stride_qk, stride_sb, stride_sm, stride_sk,
    ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, SHARED: tl.constexpr, CHUNK: tl.constexpr, POW2: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
):
    """One program: ROWS rows (SHARED: they share their blocks' scales, else each row has its own),
    and CHUNK columns holding CHUNK / BLOCK_COLS blocks, quantized in one pass; BLOCK_COLS 0: a
    block is a whole row, swept twice (its maximum, then the values) CHUNK columns at a time."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    batch = tl.program_id(2).to(tl.int64)
    x_rows = x_ptr + batch * stride_xb + rows[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + batch * stride_qb + rows[:, None].to(tl.int64) * stride_qm
    scales = scale_ptr + batch * stride_sb
    if BLOCK_COLS > 0:
        cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0)
        q, scale = quantize_blocks(x.to(tl.float32), BLOCK_COLS, SHARED, POW2, ROUND_FIRST)
        tl.store(q_rows + cols[None, :] * stride_qk, q, mask=mask)
        blocks = tl.program_id(1) * (CHUNK // BLOCK_COLS) + tl.arange(0, CHUNK // BLOCK_COLS)
        block_ok = (blocks * BLOCK_COLS < K)[None, :]
        if SHARED:
            tl.store(scales + tl.program_id(0) * stride_sm + blocks[None, :] * stride_sk, scale, mask=block_ok)
        else:
            tl.store(scales + rows[:, None] * stride_sm + blocks[None, :] * stride_sk, scale,
                     mask=row_ok[:, None] & block_ok)
    else:
        amax = tl.zeros((ROWS, CHUNK), tl.float32)
        for c in range(0, K, CHUNK):
            cols = c + tl.arange(0, CHUNK)
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        amax = tl.max(amax, axis=1)
        if SHARED:
            amax = tl.max(amax, axis=0)
        scale = scale_of(amax, POW2)
        for c in range(0, K, CHUNK):
            cols = c + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0)
            tl.store(q_rows + cols[None, :] * stride_qk, to_e4m3(x, scale if SHARED else scale[:, None], ROUND_FIRST),
                     mask=mask)
        if SHARED:
            tl.store(scales + tl.program_id(0) * stride_sm, scale)
        else:
            tl.store(scales + rows * stride_sm, scale, mask=row_ok)


# elements of a tile a program holds in registers: rows this short are quantized in one sweep
HELD_ELEMENTS = 16384


def quantize(x: torch.Tensor, block_rows: int, block_cols: int, power_of_two: bool = False) -> Quantized:
    """``x`` ``[M, K]`` or ``[B, M, K]`` (any strides) in blocks of ``block_rows x block_cols`` (0:
    the whole dim; powers of two otherwise): values e4m3 and contiguous, scales
    ``[..., ceil(M/rows), ceil(K/cols)]``."""
    batched = x if x.dim() == 3 else x.unsqueeze(0)
    batch, m, k = batched.shape
    rows = block_rows or m
    for size in (rows, block_cols):
        torch._check(size & (size - 1) == 0, lambda: f"FP8 blocks: sizes must be powers of two or 0, got {size}")
    q = torch.empty(batched.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(batch, cdiv(m, rows), cdiv(k, block_cols or k), dtype=torch.float32,
                         device=x.device)
    # a transposed view (a weight's backward orientation) lays rows side by side: a program takes
    # enough of them that each column it reads is a whole 32-byte sector, not a 16-byte half
    side_by_side = 16 if batched.stride(1) == 1 and k > 1 else 1
    kernel_cols = block_cols
    if not block_cols and rows == 1 and next_power_of_2(k) * side_by_side <= HELD_ELEMENTS:
        # a row's one block, held in registers: read once (sweeping it twice reads it twice from
        # memory once the programs in flight hold more than the L2 cache)
        kernel_cols = next_power_of_2(k)
    chunk = max(kernel_cols, 64 if interpreting() or side_by_side > 1 else 128)  # MX: several blocks a row
    if rows > 1:
        rows_per_program = rows  # one shared block
    elif kernel_cols:
        rows_per_program = max(4096 // chunk, side_by_side)  # a tile of 4K elements or more
    else:
        # whole rows, swept twice; side by side, 64 x 64 tiles (H100: 5% faster than 32 x 128)
        rows_per_program = 16 if interpreting() else 8 if side_by_side == 1 else 64
    launchable(_quantize_kernel, q)[(cdiv(m, rows_per_program), cdiv(k, chunk) if kernel_cols else 1, batch)](
        batched, q, scales, m, k, *batched.stride(), *q.stride(), *scales.stride(),
        ROWS=rows_per_program, BLOCK_COLS=kernel_cols, SHARED=rows > 1, CHUNK=chunk, POW2=power_of_two,
        ROUND_FIRST=interpreting(), num_warps=8 if rows_per_program * chunk > 4096 else 4,
    )
    if x.dim() == 2:
        q, scales = q[0], scales[0]
    return Quantized(q, scales, (block_rows, block_cols), power_of_two)


def quantize_weight(b: torch.Tensor, block_rows: int, block_cols: int, power_of_two: bool = False) -> Quantized:
    """A grouped GEMM's B operand ``[E, K, N]`` (any strides) in blocks of ``block_rows`` of N x
    ``block_cols`` of K: values stored ``[E, N, K]``, K contiguous as FP8 tensor cores read B,
    and returned as the ``[E, K, N]`` view; scales ``[E, ceil(N / rows), ceil(K / cols)]``."""
    q = quantize(b.transpose(1, 2), block_rows, block_cols, power_of_two)
    return q._replace(values=q.values.transpose(1, 2))


@triton.jit
def _quantize_segments_kernel(
    x_ptr, rows_ptr, row_scale_ptr, q_ptr, scale_ptr, sums_ptr, starts_ptr, offsets_ptr, N,
    stride_xm, stride_xn, stride_qm, stride_qn, stride_sm, stride_sn, stride_ue, alpha, limit,
    GATHER: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
    ROW_SCALE: tl.constexpr, COLUMN_SUMS: tl.constexpr, WHOLE_SEGMENT: tl.constexpr, POW2: tl.constexpr,
    ROUND_FIRST: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_N columns of one expert's rows, in blocks of BLOCK_M rows (or the whole
    segment: a first pass finds each column's maximum)."""
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    begin = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    count = tl.load(offsets_ptr + expert) - begin
    first_block = tl.load(starts_ptr + expert)
    padded = (tl.load(starts_ptr + expert + 1) - first_block) * ALIGN  # rows stored: zeros after count (masked loads)
    # q is [columns, padded rows]: a 64-bit base for the tile's first column, 32-bit offsets within it
    q_columns = q_ptr + (tl.program_id(1) * BLOCK_N).to(tl.int64) * stride_qn + first_block * ALIGN * stride_qm
    amax = tl.zeros((BLOCK_N,), tl.float32)
    sums = tl.zeros((BLOCK_N,), tl.float32)
    for scan in tl.static_range(2 if WHOLE_SEGMENT else 1):
        if scan == 1:
            scale = scale_of(amax, POW2)
        for r0 in range(0, padded, BLOCK_M):
            segment_rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = segment_rows < count
            rows = begin + segment_rows
            x = load_operand_rows(x_ptr, rows_ptr, rows, row_ok, tl.program_id(1) * BLOCK_N, N, stride_xm, stride_xn,
                                  alpha, limit, GATHER, ACT, GATED, INTERLEAVED, BLOCK_N)
            if ROW_SCALE:
                x *= tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)  # the operand as the unquantized GEMM takes it
            if COLUMN_SUMS and scan == 0:
                sums += tl.sum(x, axis=0)
            if WHOLE_SEGMENT and scan == 0:
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
            else:
                if not WHOLE_SEGMENT:
                    scale = scale_of(tl.max(tl.abs(x), axis=0), POW2)
                    block = first_block + r0 // BLOCK_M
                    tl.store(scale_ptr + block * stride_sm + cols * stride_sn, scale, mask=col_ok)
                q = to_e4m3(x, scale[None, :], ROUND_FIRST)
                tl.store(q_columns + segment_rows[:, None] * stride_qm + tl.arange(0, BLOCK_N)[None, :] * stride_qn,
                         q, mask=(segment_rows < padded)[:, None] & col_ok[None, :])
    if WHOLE_SEGMENT:
        tl.store(scale_ptr + expert * stride_sm + cols * stride_sn, scale, mask=col_ok)
    if COLUMN_SUMS:
        tl.store(sums_ptr + expert * stride_ue + cols, sums.to(sums_ptr.dtype.element_ty), mask=col_ok)


# rows: whole segments (block_rows 0) are stored padded to a multiple of this, so that a weight
# gradient loads them in aligned 16-byte vectors (asynchronous copies into shared memory need it)
SEGMENT_ALIGN = 16


def segment_starts(offsets: torch.Tensor, block_rows: int) -> torch.Tensor:
    """``[E + 1]`` int32: in ``quantize_segments``' storage, expert e's rows are rows
    ``starts[e] * align`` to ``starts[e + 1] * align`` (``align``: ``block_rows or SEGMENT_ALIGN``),
    zeros after its last row; with blocks, ``starts[e]`` is also its first scale block."""
    return tile_starts(offsets, block_rows or SEGMENT_ALIGN)


def quantize_segments(x, offsets, starts, block_rows: int, *, rows=None, activation=None, row_scale=None,
                      column_sums=None, power_of_two: bool = False) -> Quantized:
    """A weight gradient's operand ``x'`` ``[M, N]`` (rows sorted by expert, ``offsets`` their
    ends) in blocks of ``block_rows`` rows x 1 column that start at each expert's first row (0:
    the whole segment), so that no block spans two experts.

    ``x'`` is ``x[rows]`` (None: row r), or the activation of ``x`` (the pre-activation H,
    ``[M, 2N]`` if gated), times ``row_scale[r]`` if given, in x's dtype. ``column_sums`` ``[E, N]``,
    if given, receives each expert's column sums of ``x'`` (a bias gradient). ``starts``:
    ``segment_starts(offsets, block_rows)``. Values are stored ``[N, P]``, the rows contiguous as
    FP8 tensor cores read a reduced dimension, each expert's rows padded with zero rows to a
    multiple of the alignment (see ``segment_starts``), and returned as the ``[P, N]`` view; scales
    ``[S, N]``: expert e's i-th block is row ``starts[e] + i`` (whole segments: row e).
    """
    num_rows = x.shape[0] if rows is None else rows.shape[0]
    gated = activation is not None and activation.gated
    n = x.shape[1] // 2 if gated else x.shape[1]
    num_experts = offsets.shape[0]
    whole = block_rows == 0
    align = block_rows or SEGMENT_ALIGN
    padded_rows = max_tiles(num_rows, num_experts, align) * align
    q = torch.empty(n, padded_rows, dtype=torch.float8_e4m3fn, device=x.device).t()
    scales = torch.empty(num_experts if whole else max_tiles(num_rows, num_experts, block_rows), n,
                         dtype=torch.float32, device=x.device)
    block_m = block_rows or (16 if interpreting() else 64)
    # tiles of 4K elements on 4 warps, 2K for gathered rows: 1.2-1.5x as fast as 8K on 8 warps at
    # SonicMoE's large shape on the H100 (more programs in flight for a loop that waits on its loads)
    block_n = 16 if interpreting() else min(max((2048 if rows is not None else 4096) // block_m, 32), 128)
    # offsets within a tile of columns are 32-bit (here and in the weight gradient's loads)
    torch._check(128 * padded_rows < 2**31,
                 lambda: f"quantize_segments: {num_rows} rows of {num_experts} experts, over 32-bit offsets")
    launchable(_quantize_segments_kernel, scales)[(num_experts, cdiv(n, block_n))](
        x, rows if rows is not None else offsets, row_scale if row_scale is not None else x, q, scales,
        column_sums if column_sums is not None else scales, starts, offsets, n,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), scales.stride(0), scales.stride(1),
        column_sums.stride(0) if column_sums is not None else 0,
        activation.alpha if activation is not None else 0.0, activation.limit if activation is not None else 0.0,
        GATHER=rows is not None, ACT=-1 if activation is None else CODES[activation.function], GATED=gated,
        INTERLEAVED=gated and activation.interleaved, ROW_SCALE=row_scale is not None,
        COLUMN_SUMS=column_sums is not None, WHOLE_SEGMENT=whole, POW2=power_of_two, ROUND_FIRST=interpreting(),
        ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return Quantized(q, scales, (block_rows, 1), power_of_two)

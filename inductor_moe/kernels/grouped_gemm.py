"""Grouped GEMMs over expert-sorted rows, forward and backward.

Rows are (token, slot) pairs sorted by expert (``align``); expert e owns rows
``offsets[e-1]:offsets[e]``. A program computes one BLOCK_M x BLOCK_N tile of one expert; tiles
come from ``align.tile_starts`` (an expert's rows padded to BLOCK_M), the grid from an upper bound
of their number, so nothing waits for the host. Or, persistent (``_config``'s PERSISTENT), a
program per SM loops over the tiles (``_tile_loop``). B is ``[E, K, N]`` by strides: pass a
transposed view for ``[E, N, K]`` storage.

    gemm                 C = act(A[rows] @ B[e] + bias[e]); A's rows gathered by an index in the
                         prologue (no permuted copy); optionally stores the pre-activation H
    gemm_act_backward    dH = act'(H) * (scale * A[rows] @ B[e]), and per-tile partial sums of
                         (A[rows] @ B[e]) . act(H) for the routing-weight gradient
    weight_grad          dB[e] = sum over expert e's rows of A'[r]^T B'[r]; A' optionally
                         act(H) (recomputed in a pass of its own), B' optionally gathered and
                         scaled; with the column sums of B' (the bias gradient)

Accumulation in float32; bf16, fp16 and fp32 inputs, or FP8: e4m3 operands
(``quantize.Quantized``) whose scales the kernels apply per row and column after the K loop
(rowwise), or per K block inside it (blockwise: BLOCK_K is the scale block). Hopper has no MX
instructions, and an FP8 tensor-core step over MX's 32-element blocks would spend more time
rescaling than multiplying: MX tiles are dequantized in registers instead, exactly (e4m3 times a
power of two is a bfloat16), and multiplied in bfloat16. ``weight_grad`` takes its FP8 operands
from ``quantize.quantize_segments`` (blocks of rows that start at each expert's first row). On
Hopper the e4m3 GEMMs load B, and A where its rows are not gathered, by the tensor copy engine
(TMA descriptors, ``_descriptor``); everything else by pointers.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import cdiv, interpreting, launchable, next_power_of_2, traced
from .activations import CODES, act_derivative, act_forward, gated_backward, gated_forward, load_operand_rows
from .align import max_tiles, tile_starts
from .quantize import SEGMENT_ALIGN, Quantized, quantize_blocks, quantize_segments, segment_starts

NO_ACT = -1
# FP8 modes: no scales; one scale per row of A and column of B, applied after the K loop; one per
# K block (BLOCK_K) of each row and column, applied to each block's product; power-of-two scales
# per SCALE_K elements, applied to the tiles before a bfloat16 product
NO_FP8, PER_ROW, PER_K_BLOCK, DEQUANTIZE = 0, 1, 2, 3
# row tiles per group of the GEMMs' tile order (_tile): with at most 16 column tiles, a wave of an
# H100's 132 programs holds whole groups, the order the tiles were tuned in
GROUP_M = 8


@triton.jit
def _tile_loop(tiles_ptr, E, col_tiles, PERSISTENT: tl.constexpr):
    """(first, end, step) of a program's loop over its tiles (_tile), and the count of row tiles.
    PERSISTENT: every num_programs-th tile from the program's own, each tile's K loop flattened
    into this loop (``tl.range``'s flatten), so that the next tile's first loads overlap this
    tile's epilogue. Else one step, a loop the compiler removes: a real loop around a tile's code
    keeps its invariants live across it (up to 80 more registers a thread, and spills, on sm_90)."""
    row_tiles = tl.load(tiles_ptr + E)
    if PERSISTENT:
        return tl.program_id(0), row_tiles * col_tiles, tl.num_programs(0), row_tiles
    else:
        return 0, 1, 1, row_tiles


@triton.jit
def _tile(step, row_tiles, col_tiles, tiles_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
          GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr):
    """(expert, first row, end row, column tile, valid) of a program's tile at ``step`` of its
    _tile_loop. Tiles come in groups of GROUP_M row tiles by every column tile, row tiles fastest,
    so the tiles in flight share a few row tiles of A (gathered from anywhere in A) and a few
    column tiles of B through L2: each is read from memory once per group at most. (One row tile
    by every column tile in flight read Mixtral's 235 MB w1 from memory once per row tile; column
    tiles outermost re-read all of A once per column tile.)"""
    tile = step if PERSISTENT else tl.program_id(0)
    # a program per tile: the grid is an upper bound; a persistent loop ends at the last tile (a
    # constant condition, folded away: the loops stay nested for their flattening)
    valid = tl.full((), 1, tl.int1) if PERSISTENT else tile < row_tiles * col_tiles
    group_size = GROUP_M * col_tiles
    group = tile // group_size
    in_group = tile % group_size
    # the last group may be short; a tile past the last (not valid) gets a row tile in range
    group_rows = tl.maximum(tl.minimum(row_tiles - group * GROUP_M, GROUP_M), 1)
    row_tile = group * GROUP_M + in_group % group_rows
    experts = tl.arange(0, BLOCK_E)
    starts = tl.load(tiles_ptr + experts, mask=experts < E, other=2**30)
    expert = tl.sum((starts <= row_tile).to(tl.int32), axis=0) - 1  # experts without rows share a start
    expert = tl.minimum(expert, E - 1)
    begin = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    first = begin + (row_tile - tl.load(tiles_ptr + expert)) * BLOCK_M
    return expert, first, tl.load(offsets_ptr + expert), in_group // group_rows, valid


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_F32:  # Triton's interpreter multiplies bf16 wrongly: compute in float32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # tl.dot's accumulator argument, not ``acc += tl.dot(a, b)``: Triton folds that addition into
    # the MMA for 16-bit operands only; for e4m3 (max_num_imprecise_acc set) each product would
    # start from zero and wait for its MMA to finish before the addition (sm_90 TTGIR)
    return tl.dot(a, b, acc, input_precision="ieee" if IEEE else None)


@triton.jit
def _scaled_dot(a, b, acc, a_scale, b_scale, FP8: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b``, the product scaled by its K block's row and column scales in PER_K_BLOCK."""
    if FP8 == 2:  # PER_K_BLOCK
        acc += _dot(a, b, tl.zeros(acc.shape, tl.float32), DOT_F32, IEEE) * (a_scale[:, None] * b_scale[None, :])
    else:
        acc = _dot(a, b, acc, DOT_F32, IEEE)
    return acc


@triton.jit
def _scale_blocks(start, size, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """The blocks of BLOCK elements (along a reduced dim of ``size``) that the STEP elements from
    ``start`` cover, and which of them exist."""
    blocks = start // BLOCK + tl.arange(0, STEP // BLOCK)
    return blocks, blocks * BLOCK < size


@triton.jit
def _dequantized(x, scale_ptrs, scale_mask, AXIS: tl.constexpr, FP8: tl.constexpr):
    """``x``, or in DEQUANTIZE mode ``x`` times its scales in bfloat16 (exact: powers of two).
    ``scale_ptrs``: one scale per block of x's elements along AXIS (the other dim whole), each
    loaded once and broadcast in registers (a scale per element would copy 32x the bytes)."""
    if FP8 == 3:  # DEQUANTIZE
        scales = tl.load(scale_ptrs, mask=scale_mask, other=0.0)
        if AXIS == 0:
            blocks: tl.constexpr = scale_ptrs.shape[0]
            expanded = tl.broadcast_to(scales[:, None, :], (blocks, x.shape[0] // blocks, x.shape[1]))
        else:
            blocks: tl.constexpr = scale_ptrs.shape[1]
            expanded = tl.broadcast_to(scales[:, :, None], (x.shape[0], blocks, x.shape[1] // blocks))
        x = (x.to(tl.float32) * tl.reshape(expanded, x.shape)).to(tl.bfloat16)
    return x


@triton.jit
def _load_b(b_base, expert, k0, first_col, ks, cols, col_ok, K, stride_bk, stride_bn, TMA: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """B's ``[BLOCK_K, BLOCK_N]`` tile of ``expert`` from K step ``k0``: through a tensor descriptor
    over ``[E, N, K]`` storage from column ``first_col`` (TMA: Hopper's copy engine fills shared
    memory, zeros past the edges, and the threads compute no addresses), or by pointers from the
    expert's ``b_base`` at columns ``cols``."""
    if TMA:
        return tl.trans(tl.reshape(b_base.load([expert, first_col, k0]), (BLOCK_N, BLOCK_K)))
    else:
        return tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                       mask=(ks < K)[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _gemm_kernel(
    a_ptr, a_rows_ptr, b_ptr, c_ptr, h_ptr, bias_ptr, tiles_ptr, offsets_ptr, a_scale_ptr, b_scale_ptr,
    c_scale_ptr, N_OUT, K, E,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_hm, stride_hn, stride_bias_e, stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
    stride_scm, stride_sck, alpha, limit,
    GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr, STORE_H: tl.constexpr, FP8: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
    A_TMA: tl.constexpr, B_TMA: tl.constexpr, SCALE_K: tl.constexpr, C_BLOCK: tl.constexpr, C_POW2: tl.constexpr,
    C_ROUND: tl.constexpr,
    ROUND_FIRST: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr,
):
    tl.static_assert(FP8 != 2 or BLOCK_K == SCALE_K, "blockwise FP8: a K step is one scale block")
    col_tiles = tl.cdiv(N_OUT, BLOCK_N)
    first_step, end_step, stride, row_tiles = _tile_loop(tiles_ptr, E, col_tiles, PERSISTENT)
    for step in tl.range(first_step, end_step, stride, flatten=PERSISTENT):
        expert, first, end, col_tile, valid = _tile(step, row_tiles, col_tiles, tiles_ptr, offsets_ptr, E, BLOCK_M,
                                                    BLOCK_E, GROUP_M, PERSISTENT)
        if valid:
            rows = first + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0) if GATHER else rows
            cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N_OUT
            # gate columns (or all columns), and up columns of a gated activation
            gate_cols = 2 * cols if INTERLEAVED else cols
            up_cols = 2 * cols + 1 if INTERLEAVED else cols + N_OUT
            tl.static_assert(not (A_TMA and GATHER) and not (B_TMA and INTERLEAVED),
                             "descriptors load contiguous tiles")
            b_base = b_ptr if B_TMA else b_ptr + expert.to(tl.int64) * stride_be
            # FP8 scales: of A's rows, and of B's gate and up columns ([E, N / B_SCALE_ROWS, K blocks])
            a_scales = a_scale_ptr + a_rows * stride_sam
            b_scales = b_scale_ptr + expert * stride_sbe
            gate_scales = b_scales + (gate_cols // B_SCALE_ROWS) * stride_sbn
            up_scales = b_scales + (up_cols // B_SCALE_ROWS) * stride_sbn
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_blocks, block_ok = _scale_blocks(k0, K, SCALE_K, BLOCK_K)
                if A_TMA:  # rows past the expert's are the next expert's: their outputs are not stored
                    a = a_ptr.load([first, k0])
                else:
                    a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                                mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
                a = _dequantized(a, a_scales[:, None] + k_blocks[None, :] * stride_sak,
                                 row_ok[:, None] & block_ok[None, :], 1, FP8)
                if FP8 == 2:  # PER_K_BLOCK
                    a_scale = tl.load(a_scales + (k0 // BLOCK_K) * stride_sak, mask=row_ok, other=0.0)
                    gate_scale = tl.load(gate_scales + (k0 // BLOCK_K) * stride_sbk, mask=col_ok, other=0.0)
                    up_scale = tl.load(up_scales + (k0 // BLOCK_K) * stride_sbk, mask=col_ok, other=0.0)
                else:
                    a_scale, gate_scale, up_scale = 1.0, 1.0, 1.0
                b_scale_mask = block_ok[:, None] & col_ok[None, :]
                b = _load_b(b_base, expert, k0, col_tile * BLOCK_N, ks, gate_cols, col_ok, K, stride_bk, stride_bn,
                            B_TMA, BLOCK_K, BLOCK_N)
                b = _dequantized(b, gate_scales[None, :] + k_blocks[:, None] * stride_sbk, b_scale_mask, 0, FP8)
                acc = _scaled_dot(a, b, acc, a_scale, gate_scale, FP8, DOT_F32, IEEE)
                if GATED:
                    b = _load_b(b_base, expert, k0, N_OUT + col_tile * BLOCK_N, ks, up_cols, col_ok, K, stride_bk,
                                stride_bn, B_TMA, BLOCK_K, BLOCK_N)
                    b = _dequantized(b, up_scales[None, :] + k_blocks[:, None] * stride_sbk, b_scale_mask, 0, FP8)
                    acc_up = _scaled_dot(a, b, acc_up, a_scale, up_scale, FP8, DOT_F32, IEEE)
            if FP8 == 1:  # PER_ROW
                a_scale = tl.load(a_scales, mask=row_ok, other=0.0)[:, None]
                acc *= a_scale * tl.load(gate_scales, mask=col_ok, other=0.0)[None, :]
                if GATED:
                    acc_up *= a_scale * tl.load(up_scales, mask=col_ok, other=0.0)[None, :]
            if HAS_BIAS:
                bias_base = bias_ptr + expert * stride_bias_e
                acc += tl.load(bias_base + gate_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                if GATED:
                    acc_up += tl.load(bias_base + up_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            if STORE_H:
                h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm
                tl.store(h_rows + gate_cols[None, :] * stride_hn, acc.to(h_ptr.dtype.element_ty), mask=mask)
                if GATED:
                    tl.store(h_rows + up_cols[None, :] * stride_hn, acc_up.to(h_ptr.dtype.element_ty), mask=mask)
            if GATED:
                out = gated_forward(acc, acc_up, ACT, alpha, limit)
            elif ACT >= 0:
                out = act_forward(acc, ACT)
            else:
                out = acc
            c = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
            if C_BLOCK > 0:  # C in e4m3, 1 x C_BLOCK blocks of this tile's columns: the next GEMM's A
                out = tl.where(mask, out.to(C_ROUND).to(tl.float32), 0.0)  # the values the unfused path quantizes
                out, c_scale = quantize_blocks(out, C_BLOCK, False, C_POW2, ROUND_FIRST)
                scale_cols = col_tile * (BLOCK_N // C_BLOCK) + tl.arange(0, BLOCK_N // C_BLOCK)
                tl.store(c_scale_ptr + rows[:, None].to(tl.int64) * stride_scm + scale_cols[None, :] * stride_sck,
                         c_scale, mask=row_ok[:, None] & (scale_cols * C_BLOCK < N_OUT)[None, :])
            tl.store(c, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_act_backward_kernel(
    a_ptr, a_rows_ptr, b_ptr, h_ptr, scale_ptr, grad_h_ptr, partial_ptr, tiles_ptr, offsets_ptr, a_scale_ptr,
    b_scale_ptr,
    N_OUT, K, E,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_hm, stride_hn, stride_gm, stride_gn,
    stride_pm, stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, FP8: tl.constexpr,
    B_SCALE_ROWS: tl.constexpr, B_TMA: tl.constexpr, SCALE_K: tl.constexpr, DOT_F32: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr,
):
    tl.static_assert(FP8 != 2 or BLOCK_K == SCALE_K, "blockwise FP8: a K step is one scale block")
    col_tiles = tl.cdiv(N_OUT, BLOCK_N)
    first_step, end_step, stride, row_tiles = _tile_loop(tiles_ptr, E, col_tiles, PERSISTENT)
    for step in tl.range(first_step, end_step, stride, flatten=PERSISTENT):
        expert, first, end, col_tile, valid = _tile(step, row_tiles, col_tiles, tiles_ptr, offsets_ptr, E, BLOCK_M,
                                                    BLOCK_E, GROUP_M, PERSISTENT)
        if valid:
            rows = first + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)
            cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N_OUT
            b_base = b_ptr if B_TMA else b_ptr + expert.to(tl.int64) * stride_be
            a_scales = a_scale_ptr + a_rows * stride_sam
            b_scales = b_scale_ptr + expert * stride_sbe + (cols // B_SCALE_ROWS) * stride_sbn
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_blocks, block_ok = _scale_blocks(k0, K, SCALE_K, BLOCK_K)
                a_mask = row_ok[:, None] & (ks < K)[None, :]
                a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak, mask=a_mask,
                            other=0.0)
                a = _dequantized(a, a_scales[:, None] + k_blocks[None, :] * stride_sak,
                                 row_ok[:, None] & block_ok[None, :], 1, FP8)
                b = _load_b(b_base, expert, k0, col_tile * BLOCK_N, ks, cols, col_ok, K, stride_bk, stride_bn, B_TMA,
                            BLOCK_K, BLOCK_N)
                b = _dequantized(b, b_scales[None, :] + k_blocks[:, None] * stride_sbk,
                                 block_ok[:, None] & col_ok[None, :], 0, FP8)
                if FP8 == 2:  # PER_K_BLOCK
                    a_scale = tl.load(a_scales + (k0 // BLOCK_K) * stride_sak, mask=row_ok, other=0.0)
                    b_scale = tl.load(b_scales + (k0 // BLOCK_K) * stride_sbk, mask=col_ok, other=0.0)
                else:
                    a_scale, b_scale = 1.0, 1.0
                acc = _scaled_dot(a, b, acc, a_scale, b_scale, FP8, DOT_F32, IEEE)
            if FP8 == 1:  # PER_ROW
                acc *= (tl.load(a_scales, mask=row_ok, other=0.0)[:, None]
                        * tl.load(b_scales, mask=col_ok, other=0.0)[None, :])
            # the epilogue on each half of the tile's columns in turn: H's gate and up, the activation
            # and both gradients held for half the columns beside the accumulator
            h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm
            g_rows = grad_h_ptr + rows[:, None].to(tl.int64) * stride_gm
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            partial = _act_backward_epilogue(left, col_tile * BLOCK_N, row_ok, scale, h_rows, g_rows, N_OUT, stride_hn,
                                             stride_gn, alpha, limit, ACT, GATED, INTERLEAVED)
            partial += _act_backward_epilogue(right, col_tile * BLOCK_N + BLOCK_N // 2, row_ok, scale, h_rows, g_rows,
                                              N_OUT, stride_hn, stride_gn, alpha, limit, ACT, GATED, INTERLEAVED)
            tl.store(partial_ptr + rows * stride_pm + col_tile, partial, mask=row_ok)


@triton.jit
def _act_backward_epilogue(acc, first_col, row_ok, scale, h_rows, g_rows, N_OUT, stride_hn, stride_gn, alpha, limit,
                           ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dH for the columns of ``acc`` (``G = A @ B``, from ``first_col``), stored; and the rows'
    sums of ``G . act(H)`` over them, <d out / d expert output, expert output>: the routing-weight
    gradient's share of these columns."""
    cols = first_col + tl.arange(0, acc.shape[1])
    mask = row_ok[:, None] & (cols < N_OUT)[None, :]
    gate_cols = 2 * cols if INTERLEAVED else cols
    up_cols = 2 * cols + 1 if INTERLEAVED else cols + N_OUT
    gate = tl.load(h_rows + gate_cols[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_rows + up_cols[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
        activated = gated_forward(gate, up, ACT, alpha, limit)
        grad_gate, grad_up = gated_backward(gate, up, acc * scale, ACT, alpha, limit)
        tl.store(g_rows + up_cols[None, :] * stride_gn, grad_up.to(g_rows.dtype.element_ty), mask=mask)
    else:
        activated = act_forward(gate, ACT)
        grad_gate = acc * scale * act_derivative(gate, ACT)
    tl.store(g_rows + gate_cols[None, :] * stride_gn, grad_gate.to(g_rows.dtype.element_ty), mask=mask)
    return tl.sum(tl.where(mask, acc * activated, 0.0), axis=1)


@triton.jit
def _weight_grad_kernel(
    a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, scale_ptr, out_ptr, bias_grad_ptr, offsets_ptr, a_scale_ptr, b_scale_ptr,
    tiles_ptr, KD, ND,
    stride_am, stride_ak, stride_bm, stride_bn, stride_oe, stride_ok, stride_on, stride_bge,
    stride_sam, stride_sak, stride_sbm, stride_sbn,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, SUM_SCALE: tl.constexpr, BIAS_GRAD: tl.constexpr,
    FP8: tl.constexpr, ROW_BLOCK: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(FP8 != 2 or BLOCK_M == ROW_BLOCK, "blockwise FP8: a row step is one scale block")
    # an expert's tiles are consecutive programs: they share its rows of A and B through L2
    expert = tl.program_id(2)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < KD
    n_ok = ns < ND
    begin = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    count = tl.load(offsets_ptr + expert) - begin
    if FP8 != 0:
        # quantize_segments' operands: stored [columns, padded rows], the expert's rows from row
        # first_block * ROW_BLOCK, zero rows up to a multiple of ROW_BLOCK: whole 16-byte vectors
        # (a mask at the last row would split them). A column's offset passes int32 on large
        # batches: the tile's first column is a 64-bit base, offsets within the tile 32-bit
        first_block = tl.load(tiles_ptr + expert)  # of the expert's rows and scales
        count = (tl.load(tiles_ptr + expert + 1) - first_block) * ROW_BLOCK
        tile_ks, tile_ns = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        first_row = first_block * ROW_BLOCK
        a_columns = a_ptr + (tl.program_id(1) * BLOCK_K).to(tl.int64) * stride_ak + first_row * stride_am
        b_columns = b_ptr + (tl.program_id(0) * BLOCK_N).to(tl.int64) * stride_bn + first_row * stride_bm
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    column_sums = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(0, count, BLOCK_M):
        segment_rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = segment_rows < count
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = row_ok[:, None] & n_ok[None, :]
        if FP8 == 0:  # operands as loaded (gathered at most): straight to the tensor cores
            rows = begin + segment_rows
            a = load_operand_rows(a_ptr, a_rows_ptr, rows, row_ok, tl.program_id(1) * BLOCK_K, KD, stride_am,
                                  stride_ak, 0.0, 0.0, A_GATHER, -1, False, False, BLOCK_K)
            b = load_operand_rows(b_ptr, b_rows_ptr, rows, row_ok, tl.program_id(0) * BLOCK_N, ND, stride_bm,
                                  stride_bn, 0.0, 0.0, B_GATHER, -1, False, False, BLOCK_N)
            if BIAS_GRAD:
                if SUM_SCALE:
                    column_sums += tl.sum(b * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None], axis=0)
                else:
                    column_sums += tl.sum(b, axis=0)
            acc = _dot(tl.trans(a.to(b_ptr.dtype.element_ty)), b.to(b_ptr.dtype.element_ty), acc, DOT_F32, IEEE)
        else:  # blocks of ROW_BLOCK rows from the segment's first row (PER_ROW: whole segments)
            a = tl.load(a_columns + segment_rows[:, None] * stride_am + tile_ks[None, :] * stride_ak, mask=a_mask,
                        other=0.0)
            b = tl.load(b_columns + segment_rows[:, None] * stride_bm + tile_ns[None, :] * stride_bn, mask=b_mask,
                        other=0.0)
            blocks, block_ok = _scale_blocks(r0, count, ROW_BLOCK, BLOCK_M)
            blocks += first_block
            a = _dequantized(a, a_scale_ptr + blocks[:, None] * stride_sam + ks[None, :] * stride_sak,
                             block_ok[:, None] & k_ok[None, :], 0, FP8)
            b = _dequantized(b, b_scale_ptr + blocks[:, None] * stride_sbm + ns[None, :] * stride_sbn,
                             block_ok[:, None] & n_ok[None, :], 0, FP8)
            if FP8 == 2:  # PER_K_BLOCK: BLOCK_M is the scale block
                block = first_block + r0 // BLOCK_M
                a_scale = tl.load(a_scale_ptr + block * stride_sam + ks * stride_sak, mask=k_ok, other=0.0)
                b_scale = tl.load(b_scale_ptr + block * stride_sbm + ns * stride_sbn, mask=n_ok, other=0.0)
            else:
                a_scale, b_scale = 1.0, 1.0
            acc = _scaled_dot(tl.trans(a), b, acc, a_scale, b_scale, FP8, DOT_F32, IEEE)
    if FP8 == 1:  # PER_ROW: one scale per column of each segment
        acc *= (tl.load(a_scale_ptr + expert * stride_sam + ks * stride_sak, mask=k_ok, other=0.0)[:, None]
                * tl.load(b_scale_ptr + expert * stride_sbm + ns * stride_sbn, mask=n_ok, other=0.0)[None, :])
    out = out_ptr + expert.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + ns[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if BIAS_GRAD:
        if tl.program_id(1) == 0:
            tl.store(bias_grad_ptr + expert * stride_bge + ns, column_sums.to(bias_grad_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _scaled_activation_kernel(
    h_ptr, rows_ptr, scale_ptr, out_ptr, M, N, stride_hm, stride_hn, stride_om, stride_on, alpha, limit,
    GATHER: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = load_operand_rows(h_ptr, rows_ptr, rows, row_ok, tl.program_id(1) * BLOCK_N, N, stride_hm, stride_hn, alpha,
                          limit, GATHER, ACT, GATED, INTERLEAVED, BLOCK_N)
    if SCALE:
        x *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on, x.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < N)[None, :])


# --- launch -------------------------------------------------------------------------------------


def _config(kernel: str, n: int, k: int, fp8: int = NO_FP8, block_k: int | None = None, block_m: int | None = None,
            gated: bool = False, itemsize: int = 2) -> dict:
    """Tile sizes of ``kernel`` ("gemm", "act_backward" or "weight_grad") for FP8 mode ``fp8``:
    small under the interpreter; for Hopper-class GPUs otherwise (also correct on smaller ones).
    BLOCK_M is the rows per tile, or the rows per step of a weight gradient; FP8 scale blocks set
    the least BLOCK_K (a GEMM's K blocks) or BLOCK_M (a weight gradient's rows). The tiles are
    the H100 sweeps' fastest (benchmarks/tune_gemm.py; benchmarks/results/h100_gemm_configs.json
    and h100_gemm_configs_rowwise_backward.json); there the configs that spilled kilobytes of
    registers ran 2-5x slower, and sm_90 builds show the spills without a GPU (tune_gemm.py
    --ptxas, sm90_ptxas_gemm_configs.json)."""
    e4m3 = fp8 in (PER_ROW, PER_K_BLOCK)  # MMAs on e4m3 (MX tiles are multiplied in bf16)
    if interpreting():
        config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    elif kernel == "gemm" and n >= 256 and not gated:
        # rowwise 128 x 256 (879 against 641 TFLOP/s for 64 x 256); blockwise's per-block products
        # beside the accumulator want 64 rows
        config = dict(BLOCK_M=64 if fp8 == PER_K_BLOCK else 128, BLOCK_N=256, BLOCK_K=128 if e4m3 else 64,
                      num_warps=8, num_stages=3)
    elif kernel == "gemm" and fp8 == PER_K_BLOCK and gated and n >= 256:
        # the sweep's fastest blockwise up projection (262 and 248 TFLOP/s against 203 and 181 at
        # 128 x 128, which spills 1.3 KB)
        config = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3)
    elif kernel == "gemm" and n >= 128:
        # a gated epilogue loads two B tiles a step and converts two accumulators: wider bf16 tiles
        # passed Hopper's 227 KB of shared memory when it also stored H (three stages; two lost a
        # third); rowwise up projection: 945 TFLOP/s against 845 for 64 x 256
        config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128 if e4m3 else 64, num_warps=8,
                      num_stages=4 if fp8 == PER_ROW else 3)
    elif kernel == "act_backward" and fp8 == PER_ROW:
        # the act_backward tiles were timed while the epilogue took the whole tile at once, which
        # spilled 0.3-0.5 KB in them (sm_90); in column halves none spills: untimed since.
        # 551 against 448 TFLOP/s for 64-row tiles at the large shape, 257 against 243 at the small
        config = dict(BLOCK_M=128, BLOCK_N=128 if n >= 128 else 64, BLOCK_K=128, num_warps=8, num_stages=4)
    elif kernel == "act_backward":
        # the epilogue holds H's gate and up, the activation and both gradients beside the
        # accumulator: 8 warps (4 spill in 128-row tiles); bf16 256 columns wide: 339 and 209
        # TFLOP/s against 280 and 182 for 128
        wide = fp8 == NO_FP8 and n >= 256
        config = dict(BLOCK_M=64, BLOCK_N=256 if wide else 128 if n >= 128 else 64,
                      BLOCK_K=128 if e4m3 else 64 if k >= 64 else 32, num_warps=8, num_stages=3)
    elif e4m3:
        # rowwise 128 x 256 output tiles: 293 TFLOP/s against 264 for 128 x 128
        config = dict(BLOCK_M=128, BLOCK_N=256 if fp8 == PER_ROW and n >= 256 else 128 if n >= 128 else 64,
                      BLOCK_K=128, num_warps=8, num_stages=3)
    elif fp8 == NO_FP8 and itemsize == 2 and n >= 256 and k >= 64:
        # bf16 weight gradients: 123 and 115 TFLOP/s against 100 and 96 for 64 x 128 tiles of 4
        # warps (measured while the kernel still recomputed the activation and applied the routing
        # weights in its loop); float32's tiles would overflow shared memory
        config = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    else:
        config = dict(BLOCK_M=64, BLOCK_N=128 if n >= 128 else 64, BLOCK_K=64 if k >= 64 else 32, num_warps=4,
                      num_stages=3)
    if kernel != "weight_grad":
        config.update(GROUP_M=GROUP_M, PERSISTENT=False)  # persistent: untimed on a GPU yet (_grid)
        if e4m3:
            config["TMA"] = True  # e4m3 tiles through Hopper's copy engine where it can read them (_descriptor)
    # a step covers whole scale blocks (blockwise: one; the kernels assert it)
    config["BLOCK_K"] = max(config["BLOCK_K"], block_k or 1)
    config["BLOCK_M"] = max(config["BLOCK_M"], block_m or 1)
    return config


def _grid(tiles: int, config: dict, tensor: torch.Tensor) -> tuple:
    """A GEMM's grid: a program per tile of an upper bound of ``tiles``, or with
    ``config["PERSISTENT"]`` one per SM of the tensor's device at most, each striding over the
    tiles (three under the interpreter, so that each takes several)."""
    return (min(tiles, _sm_count(tensor.device)) if config["PERSISTENT"] else tiles,)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


# C's dtype for a quantizing epilogue: it rounds to it first, as the unfused path stores C
_TRITON_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                  torch.float16: tl.float16}


def _flags(dtype: torch.dtype) -> dict:
    # Triton's interpreter multiplies bf16 wrongly; float32 holds e4m3 products exactly
    return dict(DOT_F32=interpreting() and dtype in (torch.bfloat16, torch.float8_e4m3fn), IEEE=dtype == torch.float32)


def _act_code(activation) -> int:
    return NO_ACT if activation is None else CODES[activation.function]


def _fp8_mode(a, b, reduced_block: int) -> int:
    """The FP8 mode of operands ``a`` and ``b`` blocked by ``reduced_block`` along the reduced dim."""
    if not isinstance(a, Quantized):
        return NO_FP8
    torch._check(isinstance(b, Quantized) and a.power_of_two == b.power_of_two,
                 lambda: "FP8 operands need the same recipe")
    return PER_ROW if reduced_block == 0 else DEQUANTIZE if a.power_of_two else PER_K_BLOCK


def _copy_engine(tensor: torch.Tensor) -> bool:
    """Whether the tensor's device has Hopper's tensor copy engine (TMA; the interpreter emulates it)."""
    return interpreting() or (tensor.is_cuda and torch.cuda.get_device_capability(tensor.device) >= (9, 0))


def _descriptor(x: torch.Tensor, block: list, wanted: bool):
    """A tensor descriptor over ``x`` (its last dim contiguous) in ``block`` tiles, if wanted and
    the copy engine can read it: e4m3 (the tiles' MMA operand as stored), 16-byte aligned; else None."""
    if not (wanted and x.dtype == torch.float8_e4m3fn and _copy_engine(x)):
        return None
    if traced(x):
        return None  # traced for Inductor: torch records no TMA descriptors outside dynamo (triton_kernel_wrap.py)
    aligned = x.stride(-1) == 1 and all(value % 16 == 0 for value in (x.data_ptr(), *x.stride()[:-1]))
    return TensorDescriptor.from_tensor(x, block) if aligned else None


def _operands(a, b):
    """(a's values, b's values, FP8 kernel arguments, the K block of the scales) for plain or
    ``Quantized`` operands; the arguments: scale pointers, their strides, the FP8 constexprs."""
    if not isinstance(a, Quantized):
        return a, b, dict(pointers=(a, b), strides=(0,) * 5, FP8=NO_FP8, B_SCALE_ROWS=1, SCALE_K=1), None
    torch._check(isinstance(b, Quantized) and a.block[1] == b.block[1], lambda: "FP8 operands need the same K blocks")
    block_k = a.block[1]
    mode = _fp8_mode(a, b, block_k)
    arguments = dict(pointers=(a.scales, b.scales), strides=(*a.scales.stride(), *b.scales.stride()),
                     FP8=mode, B_SCALE_ROWS=b.block[0], SCALE_K=max(block_k, 1))
    return a.values, b.values, arguments, block_k or None


def gemm(a, b, offsets, *, a_rows=None, bias=None, activation=None, store_h=False, out_dtype=None, fp8_out=None):
    """``act(a[a_rows] @ b[e] + bias[e])`` for the expert-sorted rows: (C, H or None).

    a ``[M_a, K]``; ``a_rows`` ``[M]`` int32 picks a's row for each sorted row (None: row r);
    b ``[E, K, N]`` by strides; offsets ``[E]`` int32 ends. A gated activation reads N as gate and
    up and writes N / 2 columns; ``store_h`` also returns the pre-activation ``[M, N]``. a and b
    may both be ``Quantized`` (FP8; out_dtype then names the output's dtype). ``fp8_out`` (block
    columns, power-of-two scales): C rounded to out_dtype, then quantized in the epilogue in 1 x
    block blocks, as ``quantize.quantize`` would (tiles hold whole blocks), and returned
    ``Quantized``: the next GEMM's operand without a pass over it.
    """
    a, b, fp8, block_k = _operands(a, b)
    num_rows = a.shape[0] if a_rows is None else a_rows.shape[0]
    num_experts, k, n = b.shape
    gated = activation is not None and activation.gated
    n_out = n // 2 if gated else n
    dtype = out_dtype or a.dtype
    c_block, c_pow2 = fp8_out or (0, False)
    c = a.new_empty(num_rows, n_out, dtype=torch.float8_e4m3fn if fp8_out else dtype)
    c_scales = a.new_empty(num_rows, cdiv(n_out, c_block), dtype=torch.float32) if fp8_out else c
    h = a.new_empty(num_rows, n, dtype=dtype) if store_h else c
    config = _config("gemm", n_out, k, fp8["FP8"], block_k, gated=gated)
    config["BLOCK_N"] = max(config["BLOCK_N"], c_block)  # powers of two: a multiple of the block
    # the copy engine: B's contiguous gate and up columns of [E, N, K] storage, A's rows unless gathered
    tma = config.pop("TMA", False)
    interleaved = gated and activation.interleaved
    b_tiles = _descriptor(b.transpose(1, 2), [1, config["BLOCK_N"], config["BLOCK_K"]], tma and not interleaved)
    a_tiles = _descriptor(a, [config["BLOCK_M"], config["BLOCK_K"]], tma and a_rows is None)
    tiles = tile_starts(offsets, config["BLOCK_M"])
    grid = _grid(max_tiles(num_rows, num_experts, config["BLOCK_M"]) * cdiv(n_out, config["BLOCK_N"]), config, a)
    launchable(_gemm_kernel, c)[grid](
        a if a_tiles is None else a_tiles, a_rows if a_rows is not None else offsets, b if b_tiles is None else b_tiles,
        c, h, bias if bias is not None else b, tiles, offsets,
        *fp8["pointers"], c_scales, n_out, k, num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        h.stride(0), h.stride(1), bias.stride(0) if bias is not None else 0, *fp8["strides"], *c_scales.stride(),
        activation.alpha if activation is not None else 0.0, activation.limit if activation is not None else 0.0,
        GATHER=a_rows is not None, HAS_BIAS=bias is not None, ACT=_act_code(activation), GATED=gated,
        INTERLEAVED=interleaved, STORE_H=store_h, FP8=fp8["FP8"],
        B_SCALE_ROWS=fp8["B_SCALE_ROWS"], A_TMA=a_tiles is not None, B_TMA=b_tiles is not None,
        SCALE_K=fp8["SCALE_K"], C_BLOCK=c_block, C_POW2=c_pow2,
        C_ROUND=_TRITON_DTYPES[dtype], ROUND_FIRST=interpreting() and c_block > 0,
        BLOCK_E=next_power_of_2(num_experts), **_flags(a.dtype), **config,
    )
    if fp8_out:
        c = Quantized(c, c_scales, (1, c_block), c_pow2)
    return c, (h if store_h else None)


def gemm_act_backward(a, a_rows, b, offsets, h, scale, activation):
    """(dH ``[M, N]``, partial ``[M, tiles]``) with ``G = a[a_rows] @ b[e]`` (b ``[E, K, N_out]``):
    dH = d act(H) against ``scale * G``; partial sums of ``G . act(H)`` over column tiles. a and b
    may both be ``Quantized`` (FP8)."""
    a, b, fp8, block_k = _operands(a, b)
    num_rows = a_rows.shape[0]
    num_experts, k, n_out = b.shape
    config = _config("act_backward", n_out, k, fp8["FP8"], block_k)
    b_tiles = _descriptor(b.transpose(1, 2), [1, config["BLOCK_N"], config["BLOCK_K"]], config.pop("TMA", False))
    col_tiles = cdiv(n_out, config["BLOCK_N"])
    grad_h = torch.empty_like(h)
    partial = torch.zeros(num_rows, col_tiles, device=a.device, dtype=torch.float32)
    tiles = tile_starts(offsets, config["BLOCK_M"])
    grid = _grid(max_tiles(num_rows, num_experts, config["BLOCK_M"]) * col_tiles, config, a)
    launchable(_gemm_act_backward_kernel, grad_h)[grid](
        a, a_rows, b if b_tiles is None else b_tiles, h, scale, grad_h, partial, tiles, offsets, *fp8["pointers"],
        n_out, k, num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), h.stride(0), h.stride(1),
        grad_h.stride(0), grad_h.stride(1), partial.stride(0), *fp8["strides"], activation.alpha, activation.limit,
        ACT=_act_code(activation), GATED=activation.gated, INTERLEAVED=activation.interleaved, FP8=fp8["FP8"],
        B_SCALE_ROWS=fp8["B_SCALE_ROWS"], B_TMA=b_tiles is not None, SCALE_K=fp8["SCALE_K"],
        BLOCK_E=next_power_of_2(num_experts), **_flags(a.dtype), **config,
    )
    return grad_h, partial


def scaled_activation(h, activation=None, scale=None, rows=None):
    """``scale[r] * act(h[rows[r]])`` ``[M, N]`` in h's dtype (gated: h ``[., 2N]``), computed in
    float32 in one pass; any of the three may be None (rows: h's in order)."""
    gated = activation is not None and activation.gated
    num_rows, n = (h if rows is None else rows).shape[0], h.shape[1] // (2 if gated else 1)
    out = h.new_empty(num_rows, n)
    block_m, block_n = (16, 16) if interpreting() else (32, 128)
    launchable(_scaled_activation_kernel, out)[(cdiv(num_rows, block_m), cdiv(n, block_n))](
        h, rows if rows is not None else h, scale if scale is not None else h, out, num_rows, n, *h.stride(),
        *out.stride(), activation.alpha if activation is not None else 0.0,
        activation.limit if activation is not None else 0.0, GATHER=rows is not None, ACT=_act_code(activation),
        GATED=gated, INTERLEAVED=gated and activation.interleaved, SCALE=scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out


def weight_grad(a, b, offsets, out, *, a_rows=None, a_activation=None, b_rows=None, scale=None, bias_grad=None,
                fp8_rows=None, power_of_two=False):
    """``out[e] = sum over expert e's rows of A'[r]^T B'[r]`` into ``out`` ``[E, K, N]`` (any strides).

    A' is ``a[a_rows]``, or the activation of ``a`` (the pre-activation H, ``[M, 2K]`` if gated);
    B' is ``b[b_rows] * scale``. ``bias_grad`` ``[E, N]``, if given, receives B's column sums.
    With ``fp8_rows`` (0: each expert's whole segment) A' and B' are first quantized to e4m3 in
    blocks of that many rows x 1 column, starting at each expert's first row
    (``quantize.quantize_segments``, one pass over each; ``power_of_two``: MX scales). Otherwise
    the activation and the scale go to A in a pass of their own (``scaled_activation``), so that
    the GEMM's operands reach the tensor cores as loaded: computed in its loop, they went through
    registers and back to shared memory every step (100-123 TFLOP/s on an H100).
    """
    num_experts, kd, nd = out.shape
    if fp8_rows is not None:
        starts = segment_starts(offsets, fp8_rows)
        segments = dict(block_rows=fp8_rows, power_of_two=power_of_two)
        a = quantize_segments(a, offsets, starts, rows=a_rows, activation=a_activation, **segments)
        b = quantize_segments(b, offsets, starts, rows=b_rows, row_scale=scale, column_sums=bias_grad, **segments)
        a_rows = b_rows = scale = bias_grad = None
    elif a_activation is not None or scale is not None:
        a, a_rows = scaled_activation(a, a_activation, scale, a_rows), None
    fp8 = _fp8_mode(a, b, fp8_rows)
    if fp8 == NO_FP8:
        scale_pointers, scale_strides = (a, b, offsets), (0,) * 4
    else:
        scale_pointers, scale_strides = (a.scales, b.scales, starts), (*a.scales.stride(), *b.scales.stride())
        a, b = a.values, b.values
    config = _config("weight_grad", nd, kd, fp8, block_m=fp8_rows, itemsize=b.element_size())
    grid = (cdiv(nd, config["BLOCK_N"]), cdiv(kd, config["BLOCK_K"]), num_experts)
    launchable(_weight_grad_kernel, out)[grid](
        a, a_rows if a_rows is not None else offsets, b, b_rows if b_rows is not None else offsets,
        scale if scale is not None else b, out, bias_grad if bias_grad is not None else out, offsets,
        *scale_pointers, kd, nd,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        bias_grad.stride(0) if bias_grad is not None else 0, *scale_strides,
        A_GATHER=a_rows is not None, B_GATHER=b_rows is not None, SUM_SCALE=scale is not None,
        BIAS_GRAD=bias_grad is not None, FP8=fp8, ROW_BLOCK=fp8_rows or SEGMENT_ALIGN, **_flags(a.dtype),
        **config,
    )
    return out

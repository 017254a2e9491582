"""Grouped GEMMs over expert-sorted rows, forward and backward.

Rows are (token, slot) pairs sorted by expert (``align``); expert e owns rows
``offsets[e-1]:offsets[e]``. A program computes one BLOCK_M x BLOCK_N tile of one expert; tiles
come from ``align.tile_starts`` (an expert's rows padded to BLOCK_M), the grid from an upper bound
of their number, so nothing waits for the host. B is ``[E, K, N]`` by strides: pass a transposed
view for ``[E, N, K]`` storage.

    gemm                 C = act(A[rows] @ B[e] + bias[e]); A's rows gathered by an index in the
                         prologue (no permuted copy); optionally stores the pre-activation H
    gemm_act_backward    dH = act'(H) * (scale * A[rows] @ B[e]), and per-tile partial sums of
                         (A[rows] @ B[e]) . act(H) for the routing-weight gradient
    weight_grad          dB[e] = sum over expert e's rows of A'[r]^T B'[r]; A' optionally
                         act(H) (recomputed in the prologue), B' optionally gathered and scaled;
                         with the column sums of B' (the bias gradient)

Accumulation in float32; bf16, fp16 and fp32 inputs.
"""

import torch
import triton
import triton.language as tl

from . import interpreting
from .activations import CODES, act_derivative, act_forward, gated_backward, gated_forward
from .align import max_tiles, tile_starts

NO_ACT = -1


@triton.jit
def _tile(tiles_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row, valid) of this program's tile."""
    tile = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    starts = tl.load(tiles_ptr + experts, mask=experts < E, other=2**30)
    expert = tl.sum((starts <= tile).to(tl.int32), axis=0) - 1  # experts without rows share a start
    valid = tile < tl.load(tiles_ptr + E)
    expert = tl.minimum(expert, E - 1)
    begin = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    first = begin + (tile - tl.load(tiles_ptr + expert)) * BLOCK_M
    return expert, first, tl.load(offsets_ptr + expert), valid


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_F32:  # Triton's interpreter multiplies bf16 wrongly: compute in float32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _gemm_kernel(
    a_ptr, a_rows_ptr, b_ptr, c_ptr, h_ptr, bias_ptr, tiles_ptr, offsets_ptr,
    N_OUT, K, E,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_hm, stride_hn, stride_bias_e,
    alpha, limit,
    GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr, STORE_H: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    expert, first, end, valid = _tile(tiles_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if valid:
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0) if GATHER else rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        # gate columns (or all columns), and up columns of a gated activation
        gate_cols = 2 * cols if INTERLEAVED else cols
        up_cols = 2 * cols + 1 if INTERLEAVED else cols + N_OUT
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                mask=row_ok[:, None] & (ks < K)[None, :], other=0.0,
            )
            b_mask = (ks < K)[:, None] & col_ok[None, :]
            b = tl.load(b_base + ks[:, None] * stride_bk + gate_cols[None, :] * stride_bn, mask=b_mask, other=0.0)
            acc = _dot(a, b, acc, DOT_F32, IEEE)
            if GATED:
                b = tl.load(b_base + ks[:, None] * stride_bk + up_cols[None, :] * stride_bn, mask=b_mask, other=0.0)
                acc_up = _dot(a, b, acc_up, DOT_F32, IEEE)
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
        tl.store(c, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_act_backward_kernel(
    a_ptr, a_rows_ptr, b_ptr, h_ptr, scale_ptr, grad_h_ptr, partial_ptr, tiles_ptr, offsets_ptr,
    N_OUT, K, E,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_hm, stride_hn, stride_gm, stride_gn,
    stride_pm, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    expert, first, end, valid = _tile(tiles_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if valid:
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                mask=row_ok[:, None] & (ks < K)[None, :], other=0.0,
            )
            b = tl.load(
                b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=(ks < K)[:, None] & col_ok[None, :], other=0.0,
            )
            acc = _dot(a, b, acc, DOT_F32, IEEE)
        mask = row_ok[:, None] & col_ok[None, :]
        gate_cols = 2 * cols if INTERLEAVED else cols
        up_cols = 2 * cols + 1 if INTERLEAVED else cols + N_OUT
        h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm
        gate = tl.load(h_rows + gate_cols[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        g_rows = grad_h_ptr + rows[:, None].to(tl.int64) * stride_gm
        if GATED:
            up = tl.load(h_rows + up_cols[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
            activated = gated_forward(gate, up, ACT, alpha, limit)
            grad_gate, grad_up = gated_backward(gate, up, acc * scale, ACT, alpha, limit)
            tl.store(g_rows + up_cols[None, :] * stride_gn, grad_up.to(grad_h_ptr.dtype.element_ty), mask=mask)
        else:
            activated = act_forward(gate, ACT)
            grad_gate = acc * scale * act_derivative(gate, ACT)
        tl.store(g_rows + gate_cols[None, :] * stride_gn, grad_gate.to(grad_h_ptr.dtype.element_ty), mask=mask)
        # <d out / d expert output, expert output> for this tile's columns: the routing-weight gradient
        partial = tl.sum(tl.where(mask, acc * activated, 0.0), axis=1)
        tl.store(partial_ptr + rows * stride_pm + tl.program_id(1), partial, mask=row_ok)


@triton.jit
def _weight_grad_kernel(
    a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, scale_ptr, out_ptr, bias_grad_ptr, offsets_ptr,
    KD, ND,
    stride_am, stride_ak, stride_bm, stride_bn, stride_oe, stride_ok, stride_on, stride_bge,
    alpha, limit,
    A_GATHER: tl.constexpr, A_ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
    B_GATHER: tl.constexpr, B_SCALE: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < KD
    n_ok = ns < ND
    begin = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    column_sums = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(begin, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0) if A_GATHER else rows
        a_mask = row_ok[:, None] & k_ok[None, :]
        a_base = a_ptr + a_rows[:, None].to(tl.int64) * stride_am
        if A_ACT >= 0:  # A is the activation of H: recompute it, it was never kept
            if GATED:
                gate_cols = 2 * ks if INTERLEAVED else ks
                up_cols = 2 * ks + 1 if INTERLEAVED else ks + KD
                gate = tl.load(a_base + gate_cols[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
                up = tl.load(a_base + up_cols[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
                a = gated_forward(gate, up, A_ACT, alpha, limit)
            else:
                a = act_forward(tl.load(a_base + ks[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32), A_ACT)
            a = tl.where(a_mask, a, 0.0).to(b_ptr.dtype.element_ty)
        else:
            a = tl.load(a_base + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
        b_rows = tl.load(b_rows_ptr + rows, mask=row_ok, other=0) if B_GATHER else rows
        b = tl.load(
            b_ptr + b_rows[:, None].to(tl.int64) * stride_bm + ns[None, :] * stride_bn,
            mask=row_ok[:, None] & n_ok[None, :], other=0.0,
        )
        if B_SCALE:
            b = (b.to(tl.float32) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None])
            b = b.to(b_ptr.dtype.element_ty)
        if BIAS_GRAD:
            column_sums += tl.sum(b.to(tl.float32), axis=0)
        acc = _dot(tl.trans(a), b, acc, DOT_F32, IEEE)
    out = out_ptr + expert.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + ns[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if BIAS_GRAD:
        if tl.program_id(1) == 0:
            tl.store(bias_grad_ptr + expert * stride_bge + ns, column_sums.to(bias_grad_ptr.dtype.element_ty), mask=n_ok)


# --- launch -------------------------------------------------------------------------------------


def _config(n: int, k: int) -> dict:
    """Tile sizes: small under the interpreter; for Hopper-class GPUs otherwise (also correct on
    smaller ones). BLOCK_M is the rows per tile, or the rows per step of a weight gradient."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    return dict(BLOCK_M=64, BLOCK_N=128 if n >= 128 else 64, BLOCK_K=64 if k >= 64 else 32, num_warps=4, num_stages=3)


def _flags(dtype: torch.dtype) -> dict:
    return dict(DOT_F32=interpreting() and dtype == torch.bfloat16, IEEE=dtype == torch.float32)


def _act_code(activation) -> int:
    return NO_ACT if activation is None else CODES[activation.function]


def gemm(a, b, offsets, *, a_rows=None, bias=None, activation=None, store_h=False, out_dtype=None):
    """``act(a[a_rows] @ b[e] + bias[e])`` for the expert-sorted rows: (C, H or None).

    a ``[M_a, K]``; ``a_rows`` ``[M]`` int32 picks a's row for each sorted row (None: row r);
    b ``[E, K, N]`` by strides; offsets ``[E]`` int32 ends. A gated activation reads N as gate and
    up and writes N / 2 columns; ``store_h`` also returns the pre-activation ``[M, N]``.
    """
    num_rows = a.shape[0] if a_rows is None else a_rows.shape[0]
    num_experts, k, n = b.shape
    gated = activation is not None and activation.gated
    n_out = n // 2 if gated else n
    c = a.new_empty(num_rows, n_out, dtype=out_dtype or a.dtype)
    h = a.new_empty(num_rows, n) if store_h else c
    config = _config(n_out, k)
    tiles = tile_starts(offsets, config["BLOCK_M"])
    grid = (max_tiles(num_rows, num_experts, config["BLOCK_M"]), triton.cdiv(n_out, config["BLOCK_N"]))
    _gemm_kernel[grid](
        a, a_rows if a_rows is not None else offsets, b, c, h, bias if bias is not None else b, tiles, offsets,
        n_out, k, num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        h.stride(0), h.stride(1), bias.stride(0) if bias is not None else 0,
        activation.alpha if activation is not None else 0.0, activation.limit if activation is not None else 0.0,
        GATHER=a_rows is not None, HAS_BIAS=bias is not None, ACT=_act_code(activation), GATED=gated,
        INTERLEAVED=gated and activation.interleaved, STORE_H=store_h,
        BLOCK_E=triton.next_power_of_2(num_experts), **_flags(a.dtype), **config,
    )
    return c, (h if store_h else None)


def gemm_act_backward(a, a_rows, b, offsets, h, scale, activation):
    """(dH ``[M, N]``, partial ``[M, tiles]``) with ``G = a[a_rows] @ b[e]`` (b ``[E, K, N_out]``):
    dH = d act(H) against ``scale * G``; partial sums of ``G . act(H)`` over column tiles."""
    num_rows = a_rows.shape[0]
    num_experts, k, n_out = b.shape
    config = _config(n_out, k)
    col_tiles = triton.cdiv(n_out, config["BLOCK_N"])
    grad_h = torch.empty_like(h)
    partial = torch.zeros(num_rows, col_tiles, device=a.device, dtype=torch.float32)
    tiles = tile_starts(offsets, config["BLOCK_M"])
    grid = (max_tiles(num_rows, num_experts, config["BLOCK_M"]), col_tiles)
    _gemm_act_backward_kernel[grid](
        a, a_rows, b, h, scale, grad_h, partial, tiles, offsets,
        n_out, k, num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), h.stride(0), h.stride(1),
        grad_h.stride(0), grad_h.stride(1), partial.stride(0), activation.alpha, activation.limit,
        ACT=_act_code(activation), GATED=activation.gated, INTERLEAVED=activation.interleaved,
        BLOCK_E=triton.next_power_of_2(num_experts), **_flags(a.dtype), **config,
    )
    return grad_h, partial


def weight_grad(a, b, offsets, out, *, a_rows=None, a_activation=None, b_rows=None, scale=None, bias_grad=None):
    """``out[e] = sum over expert e's rows of A'[r]^T B'[r]`` into ``out`` ``[E, K, N]`` (any strides).

    A' is ``a[a_rows]``, or the activation of ``a`` (the pre-activation H, ``[M, 2K]`` if gated);
    B' is ``b[b_rows] * scale``. ``bias_grad`` ``[E, N]``, if given, receives B's column sums.
    """
    num_experts, kd, nd = out.shape
    config = _config(nd, kd)
    grid = (num_experts, triton.cdiv(kd, config["BLOCK_K"]), triton.cdiv(nd, config["BLOCK_N"]))
    gated = a_activation is not None and a_activation.gated
    _weight_grad_kernel[grid](
        a, a_rows if a_rows is not None else offsets, b, b_rows if b_rows is not None else offsets,
        scale if scale is not None else b, out, bias_grad if bias_grad is not None else out, offsets,
        kd, nd,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        bias_grad.stride(0) if bias_grad is not None else 0,
        a_activation.alpha if a_activation is not None else 0.0, a_activation.limit if a_activation is not None else 0.0,
        A_GATHER=a_rows is not None, A_ACT=_act_code(a_activation), GATED=gated,
        INTERLEAVED=gated and a_activation.interleaved, B_GATHER=b_rows is not None, B_SCALE=scale is not None,
        BIAS_GRAD=bias_grad is not None, **_flags(b.dtype), **config,
    )
    return out

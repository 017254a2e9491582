"""FP8 (e4m3) block quantization: ``x ~= q * scale`` with one float32 scale per block of
``BLOCK_ROWS x block_cols`` elements, bit for bit the recipes of ``ops/fp8.py`` (amax / 448, or a
power of two read from amax's exponent bits for MX).

One program per block: a first sweep over its columns takes the absolute maximum, a second
scales, saturates and rounds (to nearest even) into e4m3.
"""

import torch
import triton
import triton.language as tl

from . import interpreting

E4M3_MAX = 448.0
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _round_to_e4m3(v):
    """``v`` (within +-448) rounded to nearest even on the e4m3 grid, in float32. Triton 3.9's
    interpreter casts to fp8 without carrying a rounded-up mantissa into the exponent (124.5 ->
    64) and misrounds subnormals; after this its cast is exact. Not needed on a GPU."""
    a = tl.abs(v)
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: 2**-6's ulp
    ulp = tl.exp2((exponent - 3).to(tl.float32))
    rounded = ((a / ulp + 8388608.0) - 8388608.0) * ulp  # adding 2**23 rounds to an integer, half to even
    return tl.where(v < 0, -rounded, rounded)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, M, K, block_cols,
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sk,
    TINY: tl.constexpr, BLOCK_ROWS: tl.constexpr, CHUNK: tl.constexpr, POW2: tl.constexpr, ROUND_FIRST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    start = tl.program_id(1) * block_cols
    end = tl.minimum(start + block_cols, K)
    row_ok = rows < M
    amax = tl.zeros((BLOCK_ROWS, CHUNK), tl.float32)
    for c in range(start, end, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols < end)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    block_max = tl.max(tl.max(amax, axis=1), axis=0)
    if POW2:
        exponent = ((block_max.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 8
        exponent = tl.minimum(tl.maximum(exponent, -127), 127)
        scale = tl.exp2(exponent.to(tl.float32))
    else:
        scale = tl.maximum(block_max / 448.0, TINY)
    for c in range(start, end, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols < end)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        scaled = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0)
        if ROUND_FIRST:
            scaled = _round_to_e4m3(scaled)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, scaled.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + tl.program_id(0) * stride_sm + tl.program_id(1) * stride_sk, scale)


def quantize(x: torch.Tensor, block_rows: int, block_cols: int, power_of_two: bool = False):
    """(q e4m3 ``[M, K]``, float32 scales ``[ceil(M/rows), ceil(K/cols)]``); 0 is the whole dim."""
    m, k = x.shape
    block_rows, block_cols = block_rows or m, block_cols or k
    torch._check(block_rows & (block_rows - 1) == 0, lambda: f"block rows must be a power of two, got {block_rows}")
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(triton.cdiv(m, block_rows), triton.cdiv(k, block_cols), dtype=torch.float32, device=x.device)
    chunk = min(triton.next_power_of_2(block_cols), 16 if interpreting() else 128)
    _quantize_kernel[scales.shape](
        x, q, scales, m, k, block_cols, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        scales.stride(0), scales.stride(1), TINY=_TINY, BLOCK_ROWS=block_rows, CHUNK=chunk, POW2=power_of_two,
        ROUND_FIRST=interpreting(),
    )
    return q, scales

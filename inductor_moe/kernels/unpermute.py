"""Unpermute-reduce: each token's k expert rows, weighted and summed in float32.

    out[t] = sum_j weights[t, j] * rows[inverse[t * k + j]]      (weights None: a plain sum)

One program per block of tokens and columns; no atomics, so the result is deterministic.
"""

import triton
import triton.language as tl

from . import cdiv, interpreting, launchable, next_power_of_2


@triton.jit
def _unpermute_reduce_kernel(
    rows_ptr, inverse_ptr, weights_ptr, out_ptr, T, N,
    stride_rm, stride_rn, stride_om, stride_on,
    K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < T
    mask = token_ok[:, None] & (cols < N)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for j in tl.static_range(K):
        row = tl.load(inverse_ptr + tokens * K + j, mask=token_ok, other=0)
        values = tl.load(rows_ptr + row[:, None].to(tl.int64) * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        if HAS_WEIGHTS:
            values = values.to(tl.float32) * tl.load(weights_ptr + tokens * K + j, mask=token_ok, other=0.0).to(tl.float32)[:, None]
        acc += values.to(tl.float32)
    out = out_ptr + tokens[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def unpermute_reduce(rows, inverse, weights, num_tokens, k, out_dtype=None):
    """``[T, N]`` sums of each token's k rows of ``rows`` (expert-sorted), weighted by ``weights`` ``[T, k]``."""
    n = rows.shape[1]
    out = rows.new_empty(num_tokens, n, dtype=out_dtype or rows.dtype)
    block_t, block_n = (16, 16) if interpreting() else (8, min(256, next_power_of_2(n)))
    grid = (cdiv(num_tokens, block_t), cdiv(n, block_n))
    launchable(_unpermute_reduce_kernel, out)[grid](
        rows, inverse, weights.contiguous() if weights is not None else inverse, out, num_tokens, n,
        rows.stride(0), rows.stride(1), out.stride(0), out.stride(1),
        K=k, HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out

"""Activation functions for kernel epilogues, forward and derivative, in float32.

The same functions as ``inductor_moe.ops.activations`` (the torch reference). A kernel takes the
function as a ``tl.constexpr`` code from ``CODES``.
"""

import triton
import triton.language as tl

SILU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
RELU = tl.constexpr(3)
SWIGLU_OAI = tl.constexpr(4)
CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}


# Builtins and literals only (tl.exp, not tl.sigmoid; no constexpr globals in arithmetic): Triton's
# interpreter fails on jit functions nested four calls deep, and these helpers run inside helpers.
# Constants: 1/sqrt(2) = 0.70710678, sqrt(2/pi) = 0.79788456, 1/sqrt(2 pi) = 0.39894228.


@triton.jit
def act_forward(x, ACT: tl.constexpr):
    if ACT == SILU:
        y = x / (1 + tl.exp(-x))
    elif ACT == GELU:
        y = 0.5 * x * (1 + tl.erf(x * 0.7071067811865476))
    elif ACT == GELU_TANH:
        # tanh(z) = 1 - 2 / (exp(2z) + 1), written out: Triton has no tanh on every backend
        y = 0.5 * x * (2 - 2 / (tl.exp(1.5957691216057308 * (x + 0.044715 * x * x * x)) + 1))
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def act_derivative(x, ACT: tl.constexpr):
    if ACT == SILU:
        s = 1 / (1 + tl.exp(-x))
        d = s * (1 + x * (1 - s))
    elif ACT == GELU:
        d = 0.5 * (1 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == GELU_TANH:
        t = 1 - 2 / (tl.exp(1.5957691216057308 * (x + 0.044715 * x * x * x)) + 1)
        d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    else:
        d = tl.where(x > 0, 1.0, 0.0)
    return d


@triton.jit
def gated_forward(gate, up, ACT: tl.constexpr, alpha, limit):
    """``act(gate) * up``, or gpt-oss's clamped SwiGLU."""
    if ACT == SWIGLU_OAI:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        y = (u + 1) * g / (1 + tl.exp(-alpha * g))
    else:
        y = act_forward(gate, ACT) * up
    return y


@triton.jit
def gated_backward(gate, up, grad, ACT: tl.constexpr, alpha, limit):
    """(d gate, d up) of ``gated_forward`` given the output's gradient."""
    if ACT == SWIGLU_OAI:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        s = 1 / (1 + tl.exp(-alpha * g))
        grad_gate = tl.where(gate <= limit, grad * (u + 1) * s * (1 + alpha * g * (1 - s)), 0.0)
        grad_up = tl.where(tl.abs(up) <= limit, grad * g * s, 0.0)
    else:
        grad_gate = grad * up * act_derivative(gate, ACT)
        grad_up = grad * act_forward(gate, ACT)
    return grad_gate, grad_up


@triton.jit
def load_operand_rows(ptr, rows_ptr, rows, row_ok, first_col, width, stride_m, stride_n, alpha, limit,
                      GATHER: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
                      BLOCK_COLS: tl.constexpr):
    """float32 ``x[rows_ptr[rows], cols]`` (GATHER) or ``x[rows, cols]``, cols the BLOCK_COLS
    from ``first_col``; with an activation, its value on those rows of the pre-activation x
    (gated: gate and up columns, ``width`` each, interleaved or in halves), recomputed because it
    was never kept. Zero outside the rows and the width."""
    sources = tl.load(rows_ptr + rows, mask=row_ok, other=0) if GATHER else rows
    cols = first_col + tl.arange(0, BLOCK_COLS)
    mask = row_ok[:, None] & (cols < width)[None, :]
    base = ptr + sources[:, None].to(tl.int64) * stride_m
    if ACT >= 0:
        if GATED and INTERLEAVED:  # (gate, up) pairs: one contiguous load (vectorized), split in registers
            pair_cols = 2 * first_col + tl.arange(0, 2 * BLOCK_COLS)
            pairs = tl.load(base + pair_cols[None, :] * stride_n, mask=row_ok[:, None] & (pair_cols < 2 * width)[None, :],
                            other=0.0)
            gate, up = tl.split(tl.reshape(pairs.to(tl.float32), (rows.shape[0], BLOCK_COLS, 2)))
            x = gated_forward(gate, up, ACT, alpha, limit)
        elif GATED:
            gate = tl.load(base + cols[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(base + (cols + width)[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
            x = gated_forward(gate, up, ACT, alpha, limit)
        else:
            x = act_forward(tl.load(base + cols[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32), ACT)
        x = tl.where(mask, x, 0.0)
    else:
        x = tl.load(base + cols[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
    return x

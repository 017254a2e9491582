"""FP8 (e4m3) quantization recipes, in torch: the definition the Triton quantizers must match bit
for bit, and the CPU path (real e4m3 rounding, the same scales, matmuls in higher precision).

A recipe splits a 2-D tensor ``[M, K]`` into blocks of ``rows x cols`` elements (K is the reduced
dimension of the GEMM) and gives each block one float32 scale, ``x ~= q * scale`` with ``q`` in
``torch.float8_e4m3fn``:

    rowwise     a block per row (1 x K): a scale per activation row, per weight output row
    blockwise   1 x 128 activation tiles, 128 x 128 weight blocks (DeepSeek-V3, DeepGEMM)
    mxfp8       1 x 32 blocks along K with a power-of-two scale (OCP MX, E8M0)

rowwise and blockwise scale a block's absolute maximum onto e4m3's largest value, 448
(``scale = amax / 448``, at least float32's smallest normal so that all-zero and subnormal blocks
stay finite); mxfp8 takes ``2 ** (floor(log2(amax)) - 8)``, 8 being e4m3's largest exponent
(``floor(log2)`` read from amax's exponent bits, so zero and subnormal blocks get 2 ** -127), and
saturates the few values that land above 448, as the MX spec does. ``kernels/quantize.py``
computes the same bits.

A weight gradient ``dW[e] = A_e^T G_e`` reduces over expert e's rows (tokens): both operands are
blocked along those rows, ``SEGMENT_ROWS[recipe]`` rows x 1 column, the blocks starting at each
expert's first row so that no block spans two experts (rowwise: the whole segment).
"""

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_EMAX = 8  # 448 = 1.75 * 2**8
_TINY = torch.finfo(torch.float32).tiny

# recipe -> (block rows, block cols) for activations and weights ([out, K] layout); 0 is "all"
RECIPES = {
    "rowwise": ((1, 0), (1, 0)),
    "blockwise": ((1, 128), (128, 128)),
    "mxfp8": ((1, 32), (1, 32)),
}
# recipe -> rows of a weight gradient operand's blocks along the reduced token dim (0: the segment)
SEGMENT_ROWS = {"rowwise": 0, "blockwise": 128, "mxfp8": 32}


def _blocks(x: Tensor, rows: int, cols: int) -> tuple[Tensor, int, int]:
    """``x`` ``[..., M, K]`` zero-padded and viewed as ``[..., M / rows, rows, K / cols, cols]``
    blocks (0: the whole dim); batch dims (experts) never share a block."""
    m, k = x.shape[-2:]
    rows, cols = rows or m, cols or k
    padded = torch.nn.functional.pad(x.float(), (0, -k % cols, 0, -m % rows))
    pm, pk = padded.shape[-2:]
    return padded.view(*x.shape[:-2], pm // rows, rows, pk // cols, cols), m, k


def block_scales(x: Tensor, rows: int, cols: int, power_of_two: bool = False) -> Tensor:
    """One float32 scale per ``rows x cols`` block of ``x`` ``[..., M, K]``: ``[..., ceil(M/rows), ceil(K/cols)]``."""
    blocks, _, _ = _blocks(x, rows, cols)
    return scale_of(blocks.abs().amax(dim=(-3, -1)), power_of_two)


def scale_of(amax: Tensor, power_of_two: bool) -> Tensor:
    """The float32 scale of a block with absolute maximum ``amax``."""
    if power_of_two:  # floor(log2(amax)): amax's unbiased exponent field (-127 for zero and subnormals)
        exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - 127 - E4M3_EMAX
        return torch.ldexp(torch.ones_like(amax), exponent.clamp(-127, 127))
    return (amax / E4M3_MAX).clamp(min=_TINY)


def to_e4m3(x: Tensor, scales: Tensor) -> Tensor:
    """``x / scales`` rounded to nearest even in e4m3, saturated (e4m3fn has no infinity)."""
    return (x.float() / scales).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize(x: Tensor, rows: int, cols: int, power_of_two: bool = False) -> tuple[Tensor, Tensor]:
    """(q e4m3 like ``x`` ``[..., M, K]``, scales ``[..., ceil(M/rows), ceil(K/cols)]``), ``x ~= q * scale`` per block."""
    torch._check(x.dim() >= 2 and x.is_floating_point(), lambda: f"inductor_moe.fp8: x must be float [..., M, K], got {x.shape}")
    scales = block_scales(x, rows, cols, power_of_two)
    blocks, m, k = _blocks(x, rows, cols)
    q = to_e4m3(blocks, scales[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :m, :k]
    return q, scales


def dequantize(q: Tensor, scales: Tensor, rows: int, cols: int) -> Tensor:
    """float32 ``q * scale`` per block: the values an FP8 GEMM multiplies."""
    m, k = q.shape[-2:]
    rows, cols = rows or m, cols or k
    expanded = scales.repeat_interleave(rows, dim=-2)[..., :m, :].repeat_interleave(cols, dim=-1)[..., :k]
    return q.float() * expanded


def fake_quantize(x: Tensor, recipe: str, operand: str) -> Tensor:
    """``x`` rounded as ``recipe`` rounds a GEMM's activation (``operand="a"``, ``[M, K]``) or its
    weight (``"w"``, ``[..., out, K]``), in float32; K is the reduced dimension."""
    rows, cols = RECIPES[recipe][operand == "w"]
    power_of_two = recipe == "mxfp8"
    return dequantize(*quantize(x, rows, cols, power_of_two), rows, cols)


def fake_quantize_segments(x: Tensor, offsets: Tensor, recipe: str) -> Tensor:
    """``x`` ``[M, N]``, rows sorted by expert (int32 ``offsets``: each expert's end), rounded as
    ``recipe`` rounds a weight gradient's operand: blocks of ``SEGMENT_ROWS`` rows x 1 column
    starting at each expert's first row. float32; no data-dependent shapes."""
    rows = torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype)
    start = torch.nn.functional.pad(offsets, (1, 0))[torch.searchsorted(offsets, rows, right=True)]
    size = SEGMENT_ROWS[recipe]
    first = (start + (rows - start) // size * size if size else start).long()  # each row's block
    amax = torch.zeros_like(x, dtype=torch.float32).scatter_reduce(
        0, first[:, None].expand(x.shape), x.abs().float(), "amax"
    )
    scales = scale_of(amax, recipe == "mxfp8")[first]
    return to_e4m3(x, scales).float() * scales

"""Counting sort of (token, slot) pairs by expert, with no host synchronisation and no atomics.

For the flat expert ids of the pairs (``pair = token * k + slot``):

    order[r]        the pair in row r of the expert-sorted layout (stable: pairs keep their order)
    inverse[pair]   the row of a pair, so that inverse[order[r]] == r
    token_of_row[r] order[r] // k, the token row r reads
    offsets[e]      the end of expert e's rows (int32, the layout torch._grouped_mm takes)

Three kernels: per-block histograms, one program that scans them, a stable scatter per block.
``tile_starts`` pads the experts' rows to a GEMM block: its tiles never span two experts.
"""

import torch
import triton
import triton.language as tl

from . import cdiv, interpreting, launchable, next_power_of_2


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, S, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    pairs = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < S, other=-1)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + block * E + experts, counts, mask=experts < E)


@triton.jit
def _scan_kernel(counts_ptr, base_ptr, offsets_ptr, num_blocks, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """The experts' ends, and each block's first row per expert: CHUNK blocks' counts a step (a
    step per block waited on each load in turn: 0.2 ms for 1024 blocks on an H100)."""
    experts = tl.arange(0, BLOCK_E)
    valid = experts < E
    chunk = tl.arange(0, CHUNK)
    totals = tl.zeros((BLOCK_E,), tl.int32)
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + chunk
        mask = (blocks < num_blocks)[:, None] & valid[None, :]
        totals += tl.sum(tl.load(counts_ptr + blocks[:, None] * E + experts[None, :], mask=mask, other=0), axis=0)
    ends = tl.cumsum(totals, axis=0)
    tl.store(offsets_ptr + experts, ends, mask=valid)
    running = ends - totals
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + chunk
        mask = (blocks < num_blocks)[:, None] & valid[None, :]
        counts = tl.load(counts_ptr + blocks[:, None] * E + experts[None, :], mask=mask, other=0)
        tl.store(base_ptr + blocks[:, None] * E + experts[None, :], running[None, :] + tl.cumsum(counts, axis=0) - counts,
                 mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_kernel(
    ids_ptr, base_ptr, order_ptr, inverse_ptr, token_ptr, S, E, K, BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    pairs = block * BLOCK + lanes
    valid = pairs < S
    ids = tl.load(ids_ptr + pairs, mask=valid, other=-1)
    # rank among the pairs of the same expert earlier in this block: keeps the sort stable
    earlier = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    rows = tl.load(base_ptr + block * E + ids, mask=valid, other=0) + rank
    tl.store(order_ptr + rows, pairs, mask=valid)
    tl.store(token_ptr + rows, pairs // K, mask=valid)
    tl.store(inverse_ptr + pairs, rows, mask=valid)


def align(ids: torch.Tensor, num_experts: int):
    """(order, inverse, token_of_row, offsets) for ``ids`` ``[T, k]``; all int32."""
    num_tokens, k = ids.shape
    flat = ids.reshape(-1).contiguous()
    pairs = flat.numel()
    block = 16 if interpreting() else 128
    num_blocks = torch.sym_max(1, cdiv(pairs, block))  # the token count may be symbolic (traced)
    block_e = next_power_of_2(num_experts)
    device = ids.device
    # [num_blocks * E], flat: a 2-D buffer's layout check asks whether num_blocks is 1, which traced
    # for Inductor is a guard on the token count (a recompile when it changes)
    counts, base = (torch.empty(num_blocks * num_experts, device=device, dtype=torch.int32) for _ in range(2))
    offsets = torch.empty(num_experts, device=device, dtype=torch.int32)
    order = torch.empty(pairs, device=device, dtype=torch.int32)
    inverse = torch.empty_like(order)
    token_of_row = torch.empty_like(order)
    launchable(_count_kernel, flat)[(num_blocks,)](flat, counts, pairs, num_experts, BLOCK=block, BLOCK_E=block_e)
    launchable(_scan_kernel, counts)[(1,)](counts, base, offsets, num_blocks, num_experts, CHUNK=max(1, 4096 // block_e), BLOCK_E=block_e)
    launchable(_scatter_kernel, flat)[(num_blocks,)](flat, base, order, inverse, token_of_row, pairs, num_experts, k, BLOCK=block)
    return order, inverse, token_of_row, offsets


@triton.jit
def _tile_starts_kernel(offsets_ptr, tiles_ptr, E, block_m, BLOCK_E: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    valid = experts < E
    ends = tl.load(offsets_ptr + experts, mask=valid, other=0)
    begins = tl.load(offsets_ptr + experts - 1, mask=valid & (experts > 0), other=0)
    tiles = tl.cumsum((ends - begins + block_m - 1) // block_m, axis=0)
    tl.store(tiles_ptr + 1 + experts, tiles, mask=valid)
    tl.store(tiles_ptr + experts, tl.zeros_like(experts), mask=experts == 0)


def tile_starts(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """tiles[e]: the first ``block_m``-row tile of expert e, tiles[E]: their count (int32, on device).
    One launch: in torch ops it took eight, a few microseconds of host time each, per GEMM."""
    num_experts = offsets.shape[0]
    tiles = torch.empty(num_experts + 1, device=offsets.device, dtype=torch.int32)
    launchable(_tile_starts_kernel, offsets)[(1,)](offsets, tiles, num_experts, block_m, BLOCK_E=next_power_of_2(num_experts))
    return tiles


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the tiles, known without reading the counts: the GEMMs' grid size."""
    return cdiv(num_rows, block_m) + num_experts

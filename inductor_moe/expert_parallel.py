"""Expert parallelism over a torch.distributed process group: each rank owns E / world experts.

    out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])     (the experts op's contract)

with the experts spread over the ranks, rank r owning experts [r * E_local, (r + 1) * E_local):

1. the (token, slot) pairs are sorted by expert (the single-device counting sort): experts of one
   rank are contiguous, so the sorted rows are the send buffer, grouped by destination;
2. the per-expert counts go first (``all_to_all_single``), then the rows, in uneven splits;
3. the rows a rank receives (by source rank, then local expert) run through its local experts
   with the ``experts`` op (one slot each, weight 1);
4. the outputs go back by the reverse splits, and each token sums its k rows, weighted, in
   float32.

Everything is a functional collective (``torch.distributed._functional_collectives``) with
autograd, so torch.compile keeps the block in one graph and AOTAutograd derives the backward's
all-to-alls. The split sizes are read on the host (a collective of uneven splits needs them
there, as torchtitan's and Megatron's do); under torch.compile that takes
``torch._dynamo.config.capture_scalar_outputs = True``.

Eagerly, the ranks first compare their shapes (hidden size, local experts, expert width, k): ranks
that disagree fail with a clear error instead of a hang or garbage.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.distributed_c10d import _resolve_process_group

from . import config
from .ops import cpu

# what every rank must agree on
_SHAPE_FIELDS = ("hidden size", "local experts", "expert width", "top-k")


def local_experts(num_experts: int, group: dist.ProcessGroup | None = None) -> range:
    """The global ids of the experts this rank owns; a clear error if E is not divisible by the world."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % world:
        raise ValueError(f"inductor_moe.expert_parallel: {num_experts} experts cannot be split evenly over {world} ranks")
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def shard(weight: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's experts of a stacked expert weight or bias ``[E, ...]`` (a view)."""
    owned = local_experts(weight.shape[0], group)
    return weight[owned.start:owned.stop]


def _check_shapes(shape: tuple[int, ...], group) -> None:
    """A clear error where ranks disagree on the block's shapes (the exchanges would otherwise hang
    or mix rows). Eager only: compiled, each rank's shapes are fixed when it compiles."""
    mine = torch.tensor(shape)
    gathered = funcol.wait_tensor(funcol.all_gather_tensor(mine, 0, group)).view(-1, len(shape))
    disagree = (gathered != mine).any(1).nonzero().flatten().tolist()
    if disagree:
        theirs = {rank: dict(zip(_SHAPE_FIELDS, gathered[rank].tolist(), strict=True)) for rank in disagree}
        raise ValueError(f"inductor_moe.expert_parallel: ranks disagree on the block's shapes: this rank has "
                         f"{dict(zip(_SHAPE_FIELDS, shape, strict=True))}, rank(s) {theirs}")


def received_expert_ids(received: Tensor, num_rows) -> Tensor:
    """The local expert of each received row, ``[num_rows, 1]``: the rows come by source rank, then
    local expert, ``received[s, e]`` rows from rank s for expert e (the all-to-all's layout)."""
    sources, per_rank = received.shape
    return torch.arange(per_rank, device=received.device).repeat(sources).repeat_interleave(
        received.reshape(-1), output_size=num_rows)[:, None]


def experts(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None = None,
            b2: Tensor | None = None, activation: str = "swiglu", group: dist.ProcessGroup | None = None,
            **options) -> Tensor:
    """The ``experts`` op with its experts spread over ``group``: x ``[T, H]``, ids and weights
    ``[T, k]`` (global expert ids), w1 ``[E_local, H, N]``, w2 ``[E_local, I, H]`` and biases this
    rank's experts (``local_experts``); ``options``: the op's (interleaved, alpha, limit, fp8_recipe,
    ...). Returns ``[T, H]`` in x's dtype. Every rank of the group (default: the world) must call
    it (T may differ, 0 included)."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    per_rank = w1.shape[0]
    num_tokens, k = ids.shape
    flat = ids.reshape(-1)
    order, ends = cpu.sort_by_expert(flat, per_rank * world)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).view(world, per_rank)
    if not (torch.compiler.is_compiling() or is_fake(x)):  # eager only (torch 2.11's AOT tracing is not "compiling")
        _check_shapes((x.shape[1], per_rank, w1.shape[2], k), group)
    # received[s, e]: rows source rank s sends to this rank's local expert e
    received = funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, group))
    send_splits = counts.sum(1).tolist()
    recv_splits = received.sum(1).tolist()
    token = order // k  # each sorted pair's token
    rows = funcol.all_to_all_single_autograd(x.index_select(0, token), recv_splits, send_splits, group)
    local_ids = received_expert_ids(received, rows.shape[0])
    ones = rows.new_ones(rows.shape[0], 1, dtype=torch.float32)
    outputs = torch.ops.inductor_moe.experts(rows, local_ids, ones, w1, w2, b1, b2, activation, **options)[0]
    back = funcol.all_to_all_single_autograd(outputs, send_splits, recv_splits, group)
    acc = cpu.accumulation_dtype(x.dtype)
    scaled = back.to(acc) * weights.reshape(-1).index_select(0, order).to(acc)[:, None]
    return x.new_zeros(num_tokens, x.shape[1], dtype=acc).index_add(0, token, scaled).to(x.dtype)


def parallelize(group: dist.ProcessGroup | None = None):
    """Context manager (or decorator) under which torch.compile runs every MoE block it rewrites
    expert-parallel over ``group`` (default: the world): each rank computes E / world experts,
    for every rank's tokens. The model stays as written, every rank holding every expert's
    weights; a rank's gradient of the others' experts is zero, so averaging gradients over the
    group (DDP, FSDP) gives each expert its gradient of every rank's tokens. The token exchange
    reads its split sizes on the host: compile with
    ``torch._dynamo.config.capture_scalar_outputs = True``."""
    group = group or dist.group.WORLD
    return config.patch(expert_parallel=group.group_name)


def experts_of_group(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None,
                     b2: Tensor | None, activation: str, group_name: str, **options) -> Tensor:
    """``experts`` for the whole stacked weights: this rank's share of them over the named group
    (what a rewritten block runs under ``parallelize``)."""
    group = _resolve_process_group(group_name)
    local = [None if w is None else shard(w, group) for w in (w1, w2, b1, b2)]
    return experts(x, ids, weights, *local, activation, group, **options)

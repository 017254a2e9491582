"""Expert parallelism (inductor_moe.expert_parallel) on gloo, 2 and 4 processes on 127.0.0.1: each
rank's tokens through experts spread over the ranks against the single-process experts op with all
the experts, forward and every gradient, eager and compiled; uneven and empty splits, an expert
with no tokens, a rank with no tokens, T = 1; clear errors for experts not divisible by the world
and for ranks that disagree on shapes. torchtitan's expert-parallel layer (DTensor-sharded experts,
its all-to-all dispatcher) compiled with its local experts rewritten, against one process; that
local part alone on one process, with near misses left alone."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import assert_close, rewrites
from torch import nn

import inductor_moe
from inductor_moe import expert_parallel

HIDDEN, INNER = 16, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(num_experts: int):
    """The full expert weights, the same on every rank (one seed)."""
    generator = torch.Generator().manual_seed(1234)
    w1 = torch.randn(num_experts, HIDDEN, 2 * INNER, generator=generator) * HIDDEN**-0.5
    w2 = torch.randn(num_experts, INNER, HIDDEN, generator=generator) * INNER**-0.5
    return w1, w2


def _tokens(num_tokens: int, k: int, experts: list[int], seed: int):
    """x, ids (k distinct experts per token, drawn from ``experts``) and routing weights."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=generator)
    choices = torch.tensor(experts)
    ids = torch.stack([choices[torch.randperm(len(experts), generator=generator)[:k]] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(num_tokens, k, generator=generator).softmax(-1)
    return x, ids.reshape(num_tokens, k), weights


def _check(group, num_experts, num_tokens, k, experts, seed, compiled=None):
    """This rank's tokens through the experts spread over the group, against every expert on one
    process: output, grad of x and of the routing weights here, expert weight grads summed over
    the ranks' tokens."""
    rank = dist.get_rank(group)
    w1, w2 = _weights(num_experts)
    x, ids, weights = _tokens(num_tokens, k, experts, seed + rank)
    leaves = [t.clone().requires_grad_() for t in (x, weights)]
    local = [expert_parallel.shard(w, group).clone().requires_grad_() for w in (w1, w2)]
    run = compiled or expert_parallel.experts
    out = run(leaves[0], ids, leaves[1], *local, group=group)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100 + rank))
    out.backward(grad_out)

    reference = [t.clone().requires_grad_() for t in (x, weights, w1, w2)]
    expected = torch.ops.inductor_moe.experts(reference[0], ids, reference[1], reference[2], reference[3], None, None,
                                              "swiglu")[0]
    expected.backward(grad_out)
    for grad in (reference[2].grad, reference[3].grad):
        dist.all_reduce(grad, group=group)  # every rank's tokens reach the experts
    torch.testing.assert_close(out, expected, msg=f"rank {rank}: output")
    torch.testing.assert_close(leaves[0].grad, reference[0].grad, msg=f"rank {rank}: grad of x")
    torch.testing.assert_close(leaves[1].grad, reference[1].grad, msg=f"rank {rank}: grad of the routing weights")
    for name, leaf, full in zip(("w1", "w2"), local, reference[2:]):
        torch.testing.assert_close(leaf.grad, expert_parallel.shard(full.grad, group), msg=f"rank {rank}: grad of {name}")


def _check_parallelized_block(group, style: str, num_experts: int, tokens: int) -> None:
    """A block as written for one device, compiled under ``parallelize``: its rewrite runs the
    experts over the group. Output and input gradient as eager on this rank; parameter gradients,
    summed over the ranks (as data parallelism averages them), as eager's summed."""
    from inductor_moe import models

    torch.manual_seed(99)  # the same weights on every rank
    cfg = models.MoEConfig(hidden=HIDDEN, intermediate=INNER, num_experts=num_experts, top_k=2)
    model = models.build(style, cfg)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(dist.get_rank(group)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # the masked loop's torch.where(mask) is one graph only with dynamic output shapes captured
    dynamo = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
    with expert_parallel.parallelize(group), torch._dynamo.config.patch(**dynamo):
        compiled = torch.compile(model)
        runs = []
        for fn in (model, compiled):
            model.zero_grad()
            leaf = x.clone().requires_grad_()
            out = fn(leaf)
            out.square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            for grad in grads:
                dist.all_reduce(grad, group=group)
            runs.append((out.detach(), leaf.grad, grads))
    rewrites = dict(torch._dynamo.utils.counters["inductor_moe"])
    assert rewrites.get(f"{style}_experts") == 1, f"the block was not rewritten: {rewrites}"
    (out, grad_x, grads), (expected, expected_grad_x, expected_grads) = runs[1], runs[0]
    torch.testing.assert_close(out, expected, msg=f"{style}: output")
    torch.testing.assert_close(grad_x, expected_grad_x, msg=f"{style}: grad of x")
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, msg=f"{style}: grad of {name}")


def _check_torchtitan(group, tokens: int, skewed: bool) -> None:
    """torchtitan's expert-parallel MoE layer (DTensor-sharded experts, all-to-all dispatcher),
    compiled: each rank's experts rewritten, output and gradients as the layer on one process with
    every expert. ``skewed``: every token chooses experts 0 and 1, all on rank 0 (the other ranks
    receive nothing)."""
    from torch.distributed.device_mesh import init_device_mesh

    from inductor_moe import models

    world = dist.get_world_size(group)
    cfg = models.MoEConfig(hidden=4 * HIDDEN, intermediate=2 * INNER, num_experts=2 * world, top_k=2)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    layers = []
    for ep_mesh in (mesh, None):
        torch.manual_seed(7)  # the same full weights on every rank and in both layers
        layer = models.torchtitan_moe(cfg, ep_mesh=ep_mesh).bfloat16()
        if skewed:
            layer.expert_bias_E[:2] += 10.0
        layers.append(layer)
    parallel, single = layers
    x = torch.randn(1, tokens, cfg.hidden, generator=torch.Generator().manual_seed(dist.get_rank(group)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(parallel, fullgraph=True)
        runs = []
        for fn in (compiled, single):
            leaf = x.bfloat16().requires_grad_()
            out = fn(leaf)
            out.float().square().sum().backward()
            runs.append((out.detach(), leaf.grad, {n: p.grad for n, p in fn.named_parameters()}))
    rewrites = dict(torch._dynamo.utils.counters["inductor_moe"])
    assert rewrites.get("received_grouped_mm_experts") == 1, f"the local experts were not rewritten: {rewrites}"
    (out, grad_x, grads), (expected, expected_grad_x, expected_grads) = runs
    assert_close(out, expected, torch.bfloat16, "torchtitan EP: output")
    assert_close(grad_x, expected_grad_x, torch.bfloat16, "torchtitan EP: grad of x")
    for name, grad in grads.items():
        expected_grad = expected_grads[name.removeprefix("_orig_mod.")]
        if isinstance(grad, torch.distributed.tensor.DTensor):  # this rank's experts, every rank's tokens
            dist.all_reduce(expected_grad, group=group)
            expected_grad, grad = expert_parallel.shard(expected_grad, group), grad.to_local()
        assert_close(grad, expected_grad, torch.bfloat16, f"torchtitan EP: grad of {name}")


def _worker(rank: int, world: int, port: int, styles: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    # as conftest's fixtures have it: every compile runs the passes, CPU tensors run the torch code
    torch._inductor.config.force_disable_caches = True
    inductor_moe.config.triton_on_cpu = False
    try:
        group = dist.group.WORLD
        num_experts = 2 * world
        every = list(range(num_experts))
        _check(group, num_experts, 5 + 7 * rank, 2, every, seed=0)  # uneven splits, T differs per rank
        _check(group, num_experts, 0 if rank == 0 else 9, 2, every, seed=1)  # a rank with no tokens
        _check(group, num_experts, 1, 1, every, seed=2)  # T = 1
        _check(group, num_experts, 6, 2, [e for e in every if e != 1], seed=3)  # an expert with no tokens
        _check(group, num_experts, 6, 2, [0, 1], seed=4)  # everything to rank 0: the other splits empty

        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(expert_parallel.experts, fullgraph=True)  # no graph break at the collectives
            _check(group, num_experts, 5 + 7 * rank, 2, every, seed=5, compiled=compiled)
            _check(group, num_experts, 11, 2, every, seed=6, compiled=compiled)

        for style in styles:
            _check_parallelized_block(group, style, num_experts, tokens=3 + 5 * rank)
        _check_torchtitan(group, tokens=5 + 3 * rank, skewed=False)
        _check_torchtitan(group, tokens=4, skewed=True)

        with pytest.raises(ValueError, match=f"{num_experts + 1} experts cannot be split evenly over {world} ranks"):
            expert_parallel.shard(torch.zeros(num_experts + 1, 3), group)
        w1, w2 = _weights(num_experts)
        x, ids, weights = _tokens(4, 2, every, seed=7)
        if rank == world - 1:  # this rank's block is wider: every rank refuses
            w1, w2, x = torch.zeros(num_experts, HIDDEN + 1, 2 * INNER), torch.zeros(num_experts, INNER, HIDDEN + 1), \
                torch.zeros(4, HIDDEN + 1)
        with pytest.raises(ValueError, match="ranks disagree on the block's shapes"):
            expert_parallel.experts(x, ids, weights, expert_parallel.shard(w1, group), expert_parallel.shard(w2, group),
                                    group=group)
    finally:
        dist.destroy_process_group()


class ReceivedExperts(nn.Module):
    """One rank's experts as torchtitan's all-to-all dispatcher runs them: rows that came by source
    rank, then local expert (``counts[r, e]`` of each), regrouped expert-major, a SwiGLU grouped MLP,
    put back in the order they came. ``variant`` spells it otherwise, or a near miss that must be
    left alone."""

    def __init__(self, per_rank: int, variant: str = "torchtitan"):
        super().__init__()
        self.variant = variant
        self.w1, self.w3 = (nn.Parameter(torch.randn(per_rank, INNER, HIDDEN) * HIDDEN**-0.5) for _ in range(2))
        self.w2 = nn.Parameter(torch.randn(per_rank, HIDDEN, INNER) * INNER**-0.5)

    def forward(self, rows, counts):
        ranks, per_rank = counts.shape
        flat = counts.reshape(-1)
        starts = (flat.cumsum(0) - flat).view(ranks, per_rank)
        lens, starts = counts.t().reshape(-1), starts.t().reshape(-1)
        if self.variant == "rank_major":  # segments placed where they are: the rows stay grouped by rank
            lens, starts = flat, starts.view(per_rank, ranks).t().reshape(-1)
        segment = torch.arange(lens.shape[0]).repeat_interleave(lens, output_size=rows.shape[0])
        if self.variant == "other_spellings":  # the terms in another order, index_select for indexing
            out_starts = torch.index_select(lens.cumsum(0) - lens, 0, segment)
            order = torch.arange(rows.shape[0]) - out_starts + starts.index_select(0, segment)
            grouped = rows.index_select(0, order)
        else:
            order = starts[segment] + torch.arange(rows.shape[0]) - (lens.cumsum(0) - lens)[segment]
            grouped = rows[order]
        offsets = torch.cumsum(counts.sum(0), dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(grouped, self.w1.transpose(1, 2), offs=offsets))
        h = h * torch._grouped_mm(grouped, self.w3.transpose(1, 2), offs=offsets)
        out = torch._grouped_mm(h, self.w2.transpose(1, 2), offs=offsets)
        if self.variant == "other_spellings":  # put back by the inverse order
            return out[order.argsort()]
        back = out.new_empty(rows.shape)
        back[order.flip(0) if self.variant == "put_back_reversed" else order] = out
        return back


def _received(ranks: int, per_rank: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (ranks, per_rank), generator=generator)
    counts[0, -1] = 0  # a source that sends an expert nothing
    rows = torch.randn(int(counts.sum()), HIDDEN, generator=generator).bfloat16()
    return rows, counts


@pytest.mark.parametrize("variant", ["torchtitan", "other_spellings"])
def test_received_rows_become_the_experts_op(variant):
    """The local part alone, on one process: rewritten, and as eager, output and gradients."""
    model = ReceivedExperts(per_rank=3, variant=variant).bfloat16()
    compiled = torch.compile(model, dynamic=True)
    for seed in range(2):  # the counts, and so the regrouping, differ per step
        rows, counts = _received(ranks=2, per_rank=3, seed=seed)
        runs = []
        for fn in (model, compiled):
            leaf = rows.clone().requires_grad_()
            out = fn(leaf, counts)
            out.float().square().sum().backward()
            runs.append([out.detach(), leaf.grad, *(p.grad for p in model.parameters())])
            model.zero_grad()
        for name, actual, expected in zip(("output", "grad of rows", "w1", "w3", "w2"), *runs[::-1]):
            assert_close(actual, expected, torch.bfloat16, name)
    assert rewrites() == {"received_grouped_mm_experts": 1}


@pytest.mark.parametrize("variant", ["rank_major", "put_back_reversed"])
def test_received_rows_near_misses_are_left_alone(variant):
    model = ReceivedExperts(per_rank=3, variant=variant).bfloat16()
    rows, counts = _received(ranks=2, per_rank=3, seed=0)
    report = inductor_moe.explain(model, rows, counts)
    assert report.rewritten == [] and report.left_alone, str(report)
    assert_close(torch.compile(model)(rows, counts), model(rows, counts), torch.bfloat16, variant)


# the compiled blocks, the slowest part (4 processes share this machine's 2 cores): both on 2 ranks
@pytest.mark.parametrize("world, styles", [(2, ("dense_loop", "masked_loop")), (4, ("dense_loop",))])
def test_expert_parallel_matches_one_process(world, styles):
    mp.spawn(_worker, args=(world, _free_port(), styles), nprocs=world, join=True)

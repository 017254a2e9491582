"""Expert parallelism (inductor_moe.expert_parallel) on gloo, 2 and 4 processes on 127.0.0.1: each
rank's tokens through experts spread over the ranks against the single-process experts op with all
the experts, forward and every gradient, eager and compiled; uneven and empty splits, an expert
with no tokens, a rank with no tokens, T = 1; clear errors for experts not divisible by the world
and for ranks that disagree on shapes."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


# the compiled blocks, the slowest part (4 processes share this machine's 2 cores): both on 2 ranks
@pytest.mark.parametrize("world, styles", [(2, ("dense_loop", "masked_loop")), (4, ("dense_loop",))])
def test_expert_parallel_matches_one_process(world, styles):
    mp.spawn(_worker, args=(world, _free_port(), styles), nprocs=world, join=True)

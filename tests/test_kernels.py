"""Triton kernels against float64 references: on CUDA when there is one, else on CPU under
Triton's interpreter (conftest turns it on). Every kernel writes into poisoned memory, so a
value it forgets to write shows up as NaN."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, assert_matches_eager
from references import OPERANDS, make_experts, reference_experts, reference_route

import inductor_moe
from inductor_moe import accuracy, benchmark, models
from inductor_moe.kernels import align, grouped_gemm, routing, unpermute
from inductor_moe.ops import triton_impl
from inductor_moe.ops.activations import Activation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 tolerances: a GPU's float32 products differ from float64 by more than a CPU's
EXACT = torch.float32
LOW = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.bfloat16}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """New tensors start as NaN (floats) or -7 (integers) instead of whatever memory held."""

    def poison(tensor):
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -7)

    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _original=original, **k: poison(_original(*a, **k)))


# --- routing ------------------------------------------------------------------------------------

ROUTERS = {
    "softmax": dict(renormalize=False),
    "softmax, renormalised": dict(renormalize=True),
    "sigmoid, bias, groups, scale": dict(renormalize=True, sigmoid=True, n_group=8, topk_group=3, scale=2.5, bias=True),
    "sigmoid, groups of 2": dict(renormalize=False, sigmoid=True, n_group=4, topk_group=1),
    "sigmoid, groups filled with 0": dict(renormalize=True, sigmoid=True, n_group=4, topk_group=2, group_fill=0.0, bias=True),
    "top-k of the logits": dict(renormalize=False, choose_on_logits=True, scale=0.5),
    "top-k of the logits, sigmoid": dict(renormalize=True, sigmoid=True, choose_on_logits=True, scale=2.0),
    "softmax, groups ranked by their best": dict(renormalize=False, n_group=4, topk_group=2, group_top=1, group_fill=0.0),
    "sigmoid, renormalised with an eps": dict(renormalize=True, sigmoid=True, eps=1e-6),  # LFM2-MoE's
}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 1), (37, 16, 2), (20, 64, 8), (70, 32, 4)])
def test_route_kernel(router, tokens, experts, k):
    options = dict(ROUTERS[router])
    if "group_fill" in options:
        logits_shift = -4.0  # sigmoid scores plus a negative bias: some kept choices fall below 0
    elif "eps" in options:
        logits_shift = -14.0  # sigmoid scores about the eps: it changes the weights by half
    else:
        logits_shift = 0.0
    if options.get("n_group", 1) > experts // 2 or options.get("topk_group", 1) * experts // options.get("n_group", 1) < k:
        pytest.skip("not enough experts in the kept groups")
    bias = 0.1 * torch.randn(experts, device=DEVICE) if options.pop("bias", False) else None
    logits = torch.randn(tokens, experts, device=DEVICE) + logits_shift
    if bias is not None and logits_shift:
        bias -= 0.5
    weights, ids = routing.route(logits, k, bias=bias, **options)
    sigmoid = options.pop("sigmoid", False)
    choose_on_logits = options.pop("choose_on_logits", False)
    scoring = ("sigmoid" if sigmoid else "softmax") + ("_of_topk" if choose_on_logits else "")
    expected_weights, expected_ids = reference_route(logits.cpu(), k, scoring=scoring,
                                                     bias=None if bias is None else bias.cpu(), **options)
    assert torch.equal(ids.cpu().long(), expected_ids), "ids (best first, ties to the lowest index)"
    assert_close(weights.cpu(), expected_weights, EXACT, "weights")

    grad = torch.randn(tokens, k, device=DEVICE)
    x = logits.cpu().double().requires_grad_()
    scores = x.sigmoid() if sigmoid else x.softmax(-1)
    picked = scores.gather(-1, ids.cpu().long())
    eps = options.get("eps", 0.0)
    if choose_on_logits and not sigmoid:  # the softmax of the chosen logits
        picked = picked / picked.sum(-1, keepdim=True)
    if options["renormalize"]:
        picked = picked / (picked.sum(-1, keepdim=True) + eps)
    (expected,) = torch.autograd.grad(picked * options.get("scale", 1.0), x, grad.cpu().double())
    actual = routing.route_backward(grad, logits, ids, options["renormalize"], sigmoid, options.get("scale", 1.0), eps,
                                    choose_on_logits)
    assert_close(actual.cpu(), expected, EXACT, "grad of logits")
    if choose_on_logits:  # only the chosen logits were scored
        unchosen = torch.ones_like(actual, dtype=torch.bool).scatter(-1, ids.long(), False)
        assert (actual[unchosen] == 0).all(), "unchosen logits get a gradient"


# --- align --------------------------------------------------------------------------------------


# (300, 4, 64): more count blocks than the scan takes a step (a partial last step)
@pytest.mark.parametrize("tokens, k, experts", [(1, 1, 1), (1, 2, 4), (37, 2, 8), (100, 8, 64), (33, 3, 5), (300, 4, 64)])
def test_align(tokens, k, experts):
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]).to(DEVICE)
    order, inverse, token_of_row, offsets = align.align(ids, experts)
    flat = ids.reshape(-1).cpu()
    expected_order = torch.argsort(flat, stable=True)  # stable: pairs keep their order in an expert
    assert torch.equal(order.cpu().long(), expected_order)
    assert torch.equal(inverse.cpu().long()[expected_order], torch.arange(tokens * k))
    assert torch.equal(token_of_row.cpu().long(), expected_order // k)
    counts = torch.bincount(flat, minlength=experts)
    assert torch.equal(offsets.cpu(), counts.cumsum(0).int())
    for block in (16, 64):
        tiles = align.tile_starts(offsets, block).cpu()
        assert torch.equal(tiles, torch.cat([torch.zeros(1), ((counts + block - 1) // block).cumsum(0)]).int())
        assert tiles[-1] <= align.max_tiles(tokens * k, experts, block)


# --- grouped GEMMs ------------------------------------------------------------------------------

EPILOGUES = [None, *(Activation(n) for n in ("silu", "gelu", "gelu_tanh", "relu", "swiglu", "geglu", "geglu_tanh", "reglu")),
             Activation("swiglu", interleaved=True), Activation("swiglu_oai", interleaved=True, limit=1.0)]


def sorted_rows(tokens, k, experts):
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]).to(DEVICE)
    order, inverse, token_of_row, offsets = align.align(ids, experts)
    return ids.reshape(-1)[order.long()].cpu(), inverse, token_of_row, offsets


def expert_weights(experts, fan_in, fan_out, dtype, out_in):
    w = torch.randn(experts, *((fan_out, fan_in) if out_in else (fan_in, fan_out)), dtype=dtype, device=DEVICE)
    return (w * fan_in**-0.5).transpose(1, 2) if out_in else w * fan_in**-0.5


@pytest.mark.parametrize("act", EPILOGUES, ids=str)
@pytest.mark.parametrize("dtype, out_in, bias", [(torch.float32, True, True), (torch.bfloat16, False, False), (torch.float16, True, False)])
def test_gemm(act, dtype, out_in, bias):
    tokens, k, experts, hidden, inner = 29, 3, 6, 40, 24
    width = 2 * inner if act is not None and act.gated else inner
    experts_of_row, _, token_of_row, offsets = sorted_rows(tokens, k, experts)
    x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    w = expert_weights(experts, hidden, width, dtype, out_in)
    b = 0.1 * torch.randn(experts, width, dtype=dtype, device=DEVICE) if bias else None
    out, h = grouped_gemm.gemm(x, w, offsets, a_rows=token_of_row, bias=b, activation=act, store_h=act is not None)
    expected_h = torch.einsum("rk,rkn->rn", x.cpu()[token_of_row.cpu().long()].double(), w.cpu()[experts_of_row].double())
    if bias:
        expected_h += b.cpu()[experts_of_row].double()
    assert_close(out.cpu(), expected_h if act is None else act.forward(expected_h), LOW[dtype], "output")
    if act is not None:
        assert_close(h.cpu(), expected_h, LOW[dtype], "stored pre-activation")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's division by zero
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("group_m", [1, 5, 64])
def test_gemm_tile_order_covers_every_tile(group_m, persistent, monkeypatch):
    """Groups of row tiles (the last one short, or one group of all) by column tiles: each output
    tile computed (C starts uninitialized), by a program per tile or by three programs striding
    over them (persistent). Every token picks all 4 experts, 17 rows each: 8 row tiles of 16 (a
    grid of 9), so groups of 5 leave a short last group with three tiles to do; the ninth row
    tile's programs, past the last, compute no tile (nor a division by zero: groups of 1)."""
    config = grouped_gemm._config
    monkeypatch.setattr(grouped_gemm, "_config",
                        lambda *a, **k: config(*a, **k) | dict(GROUP_M=group_m, PERSISTENT=persistent))
    monkeypatch.setattr(grouped_gemm, "_sm_count", lambda device: 3)  # also on a GPU
    tokens, k, experts, hidden, width = 17, 4, 4, 32, 80
    experts_of_row, _, token_of_row, offsets = sorted_rows(tokens, k, experts)
    x = torch.randn(tokens, hidden, device=DEVICE)
    w = expert_weights(experts, hidden, width, torch.float32, False)
    out, _ = grouped_gemm.gemm(x, w, offsets, a_rows=token_of_row)
    expected = torch.einsum("rk,rkn->rn", x.cpu()[token_of_row.cpu().long()].double(), w.cpu()[experts_of_row].double())
    assert_close(out.cpu(), expected, LOW[torch.float32], "output")


@pytest.mark.parametrize("recipe", [None, "rowwise", "blockwise"])
def test_persistent_gemms_match_a_program_per_tile(recipe, monkeypatch):
    """Three programs striding over the tiles (on a GPU: a program per SM, the tile and K loops
    flattened into one) compute the experts op, forward and backward, bit for bit as a program
    per tile does: the up projection with its gather and epilogue, the down projection (e4m3 A
    and B by the tensor copy engine), dH and dX; two row tiles a group, an idle expert."""
    operands = dict(zip(OPERANDS, make_experts(21, 64, 48, 4, 2, Activation("swiglu"), torch.float32, device=DEVICE)))
    operands["ids"][:, 0] = 0
    operands["ids"][:, 1] = 2 + torch.arange(21, device=DEVICE) % 2  # expert 1 idle
    grad_out = torch.randn_like(operands["x"])
    config = grouped_gemm._config
    monkeypatch.setattr(grouped_gemm, "_sm_count", lambda device: 3)  # several tiles a program, also on a GPU
    runs = {}
    for persistent in (True, False):
        def tiles(*args, persistent=persistent, **kwargs):
            chosen = config(*args, **kwargs)
            return chosen | dict(PERSISTENT=persistent, GROUP_M=2) if "PERSISTENT" in chosen else chosen

        monkeypatch.setattr(grouped_gemm, "_config", tiles)
        with inductor_moe.config.patch(triton_on_cpu=True):
            runs[persistent] = accuracy.run_experts(operands, grad_out, fp8_recipe=recipe, activation="swiglu")
    for name in runs[True]:
        assert torch.equal(runs[True][name], runs[False][name]), name


@pytest.mark.parametrize("act", EPILOGUES[1:], ids=str)
@pytest.mark.parametrize("dtype, out_in", [(torch.float32, False), (torch.bfloat16, True)])
def test_gemm_act_backward(act, dtype, out_in):
    tokens, k, experts, hidden, inner = 23, 2, 5, 32, 24
    width = 2 * inner if act.gated else inner
    experts_of_row, _, token_of_row, offsets = sorted_rows(tokens, k, experts)
    rows = tokens * k
    grad_out = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    w2 = expert_weights(experts, inner, hidden, dtype, out_in)  # [E, I, H]
    h = torch.randn(rows, width, dtype=dtype, device=DEVICE)
    scale = torch.rand(rows, device=DEVICE)
    grad_h, partial = grouped_gemm.gemm_act_backward(grad_out, token_of_row, w2.transpose(1, 2), offsets, h, scale, act)
    unscaled = torch.einsum("rh,rih->ri", grad_out.cpu()[token_of_row.cpu().long()].double(), w2.cpu()[experts_of_row].double())
    h64 = h.cpu().double().requires_grad_()
    activated = act.forward(h64)
    (expected,) = torch.autograd.grad(activated, h64, unscaled * scale.cpu().double()[:, None])
    assert_close(grad_h.cpu(), expected, LOW[dtype], "grad of h")
    assert_close(partial.sum(1).cpu(), (unscaled * activated.detach()).sum(1), LOW[dtype], "routing-weight grad")


@pytest.mark.parametrize("dtype, out_in", [(torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("prologue", ["gathered rows", "activation", "activation, interleaved"])
def test_weight_grad(dtype, out_in, prologue):
    tokens, k, experts, hidden, inner = 31, 2, 7, 24, 16
    experts_of_row, _, token_of_row, offsets = sorted_rows(tokens, k, experts)
    rows = tokens * k
    grad_rows = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)  # gathered by token, scaled
    scale = torch.rand(rows, device=DEVICE)
    tok = token_of_row.cpu().long()
    b_rows = grad_rows.cpu()[tok].double() * scale.cpu().double()[:, None]
    if prologue == "gathered rows":
        a, a_rows, act = torch.randn(tokens, inner, dtype=dtype, device=DEVICE), token_of_row, None
        a_rows_ref = a.cpu()[tok].double()
    else:
        act = Activation("swiglu_oai", interleaved=True, limit=1.0) if "interleaved" in prologue else Activation("geglu")
        a, a_rows = torch.randn(rows, 2 * inner, dtype=dtype, device=DEVICE), None
        a_rows_ref = act.forward(a.cpu().double())
    out = (torch.empty(experts, hidden, inner, dtype=dtype, device=DEVICE).transpose(1, 2) if out_in
           else torch.empty(experts, inner, hidden, dtype=dtype, device=DEVICE))
    bias_grad = torch.empty(experts, hidden, dtype=dtype, device=DEVICE)
    grouped_gemm.weight_grad(a, grad_rows, offsets, out, a_rows=a_rows, a_activation=act, b_rows=token_of_row,
                             scale=scale, bias_grad=bias_grad)
    expected = torch.zeros(experts, inner, hidden, dtype=torch.float64).index_add_(
        0, experts_of_row, a_rows_ref[:, :, None] * b_rows[:, None, :])
    assert_close(out.cpu(), expected, LOW[dtype], "weight grad")
    expected_bias = torch.zeros(experts, hidden, dtype=torch.float64).index_add_(0, experts_of_row, b_rows)
    assert_close(bias_grad.cpu(), expected_bias, LOW[dtype], "bias grad")


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("tokens, k, width", [(1, 1, 8), (37, 4, 40), (64, 8, 24)])
def test_unpermute_reduce(weighted, tokens, k, width):
    _, inverse, _, _ = sorted_rows(tokens, k, 8)
    rows = torch.randn(tokens * k, width, dtype=torch.bfloat16, device=DEVICE)
    weights = torch.rand(tokens, k, device=DEVICE) if weighted else None
    out = unpermute.unpermute_reduce(rows, inverse, weights, tokens, k, out_dtype=torch.float32)
    per_token = rows.cpu().double()[inverse.cpu().long()].view(tokens, k, width)
    expected = (per_token * (weights.cpu().double()[..., None] if weighted else 1)).sum(1)
    assert_close(out.cpu(), expected, EXACT, "sums")


# --- the ops on the kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("act", [Activation("swiglu"), Activation("gelu"), Activation("swiglu_oai", interleaved=True, limit=1.0)], ids=str)
# One token is checked in float32 only: in bf16 its routing-weight gradient is one dot product and
# its weight gradients one outer product, with no averaging, and their relative error ranged past
# any bound (about 1 run in 20 failed under the interpreter, before FP8 too).
@pytest.mark.parametrize("dtype, shape", [
    (dtype, shape) for dtype in (torch.float32, torch.bfloat16)
    for shape in ((1, 16, 8, 4, 1), (33, 40, 24, 6, 3), (20, 32, 16, 64, 8)) if dtype == torch.float32 or shape[0] > 1
])
def test_experts_op_on_kernels(act, shape, dtype):
    """Forward and every gradient of the experts op on the kernels against float64 references,
    as close as the torch code in the same dtype (4x its error, or the dtype's tolerance)."""
    check_experts_op_on_kernels(act, shape, dtype)


@pytest.mark.parametrize("act, dtype", [
    (Activation("swiglu"), torch.float32), (Activation("swiglu"), torch.bfloat16),
    (Activation("swiglu_oai", interleaved=True, limit=1.0), torch.bfloat16),
], ids=str)
def test_experts_op_with_vendor_weight_grads(act, dtype, monkeypatch):
    """The same with the weight gradients by torch._grouped_mm, as Hopper computes wide bf16
    experts': biases, [E, out, in] weights, and 80 pairs over 32 experts leave some idle."""
    monkeypatch.setattr(triton_impl, "vendor_weight_grads", lambda *_: True)
    check_experts_op_on_kernels(act, (10, 40, 24, 32, 8), dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: a GPU's")
@pytest.mark.parametrize("recipe", [None, "rowwise"])
def test_experts_op_replays_in_a_cuda_graph(recipe):
    """The op's forward and backward, captured once in a CUDA graph (no host synchronisation on
    their path: capture fails on one) and replayed on new routing, activations and weights copied
    into the captured tensors, compute what the op computes eagerly on them: nothing the host
    decided at capture (a cached FP8 weight, a tile count) is replayed stale. Wide enough for bf16
    weight gradients by torch._grouped_mm on Hopper."""
    if recipe and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("e4m3 GEMMs: Hopper")
    make = lambda: dict(zip(OPERANDS, make_experts(96, 128, 256, 8, 2, Activation("swiglu"), torch.bfloat16,  # noqa: E731
                                                   bias=False, device=DEVICE)))
    static = {name: t.detach().requires_grad_(name in accuracy.GRADIENTS) if t is not None else None
              for name, t in make().items()}
    leaves = [static[name] for name in accuracy.GRADIENTS]
    grad_out = torch.randn_like(static["x"])

    def step():
        out = torch.ops.inductor_moe.experts(*static.values(), "swiglu", fp8_recipe=recipe)[0]
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    graph, captured = benchmark.cuda_graph(step)
    with torch.no_grad():
        for name, fresh in make().items():
            if fresh is not None:
                static[name].copy_(fresh)
    graph.replay()
    for name, replayed, eager in zip(("out", *accuracy.GRADIENTS), captured, step()):
        assert_close(replayed, eager.double(), torch.bfloat16, name)


def check_experts_op_on_kernels(act, shape, dtype):
    if dtype != torch.float32 and act.name == "swiglu_oai":
        act = dataclasses.replace(act, limit=7.0)  # rounding the kept pre-activation would flip clamps
    operands = dict(zip(OPERANDS, make_experts(*shape, act, dtype, bias=shape[0] > 1, out_in=shape[1] == 40, device=DEVICE)))
    grad = torch.randn(operands["x"].shape, dtype=dtype, device=DEVICE)

    def forward_backward(device, cast=lambda t: t, on_kernels=False, reference=False):
        leaves = {n: cast(t.to(device)).detach().requires_grad_() for n, t in operands.items() if n != "ids" and t is not None}
        args = [leaves["x"], operands["ids"].to(device), *(leaves.get(n) for n in OPERANDS[2:])]
        with inductor_moe.config.patch(triton_on_cpu=on_kernels):
            out = reference_experts(*args, act) if reference else torch.ops.inductor_moe.experts(
                *args, act.name, act.interleaved, act.alpha, act.limit)[0]
            grads = torch.autograd.grad(out, list(leaves.values()), cast(grad.to(device)))
        return {"out": out.detach(), **dict(zip(leaves, grads))}

    kernels = forward_backward(DEVICE, on_kernels=True)
    torch_code = forward_backward("cpu")
    reference = forward_backward("cpu", torch.Tensor.double, reference=True)
    for name, expected in reference.items():
        if name != "out":
            assert kernels[name].stride() == operands[name].stride(), f"layout of the grad of {name}"
        bound = 4 * (torch_code[name].double() - expected).norm().item()
        assert_close(kernels[name].cpu(), expected, LOW[dtype], name, bound)


@pytest.mark.parametrize("act", [None, Activation("swiglu"), Activation("swiglu_oai", interleaved=True, limit=1.0)],
                         ids=str)
@pytest.mark.parametrize("on_kernels", [False, True])
def test_grouped_mm_op(on_kernels, act):
    """The max-autotune choice point (ops/grouped_mm.py), on the kernel and the torch code: gathered
    rows, a transposed B, the activations."""
    tokens, k, experts, hidden, inner = 29, 3, 5, 24, 20
    width = 2 * inner if act is not None else inner
    experts_of_row, _, token_of_row, offsets = sorted_rows(tokens, k, experts)
    x = torch.randn(tokens, hidden, device=DEVICE)
    w = expert_weights(experts, hidden, width, torch.float32, out_in=True)
    options = {} if act is None else dict(activation=act.name, interleaved=act.interleaved, limit=act.limit)
    with inductor_moe.config.patch(triton_on_cpu=on_kernels):
        out = torch.ops.inductor_moe.grouped_mm(x, w, offsets, token_of_row, **options)
    expected = torch.einsum("rk,rkn->rn", x.cpu()[token_of_row.cpu().long()].double(), w.cpu()[experts_of_row].double())
    assert_close(out.cpu(), expected if act is None else act.forward(expected), EXACT, "grouped_mm")
    with pytest.raises(RuntimeError, match="a \\[M, K\\], b \\[E, K, N\\]"):
        torch.ops.inductor_moe.grouped_mm(x, w[:, :-1], offsets)


def test_route_op_on_kernels():
    logits = torch.randn(19, 32, device=DEVICE, requires_grad=True)
    bias = 0.1 * torch.randn(32, device=DEVICE)
    options = dict(renormalize=True, scoring="sigmoid", bias=bias, n_group=4, topk_group=2, scale=2.0)
    with inductor_moe.config.patch(triton_on_cpu=True):
        weights, ids = torch.ops.inductor_moe.route(logits, 4, **options)
        (grad,) = torch.autograd.grad(weights.sum(), logits)
    expected_weights, expected_ids = torch.ops.inductor_moe.route(logits, 4, **options)
    (expected_grad,) = torch.autograd.grad(expected_weights.sum(), logits)
    assert torch.equal(ids.sort(-1).values, expected_ids.sort(-1).values)
    assert_close(weights.sort(-1).values, expected_weights.sort(-1).values, EXACT, "weights")
    assert_close(grad, expected_grad, EXACT, "grad of logits")


def test_compiled_model_on_kernels_matches_eager():
    """torch.compile + inductor_moe, its ops on the kernels (interpreted on CPU), against eager."""
    cfg = models.MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, bias=True)
    model = models.DenseLoop(cfg).to(device=DEVICE)
    with inductor_moe.config.patch(triton_on_cpu=True):
        assert_matches_eager(model, torch.compile(model), torch.randn(13, cfg.hidden, device=DEVICE))
    assert torch._dynamo.utils.counters["inductor_moe"]["dense_loop_experts"] == 1
    assert torch._dynamo.utils.counters["inductor_moe"]["experts_without_h"] == 0  # the backward reads h


def test_compiled_inference_on_kernels_does_not_store_h(monkeypatch):
    """Compiled for inference (nothing saves h for a backward), the experts call on the kernels
    is told not to store h: the up projection runs without it, and the output is unchanged."""
    cfg = models.MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2)
    model = models.DenseLoop(cfg).to(device=DEVICE)
    x = torch.randn(13, cfg.hidden, device=DEVICE)
    gemm, stored = grouped_gemm.gemm, []
    monkeypatch.setattr(grouped_gemm, "gemm", lambda *a, **k: stored.append(k.get("store_h")) or gemm(*a, **k))
    with inductor_moe.config.patch(triton_on_cpu=True), torch.no_grad():
        expected = model(x)
        actual = torch.compile(model)(x)
    assert torch._dynamo.utils.counters["inductor_moe"]["experts_without_h"] == 1
    assert stored and not any(stored), stored
    assert_close(actual, expected, LOW[torch.float32], "output")


@pytest.mark.parametrize("on_kernels", [False, True])
def test_experts_op_without_h(on_kernels):
    """store_h=False: the same output, h empty ([0, N]), and a clear error on backward."""
    args = make_experts(9, 16, 8, 4, 2, Activation("swiglu"), torch.float32, device=DEVICE)
    x = args[0].detach().requires_grad_()
    with inductor_moe.config.patch(triton_on_cpu=on_kernels):
        out, h, _, _ = torch.ops.inductor_moe.experts(x, *args[1:], "swiglu")
        out_without, h_without, _, _ = torch.ops.inductor_moe.experts(x, *args[1:], "swiglu", store_h=False)
        assert torch.equal(out_without, out) and h.shape == (18, 16) and h_without.shape == (0, 16)
        with pytest.raises(RuntimeError, match="store_h=False"):
            out_without.sum().backward()


@pytest.mark.skipif(DEVICE == "cuda", reason="compiled and run for real on this machine's GPU")
def test_kernels_compile_for_gpus():
    """The kernels compile to GPU code for Hopper and Ampere (Triton's own ptxas, no GPU needed)
    within an H100's shared memory, the quantizers reading 16-byte vectors and whole 32-byte
    sectors (also from a transposed view), and on Hopper every grouped GEMM's K loop is
    software-pipelined: each tile copied into shared memory ahead of its use (e4m3 weights, and
    rows not gathered, by the tensor copy engine), none loaded into registers and waited for, none computed in registers and stored back for the MMA but MXFP8's
    dequantized tiles; its MMAs accumulate in place, except blockwise FP8's, whose K blocks'
    products are scaled before they are added. A persistent GEMM's K loops are flattened into
    its loop over tiles, pipelined across them: the next tile's copies start before this one's
    epilogue. dH spills no registers in bf16 and FP8.

    In a separate process: under the interpreter, kernels are not compilable objects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(inductor_moe.__file__)), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", "import kernel_builds; kernel_builds.compile_all()"],
        cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout, result.stdout
    hopper = [json.loads(line.split(":", 1)[1]) for line in result.stdout.splitlines() if line.startswith("sm_90:")]
    assert all(build["shared_bytes"] <= 227 * 1024 for build in hopper), hopper  # an H100 block's most
    quantizers = [build for build in hopper if build["kernel"] == "_quantize_kernel"]
    assert quantizers and all(build["load_bytes"] == 16 for build in quantizers), quantizers  # whole vectors
    quantizers += [build for build in hopper if build["kernel"] == "_quantize_segments_kernel"]
    assert all(build["warp_run_bytes"] >= 32 for build in quantizers), quantizers  # whole sectors
    loops = [build for build in hopper if "mma" in build]
    assert {loop["fp8"] for loop in loops} == {0, 1, 2, 3}, result.stdout
    for loop in loops:
        assert loop["async_tiles"] >= 2 and loop["register_tiles"] == 0, loop
        e4m3_gemm = loop["fp8"] in (grouped_gemm.PER_ROW, grouped_gemm.PER_K_BLOCK) and "weight_grad" not in loop["kernel"]
        assert (loop["tma_tiles"] > 0) == e4m3_gemm, loop  # e4m3 weights by the copy engine
        assert (loop["stored_operands"] > 0) == (loop["fp8"] == grouped_gemm.DEQUANTIZE), loop
        assert loop["mma_from_zero"] == (loop["mma"] if loop["fp8"] == grouped_gemm.PER_K_BLOCK else 0), loop
        assert loop["epilogue_in_loop"] == loop["persistent"], loop  # persistent: the K loops flattened
    assert {loop["fp8"] for loop in loops if loop["persistent"]} == {grouped_gemm.NO_FP8, grouped_gemm.PER_ROW}
    # dH's epilogue, in column halves, keeps its tiles in registers (float32's IEEE products aside)
    dh = [build for build in hopper if build["kernel"] == "_gemm_act_backward_kernel" and build["a_dtype"] != "float32"]
    assert len(dh) == 6 and all(build["stack_bytes"] == 0 for build in dh), dh

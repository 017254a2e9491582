"""The canonical ops on their torch code (ops/cpu.py): float64 references, gradients, errors."""

import pytest
import torch
from helpers import assert_close
from references import make_experts, reference_experts, reference_route

from inductor_moe.ops import activations, cpu
from inductor_moe.ops.activations import Activation

experts_op = torch.ops.inductor_moe.experts
route_op = torch.ops.inductor_moe.route

ACTIVATIONS = [Activation(name) for name in sorted(activations.ACTIVATIONS)] + [
    Activation("swiglu", interleaved=True),
    Activation("swiglu_oai", interleaved=True, alpha=1.702, limit=1.0),  # a small limit: the clamps matter
]
ARGS = {act: (act.name, act.interleaved, act.alpha, act.limit) for act in ACTIVATIONS}

SHAPES = [  # tokens, hidden, inner, experts, k: one token, k=1, odd sizes, experts that get no token
    (1, 16, 8, 4, 1),
    (7, 24, 8, 16, 2),
    (33, 36, 20, 6, 3),
    (64, 32, 16, 64, 8),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_experts_forward_matches_float64_reference(act, shape):
    args = make_experts(*shape, act, torch.float32, bias=shape[0] % 2 == 1, out_in=shape[1] % 3 == 0)
    out, h, order, offsets = experts_op(*args, *ARGS[act])
    assert_close(out, reference_experts(*args, act), torch.float32, "out")
    counts = torch.bincount(args[1].reshape(-1), minlength=shape[3])
    assert torch.equal(offsets, counts.cumsum(0).int())
    assert torch.equal(args[1].reshape(-1)[order].sort().values, args[1].reshape(-1)[order])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_low_precision_matches_float64_reference(dtype):
    act = Activation("swiglu")
    args = make_experts(48, 64, 32, 8, 2, act, dtype)
    out = experts_op(*args, "swiglu")[0]
    assert out.dtype == dtype
    assert_close(out, reference_experts(*args, act), torch.bfloat16, "out")


@pytest.mark.parametrize("act", [Activation("swiglu"), Activation("gelu"), ACTIVATIONS[-1]], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_experts_gradcheck(act, bias):
    x, ids, weights, w1, w2, b1, b2 = make_experts(5, 6, 4, 3, 2, act, torch.float64, bias=bias)
    inputs = [t.detach().requires_grad_() for t in (x, weights.double(), w1, w2) + ((b1, b2) if bias else ())]

    def f(x, weights, w1, w2, b1=None, b2=None):
        return experts_op(x, ids, weights, w1, w2, b1, b2, *ARGS[act])[0]

    assert torch.autograd.gradcheck(f, inputs)


def test_experts_bfloat16_gradients_match_float64():
    act = Activation("swiglu")
    x, ids, weights, w1, w2, b1, b2 = make_experts(40, 32, 16, 8, 2, act, torch.bfloat16)
    grad = torch.randn(x.shape, dtype=torch.bfloat16)
    leaves = [x, weights, w1, w2, b1, b2]

    def grads(cast):
        inputs = [cast(t).detach().requires_grad_() for t in leaves]
        out = experts_op(inputs[0], ids, *inputs[1:], "swiglu")[0]
        return torch.autograd.grad(out, inputs, cast(grad))

    for name, actual, expected in zip("x weights w1 w2 b1 b2".split(), grads(lambda t: t), grads(torch.Tensor.double)):
        assert_close(actual, expected, torch.bfloat16, f"grad of {name}")


def test_experts_saves_inputs_pre_activation_and_routing_metadata_only():
    args = make_experts(24, 48, 16, 4, 2, Activation("swiglu"), torch.bfloat16, bias=False)
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in args[:5]] + [None, None]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        experts_op(*leaves, "swiglu")
    inputs = [t for t in leaves if t is not None]
    assert len(saved) == len(inputs) + 3
    assert all(any(s is t for t in inputs) for s in saved[: len(inputs)])
    assert [tuple(s.shape) for s in saved[len(inputs):]] == [(48, 32), (48,), (4,)]


def test_expert_without_tokens_gets_zero_gradient():
    x, ids, weights, w1, w2, b1, b2 = make_experts(6, 16, 8, 5, 1, Activation("swiglu"), torch.float32)
    ids = torch.where(ids == 3, 0, ids)  # nobody routes to expert 3
    ids[0, 0] = 0  # and someone to expert 0
    w1, w2, b1 = (t.detach().requires_grad_() for t in (w1, w2, b1))
    experts_op(x, ids, weights, w1, w2, b1, b2, "swiglu")[0].sum().backward()
    assert w1.grad[3].abs().max() == 0 and w2.grad[3].abs().max() == 0 and b1.grad[3].abs().max() == 0
    assert w1.grad[0].abs().max() > 0


def test_experts_with_no_tokens():
    """T = 0 (a rank that receives no rows under expert parallelism): an empty output, zero
    weight gradients."""
    x, ids, weights, w1, w2, b1, b2 = make_experts(1, 16, 8, 4, 2, Activation("swiglu"), torch.float32)
    x, ids, weights = x[:0], ids[:0], weights[:0]
    w1, w2 = (t.detach().requires_grad_() for t in (w1, w2))
    out = experts_op(x, ids, weights, w1, w2, b1, b2, "swiglu")[0]
    assert out.shape == (0, 16)
    out.sum().backward()
    assert w1.grad.abs().max() == 0 and w2.grad.abs().max() == 0


@pytest.mark.parametrize("aligned", [True, False])
def test_grouped_mm_paths_agree_with_per_expert_matmul(aligned):
    k = 32 if aligned else 30  # 30 bf16 values per row is not 16-byte aligned: the per-expert loop
    a = torch.randn(37, k, dtype=torch.bfloat16)
    b = torch.randn(4, k, 24, dtype=torch.bfloat16)
    offsets = torch.tensor([5, 5, 20, 37], dtype=torch.int32)
    assert cpu._grouped_mm_accepts(a, b) == aligned
    out = cpu.grouped_mm(a, b, offsets)
    grad = cpu.grouped_mm_weight_grad(a, out, offsets, out_in=False)
    transposed = cpu.grouped_mm_weight_grad(a, out, offsets, out_in=True)
    assert transposed.stride(1) == 1 and torch.allclose(transposed, grad, rtol=2e-2, atol=1e-1)
    starts = [0, 5, 5, 20]
    for e, (s, t) in enumerate(zip(starts, offsets.tolist())):
        if t > s:
            assert_close(out[s:t], a[s:t].double() @ b[e].double(), torch.bfloat16, f"rows of expert {e}")
        expected = a[s:t].double().t() @ out[s:t].double()
        assert torch.allclose(grad[e].double(), expected, rtol=2e-2, atol=1e-1), f"weight grad of expert {e}"


ROUTERS = {  # name -> route options
    "softmax": dict(renormalize=False),
    "softmax, renormalised": dict(renormalize=True),
    "sigmoid, bias, groups, scale (DeepSeek-V3)": dict(
        renormalize=True, scoring="sigmoid", n_group=4, topk_group=2, scale=2.5, bias=True, group_fill=float("-inf")
    ),
    "sigmoid, not renormalised": dict(renormalize=False, scoring="sigmoid"),
    "sigmoid, groups filled with 0 (older DeepSeek-V3 code)": dict(
        renormalize=True, scoring="sigmoid", n_group=4, topk_group=2, group_fill=0.0, bias=True
    ),
    "top-k then softmax (gpt-oss)": dict(renormalize=False, scoring="softmax_of_topk", scale=0.5),
    "top-k then sigmoid, renormalised (Cohere2-MoE)": dict(renormalize=True, scoring="sigmoid_of_topk", scale=2.0),
    "softmax, groups ranked by their best (DeepSeek-V2)": dict(
        renormalize=False, n_group=4, topk_group=2, group_top=1, group_fill=0.0, scale=16.0
    ),
    "sigmoid, renormalised with an eps": dict(renormalize=True, scoring="sigmoid", eps=0.5),  # large: it shows
}


def route_args(options: dict, num_experts: int) -> dict:
    options = dict(options)
    if options.pop("bias", False):
        options["bias"] = 0.1 * torch.randn(num_experts)
    return options


def distinct_logits(tokens: int, num_experts: int, dtype) -> torch.Tensor:
    """Random logits without ties in a row (bf16 rounds many random values onto each other, and
    ties may be broken either way)."""
    levels = torch.linspace(-3, 3, num_experts)
    return torch.stack([levels[torch.randperm(num_experts)] for _ in range(tokens)]).to(dtype)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(router, dtype):
    logits = distinct_logits(37, 16, dtype).requires_grad_()
    options = route_args(ROUTERS[router], 16)
    weights, ids = route_op(logits, 3, **options)
    expected_weights, expected_ids = reference_route(logits.detach(), 3, **options)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long().sort(-1).values, expected_ids.sort(-1).values)
    assert_close(weights.sort(-1).values, expected_weights.sort(-1).values, torch.float32, "weights")


@pytest.mark.parametrize("router", ROUTERS)
def test_route_gradient_matches_autograd(router):
    logits = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    options = route_args(ROUTERS[router], 16)
    # the route op computes in float32: check its gradient against float32 autograd of cpu code
    _, ids = route_op(logits, 3, **options)
    grad = torch.randn(6, 3, dtype=torch.float64)
    (actual,) = torch.autograd.grad(route_op(logits, 3, **options)[0], logits, grad)
    x = logits.detach().float().requires_grad_()
    scoring = options.get("scoring", "softmax")
    scores = x.sigmoid() if scoring.startswith("sigmoid") else x.softmax(-1)
    picked = scores.gather(-1, ids.long())
    if options["renormalize"] or scoring == "softmax_of_topk":
        picked = picked / (picked.sum(-1, keepdim=True) + options.get("eps", 0.0))
    (expected,) = torch.autograd.grad(picked * options.get("scale", 1.0), x, grad.float())
    assert_close(actual.float(), expected, torch.float32, "grad of logits")
    if scoring.endswith("_of_topk"):  # only the chosen logits were scored: the others get exactly 0, as in eager
        unchosen = torch.ones_like(actual, dtype=torch.bool).scatter(-1, ids.long(), False)
        assert (actual[unchosen] == 0).all(), "unchosen logits get a gradient"


BAD_EXPERTS_CALLS = [
    ("x, weights and biases must share a dtype", dict(w1=lambda a: a.double())),
    ("ids must be int32 or int64", dict(ids=lambda a: a.float())),
    ("ids and weights must both be", dict(weights=lambda a: a[:, :1])),
    ("w2 must be", dict(w2=lambda a: a[:, :, :8])),
    ("experts per token but only", dict(ids=lambda a: a.repeat(1, 3), weights=lambda a: a.repeat(1, 3))),
    ("b1 must be", dict(b1=lambda a: a[:, :3])),
    ("tensors on several devices", dict(weights=lambda a: a.to("meta"))),
]


@pytest.mark.parametrize("message, change", BAD_EXPERTS_CALLS, ids=[m for m, _ in BAD_EXPERTS_CALLS])
def test_experts_rejects_bad_input(message, change):
    names = ["x", "ids", "weights", "w1", "w2", "b1", "b2"]
    args = dict(zip(names, make_experts(6, 16, 8, 2, 2, Activation("swiglu"), torch.float32)))
    args.update({name: fn(args[name]) for name, fn in change.items()})
    with pytest.raises(RuntimeError, match=message):
        experts_op(*args.values(), "swiglu")


def test_experts_rejects_unknown_activation_and_ids_out_of_range():
    args = make_experts(6, 16, 8, 4, 2, Activation("swiglu"), torch.float32)
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        experts_op(*args, "mish")
    with pytest.raises(ValueError, match="gelu is not gated"):
        experts_op(*args, "gelu", True)
    ids = args[1].clone()
    ids[2, 1] = 4
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        experts_op(args[0], ids, *args[2:], "swiglu")


def test_route_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match=r"k = 9 must lie in \[1, E = 8\]"):
        route_op(torch.randn(4, 8), 9, True)
    with pytest.raises(RuntimeError, match="logits must be a floating"):
        route_op(torch.ones(4, 8, dtype=torch.int64), 2, True)
    with pytest.raises(RuntimeError, match="scoring must be one of"):
        route_op(torch.randn(4, 8), 2, True, "tanh")
    with pytest.raises(RuntimeError, match="cannot form 3 groups"):
        route_op(torch.randn(4, 8), 2, True, "sigmoid", None, 3, 1)
    with pytest.raises(RuntimeError, match="groups of 2 experts have no 3 best"):
        route_op(torch.randn(4, 8), 2, True, "sigmoid", None, 4, 1, group_top=3)
    with pytest.raises(RuntimeError, match="sigmoid_of_topk selects on the logits: no bias"):
        route_op(torch.randn(4, 8), 2, True, "sigmoid_of_topk", torch.zeros(8))

"""``inductor_moe::experts``: the whole routed expert computation, with its own backward.

    out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])
    expert_e(v) = act(v @ w1[e] + b1[e]) @ w2[e] + b2[e]

``act`` is named by ``activation`` (ops/activations.py), with ``interleaved`` gate and up columns
and gpt-oss's ``alpha`` and ``limit`` where they apply.

Shapes: x ``[T, H]``; ids and weights ``[T, k]``; w1 ``[E, H, N]`` (N = 2I for a gated
activation, else I); w2 ``[E, I, H]``; b1 ``[E, N]``, b2 ``[E, H]`` or None. Weights stored as
``[E, out, in]`` are passed as a transposed view: only the logical layout is fixed. The combine
accumulates in float32 and returns x's dtype.

``fp8_recipe`` ("rowwise", "blockwise", "mxfp8"; ops/fp8.py) runs the grouped GEMMs on float8 e4m3
operands with float32 accumulation: both forward GEMMs and the backward's activation-gradient
GEMMs, and its weight-gradient GEMMs too unless ``fp8_weight_grad`` is False.

Besides ``out`` the op returns what its backward needs and cannot cheaply recompute: ``h``, the
first projection's output (pre-activation, rows in expert order, ``[T*k, N]``; ``[0, N]`` with
``store_h`` False, which Inductor's post-grad pass sets where nothing reads it: inference), and
the routing metadata ``order`` (pair indices sorted by expert) and ``offsets`` (int32 ends of
each expert's rows). Autograd therefore keeps x, the routing tensors, the weights (all inputs),
h and the metadata: about 2*T*H + 4*T*k*I bytes beyond the inputs in bf16 for a gated
activation. The gathered copies of x, the activation output and the expert outputs are
recomputed in backward.
"""

import torch
from torch import Tensor

from . import fp8, implementation
from .activations import Activation
from .cpu import stored_out_in


def _check(x, ids, weights, w1, w2, b1, b2, act: Activation, fp8_recipe: str | None = None) -> None:
    """Clear errors for malformed calls; runs on real and fake tensors (no data access)."""
    torch._check(
        fp8_recipe is None or fp8_recipe in fp8.RECIPES,
        lambda: f"inductor_moe.experts: fp8_recipe must be None or one of {list(fp8.RECIPES)}, got {fp8_recipe!r}",
    )
    torch._check(x.dim() == 2, lambda: f"inductor_moe.experts: x must be [T, H], got {tuple(x.shape)}")
    torch._check(x.is_floating_point(), lambda: f"inductor_moe.experts: x must be floating, got {x.dtype}")
    torch._check(
        ids.dim() == 2 and weights.shape == ids.shape and ids.shape[0] == x.shape[0],
        lambda: "inductor_moe.experts: ids and weights must both be [T, k] with T = x.shape[0], got "
        f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)}, x {tuple(x.shape)}",
    )
    torch._check(
        ids.dtype in (torch.int32, torch.int64),
        lambda: f"inductor_moe.experts: ids must be int32 or int64, got {ids.dtype}",
    )
    torch._check(
        weights.is_floating_point(),
        lambda: f"inductor_moe.experts: routing weights must be floating, got {weights.dtype}",
    )
    torch._check(
        w1.dim() == 3 and w2.dim() == 3,
        lambda: f"inductor_moe.experts: w1, w2 must be [E, in, out], got {tuple(w1.shape)}, {tuple(w2.shape)}",
    )
    num_experts, hidden, width = w1.shape
    inner = width // 2 if act.gated else width
    torch._check(
        hidden == x.shape[1] and tuple(w2.shape) == (num_experts, inner, hidden),
        lambda: f"inductor_moe.experts: with x {tuple(x.shape)} and w1 {tuple(w1.shape)} "
        f"({act.name}) w2 must be {(num_experts, inner, hidden)}, got {tuple(w2.shape)}",
    )
    torch._check(
        not act.gated or width % 2 == 0,
        lambda: f"inductor_moe.experts: gated activation {act.name} needs an even w1 width, got {width}",
    )
    torch._check(
        ids.shape[1] <= num_experts,
        lambda: f"inductor_moe.experts: k = {ids.shape[1]} experts per token but only {num_experts} experts",
    )
    _check_bias("b1", b1, (num_experts, width))
    _check_bias("b2", b2, (num_experts, hidden))
    tensors = [t for t in (x, w1, w2, b1, b2) if t is not None]
    torch._check(
        all(t.dtype == x.dtype for t in tensors),
        lambda: "inductor_moe.experts: x, weights and biases must share a dtype, got "
        f"{[t.dtype for t in tensors]}",
    )
    devices = {t.device for t in (*tensors, ids, weights)}
    torch._check(len(devices) == 1, lambda: f"inductor_moe.experts: tensors on several devices: {devices}")


def _check_bias(name: str, bias: Tensor | None, shape: tuple) -> None:
    torch._check(
        bias is None or tuple(bias.shape) == shape,
        lambda: f"inductor_moe.experts: {name} must be {shape}, got {tuple(bias.shape)}",
    )


def _check_ids_in_range(ids: Tensor, num_experts: int) -> None:
    """Ids out of range would index past the kernels' per-expert tables. On CPU reading them is a
    memory read: a ValueError naming them. On a GPU reading them would wait for it and break CUDA
    graph capture: an asynchronous device-side assertion, as torch's own indexing makes."""
    message = f"inductor_moe.experts: expert ids must lie in [0, {num_experts})"
    if ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < num_experts)).all(), message)
    elif ids.numel() and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"{message}, got values in [{int(ids.min())}, {int(ids.max())}]")


@torch.library.custom_op("inductor_moe::experts", mutates_args=())
def experts(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    activation: str,
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    fp8_recipe: str | None = None,
    fp8_weight_grad: bool = True,
    store_h: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    act = Activation(activation, interleaved, alpha, limit)
    _check(x, ids, weights, w1, w2, b1, b2, act, fp8_recipe)
    _check_ids_in_range(ids, w1.shape[0])
    return implementation.of(x).experts_forward(x, ids, weights, w1, w2, b1, b2, act, fp8_recipe, store_h)


@experts.register_fake
def _(x, ids, weights, w1, w2, b1, b2, activation, interleaved=False, alpha=1.702, limit=7.0, fp8_recipe=None,
      fp8_weight_grad=True, store_h=True):
    _check(x, ids, weights, w1, w2, b1, b2, Activation(activation, interleaved, alpha, limit), fp8_recipe)
    pairs = ids.shape[0] * ids.shape[1]
    return (
        x.new_empty(x.shape),
        x.new_empty(pairs if store_h else 0, w1.shape[2]),
        ids.new_empty(pairs, dtype=torch.int64),
        ids.new_empty(w1.shape[0], dtype=torch.int32),
    )


def _check_h_stored(h: Tensor, ids: Tensor) -> None:
    torch._check(h.shape[0] == ids.numel(),
                 lambda: "inductor_moe.experts_backward: h is empty: the forward ran with store_h=False")


@torch.library.custom_op("inductor_moe::experts_backward", mutates_args=())
def experts_backward(
    grad_out: Tensor,
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    h: Tensor,
    order: Tensor,
    offsets: Tensor,
    activation: str,
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    fp8_recipe: str | None = None,
    fp8_weight_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weights, w1, w2, b1, b2); a bias gradient is empty when the bias is None."""
    _check_h_stored(h, ids)
    act = Activation(activation, interleaved, alpha, limit)
    return implementation.of(x).experts_backward(
        grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, act, fp8_recipe, fp8_weight_grad
    )


@experts_backward.register_fake
def _(grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, *options):
    _check_h_stored(h, ids)
    def like(t):
        return x.new_empty(0) if t is None else t.new_empty(t.shape)

    def weight_grad(w):  # the layout of the weight's storage, as the real implementation returns
        return w.new_empty(w.shape[0], w.shape[2], w.shape[1]).transpose(1, 2) if stored_out_in(w) else like(w)

    return like(x), like(weights), weight_grad(w1), weight_grad(w2), like(b1), like(b2)


def _setup_context(ctx, inputs, output):
    x, ids, weights, w1, w2, b1, b2, *options, _store_h = inputs
    _, h, order, offsets = output
    ctx.save_for_backward(x, ids, weights, w1, w2, b1, b2, h, order, offsets)
    ctx.options = options  # activation and precision


def _backward(ctx, grad_out, _grad_h, _grad_order, _grad_offsets):
    x, ids, weights, w1, w2, b1, b2, h, order, offsets = ctx.saved_tensors
    grad_x, grad_weights, grad_w1, grad_w2, grad_b1, grad_b2 = experts_backward(
        grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, *ctx.options
    )
    no_grads = [None] * (len(ctx.options) + 1)  # and store_h
    grad_b1, grad_b2 = (None if b is None else grad for b, grad in ((b1, grad_b1), (b2, grad_b2)))
    return (grad_x, None, grad_weights, grad_w1, grad_w2, grad_b1, grad_b2, *no_grads)


experts.register_autograd(_backward, setup_context=_setup_context)

"""``inductor_moe::route``: router logits -> top-k routing weights and expert ids.

    scores = softmax(float32(logits), -1)  or  sigmoid(float32(logits))       (scoring)
    choice = scores + bias                          (bias: a score correction for selection only)
    with n_group > 1: only the topk_group groups of E / n_group experts with the largest sum of
        their group_top best choices stay candidates (DeepSeek-V3: two; DeepSeek-V2: one, the
        group's maximum); the others' choice becomes group_fill (DeepSeek-V3: -inf, or 0 in older code)
    ids = top-k of choice;  weights = scores[ids]
    weights = scale * weights / (weights.sum(-1) + eps)    (renormalize)  or  scale * weights

scorings "softmax_of_topk" (gpt-oss, Mixtral's first code) and "sigmoid_of_topk" (Cohere2-MoE,
Llama 4): ids = top-k of the logits themselves, weights = the softmax of those k logits (which is
the renormalised softmax of all of them) or their sigmoids, then renormalised and scaled as above.
Returns float32 weights and int32 ids, ``[T, k]`` for logits ``[T, E]``, best first. Autograd
saves the logits and the ids; the backward (``route_backward``) recomputes the scores.
"""

import torch
from torch import Tensor

from . import implementation

SCORINGS = ("softmax", "sigmoid", "softmax_of_topk", "sigmoid_of_topk")


def _check(logits: Tensor, k: int, scoring: str, bias: Tensor | None, n_group: int, topk_group: int,
           group_top: int) -> None:
    torch._check(
        logits.is_floating_point() and logits.dim() == 2,
        lambda: f"inductor_moe.route: logits must be a floating [T, E] tensor, got {logits.dtype} {tuple(logits.shape)}",
    )
    num_experts = logits.shape[1]
    torch._check(1 <= k <= num_experts, lambda: f"inductor_moe.route: k = {k} must lie in [1, E = {num_experts}]")
    torch._check(scoring in SCORINGS, lambda: f"inductor_moe.route: scoring must be one of {SCORINGS}, got {scoring!r}")
    torch._check(
        bias is None or (tuple(bias.shape) == (num_experts,) and bias.device == logits.device),
        lambda: f"inductor_moe.route: bias must be [E = {num_experts}] on {logits.device}",
    )
    torch._check(
        n_group >= 1 and num_experts % n_group == 0 and 1 <= topk_group <= n_group
        and (n_group == 1 or num_experts // n_group >= 2),
        lambda: f"inductor_moe.route: {num_experts} experts cannot form {n_group} groups of at least 2 "
        f"with {topk_group} kept",
    )
    torch._check(
        n_group == 1 or 1 <= group_top <= num_experts // n_group,
        lambda: f"inductor_moe.route: groups of {num_experts // n_group} experts have no {group_top} best",
    )
    torch._check(
        not scoring.endswith("_of_topk") or (bias is None and n_group == 1),
        lambda: f"inductor_moe.route: {scoring} selects on the logits: no bias, no groups",
    )


@torch.library.custom_op("inductor_moe::route", mutates_args=())
def route(
    logits: Tensor,
    k: int,
    renormalize: bool,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    group_fill: float = 0.0,  # no -inf default: the schema parser takes none; callers pass it
    eps: float = 0.0,
    group_top: int = 2,
) -> tuple[Tensor, Tensor]:
    _check(logits, k, scoring, bias, n_group, topk_group, group_top)
    return implementation.of(logits).route_forward(
        logits, k, renormalize, scoring, bias, n_group, topk_group, scale, group_fill, eps, group_top
    )


@route.register_fake
def _(logits, k, renormalize, scoring="softmax", bias=None, n_group=1, topk_group=1, scale=1.0, group_fill=0.0,
      eps=0.0, group_top=2):
    _check(logits, k, scoring, bias, n_group, topk_group, group_top)
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("inductor_moe::route_backward", mutates_args=())
def route_backward(
    grad_weights: Tensor, logits: Tensor, ids: Tensor, renormalize: bool, scoring: str, scale: float, eps: float
) -> Tensor:
    """Gradient of the logits from the weights' gradient (the bias and the selection get none)."""
    return implementation.of(logits).route_backward(grad_weights, logits, ids, renormalize, scoring, scale, eps)


@route_backward.register_fake
def _(grad_weights, logits, ids, renormalize, scoring, scale, eps):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, _, renormalize, scoring, _, _, _, scale, _, eps, _ = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.options = renormalize, scoring, scale, eps


def _backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    return route_backward(grad_weights, logits, ids, *ctx.options), *[None] * 10


route.register_autograd(_backward, setup_context=_setup_context)

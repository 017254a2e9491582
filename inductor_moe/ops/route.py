"""``inductor_moe::route``: router logits -> top-k routing weights and expert ids.

    probs = softmax(float32(logits), -1); weights, ids = topk(probs, k)
    weights /= weights.sum(-1, keepdim=True)       (if renormalize)

Returns float32 weights and int32 ids, ``[..., k]``. The selection is the one eager's float32
softmax and ``torch.topk`` make. Autograd saves the logits and both outputs; the backward
recomputes the softmax (``[..., E]``, cheap) rather than keeping it.
"""

import torch
from torch import Tensor


def _check(logits: Tensor, k: int) -> None:
    torch._check(
        logits.is_floating_point() and logits.dim() >= 1,
        lambda: f"inductor_moe.route: logits must be a floating [..., E] tensor, got {logits.dtype} {tuple(logits.shape)}",
    )
    torch._check(
        1 <= k <= logits.shape[-1],
        lambda: f"inductor_moe.route: k = {k} must lie in [1, E = {logits.shape[-1]}]",
    )


def route_forward(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@torch.library.custom_op("inductor_moe::route", mutates_args=())
def route(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    _check(logits, k)
    return route_forward(logits, k, renormalize)


@route.register_fake
def _(logits, k, renormalize):
    _check(logits, k)
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _, renormalize = inputs
    weights, ids = output
    ctx.save_for_backward(logits, weights, ids)
    ctx.renormalize = renormalize


def _backward(ctx, grad_weights, _grad_ids):
    logits, weights, ids = ctx.saved_tensors
    ids = ids.long()
    probs = torch.softmax(logits.float(), dim=-1)
    grad = grad_weights.float()
    if ctx.renormalize:
        # weights = p / s with s = sum(p): dL/dp_j = (g_j - <g, weights>) / s
        total = probs.gather(-1, ids).sum(dim=-1, keepdim=True)
        grad = (grad - (grad * weights).sum(dim=-1, keepdim=True)) / total
    grad_probs = torch.zeros_like(probs).scatter(-1, ids, grad)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
    return grad_logits.to(logits.dtype), None, None


route.register_autograd(_backward, setup_context=_setup_context)

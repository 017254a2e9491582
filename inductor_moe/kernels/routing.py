"""Router: logits -> top-k routing weights and expert ids, and the backward to the logits.

    scores = softmax(logits) or sigmoid(logits)                      (float32)
    choice = scores + bias                                           (bias: selection only)
    group-limited: keep the topk_group groups with the largest sum of their GROUP_TOP best
                   choices; the other experts' choice becomes group_fill (DeepSeek-V3)
    ids = top-k of choice (ties: lowest index); weights = scores[ids]
    weights = scale * weights / (sum(weights) + eps)  (renormalize)  or  scale * weights

With ``choose_on_logits`` the choice is the logits themselves (top-k, then softmax or sigmoid):
the softmax of the k chosen logits is the full softmax's renormalised, and only those k get a
gradient.

One program routes BLOCK_T tokens over all E experts (E up to a few hundred).
"""

import torch
import triton
import triton.language as tl

from . import cdiv, interpreting, launchable, next_power_of_2


@triton.jit
def _scores(logits_ptr, rows, cols, mask, T, stride_t, SIGMOID: tl.constexpr):
    x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
    x = tl.where((rows >= T)[:, None] & (cols[None, :] == 0), 0.0, x)  # rows past T: finite, no NaN
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        s = e / tl.sum(e, axis=1)[:, None]
    return tl.where(mask, s, 0.0)


@triton.jit
def _argmax(values, cols, BLOCK_E: tl.constexpr):
    """Column of each row's maximum, the lowest on ties."""
    best = tl.max(values, axis=1)
    return tl.min(tl.where(values == best[:, None], cols[None, :], BLOCK_E), axis=1)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    T, E, stride_t, scale, group_fill, eps,
    K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP: tl.constexpr, CHOOSE_ON_LOGITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    scores = _scores(logits_ptr, rows, cols, mask, T, stride_t, SIGMOID)
    if CHOOSE_ON_LOGITS:
        choice = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(mask, choice, -float("inf"))
    if N_GROUP > 1:
        group = cols // (E // N_GROUP)
        # a group's score: the sum of its GROUP_TOP best choices
        group_scores = tl.zeros((BLOCK_T, N_GROUP), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = tl.where((group == g)[None, :], choice, -float("inf"))
            total = tl.zeros((BLOCK_T,), tl.float32)
            for _ in tl.static_range(GROUP_TOP):
                total += tl.max(in_group, axis=1)
                in_group = tl.where(cols[None, :] == _argmax(in_group, cols, BLOCK_E)[:, None], -float("inf"), in_group)
            group_scores = tl.where((tl.arange(0, N_GROUP) == g)[None, :], total[:, None], group_scores)
        keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
        group_cols = tl.arange(0, N_GROUP)
        for _ in tl.static_range(TOPK_GROUP):
            best = _argmax(group_scores, group_cols, N_GROUP)
            keep = keep | (group[None, :] == best[:, None])
            group_scores = tl.where(group_cols[None, :] == best[:, None], -float("inf"), group_scores)
        choice = tl.where(keep, choice, tl.where(mask, group_fill, -float("inf")))
    slots = tl.arange(0, BLOCK_K)
    picked = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for j in tl.static_range(K):
        best = _argmax(choice, cols, BLOCK_E)
        hit = cols[None, :] == best[:, None]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        picked = tl.where(slots[None, :] == j, weight[:, None], picked)
        ids = tl.where(slots[None, :] == j, best[:, None], ids)
        choice = tl.where(hit, -float("inf"), choice)
    if CHOOSE_ON_LOGITS and not SIGMOID:  # the softmax of the k chosen logits
        picked = picked / tl.sum(picked, axis=1)[:, None]
    if RENORMALIZE:
        picked = picked / tl.maximum(tl.sum(picked, axis=1) + eps, 1e-30)[:, None]
    out = rows[:, None] * K + slots[None, :]
    out_mask = (rows < T)[:, None] & (slots < K)[None, :]
    tl.store(weights_ptr + out, picked * scale, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


@triton.jit
def _route_backward_kernel(
    grad_ptr, logits_ptr, ids_ptr, grad_logits_ptr,
    T, E, stride_t, scale, eps,
    K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, CHOOSE_ON_LOGITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    slot_mask = (rows < T)[:, None] & (slots < K)[None, :]
    scores = _scores(logits_ptr, rows, cols, mask, T, stride_t, SIGMOID)
    ids = tl.load(ids_ptr + rows[:, None] * K + slots[None, :], mask=slot_mask, other=-1)
    grad = tl.load(grad_ptr + rows[:, None] * K + slots[None, :], mask=slot_mask, other=0.0).to(tl.float32)
    picked = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for j in tl.static_range(K):
        id_j = tl.sum(tl.where(slots[None, :] == j, ids, 0), axis=1)
        p_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], scores, 0.0), axis=1)
        picked = tl.where(slots[None, :] == j, p_j[:, None], picked)
    if CHOOSE_ON_LOGITS and not SIGMOID:  # the softmax of the k chosen logits
        picked = picked / tl.maximum(tl.sum(picked, axis=1), 1e-30)[:, None]
    if RENORMALIZE:
        # weights = scale * p / s with s = sum(p) + eps: d/dp_j = scale / s * (g_j - <g, p> / s)
        total = tl.maximum(tl.sum(picked, axis=1) + eps, 1e-30)
        grad = scale / total[:, None] * (grad - (tl.sum(grad * picked, axis=1) / total)[:, None])
    else:
        grad = grad * scale
    if CHOOSE_ON_LOGITS:  # through the k chosen logits' own scores: the others get exactly 0
        if SIGMOID:
            grad = grad * picked * (1 - picked)
        else:
            grad = picked * (grad - tl.sum(grad * picked, axis=1)[:, None])
    grad_scores = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for j in tl.static_range(K):
        id_j = tl.sum(tl.where(slots[None, :] == j, ids, 0), axis=1)
        g_j = tl.sum(tl.where(slots[None, :] == j, grad, 0.0), axis=1)
        grad_scores += tl.where(cols[None, :] == id_j[:, None], g_j[:, None], 0.0)
    if CHOOSE_ON_LOGITS:
        grad_logits = grad_scores
    elif SIGMOID:
        grad_logits = grad_scores * scores * (1 - scores)
    else:
        grad_logits = scores * (grad_scores - tl.sum(grad_scores * scores, axis=1)[:, None])
    tl.store(grad_logits_ptr + rows[:, None] * E + cols[None, :], grad_logits, mask=mask)


def _blocks(num_experts: int, k: int) -> dict:
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(64, 4096 // block_e)) if not interpreting() else 16
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_power_of_2(k))


def route(logits, k, renormalize, sigmoid=False, bias=None, n_group=1, topk_group=1, scale=1.0,
          group_fill=float("-inf"), eps=0.0, group_top=2, choose_on_logits=False):
    """(weights float32 [T, k], ids int32 [T, k]) for logits ``[T, E]``."""
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, k, device=logits.device, dtype=torch.float32)
    ids = torch.empty(num_tokens, k, device=logits.device, dtype=torch.int32)
    blocks = _blocks(num_experts, k)
    launchable(_route_kernel, weights)[(cdiv(num_tokens, blocks["BLOCK_T"]),)](
        logits, bias if bias is not None else logits, weights, ids,
        num_tokens, num_experts, logits.stride(0), scale, group_fill, eps,
        K=k, SIGMOID=sigmoid, HAS_BIAS=bias is not None, RENORMALIZE=renormalize,
        N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_TOP=group_top, CHOOSE_ON_LOGITS=choose_on_logits, **blocks,
    )
    return weights, ids


def route_backward(grad_weights, logits, ids, renormalize, sigmoid=False, scale=1.0, eps=0.0, choose_on_logits=False):
    """Gradient of ``route``'s weights with respect to the logits (ids are not differentiable)."""
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    k = ids.shape[1]
    grad_logits = torch.empty(num_tokens, num_experts, device=logits.device, dtype=torch.float32)
    blocks = _blocks(num_experts, k)
    launchable(_route_backward_kernel, grad_logits)[(cdiv(num_tokens, blocks["BLOCK_T"]),)](
        grad_weights.contiguous(), logits, ids.contiguous(), grad_logits,
        num_tokens, num_experts, logits.stride(0), scale, eps,
        K=k, SIGMOID=sigmoid, RENORMALIZE=renormalize, CHOOSE_ON_LOGITS=choose_on_logits, **blocks,
    )
    return grad_logits.to(logits.dtype)

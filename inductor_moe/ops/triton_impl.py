"""The canonical ops on the Triton kernels of ``inductor_moe.kernels`` (see ops/implementation.py).

Same contracts as the torch code in ops/cpu.py: same outputs, same saved tensors, weight
gradients in their weight's storage layout.
"""

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels import align, grouped_gemm, quantize, routing, traced, unpermute
from . import fp8
from .activations import Activation
from .grouped_mm import is_choice_point
from .cpu import gather_rows, grouped_mm_weight_grad, segment_sum, stored_out_in

# weight tensor (the root of its views) -> {(view, recipe): (version, Quantized)}: each weight is
# quantized once per value (once per training step; once for inference); the entry dies with it
_QUANTIZED_WEIGHTS = WeakIdKeyDictionary()


def activation_operand(x: torch.Tensor, recipe: str | None):
    """A GEMM's A operand as the kernels take it: x, or x quantized in the recipe's activation blocks."""
    if recipe is None:
        return x
    rows, cols = fp8.RECIPES[recipe][0]
    return quantize.quantize(x, rows, cols, recipe == "mxfp8")


def epilogue_blocks(recipe: str | None):
    """(block columns, power of two) of the recipe's activation blocks when the GEMM that
    produces the activation can quantize it in its epilogue: tile-local 1 x 128 / 1 x 32 blocks.
    None for rowwise, whose scale needs the whole row (quantized by a pass of its own)."""
    cols = fp8.RECIPES[recipe][0][1] if recipe is not None else 0
    return (cols, recipe == "mxfp8") if cols else None


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (for ``tensor``'s device)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def weight_operand(b: torch.Tensor, recipe: str | None):
    """A GEMM's B operand ``[E, K, N]`` as the kernels take it: b, or b quantized in the recipe's
    weight blocks, cached until the weight changes (its version counter moves). Not cached into a
    CUDA graph: its replays skip this check, so they quantize the weight themselves."""
    if recipe is None:
        return b
    rows, cols = fp8.RECIPES[recipe][1]
    quantized = lambda: quantize.quantize_weight(b, rows, cols, recipe == "mxfp8")  # noqa: E731
    if traced(b) or _capturing(b):  # a graph being traced or captured quantizes it every call
        return quantized()
    root = b if b._base is None else b._base
    key = (b.shape, b.stride(), b.storage_offset(), recipe)
    cached = _QUANTIZED_WEIGHTS.setdefault(root, {}).get(key)
    if cached is None or cached[0] != b._version:
        cached = b._version, quantized()
        _QUANTIZED_WEIGHTS[root][key] = cached
    return cached[1]


def weight_grad_options(recipe: str | None) -> dict:
    """``grouped_gemm.weight_grad``'s FP8 arguments for the recipe: its operands quantized in the
    recipe's blocks of each expert's rows (none for None)."""
    if recipe is None:
        return {}
    return dict(fp8_rows=fp8.SEGMENT_ROWS[recipe], power_of_two=recipe == "mxfp8")


def vendor_weight_grads(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch._grouped_mm (CUTLASS) computes the bf16 weight gradients instead of our
    kernel. Both take the routing weights times act(H) from a pass of its own
    (``grouped_gemm.scaled_activation``); _grouped_mm also needs the gathered rows materialised:
    bytes per row, against GEMM FLOPs per row times the experts' width n. On the H100 a training
    step is 1.02x as fast at n = 256, 1.11x at 512, 1.07x and 1.18x at 1024
    (benchmarks/results/h100_weight_grads.json); narrower experts are untimed and keep our kernel."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and w2.shape[1] >= 256 and all(size % 8 == 0 for size in (x.shape[1], w1.shape[2], w2.shape[1])))


def grouped_mm(a, b, offsets, rows=None, act: Activation | None = None):
    return grouped_gemm.gemm(a, b, offsets, a_rows=rows, activation=act)[0]


def route_forward(logits, k: int, renormalize: bool, scoring: str, bias, n_group: int, topk_group: int,
                  scale: float, group_fill: float, eps: float, group_top: int):
    return routing.route(logits, k, renormalize, scoring.startswith("sigmoid"), bias, n_group, topk_group, scale,
                         group_fill, eps, group_top, scoring.endswith("_of_topk"))


def route_backward(grad_weights, logits, ids, renormalize: bool, scoring: str, scale: float, eps: float):
    return routing.route_backward(grad_weights, logits, ids, renormalize, scoring.startswith("sigmoid"), scale, eps,
                                  scoring.endswith("_of_topk"))


def experts_forward(x, ids, weights, w1, w2, b1, b2, act: Activation, fp8_recipe=None, store_h=True):
    num_tokens, k = ids.shape
    order, inverse, token_of_row, offsets = align.align(ids, w1.shape[0])
    # FP8: x is quantized per token, before the gather: T rows, not T * k
    fused = epilogue_blocks(fp8_recipe)
    plain = fp8_recipe is None and is_choice_point(x)  # a choice for Inductor's autotuner (ops/grouped_mm.py)
    if plain and b1 is None and not store_h:
        a, h = torch.ops.inductor_moe.grouped_mm(x, w1, offsets, token_of_row, act.name, act.interleaved, act.alpha,
                                                 act.limit), None
    else:
        a, h = grouped_gemm.gemm(activation_operand(x, fp8_recipe), weight_operand(w1, fp8_recipe), offsets,
                                 a_rows=token_of_row, bias=b1, activation=act, store_h=store_h, out_dtype=x.dtype,
                                 fp8_out=fused)
    a = a if fused else activation_operand(a, fp8_recipe)
    if plain and b2 is None:
        y = torch.ops.inductor_moe.grouped_mm(a, w2, offsets)
    else:
        y, _ = grouped_gemm.gemm(a, weight_operand(w2, fp8_recipe), offsets, bias=b2, out_dtype=x.dtype)
    out = unpermute.unpermute_reduce(y, inverse, weights, num_tokens, k, out_dtype=x.dtype)
    return out, h if store_h else x.new_empty(0, w1.shape[2]), order.long(), offsets


def _like_storage(weight: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``weight`` and laid out like its storage."""
    if stored_out_in(weight):
        return weight.new_empty(weight.shape[0], weight.shape[2], weight.shape[1]).transpose(1, 2)
    return weight.new_empty(weight.shape)


def experts_backward(grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, act: Activation, fp8_recipe=None,
                     fp8_weight_grad=True):
    num_tokens, k = ids.shape
    num_experts = w1.shape[0]
    grad_out = grad_out.contiguous()
    _, inverse, token_of_row, _ = align.align(ids, num_experts)  # the same sort as the forward's
    scale = gather_rows(weights.reshape(-1), order).float()
    expert_of_row = gather_rows(ids.reshape(-1), order) if b1 is not None or b2 is not None else None  # for the biases
    grad_h, partial = grouped_gemm.gemm_act_backward(
        activation_operand(grad_out, fp8_recipe), token_of_row, weight_operand(w2.transpose(1, 2), fp8_recipe), offsets, h, scale, act
    )
    grad_scale = partial.sum(dim=1)
    if b2 is not None:  # the bias's share of each expert output: <grad_t, b2[e]>
        grad_scale += (gather_rows(grad_out, token_of_row).float() * gather_rows(b2, expert_of_row).float()).sum(dim=-1)
    grad_weights = gather_rows(grad_scale, inverse).view(num_tokens, k).to(weights.dtype)

    weight_grad_recipe = fp8_recipe if fp8_weight_grad else None
    if weight_grad_recipe is None and vendor_weight_grads(x, w1, w2):
        # on materialised operands: the routing weights times act(H), the gathered rows
        token_rows = token_of_row.long()
        grad_rows = gather_rows(grad_out, token_rows)
        grad_w2 = grouped_mm_weight_grad(grouped_gemm.scaled_activation(h, act, scale), grad_rows, offsets,
                                         stored_out_in(w2))
        grad_w1 = grouped_mm_weight_grad(gather_rows(x, token_rows), grad_h, offsets, stored_out_in(w1))
        grad_b1 = None if b1 is None else segment_sum(grad_h, expert_of_row, num_experts).to(b1.dtype)
        grad_b2 = None if b2 is None else segment_sum(grad_rows * scale[:, None], expert_of_row, num_experts).to(b2.dtype)
    else:
        weight_grad_fp8 = weight_grad_options(weight_grad_recipe)
        grad_w2, grad_b2 = _like_storage(w2), None if b2 is None else torch.empty_like(b2)
        grouped_gemm.weight_grad(
            h, grad_out, offsets, grad_w2, a_activation=act, b_rows=token_of_row, scale=scale, bias_grad=grad_b2,
            **weight_grad_fp8,
        )
        grad_w1, grad_b1 = _like_storage(w1), None if b1 is None else torch.empty_like(b1)
        grouped_gemm.weight_grad(x, grad_h, offsets, grad_w1, a_rows=token_of_row, bias_grad=grad_b1, **weight_grad_fp8)
    grad_x_rows, _ = grouped_gemm.gemm(
        activation_operand(grad_h, fp8_recipe), weight_operand(w1.transpose(1, 2), fp8_recipe), offsets, out_dtype=x.dtype
    )
    grad_x = unpermute.unpermute_reduce(grad_x_rows, inverse, None, num_tokens, k, out_dtype=x.dtype)
    no_bias = x.new_empty(0), x.new_empty(0)  # distinct: outputs must not alias
    return (grad_x, grad_weights, grad_w1, grad_w2, no_bias[0] if b1 is None else grad_b1,
            no_bias[1] if b2 is None else grad_b2)

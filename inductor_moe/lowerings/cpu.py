"""CPU: the canonical ops decompose into aten before Inductor lowers them.

Inductor then emits its fused C++ for the gather, the activation and the combine, and extern
``torch._grouped_mm`` calls for the GEMMs. That needs bfloat16 (``_grouped_mm``'s only dtype
under compile on CPU) and 16-byte aligned rows; anything else stays one extern call of the op's
eager implementation.
"""

import torch
from torch._inductor.decomposition import register_decomposition

from ..ops import cpu
from ..ops.route import route_forward


def _on_cpu(*tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


@register_decomposition(torch.ops.inductor_moe.route.default)
def _route(logits, k, renormalize):
    if not _on_cpu(logits):
        return NotImplemented
    return route_forward(logits, k, renormalize)


@register_decomposition(torch.ops.inductor_moe.experts.default)
def _experts(x, ids, weights, w1, w2, b1, b2, activation):
    if not (_on_cpu(x) and cpu.compilable(x, w1, w2)):
        return NotImplemented
    return cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, activation)


@register_decomposition(torch.ops.inductor_moe.experts_backward.default)
def _experts_backward(grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, activation):
    if not (_on_cpu(x) and cpu.compilable(x, w1, w2)):
        return NotImplemented
    return cpu.experts_backward(grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, activation)

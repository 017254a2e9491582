"""How Inductor lowers the canonical ops.

``decompose``: a post-grad pass replaces each op by its implementation traced into the graph:
the Triton kernels on CUDA (emitted into Inductor's output code), the torch code on CPU (fused by
Inductor around extern grouped GEMMs). Where that does not apply (the kernels on CPU tensors in
Triton's interpreter, dtypes ``_grouped_mm`` cannot compile on CPU), the op runs as one extern call
of its eager implementation: the fallbacks registered here. First, an experts call whose ``h``
nothing reads (an inference graph: no backward saves it) is told not to store it. ``autotune``:
under max-autotune the plain grouped GEMMs are a choice between our kernel and ``torch._grouped_mm``.
"""

import operator

import torch
from torch._dynamo.utils import counters
from torch._inductor.lowering import make_fallback
from torch.fx import Graph

from . import autotune, decompose

_STORE_H = [a.name for a in torch.ops.inductor_moe.experts.default._schema.arguments].index("store_h")

for _op in (
    torch.ops.inductor_moe.route.default,
    torch.ops.inductor_moe.route_backward.default,
    torch.ops.inductor_moe.experts.default,
    torch.ops.inductor_moe.experts_backward.default,
):
    make_fallback(_op, warn=False)
if not autotune.register():
    make_fallback(torch.ops.inductor_moe.grouped_mm.default, warn=False)


def _skip_unread_h(graph: Graph) -> None:
    """Experts calls whose h no node reads skip storing it (T * k rows of the first projection)."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.inductor_moe.experts.default):
        if any(user.target is operator.getitem and user.args[1] == 1 for user in node.users):
            continue
        if len(node.args) > _STORE_H:
            node.update_arg(_STORE_H, False)
        else:
            node.update_kwarg("store_h", False)
        out, h, order, offsets = node.meta["val"]
        node.meta["val"] = (out, h.new_empty(0, h.shape[1]), order, offsets)
        counters["inductor_moe"]["experts_without_h"] += 1


def post_grad(graph: Graph) -> None:
    """inductor_moe's post-grad pass: unread h not stored, then the ops traced where they can be."""
    _skip_unread_h(graph)
    decompose.decompose(graph)

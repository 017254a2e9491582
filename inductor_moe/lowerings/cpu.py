"""CPU: each canonical op is replaced by its CPU code, traced into aten, after AOTAutograd.

After, not before: AOTAutograd has by then fixed what training keeps for the backward (the ops'
own choice: inputs, the first projection's output, the routing metadata), and the forward and
backward graphs each receive the traced code. Inductor then fuses the gather, the activation and
the combine into its C++ kernels around extern ``torch._grouped_mm`` calls. That needs bfloat16
(``_grouped_mm``'s only dtype under compile on CPU) and 16-byte aligned rows; anything else stays
one extern call of the op's eager implementation.
"""

import torch
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern
from torch.fx import Graph

from ..ops import cpu
from ..ops.route import route_forward

_PASS = PatternMatcherPass(pass_name="inductor_moe_cpu")


def _call(op, arity: int) -> CallFunction:
    return CallFunction(op, *(Arg() for _ in range(arity)))  # one Arg object per position


def _value(match: Match, position: int):
    node = match.output_node().args[position]
    return node.meta["val"] if isinstance(node, torch.fx.Node) else node


def _on_cpu(match: Match) -> bool:
    return _value(match, 0).device.type == "cpu"


def _experts_traceable(match: Match, x: int = 0, w1: int = 3) -> bool:
    return _on_cpu(match) and cpu.compilable(_value(match, x), _value(match, w1), _value(match, w1 + 1))


@register_graph_pattern(_call(torch.ops.inductor_moe.route.default, 3), pass_dict=_PASS, extra_check=_on_cpu)
def _route(match: Match, *args):
    match.replace_by_example(route_forward, args)


@register_graph_pattern(
    _call(torch.ops.inductor_moe.experts.default, 8), pass_dict=_PASS, extra_check=_experts_traceable
)
def _experts(match: Match, *args):
    match.replace_by_example(cpu.experts_forward, args)


@register_graph_pattern(
    _call(torch.ops.inductor_moe.experts_backward.default, 12),
    pass_dict=_PASS,
    extra_check=lambda match: _experts_traceable(match, x=1, w1=4),
)
def _experts_backward(match: Match, *args):
    match.replace_by_example(cpu.experts_backward, args)


def decompose(graph: Graph) -> None:
    """The post-grad pass: replace canonical ops on CPU by their traced CPU code."""
    _PASS.apply(graph)

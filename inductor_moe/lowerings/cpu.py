"""CPU: each canonical op is replaced by its CPU code, traced into aten, after AOTAutograd.

After, not before: AOTAutograd has by then fixed what training keeps for the backward (the ops'
own choice: inputs, the first projection's output, the routing metadata), and the forward and
backward graphs each receive the traced code. Inductor then fuses the gather, the activation and
the combine into its C++ kernels around extern ``torch._grouped_mm`` calls. That needs bfloat16
(``_grouped_mm``'s only dtype under compile on CPU) and 16-byte aligned rows; anything else stays
one extern call of the op's implementation (``ops/implementation.py``: the Triton kernels under
``config.triton_on_cpu``).
"""

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match, PatternMatcherPass, register_graph_pattern
from torch.fx import Graph

from ..ops import cpu, implementation
from ..ops.activations import Activation

_PASS = PatternMatcherPass(pass_name="inductor_moe_cpu")
_OPS = torch.ops.inductor_moe


def _value(node):
    return node.meta["val"] if isinstance(node, torch.fx.Node) else node


def _bound(op, args, kwargs) -> dict:
    """The op's arguments by name, defaults filled in (graphs omit defaulted ones)."""
    schema = op._schema
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update(zip((a.name for a in schema.arguments), args))
    values.update(kwargs)
    return values


def _runs_torch_code(tensor) -> bool:
    return tensor.device.type == "cpu" and not implementation.uses_kernels(tensor)


def _experts_traceable(match: Match, x_index: int) -> bool:
    """Whether the matched experts (backward) op, x at ``x_index`` and its weights 3 and 4 places
    later, can be traced: torch code on CPU, _grouped_mm-compilable, not FP8."""
    node = match.output_node()
    x, w1, w2 = (_value(node.args[i]) for i in (x_index, x_index + 3, x_index + 4))
    fp8 = _bound(node.target, node.args, node.kwargs)["fp8_recipe"]
    return fp8 is None and _runs_torch_code(x) and cpu.compilable(x, w1, w2)


def _activation(a: dict) -> Activation:
    return Activation(a["activation"], a["interleaved"], a["alpha"], a["limit"])


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.route.default), pass_dict=_PASS,
    extra_check=lambda match: _runs_torch_code(_value(match.output_node().args[0])),
)
def _route(match: Match, *args, **kwargs):
    a = _bound(_OPS.route.default, args, kwargs)
    options = [a[name] for name in ("k", "renormalize", "scoring")]
    rest = [a[name] for name in ("n_group", "topk_group", "scale", "group_fill", "eps", "group_top")]
    match.replace_by_example(lambda logits, bias: cpu.route_forward(logits, *options, bias, *rest), [a["logits"], a["bias"]])


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.route_backward.default), pass_dict=_PASS,
    extra_check=lambda match: _runs_torch_code(_value(match.output_node().args[1])),
)
def _route_backward(match: Match, *args, **kwargs):
    a = _bound(_OPS.route_backward.default, args, kwargs)
    options = [a[name] for name in ("renormalize", "scoring", "scale", "eps")]
    match.replace_by_example(
        lambda grad, logits, ids: cpu.route_backward(grad, logits, ids, *options), [a["grad_weights"], a["logits"], a["ids"]]
    )


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.experts.default), pass_dict=_PASS, extra_check=lambda match: _experts_traceable(match, 0)
)
def _experts(match: Match, *args, **kwargs):
    a = _bound(_OPS.experts.default, args, kwargs)
    act = _activation(a)
    tensors = [a[name] for name in ("x", "ids", "weights", "w1", "w2", "b1", "b2")]
    match.replace_by_example(lambda *t: cpu.experts_forward(*t, act), tensors)


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.experts_backward.default), pass_dict=_PASS,
    extra_check=lambda match: _experts_traceable(match, 1),
)
def _experts_backward(match: Match, *args, **kwargs):
    a = _bound(_OPS.experts_backward.default, args, kwargs)
    act = _activation(a)
    names = ("grad_out", "x", "ids", "weights", "w1", "w2", "b1", "b2", "h", "order", "offsets")
    match.replace_by_example(lambda *t: cpu.experts_backward(*t, act), [a[name] for name in names])


def decompose(graph: Graph) -> None:
    """Replace canonical ops on CPU by their traced CPU code (the post-grad pass's first step)."""
    _PASS.apply(graph)

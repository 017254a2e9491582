"""Each canonical op is replaced by its implementation traced into the graph, after AOTAutograd.

After, not before: AOTAutograd has by then fixed what training keeps for the backward (the ops'
own choice: inputs, the first projection's output, the routing metadata), and the forward and
backward graphs each receive the traced code.

- CUDA: the Triton kernels (``ops/triton_impl.py``). Each launch is recorded through
  ``torch.library.wrap_triton`` (``kernels.launchable``), so Inductor emits the kernels' source
  into its output code and schedules them with its own: no extern call of the op, no host sync,
  grids symbolic in the token count.
- CPU: the torch code (``ops/cpu.py``), which Inductor fuses into its C++ kernels around extern
  ``torch._grouped_mm`` calls. That needs bfloat16 (``_grouped_mm``'s only dtype under compile on
  CPU) and 16-byte aligned rows, and no FP8 (emulated in torch code the CPU does not compile).

Anything else stays one extern call of the op's implementation (``ops/implementation.py``): the
Triton kernels under ``config.triton_on_cpu`` run in Triton's interpreter, which cannot be traced.
"""

import contextlib

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._inductor import config as inductor_config
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match, PatternMatcherPass, register_graph_pattern
from torch.fx import Graph
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.traceback import preserve_node_meta

from ..ops import bound_arguments, cpu, grouped_mm, implementation
from ..ops.activations import Activation

_PASS = PatternMatcherPass(pass_name="inductor_moe_decompose")
_OPS = torch.ops.inductor_moe


def _functional_trace(fn, args) -> torch.fx.GraphModule:
    """``fn`` traced as ``replace_by_example``'s default does, but functionalized: a kernel launch
    (which writes its outputs in place) becomes ``triton_kernel_wrapper_functional`` whose results
    are read, not a mutation that dead-code elimination drops. Inductor's reinplacing pass later
    turns it back into a launch on the buffers themselves."""
    with enable_python_dispatcher(), preserve_node_meta():
        gm = make_fx(torch.func.functionalize(fn, remove="mutations"), select_decomp_table(),
                     tracing_mode="real")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _tracer(impl):
    """How to trace ``impl``: kernel launches write in place, so the kernels are traced functionalized."""
    return _functional_trace if impl is not cpu else None


def _value(node):
    return node.meta["val"] if isinstance(node, torch.fx.Node) else node


def _traceable(tensor) -> bool:
    """Whether the op's implementation for ``tensor`` can be traced: anything but the kernels on CPU."""
    return not (implementation.uses_kernels(tensor) and tensor.device.type == "cpu")


def _experts_traceable(match: Match, x_index: int) -> bool:
    """Whether the matched experts (backward) op, x at ``x_index`` and its weights 3 and 4 places
    later, can be traced: the kernels on CUDA; the torch code where it compiles (bf16, no FP8)."""
    node = match.output_node()
    x, w1, w2 = (_value(node.args[i]) for i in (x_index, x_index + 3, x_index + 4))
    if implementation.uses_kernels(x):
        return _traceable(x)
    return bound_arguments(node.target, node.args, node.kwargs)["fp8_recipe"] is None and cpu.compilable(x, w1, w2)


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.route.default), pass_dict=_PASS,
    extra_check=lambda match: _traceable(_value(match.output_node().args[0])),
)
def _route(match: Match, *args, **kwargs):
    a = bound_arguments(_OPS.route.default, args, kwargs)
    impl = implementation.of(_value(a["logits"]))
    options = [a[name] for name in ("k", "renormalize", "scoring")]
    rest = [a[name] for name in ("n_group", "topk_group", "scale", "group_fill", "eps", "group_top")]
    match.replace_by_example(lambda logits, bias: impl.route_forward(logits, *options, bias, *rest), [a["logits"], a["bias"]],
                             trace_fn=_tracer(impl))


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.route_backward.default), pass_dict=_PASS,
    extra_check=lambda match: _traceable(_value(match.output_node().args[1])),
)
def _route_backward(match: Match, *args, **kwargs):
    a = bound_arguments(_OPS.route_backward.default, args, kwargs)
    impl = implementation.of(_value(a["logits"]))
    options = [a[name] for name in ("renormalize", "scoring", "scale", "eps")]
    match.replace_by_example(
        lambda grad, logits, ids: impl.route_backward(grad, logits, ids, *options), [a["grad_weights"], a["logits"], a["ids"]],
        trace_fn=_tracer(impl),
    )


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.experts.default), pass_dict=_PASS, extra_check=lambda match: _experts_traceable(match, 0)
)
def _experts(match: Match, *args, **kwargs):
    a = bound_arguments(_OPS.experts.default, args, kwargs)
    impl = implementation.of(_value(a["x"]))
    act, recipe, store_h = Activation.of(a), a["fp8_recipe"], a["store_h"]
    tensors = [a[name] for name in ("x", "ids", "weights", "w1", "w2", "b1", "b2")]
    # under max-autotune the GEMMs without bias or FP8 stay grouped_mm ops: Inductor times them (lowerings/autotune.py)
    with grouped_mm.choosing() if inductor_config.max_autotune else contextlib.nullcontext():
        match.replace_by_example(lambda *t: impl.experts_forward(*t, act, recipe, store_h), tensors,
                                 trace_fn=_tracer(impl))


@register_graph_pattern(
    CallFunctionVarArgs(_OPS.experts_backward.default), pass_dict=_PASS,
    extra_check=lambda match: _experts_traceable(match, 1),
)
def _experts_backward(match: Match, *args, **kwargs):
    a = bound_arguments(_OPS.experts_backward.default, args, kwargs)
    impl = implementation.of(_value(a["x"]))
    act, recipe, fp8_weight_grad = Activation.of(a), a["fp8_recipe"], a["fp8_weight_grad"]
    names = ("grad_out", "x", "ids", "weights", "w1", "w2", "b1", "b2", "h", "order", "offsets")
    match.replace_by_example(lambda *t: impl.experts_backward(*t, act, recipe, fp8_weight_grad), [a[name] for name in names],
                             trace_fn=_tracer(impl))


def decompose(graph: Graph) -> None:
    """Replace canonical ops by their traced implementation (the post-grad pass's last step)."""
    _PASS.apply(graph)

"""MoE blocks rewritten for deployment: ``export`` is ``torch.export.export`` with the model's MoE
blocks found and rewritten into the canonical ops, as torch.compile would rewrite them.

The matchers read dynamo's torch-level graph (functions, methods, their spellings normalised);
an ``ExportedProgram`` has been lowered to ATen by then. So the model is captured by dynamo first
(``torch._dynamo.export``, the graph torch.compile's pre-grad pass sees), rewritten, and that graph
exported, its parameters and buffers under the model's own names. The program runs eagerly (the
ops' eager implementations), and AOTInductor lowers the ops as torch.compile does (lowerings/):
bfloat16 blocks on CPU become C++ kernels around ``_grouped_mm`` calls, so the package loads
without this package; float32 and FP8 blocks stay calls of the ops, which the loading process
must register (``import inductor_moe``).

``for_executorch`` decomposes the ops of an inference program into core ATen ops that ExecuTorch
runs (its portable kernels, XNNPACK): the router as the torch code computes it, and the experts
with each (token, slot) pair's expert weights gathered for a matrix-vector product, whose
shapes follow the token count alone (no sort, no data-dependent sizes: ExecuTorch plans memory
before it runs).
"""

import functools
import operator

import torch
from torch import nn
from torch.export import ExportedProgram

from . import config
from .ops import bound_arguments, cpu
from .ops.activations import Activation
from .patterns.graph_pass import rewrite_moe


def export(model: nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None,
           strict: bool = False) -> ExportedProgram:
    """``torch.export.export(model, args, kwargs, dynamic_shapes=..., strict=...)`` with the MoE
    blocks rewritten (what was rewritten is logged and counted as under torch.compile)."""
    kwargs = kwargs or {}
    if not config.enabled:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    captured, _ = torch._dynamo.export(model, dynamic_shapes=dynamic_shapes)(*args, **kwargs)
    rewrite_moe(captured.graph)
    return torch.export.export(_named_as(captured, model), args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)


def _named_as(captured: torch.fx.GraphModule, model: nn.Module) -> torch.fx.GraphModule:
    """The captured graph over ``model``'s parameters and buffers by their names in it (dynamo
    names them ``L__self___...``), so that the program's state dict is the model's."""
    names = {id(t): name for name, t in model.named_parameters(remove_duplicate=False)}
    buffers = {id(t): name for name, t in model.named_buffers(remove_duplicate=False)}
    attributes, found_buffers = {}, {}
    for node in captured.graph.find_nodes(op="get_attr"):
        tensor = getattr(captured, node.target)
        node.target = names.get(id(tensor)) or buffers.get(id(tensor)) or node.target  # else a constant of dynamo's
        attributes[node.target] = tensor
        if id(tensor) in buffers:
            found_buffers[node.target] = tensor
    named = torch.fx.GraphModule(attributes, captured.graph)
    persistent = model.state_dict(keep_vars=True).keys()
    for name, tensor in found_buffers.items():  # a dict root makes plain attributes: buffers again
        owner, _, leaf = name.rpartition(".")
        module = named.get_submodule(owner)
        delattr(module, leaf)
        module.register_buffer(leaf, tensor, persistent=name in persistent)
    return named


def for_executorch(program: ExportedProgram, expert_weights: str | None = None) -> ExportedProgram:
    """``program`` (from ``export``, for inference) with its canonical ops decomposed for ExecuTorch
    and what depends on the weights alone precomputed. ``expert_weights``: None (as they are),
    ``"int8"`` or ``"int4"`` (weight-only, see ``_quantized``), dequantized as each pair's weights
    are gathered. Needs ``executorch``."""
    if expert_weights not in (None, *_BITS):
        raise ValueError(f"inductor_moe.for_executorch: expert_weights must be None, 'int8' or 'int4', got {expert_weights!r}")
    for node in program.graph.find_nodes(op="call_function", target=torch.ops.inductor_moe.experts.default):
        if any(user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users):
            raise ValueError("inductor_moe.for_executorch: the program reads more of the experts op than its output "
                             "(a training program?); export the model in eval mode, without gradients")
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    # only the canonical ops: ExecuTorch decomposes the rest its own way (keeping linear for XNNPACK)
    table = {torch.ops.inductor_moe.route.default: _route,
             torch.ops.inductor_moe.experts.default: functools.partial(_experts_by_gathered_weights,
                                                                        bits=_BITS.get(expert_weights)),
             torch.ops.aten.split.Tensor: _split_by_slices,
             torch.ops.aten.split_with_sizes.default: _split_by_slices}
    # what depends on the parameters only (stacking, quantizing) is done here once, not each call
    folded = constant_prop_pass(program.run_decompositions(table))
    for name, value in folded.constants.items():  # values, not views of the parameters that need grad
        folded.constants[name] = value.detach()
    return folded


_BITS = {"int8": 8, "int4": 4}


def _split_by_slices(tensor, sizes, dim=0):
    """``split`` as slices: ExecuTorch 1.5.1's verifier takes a list result's first tensor for the
    list and its length for the list's, fixing a symbolic token count to the example's."""
    if isinstance(sizes, int):  # parts of that size, the last what is left
        sizes = [min(sizes, tensor.shape[dim] - start) for start in range(0, tensor.shape[dim], sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [tensor.narrow(dim, start, size) for start, size in zip(starts, sizes)]


def _route(*args, **kwargs):
    a = bound_arguments(torch.ops.inductor_moe.route.default, args, kwargs)
    return cpu.route_forward(*(a[name] for name in ("logits", "k", "renormalize", "scoring", "bias", "n_group",
                                                    "topk_group", "scale", "group_fill", "eps", "group_top")))


def _experts_by_gathered_weights(*args, bits=None, **kwargs):
    """The experts op's output, each pair's rows times its expert's gathered weights, stored in
    ``bits`` if given (the other outputs, which ``for_executorch`` checked nothing reads, are
    placeholders of their shapes)."""
    a = bound_arguments(torch.ops.inductor_moe.experts.default, args, kwargs)
    if a["fp8_recipe"] is not None:
        raise ValueError("inductor_moe.for_executorch: FP8 experts are emulated on CPU; export without config.fp8")
    x, ids, weights, w1, w2, b1, b2 = (a[name] for name in ("x", "ids", "weights", "w1", "w2", "b1", "b2"))
    act = Activation.of(a)
    num_tokens, k = ids.shape
    pairs = ids.flatten()
    rows = x.unsqueeze(1).expand(-1, k, -1).flatten(0, 1)
    h = _times_gathered(rows, w1, pairs, bits)
    if b1 is not None:
        h = h + b1.index_select(0, pairs)
    y = _times_gathered(act.forward(h), w2, pairs, bits)
    if b2 is not None:
        y = y + b2.index_select(0, pairs)
    acc = cpu.accumulation_dtype(x.dtype)
    out = (y.unflatten(0, (num_tokens, k)).to(acc) * weights.unsqueeze(-1).to(acc)).sum(1).to(x.dtype)
    return out, h, pairs, pairs.new_zeros(w1.shape[0], dtype=torch.int32)


def _times_gathered(rows, weight, pairs, bits=None):
    """``rows[p] @ weight[pairs[p]]`` for every pair p, as a product and a sum (XNNPACK's batched
    matmul of two runtime operands sizes its output wrongly, ExecuTorch 1.5.1); with ``bits``, of
    the weights quantized, dequantized as gathered."""
    if bits is None:
        return (rows.unsqueeze(-1) * weight.index_select(0, pairs)).sum(1)
    codes, scale = _quantized(weight, bits)
    gathered = codes.index_select(0, pairs)
    if bits == 4:  # two codes a byte, along the input dim: the even row's the low nibble
        nibbles = torch.stack([gathered.to(torch.int32) % 16, gathered.to(torch.int32) // 16], dim=2).flatten(1, 2)
        gathered = (nibbles - 16 * (nibbles >= 8).to(torch.int32))[:, :weight.shape[1]]  # two's complement
    groups = scale.shape[1]
    dequantized = gathered.unflatten(1, (groups, -1)).to(rows.dtype) * scale.index_select(0, pairs).unsqueeze(2).to(rows.dtype)
    return (rows.unsqueeze(-1) * dequantized.flatten(1, 2)).sum(1)


def _quantized(weight, bits: int):
    """(codes, scale [E, groups, out]) of ``weight`` [E, in, out]: symmetric, a scale per expert,
    output column and group of ``in`` (all of it for int8; 32 rows for int4, where they divide it);
    int8 codes, or int4 codes packed two to a uint8 along ``in`` (padded to even)."""
    top = 2 ** (bits - 1) - 1
    rows = weight.shape[1]
    group = 32 if bits == 4 and rows % 32 == 0 else rows
    blocks = weight.detach().float().unflatten(1, (rows // group, group))
    scale = blocks.abs().amax(2).clamp(min=1e-12) / top
    codes = (blocks / scale.unsqueeze(2)).round().clamp(-top - 1, top).to(torch.int8).flatten(1, 2)
    if bits == 4:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, codes.shape[1] % 2)).unflatten(1, (-1, 2))
        codes = ((codes[:, :, 0] & 15) | (codes[:, :, 1] << 4)).to(torch.uint8)
    return codes.contiguous(), scale.contiguous()  # a transposed weight's layout confuses ExecuTorch's dim order

"""A normalised view of dynamo's torch-IR nodes, the vocabulary every matcher is written in.

The pre-grad graph is not normalised: ``torch.softmax``, ``F.softmax`` and ``x.softmax`` are three
targets, in-place ops appear as ``operator.itruediv`` or ``call_method index_add_``, and arguments
come positionally or by keyword. ``call(node)`` names each operation once and binds its arguments
by parameter name, so a matcher asks ``c.name == "softmax" and c["dim"] == -1``.
"""

import inspect
import operator

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true


class NoMatch(Exception):
    """A candidate is not (or not safely) the pattern; the message says why, for the log."""


def require(condition: object, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)


def _signature(params: str) -> inspect.Signature:
    namespace: dict = {}
    exec(f"def f({params}): pass", namespace)
    return inspect.signature(namespace["f"])


# (name, signature, spellings): a spelling is a call_function target or ".method".
_TABLE = [
    ("linear", "input, weight, bias=None", F.linear),
    ("matmul", "input, other", torch.matmul, operator.matmul, ".matmul"),
    ("bmm", "input, mat2", torch.bmm, ".bmm"),
    ("mm", "input, mat2", torch.mm, ".mm"),
    ("einsum", "equation, *operands", torch.einsum, torch.functional.einsum),
    ("grouped_mm", "mat_a, mat_b, offs=None, bias=None, out_dtype=None", torch._grouped_mm,
     *([F.grouped_mm] if hasattr(F, "grouped_mm") else [])),
    ("softmax", "input, dim=None, _stacklevel=3, dtype=None", F.softmax),
    ("softmax", "input, dim, dtype=None", torch.softmax, ".softmax"),
    ("topk", "input, k, dim=-1, largest=True, sorted=True", torch.topk, ".topk"),
    ("max", "input, dim=None, keepdim=False", torch.max, ".max"),
    ("amax", "input, dim=(), keepdim=False", torch.amax, ".amax"),
    ("sum", "input, dim=None, keepdim=False, dtype=None", torch.sum, ".sum"),
    ("norm", "input, p='fro', dim=None, keepdim=False, dtype=None", torch.norm, ".norm"),
    ("div", "input, other, rounding_mode=None", torch.div, ".div", ".div_"),
    ("div", "input, other", operator.truediv, operator.itruediv, torch.true_divide),
    ("floordiv", "input, other", operator.floordiv, torch.floor_divide, ".floor_divide"),
    ("mul", "input, other", operator.mul, operator.imul, torch.mul, ".mul", ".mul_"),
    ("add", "input, other, alpha=1", operator.add, operator.iadd, torch.add, ".add", ".add_"),
    ("sub", "input, other, alpha=1", operator.sub, operator.isub, torch.sub, ".sub", ".sub_"),
    ("masked_fill", "input, mask, value", torch.masked_fill, ".masked_fill", ".masked_fill_"),
    ("clamp", "input, min=None, max=None", torch.clamp, ".clamp", ".clamp_"),
    ("invert", "input", operator.invert, torch.logical_not, ".logical_not"),
    ("gather", "input, dim, index, sparse_grad=False", torch.gather, ".gather"),
    ("expand", "input, *sizes", ".expand"),
    ("expand_as", "input, other", ".expand_as"),
    ("eq", "input, other", operator.eq, torch.eq, ".eq"),
    ("getitem", "input, index", operator.getitem),
    ("getattr", "input, name", getattr),
    ("setitem", "input, index, value", operator.setitem),
    ("reshape", "input, *shape", ".reshape", ".view"),
    ("reshape", "input, shape", torch.reshape),
    ("view_as", "input, other", ".view_as", ".reshape_as"),
    ("flatten", "input, start_dim=0, end_dim=-1", torch.flatten, ".flatten"),
    ("ravel", "input", torch.ravel, ".ravel"),
    ("unflatten", "input, dim, sizes", torch.unflatten, ".unflatten"),
    ("to", "input, *args, **kwargs", ".to", ".type", ".type_as", ".float", ".double", ".half",
     ".bfloat16", ".int", ".long", ".bool"),
    ("contiguous", "input, memory_format=None", ".contiguous"),
    ("transpose", "input, dim0, dim1", torch.transpose, ".transpose", torch.swapaxes, ".swapaxes", torch.swapdims,
     ".swapdims"),
    ("movedim", "input, source, destination", torch.movedim, ".movedim", torch.moveaxis, ".moveaxis"),
    ("t", "input", torch.t, ".t"),
    ("permute", "input, *dims", ".permute"),
    ("permute", "input, dims", torch.permute),
    ("unsqueeze", "input, dim", torch.unsqueeze, ".unsqueeze"),
    ("squeeze", "input, dim=None", torch.squeeze, ".squeeze"),
    ("chunk", "input, chunks, dim=0", torch.chunk, ".chunk"),
    ("cat", "tensors, dim=0", torch.cat, torch.concat, torch.concatenate),
    ("split", "input, split_size_or_sections, dim=0", torch.split, ".split"),
    ("tensor_split", "input, indices_or_sections, dim=0", torch.tensor_split, ".tensor_split"),
    ("unbind", "input, dim=0", torch.unbind, ".unbind"),
    ("repeat", "input, *sizes", ".repeat"),
    ("sort", "input, dim=-1, descending=False, stable=False", torch.sort, ".sort"),
    ("argsort", "input, dim=-1, descending=False, stable=False", torch.argsort, ".argsort"),
    ("histc", "input, bins=100, min=0, max=0", torch.histc, ".histc"),
    ("bincount", "input, weights=None, minlength=0", torch.bincount, ".bincount"),
    ("cumsum", "input, dim, dtype=None", torch.cumsum, ".cumsum"),
    ("index_select", "input, dim, index", torch.index_select, ".index_select"),
    ("index_add", "input, dim, index, source, alpha=1", torch.index_add, ".index_add", ".index_add_"),
    ("scatter", "input, dim, index, src=None, value=None, reduce=None", torch.scatter, ".scatter", ".scatter_"),
    ("scatter_add", "input, dim, index, src", torch.scatter_add, ".scatter_add", ".scatter_add_"),
    ("scatter_reduce", "input, dim, index, src, reduce, include_self=True", torch.scatter_reduce, ".scatter_reduce",
     ".scatter_reduce_"),
    ("index_put", "input, indices, values, accumulate=False", torch.index_put, torch.index_put_, ".index_put",
     ".index_put_"),
    ("index_copy", "input, dim, index, source", torch.index_copy, ".index_copy", ".index_copy_"),
    ("nonzero", "input, as_tuple=False", torch.nonzero, ".nonzero"),
    ("one_hot", "input, num_classes=-1", F.one_hot),
    ("where", "condition, input=None, other=None", torch.where),
    ("repeat_interleave", "input, repeats, dim=None, output_size=None", torch.repeat_interleave,
     ".repeat_interleave"),
    ("zeros", "*size, out=None, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False",
     torch.zeros),
    ("zeros_like", "input, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False, "
     "memory_format=None", torch.zeros_like),
    ("new_zeros", "input, *size, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False",
     ".new_zeros"),
    ("new_empty", "input, *size, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False",
     ".new_empty"),
    ("ones_like", "input, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False, "
     "memory_format=None", torch.ones_like),
    ("empty_like", "input, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False, "
     "memory_format=None", torch.empty_like),
    ("full_like", "input, fill_value, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False, "
     "memory_format=None", torch.full_like),
    ("new_full", "input, size, fill_value, dtype=None, layout=None, device=None, pin_memory=False, "
     "requires_grad=False", ".new_full"),
    ("arange", "*args, **kwargs", torch.arange),
    ("silu", "input, inplace=False", F.silu),
    ("gelu", "input, approximate='none'", F.gelu),
    ("relu", "input, inplace=False", F.relu),
    ("relu", "input", torch.relu, ".relu"),
    ("sigmoid", "input", torch.sigmoid, ".sigmoid"),
    ("sigmoid", "input", F.sigmoid),
]
_INPLACE = {operator.itruediv, operator.imul, operator.iadd, operator.isub, operator.setitem, torch.index_put_}

_FUNCTIONS: dict = {}
_METHODS: dict = {}
for _name, _params, *_spellings in _TABLE:
    for _spelling in _spellings:
        if isinstance(_spelling, str):
            _METHODS[_spelling[1:]] = (_name, _signature(_params))
        else:
            _FUNCTIONS[_spelling] = (_name, _signature(_params))


# keyword spellings torch accepts besides its own (NumPy's)
_KEYWORD_ALIASES = {"keepdims": "keepdim", "axis": "dim"}


class Call:
    """One operation: its canonical ``name``, arguments bound by parameter name, ``inplace``."""

    def __init__(self, node: Node, name: str, signature: inspect.Signature, inplace: bool):
        self.node = node
        self.name = name
        self.inplace = inplace
        kwargs = {_KEYWORD_ALIASES.get(key, key): v for key, v in node.kwargs.items()}
        bound = signature.bind(*node.args, **kwargs)
        bound.apply_defaults()
        self.args = bound.arguments

    def __getitem__(self, parameter: str):
        return self.args[parameter]

    def __repr__(self) -> str:
        return f"Call({self.name}, {self.node.format_node()})"


def call(node: object) -> Call | None:
    """The normalised operation of ``node``, or None for anything this table does not know."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):  # custom ops: transformers', torchtitan's
            target = target.overloadpacket
        if target == getattr(torch.ops.transformers, "grouped_mm_fallback", None):
            return Call(node, "grouped_mm", _signature("mat_a, mat_b, offs"), False)
        if target == getattr(torch.ops.torchtitan, "deterministic_scatter_add", None):
            return Call(node, "scatter_add", _signature("input, index, src, dim=0"), False)
        if target not in _FUNCTIONS:
            return None
        name, signature = _FUNCTIONS[target]
        inplace = target in _INPLACE
    elif node.op == "call_method" and node.target in _METHODS:
        name, signature = _METHODS[node.target]
        inplace = node.target.endswith("_")
    else:
        return None
    try:
        return Call(node, name, signature, inplace)
    except TypeError:  # a spelling this signature does not cover
        return None


# operations whose result is a view of their input
VIEWS = {"reshape", "view_as", "flatten", "unflatten", "ravel", "transpose", "t", "permute", "movedim", "unsqueeze",
         "squeeze", "chunk", "split", "tensor_split", "unbind", "expand", "expand_as"}


def _basic(index) -> bool:
    """Indexing with ints, slices, None and ... only: the result is a view."""
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, (int, slice)) for item in items)


def view_source(node: object) -> Node | None:
    """The tensor ``node`` is a view of, or None if it owns its memory (or is no tensor op)."""
    c = call(node)
    if c is None:
        return None
    if c.name in VIEWS or (c.name == "getattr" and c["name"] in ("T", "mT")):
        return c["input"]
    if c.name == "getitem" and isinstance(c["input"], Node) and isinstance(value(c["input"]), torch.Tensor) and _basic(c["index"]):
        return c["input"]
    return None


def is_view(node: object) -> bool:
    return view_source(node) is not None


def is_call(node: object, *names: str) -> bool:
    c = call(node)
    return c is not None and c.name in names


def expect(node: object, *names: str, what: str = "") -> Call:
    """``call(node)`` if it is one of ``names``, else NoMatch naming what was found."""
    c = call(node)
    require(c is not None and c.name in names, f"{what or 'value'} is {describe(node)}, not {' or '.join(names)}")
    return c


def describe(node: object) -> str:
    """A short name for what ``node`` computes, for messages: ``softmax``, ``amax``, a placeholder's name."""
    c = call(node)
    if c is not None:
        return c.name
    if not isinstance(node, Node):
        return repr(node)
    if node.op in ("call_function", "call_method", "call_module"):
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.name


def value(node: Node):
    """The fake tensor (or symbolic value) dynamo recorded for ``node``."""
    require("example_value" in node.meta, f"{node} has no recorded value")
    return node.meta["example_value"]


def shape(node: Node) -> tuple:
    return tuple(value(node).shape)


def dtype(node: Node) -> torch.dtype:
    return value(node).dtype


def same_size(a, b) -> bool:
    """Sizes provably equal (ints or symbolic), without adding a guard."""
    return statically_known_true(a == b)


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def number(x: object) -> float | None:
    """A Python number, or the value of a float that dynamo made symbolic (``dynamic=True`` turns a
    module's float attribute into an input): reading it specializes the graph on it, with a guard."""
    if isinstance(x, Node) and isinstance(x.meta.get("example_value"), torch.SymFloat):
        x = float(x.meta["example_value"])
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def is_last_dim(dim: object, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def scattered_constant(c: "Call"):
    """The constant a ``scatter`` writes, ``value=`` or a Python ``src``; None for a tensor source."""
    constant = c["value"] if c["src"] is None else c["src"]
    return None if isinstance(constant, Node) else constant


def getitem_users(node: Node) -> dict[int, Node]:
    """{index: node} for ``node[i]`` users of a tuple-valued node (topk, sort, where, chunk)."""
    users = {}
    for user in node.users:
        require(is_call(user, "getitem") and isinstance(user.args[1], int), f"{node} is used whole by {user}")
        require(user.args[1] not in users, f"{node}[{user.args[1]}] is taken twice")
        users[user.args[1]] = user
    return users

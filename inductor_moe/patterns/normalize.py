"""Before matching: in-place updates of tensors nothing else can see become functional ops.

``out.add_(bias)`` followed by reads of ``out`` (transformers' biased experts) becomes
``out_1 = out.add(bias)`` with the later reads moved to ``out_1``; so do ``/=``, ``*=``, ``+=``,
``scatter_``, ``masked_fill_``... The matchers then see one spelling. It is done only where no
one else can observe the update: the tensor was allocated in the graph by an op that never
returns an alias of its input (or is a view of such a tensor that nothing else views), and no
other view of it exists. ``setitem`` and ``index_add_`` keep their form: their matchers read it.
"""

import operator

import torch
from torch.fx import Graph, Node

from .fx import call, value

# operations whose result owns new memory, never an alias of an input
_ALLOCATING = {
    "linear", "matmul", "bmm", "grouped_mm", "softmax", "topk", "sum", "div", "floordiv", "mul", "add", "eq",
    "sort", "argsort", "histc", "bincount", "cumsum", "index_select", "index_add", "scatter", "one_hot",
    "repeat_interleave", "zeros", "zeros_like", "new_zeros", "ones_like", "empty_like", "arange", "scatter_add", "silu", "gelu", "relu",
    "sigmoid", "gather", "masked_fill", "clamp", "cat", "stack",
}
_VIEWS = {"reshape", "view_as", "flatten", "unflatten", "transpose", "t", "permute", "unsqueeze", "squeeze", "chunk", "expand"}
_FUNCTIONAL_OPERATORS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.itruediv: operator.truediv}


def _is_view(node: Node) -> bool:
    c = call(node)
    if c is None:
        return False
    if c.name == "getitem":  # basic indexing of a tensor views it; a tuple element or a gather does not
        base = value(c["input"])
        items = c["index"] if isinstance(c["index"], tuple) else (c["index"],)
        return isinstance(base, torch.Tensor) and all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)
    return c.name in _VIEWS


def _owned(node: Node) -> bool:
    """Whether node's memory is its own: allocated here, and seen through no other name."""
    if _is_view(node):
        source = call(node)["input"]
        return isinstance(source, Node) and list(source.users) == [node] and _owned(source)
    c = call(node)
    if c is None or c.inplace:
        return False
    if c.name == "getitem":  # an element of topk's or sort's result
        producer = call(c["input"])
        return producer is not None and producer.name in ("topk", "sort") and not producer.inplace
    return c.name in _ALLOCATING


def _functional_form(node: Node):
    """(op, target) of the functional twin of an in-place node."""
    if node.op == "call_function":
        return "call_function", _FUNCTIONAL_OPERATORS.get(node.target)
    return "call_method", node.target[:-1]


def functionalize(graph: Graph) -> None:
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        c = call(node)
        if c is None or not c.inplace or c.name in ("setitem", "index_add"):
            continue
        base = node.args[0]
        op, target = _functional_form(node)
        if target is None or not isinstance(base, Node) or not _owned(base):
            continue
        if any(_is_view(user) and position[user] < position[node] for user in base.users):
            continue  # a view taken earlier could read the update
        with graph.inserting_before(node):
            replacement = graph.create_node(op, target, node.args, node.kwargs)
        replacement.meta = dict(node.meta)
        position[replacement] = position[node]
        node.replace_all_uses_with(replacement)
        for user in list(base.users):
            if user is not node and user is not replacement and position[user] > position[node]:
                user.replace_input_with(base, replacement)
        graph.erase_node(node)

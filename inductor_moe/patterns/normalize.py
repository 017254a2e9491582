"""Before matching: one spelling for each operation the matchers read.

    t[idx], t[idx, :], t[idx, ...], t[None, idx]      ->  t.index_select(0, idx) [.unsqueeze(d)]
    torch.gather(t, 0, idx[:, None].expand_as(t'))    ->  t.index_select(0, idx)
    v[:, None], v[..., None], v.view(-1, 1)           ->  v.unsqueeze(d)          (d >= 0)
    t.view(-1, 1)[idx]                                ->  t.reshape(-1).index_select(0, idx).unsqueeze(1)
    t.view(t.shape), t.unsqueeze(0).reshape(t.shape), t[..., 0] of a unit dim  ->  t, t, t.squeeze(d)
    x.mT, x.T, x.t(), x.permute(0, 2, 1), x.swapaxes(1, 2), x.movedim(1, 2)
                                                      ->  x.transpose(i, j)       (0 <= i < j)
    x.flatten(), x.ravel()                            ->  x.reshape(-1)
    t.view(a).reshape(t.shape)                        ->  t
    sigmoid(full(-inf).scatter(d, idx, v))            ->  zeros.scatter(d, idx, sigmoid(v))
    torch.div(a, k, rounding_mode="floor"), torch.floor_divide(a, k), and "trunc" of a >= 0
                                                      ->  a // k
    h.split(n, -1), torch.split(h, [n, n], -1), h.tensor_split(2, -1), h[..., :n], h[..., n:]
                                                      ->  h.chunk(2, -1)[i]
    x.unsqueeze(1).expand(T, k, H).reshape(T * k, H)  ->  x.repeat_interleave(k, 0)
    out.index_put_((idx,), rows, accumulate=True), out.scatter_add_(0, idx[:, None].expand_as(rows), rows),
    out.scatter_reduce_(0, ..., "sum")                ->  out.index_add_(0, idx, rows)
    torch.nonzero(m, as_tuple=True), m.nonzero()[:, i], m.nonzero().unbind(1)
                                                      ->  torch.where(m)[i]
    torch.mm(a, b), torch.einsum of two operands      ->  torch.matmul (with permutes, unsqueezes)

Each rule replaces values by the same values, views by the same views, and gradients by the
same gradients (an einsum becomes the matmul it computes), so a graph the matchers then leave
alone computes what it did. Then in-place updates of tensors nothing else can see become
functional ops: ``out.add_(bias)`` followed by reads of ``out`` (transformers' biased experts)
becomes ``out_1 = out.add(bias)`` with the later reads moved to ``out_1``; so do ``/=``, ``*=``,
``+=``, ``scatter_``, ``masked_fill_``... That is done only where no one else can observe the
update: the tensor was allocated in the graph by an op that never returns an alias of its input
(or is a view of such a tensor that nothing else views), and no other view of it exists.
``setitem`` and ``index_add_`` keep their form: their matchers read it.
"""

import operator

import torch
from torch.fx import Graph, Node

from .fx import call, dtype, is_call, is_view, number, same_shape, same_size, shape, value, view_source
from .rewrite import Emitter, drop_dead_code, erase_unused

# --- canonical spellings ---------------------------------------------------------------------------


def _dim(d: object, ndim: int) -> int | None:
    return d % ndim if isinstance(d, int) and -ndim <= d < ndim else None


def _is_index(node: object) -> bool:
    """A 1-D integer tensor (an index of rows)."""
    return isinstance(node, Node) and isinstance(v := value(node), torch.Tensor) and v.dim() == 1 \
        and not v.dtype.is_floating_point and v.dtype != torch.bool


def _unsqueezed(emit: Emitter, node: Node, dims: list) -> Node:
    for d in sorted(dims):
        node = emit.method("unsqueeze", node, d)
    return node


def _index(graph: Graph, node: Node, c) -> Node | None:
    """``t[idx]`` with other items only ``:``, ``...`` and ``None`` -> index_select, unsqueezes;
    ``t[...]`` with only those -> unsqueezes."""
    base = c["input"]
    if not isinstance(base, Node) or not isinstance(value(base), torch.Tensor):
        return None
    items = c["index"] if isinstance(c["index"], tuple) else (c["index"],)
    tensors = [i for i, item in enumerate(items) if isinstance(item, Node)]
    trivial = all(item is None or item is Ellipsis or item == slice(None) or i in tensors for i, item in enumerate(items))
    if not trivial or len(tensors) > 1 or items.count(Ellipsis) > 1:
        return None
    if tensors and not (_is_index(items[tensors[0]]) and all(item is None for item in items[:tensors[0]])):
        return None  # the index must select the first dim: t[None, idx] is fine, t[:, idx] is not
    ndim = value(base).dim()
    explicit = sum(item is not None and item is not Ellipsis for item in items)
    out_dims, position, nones = [], 0, []
    for item in items:  # the output dim of each item, Ellipsis spanning the dims it stands for
        if item is None:
            nones.append(position)
            position += 1
        elif item is Ellipsis:
            position += ndim - explicit
        else:
            position += 1
    if not nones and not tensors:
        return None
    emit = Emitter(graph, node, node)
    out = emit.method("index_select", base, 0, items[tensors[0]]) if tensors else base
    return _unsqueezed(emit, out, nones)


def _column_view(graph: Graph, node: Node, c) -> Node | None:
    """``t.view(-1, 1)`` (any t) -> ``t.reshape(-1).unsqueeze(1)``; a reshape to t's own shape ->
    ``t``, also one that only undoes ``t.unsqueeze(d)`` (transformers' ``x[None, idx].reshape(-1, H)``)."""
    source = c["input"]
    if not isinstance(source, Node) or not isinstance(value(source), torch.Tensor):
        return None
    if same_shape(shape(node), shape(source)):
        return source
    if is_call(source, "unsqueeze") and same_shape(shape(node), shape(call(source)["input"])):
        return call(source)["input"]
    if len(shape(node)) != 2 or not same_size(shape(node)[1], 1) or len(shape(source)) == 0:
        return None
    emit = Emitter(graph, node, node)
    flat = source if len(shape(source)) == 1 else emit.method("reshape", source, -1)
    return emit.method("unsqueeze", flat, 1)


def _round_trip(graph: Graph, node: Node, c) -> Node | None:
    """``t.reshape(a).reshape(t.shape)`` -> ``t`` (Llama 4's expert outputs, ``view(-1, H)`` then
    ``reshape(E, -1, H)``)."""
    inner = call(c["input"])
    if inner is None or inner.name != "reshape" or not same_shape(shape(node), shape(inner["input"])):
        return None
    return inner["input"]


def _scored_scatter(graph: Graph, node: Node, c) -> Node | None:
    """``sigmoid(full(-inf).scatter(d, idx, v))`` (casts between too) -> ``zeros.scatter(d, idx,
    sigmoid(v))``: sigmoid(-inf) is 0 exactly, so the scores of the scattered values and 0 elsewhere
    (Llama 4's router)."""
    source, casts = c["input"], []
    while is_call(source, "to"):
        casts.append(dtype(source))
        source = call(source)["input"]
    scattered = call(source)
    if scattered is None or scattered.name != "scatter" or scattered.inplace or not isinstance(scattered["src"], Node):
        return None
    filled = call(scattered["input"])
    if scattered["reduce"] is not None or filled is None or filled.name not in ("full_like", "new_full") \
            or number(filled["fill_value"]) != float("-inf"):
        return None
    emit = Emitter(graph, node, node)
    values = scattered["src"]
    for cast in reversed(casts):
        values = emit.method("to", values, cast)
    if filled.name == "full_like":
        zeros = emit.function(torch.zeros_like, filled["input"], dtype=dtype(node))
    else:
        zeros = emit.method("new_zeros", filled["input"], filled["size"], dtype=dtype(node))
    return emit.method("scatter", zeros, scattered["dim"], scattered["index"], emit.function(torch.sigmoid, values))


def _gather_then_column(graph: Graph, node: Node, c) -> Node | None:
    """``v.unsqueeze(1).index_select(0, idx)`` of a 1-D v -> ``v.index_select(0, idx).unsqueeze(1)``."""
    column = call(c["input"])
    if c["dim"] != 0 or column is None or column.name != "unsqueeze" or column["dim"] != 1 or len(shape(column["input"])) != 1:
        return None
    emit = Emitter(graph, node, node)
    return emit.method("unsqueeze", emit.method("index_select", column["input"], 0, c["index"]), 1)


def _unit_select(graph: Graph, node: Node, c) -> Node | None:
    """``t[..., 0]`` (an int on one unit dim, the other items ``:`` or ``...``) -> ``t.squeeze(d)``."""
    base = c["input"]
    if not isinstance(base, Node) or not isinstance(value(base), torch.Tensor):
        return None
    items = c["index"] if isinstance(c["index"], tuple) else (c["index"],)
    ints = [i for i, item in enumerate(items) if isinstance(item, int) and not isinstance(item, bool)]
    rest_trivial = all(item is Ellipsis or item == slice(None) for i, item in enumerate(items) if i not in ints)
    if len(ints) != 1 or not rest_trivial or items.count(Ellipsis) > 1:
        return None
    ndim = len(shape(base))
    at = ints[0]
    d = at if Ellipsis not in items[:at] else ndim - (len(items) - at)
    if not 0 <= d < ndim or items[at] not in (0, -1) or not same_size(shape(base)[d], 1):
        return None
    return Emitter(graph, node, node).method("squeeze", base, d)


def _unsqueeze(graph: Graph, node: Node, c) -> Node | None:
    d = c["dim"]
    if not isinstance(d, int) or d >= 0:
        return None
    return Emitter(graph, node, node).method("unsqueeze", c["input"], d % len(shape(node)))


def _transposed(graph: Graph, node: Node, c) -> Node | None:
    """Any swap of two dims -> ``transpose(i, j)``, 0 <= i < j, as a method call."""
    x = c["input"]
    ndim = len(shape(x))
    if c.name == "getattr":
        if c["name"] == "mT" or (c["name"] == "T" and ndim == 2):
            pair = (ndim - 2, ndim - 1)
        else:
            return None
    elif c.name == "t":
        pair = (0, 1) if ndim == 2 else None
    elif c.name in ("permute", "movedim"):
        if c.name == "permute":
            dims = c["dims"][0] if len(c["dims"]) == 1 and isinstance(c["dims"][0], (tuple, list)) else c["dims"]
        else:
            source, destination = _dim(c["source"], ndim), _dim(c["destination"], ndim)
            if source is None or destination is None or abs(source - destination) != 1:
                return None
            dims = list(range(ndim))
            dims[source], dims[destination] = destination, source
        dims = [_dim(d, ndim) for d in dims]
        moved = [i for i, d in enumerate(dims) if d != i]
        pair = tuple(moved) if len(moved) == 2 and None not in dims else None
    else:  # transpose, swapaxes, swapdims
        d0, d1 = _dim(c["dim0"], ndim), _dim(c["dim1"], ndim)
        if d0 is None or d1 is None or d0 == d1:
            return None
        pair = (min(d0, d1), max(d0, d1))
        if node.op == "call_method" and node.target == "transpose" and (c["dim0"], c["dim1"]) == pair:
            return None  # already canonical
    return None if pair is None else Emitter(graph, node, node).method("transpose", x, *pair)


def _flattened(graph: Graph, node: Node, c) -> Node | None:
    """``x.flatten()`` (all dims) or ``x.ravel()`` -> ``x.reshape(-1)``."""
    ndim = len(shape(c["input"]))
    if ndim == 0 or (c.name == "flatten" and (_dim(c["start_dim"], ndim), _dim(c["end_dim"], ndim)) != (0, ndim - 1)):
        return None
    return Emitter(graph, node, node).method("reshape", c["input"], -1)


def _non_negative(node: object) -> bool:
    """Values known to be >= 0: sort positions, arange from 0, where/nonzero indices."""
    c = call(node)
    if c is None:
        return False
    if c.name == "argsort" or (c.name == "getitem" and c["index"] == 1 and is_call(c["input"], "sort")):
        return True
    if c.name == "getitem" and is_call(c["input"], "where", "nonzero"):
        return True
    return c.name == "arange" and len(c["args"]) == 1 and isinstance(c["args"][0], int | Node)


def _floor_division(graph: Graph, node: Node, c) -> Node | None:
    if node.op == "call_function" and node.target is operator.floordiv:
        return None
    mode = c.args.get("rounding_mode") if c.name == "div" else "floor"
    divisor = number(c["other"])
    if mode == "floor" or (mode == "trunc" and divisor is not None and divisor > 0 and _non_negative(c["input"])):
        return Emitter(graph, node, node).function(operator.floordiv, c["input"], c["other"])
    return None


def _chunk(graph: Graph, node: Node, source: Node) -> Node:
    """The node ``source.chunk(2, -1)``, right after ``source``: one for all its readers."""
    for user in source.users:
        if user.op == "call_method" and user.target == "chunk" and user.args == (source, 2, -1) and user.prev is source:
            return user
    point = source.next
    while point.op == "placeholder":
        point = point.next
    return Emitter(graph, point, node).method("chunk", source, 2, -1)


def _halves(graph: Graph, node: Node, c) -> Node | None:
    """Two equal parts along the last dim -> ``chunk(2, -1)``."""
    x = c["input"]
    if not isinstance(x, Node) or not isinstance(value(x), torch.Tensor):
        return None
    ndim = len(shape(x))
    if c.name in ("split", "tensor_split"):
        parts = c["split_size_or_sections"] if c.name == "split" else c["indices_or_sections"]
        width = shape(x)[-1]
        halves = {"split": parts in ([width // 2] * 2, (width // 2,) * 2) or (isinstance(parts, int) and 2 * parts == width),
                  "tensor_split": parts == 2}[c.name]
        dim = c["dim"]
        if not (halves and _dim(dim, ndim) == ndim - 1 and isinstance(width, int) and width % 2 == 0):
            return None
        return _chunk(graph, node, x)
    if c.name == "chunk":
        if c["chunks"] != 2 or _dim(c["dim"], ndim) != ndim - 1 or (node.op == "call_method" and c["dim"] == -1):
            return None
        return _chunk(graph, node, x)
    # getitem: h[..., :n] or h[..., n:] (also h[:, :n] on 2-D h) with 2n the last dim
    items = c["index"] if isinstance(c["index"], tuple) else (c["index"],)
    if len(items) < 2 or not isinstance(items[-1], slice) or items[-1].step not in (None, 1):
        return None
    lead = items[:-1]
    if not (lead == (Ellipsis,) or (len(items) == ndim and all(i == slice(None) for i in lead))):
        return None
    width = shape(x)[-1]
    if not isinstance(width, int) or width % 2:
        return None
    half = width // 2
    start, stop = items[-1].start or 0, items[-1].stop
    part = 0 if (start, stop) == (0, half) else 1 if start == half and stop in (None, width) else None
    if part is None:
        return None
    chunk = _chunk(graph, node, x)
    return Emitter(graph, node, node).function(operator.getitem, chunk, part)


def _repeated_rows(graph: Graph, node: Node, c) -> Node | None:
    """``x.unsqueeze(1).expand(T, k, ...).reshape(T * k, ...)`` -> ``x.repeat_interleave(k, 0)``."""
    expanded = call(c["input"])
    if expanded is None or expanded.name != "expand" or not is_call(expanded["input"], "unsqueeze"):
        return None
    unsqueezed = call(expanded["input"])
    x = unsqueezed["input"]
    xs = shape(x)
    if _dim(unsqueezed["dim"], len(xs) + 1) != 1 or len(shape(expanded.node)) != len(xs) + 1:
        return None
    k = shape(expanded.node)[1]
    if not isinstance(k, int) or not same_shape(shape(expanded.node), (xs[0], k, *xs[1:])):
        return None
    if not same_shape(shape(node), (xs[0] * k, *xs[1:])):
        return None
    return Emitter(graph, node, node).method("repeat_interleave", x, k, dim=0)


def _row_index(index: object, rows_shape: tuple) -> Node | None:
    """``idx`` for an index that repeats ``idx`` across each row: ``idx.unsqueeze(1).expand(...)``,
    ``.expand_as(...)`` or ``.repeat(1, n)``, of the shape ``rows_shape``."""
    c = call(index)
    if c is None or c.name not in ("expand", "expand_as", "repeat") or not same_shape(shape(index), rows_shape):
        return None
    if c.name == "repeat" and not (len(c["sizes"]) == 2 and c["sizes"][0] == 1):
        return None
    column = call(c["input"])
    if column is None or column.name != "unsqueeze" or _dim(column["dim"], 2) != 1 or len(rows_shape) != 2:
        return None
    i = column["input"]
    return i if _is_index(i) else None


def _row_gather(graph: Graph, node: Node, c) -> Node | None:
    """``torch.gather(t, 0, idx[:, None].expand(-1, H))`` (or of 1-D t by 1-D idx) -> index_select."""
    t, index = c["input"], c["index"]
    if _dim(c["dim"], len(shape(t))) != 0:
        return None
    if len(shape(t)) == 1 and _is_index(index):
        rows = index
    elif len(shape(t)) == 2 and same_size(shape(index)[1], shape(t)[1]):
        rows = _row_index(index, shape(index))
    else:
        rows = None
    return None if rows is None else Emitter(graph, node, node).method("index_select", t, 0, rows)


def _accumulation(graph: Graph, node: Node, c) -> Node | None:
    """Sums of rows into rows of ``out`` -> ``out.index_add_(0, idx, rows)`` (or ``index_add``)."""
    if node.op == "call_function" and node.target == getattr(torch.ops.torchtitan, "deterministic_scatter_add", None):
        return None  # a deterministic op of the model's own: kept, whatever happens to the block
    out = c["input"]
    if c.name == "index_put":
        indices, rows = c["indices"], c["values"]
        if not (c["accumulate"] is True and isinstance(indices, (tuple, list)) and len(indices) == 1):
            return None
        idx = indices[0] if _is_index(indices[0]) else None
    else:
        if c.name == "scatter_reduce" and (c["reduce"] != "sum" or c["include_self"] is not True):
            return None
        rows = c["src"]
        idx = _row_index(c["index"], shape(rows)) if _dim(c["dim"], len(shape(out))) == 0 else None
    if idx is None or not isinstance(rows, Node) or dtype(rows) != dtype(out):
        return None
    if not (same_shape(shape(rows)[1:], shape(out)[1:]) and same_size(shape(rows)[0], shape(idx)[0])):
        return None
    in_place = node.op == "call_method" and node.target.endswith("_") or node.target is torch.index_put_
    return Emitter(graph, node, node).method("index_add_" if in_place else "index_add", out, 0, idx, rows)


def _nonzero(graph: Graph, node: Node, c) -> Node | None:
    """``nonzero(m, as_tuple=True)`` -> ``where(m)``; ``m.nonzero()[:, i]`` -> ``where(m)[i]``,
    ``m.nonzero().unbind(1)`` -> ``where(m)``."""
    if c.name == "nonzero":
        return Emitter(graph, node, node).function(torch.where, c["input"]) if c["as_tuple"] else None
    nonzero = call(c["input"])
    if nonzero is None or nonzero.name != "nonzero" or nonzero["as_tuple"]:
        return None
    if c.name == "unbind":
        return Emitter(graph, node, node).function(torch.where, nonzero["input"]) if c["dim"] in (1, -1) else None
    items = c["index"]
    if not (isinstance(items, tuple) and len(items) == 2 and items[0] == slice(None) and isinstance(items[1], int)):
        return None
    # one where for all the nonzero's columns, right after it: before every reader
    where = nonzero.node.next
    if not (is_call(where, "where") and where.args == (nonzero["input"],)):
        where = Emitter(graph, nonzero.node.next, node).function(torch.where, nonzero["input"])
    return Emitter(graph, node, node).function(operator.getitem, where, items[1])


def _matmul(graph: Graph, node: Node, c) -> Node | None:
    if c.name == "mm":
        return Emitter(graph, node, node).function(torch.matmul, c["input"], c["mat2"])
    return _einsum(graph, node, c)


def _einsum(graph: Graph, node: Node, c) -> Node | None:
    """A two-operand einsum that is one (batched) matrix product -> matmul with the operands'
    dims moved into [batch, rows, reduced] x [batch, reduced, columns]. A batch dim of one operand
    only is broadcast over the other (``einsum("th,ehn->etn", x, w)``: every expert on every token)."""
    operands = c["operands"][0] if len(c["operands"]) == 1 and isinstance(c["operands"][0], (list, tuple)) else c["operands"]
    equation = c["equation"].replace(" ", "") if isinstance(c["equation"], str) else ""
    if len(operands) != 2 or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    letters = inputs.split(",")
    if len(letters) != 2 or any(len(set(s)) != len(s) or len(s) != len(shape(t)) for s, t in zip(letters, operands)):
        return None
    a, b = letters
    reduced = [x for x in a if x in b and x not in out]
    own = [[x for x in s if x not in other] for s, other in ((a, b), (b, a))]
    if len(reduced) != 1 or len(set(out)) != len(out) or any(x not in out for side in own for x in side):
        return None
    # each side's matrix dim: its own letter that comes last in the output (or a unit dim); the rest batch
    free = [[x for x in out if x in side][-1:] or ["<unit>"] for side in own]
    batch = [x for x in out if x not in free[0] + free[1]]

    def layout(side: int, left: bool) -> list:
        return batch + (free[side] + reduced if left else reduced + free[side])

    def permutes(order: tuple[int, int]) -> int:
        return sum([x for x in layout(side, left) if x in letters[side]] != list(letters[side])
                   for side, left in zip(order, (True, False)))

    left_side, right_side = min(((0, 1), (1, 0)), key=permutes)
    emit = Emitter(graph, node, node)
    prepared = []
    for side, left in ((left_side, True), (right_side, False)):
        target, t = layout(side, left), operands[side]
        present = [x for x in target if x in letters[side]]
        if present != list(letters[side]):
            t = emit.method("permute", t, *[letters[side].index(x) for x in present])
        for position, x in enumerate(target):
            if x not in letters[side]:  # a unit dim: broadcast, or a vector's missing matrix dim
                t = emit.method("unsqueeze", t, position)
        prepared.append(t)
    product = emit.function(torch.matmul, *prepared)
    result = batch + free[left_side] + free[right_side]
    for position in sorted((i for i, x in enumerate(result) if x == "<unit>"), reverse=True):
        product = emit.method("squeeze", product, position)
        del result[position]
    if result != list(out):
        product = emit.method("permute", product, *[result.index(x) for x in out])
    return product


# canonical name -> rules that may rewrite a call of it
_RULES = {
    "getitem": (_index, _halves, _nonzero, _unit_select),
    "index_select": (_gather_then_column,),
    "reshape": (_column_view, _round_trip),
    "sigmoid": (_scored_scatter,),
    "unsqueeze": (_unsqueeze,),
    "getattr": (_transposed,), "t": (_transposed,), "permute": (_transposed,), "movedim": (_transposed,),
    "transpose": (_transposed,),
    "flatten": (_flattened,), "ravel": (_flattened,),
    "div": (_floor_division,), "floordiv": (_floor_division,),
    "split": (_halves,), "tensor_split": (_halves,), "chunk": (_halves,),
    "gather": (_row_gather,),
    "index_put": (_accumulation,), "scatter_add": (_accumulation,), "scatter_reduce": (_accumulation,),
    "nonzero": (_nonzero,), "unbind": (_nonzero,),
    "mm": (_matmul,), "einsum": (_matmul,),
}
_RULES["reshape"] += (_repeated_rows,)


def _written(node: Node) -> bool:
    """Whether ``node``, or a view of it, is updated in place: then its spelling is part of what
    the update means (a slice that becomes one of ``chunk``'s views can no longer be written)."""
    def updates(user: Node) -> bool:  # copy_, fill_ and the like are no ops of fx's table
        in_place = getattr(call(user), "inplace", False) or user.op == "call_method" and user.target.endswith("_")
        return in_place and user.args[:1] == (node,)

    return any(updates(user) or (view_source(user) is node and _written(user)) for user in node.users)


def _merge_twin_views(graph: Graph) -> None:
    """One node for views of one tensor taken alike (an einsum per projection makes its own
    ``x.unsqueeze(0)``, two projections their own ``split``), and for one part of a split taken
    twice: they alias the same memory, so one stands for all of them."""
    seen: dict = {}
    for node in list(graph.nodes):
        part = is_call(node, "getitem") and is_call(node.args[0], "split", "chunk", "tensor_split", "unbind")
        if not (is_view(node) or part):
            continue
        key = (node.op, node.target, str(node.args), str(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def canonicalize(graph: Graph) -> None:
    """Rewrite every spelling above into its canonical form (until none is left)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node._erased or (is_view(node) and _written(node)):
                continue
            c = call(node)
            for rule in _RULES.get(c.name, ()) if c is not None else ():
                try:
                    replacement = rule(graph, node, c)
                except (KeyError, TypeError, IndexError):  # an unusual call of a known op: left as written
                    replacement = None
                if replacement is not None:
                    node.replace_all_uses_with(replacement)
                    erase_unused(graph, node)
                    changed = True
                    break
    _merge_twin_views(graph)


# --- in-place updates of fresh tensors -------------------------------------------------------------

# operations whose result owns new memory, never an alias of an input
_ALLOCATING = {
    "linear", "matmul", "bmm", "grouped_mm", "softmax", "topk", "sum", "div", "floordiv", "mul", "add", "sub", "eq",
    "sort", "argsort", "histc", "bincount", "cumsum", "index_select", "index_add", "scatter", "one_hot",
    "repeat_interleave", "zeros", "zeros_like", "new_zeros", "new_empty", "ones_like", "empty_like", "arange", "scatter_add", "silu", "gelu", "relu",
    "sigmoid", "gather", "masked_fill", "clamp", "cat", "stack", "full_like", "new_full",
}
_FUNCTIONAL_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                         operator.itruediv: operator.truediv}


def _owned(node: Node) -> bool:
    """Whether node's memory is its own: allocated here, and seen through no other name."""
    if is_view(node):
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
        if any(is_view(user) and position[user] < position[node] for user in base.users):
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


def normalize(graph: Graph) -> None:
    """Canonical spellings and functional updates of fresh tensors: what every matcher reads.
    Spellings again after the updates: a rule may read the value an update makes, as it does
    ``full(-inf).scatter_(...)``'s."""
    drop_dead_code(graph)
    canonicalize(graph)
    functionalize(graph)
    canonicalize(graph)

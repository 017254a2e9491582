"""The expert body: two projections around an activation, however a style spells them.

    down(act(gate(v)) * up(v))                        gated, separate gate and up projections
    down(act(g) * u) with g, u = up(v).chunk(2, -1)   gated, one fused gate_up projection
    down(act(up(v)))                                  plain MLP
    gated with h = up(v) split into even and odd columns (``h[..., ::2]``, ``h[..., 1::2]``), and
    gpt-oss's clamped SwiGLU ``(clamp(u, -l, l) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=l)``

A style passes ``project``, which recognises one projection in its own terms (an ``nn.Linear``
per expert, ``_grouped_mm`` over stacked weights, ``bmm`` over gathered weights) and says where
its weight and bias come from. ``match_mlp`` does the rest, so every style accepts the same
bodies and refuses the same things.
"""

import dataclasses
from collections.abc import Callable

from torch.fx import Node

from ..ops.activations import ACTIVATIONS, Activation, activation_name
from .fx import (
    NoMatch, call, describe, dtype, expect, getitem_users, is_call, is_last_dim, number, require, same_size, shape,
)


@dataclasses.dataclass(frozen=True)
class Weight:
    """How to assemble a stacked ``[E, in, out]`` weight or ``[E, out]`` bias from graph values.

    ``parts`` are concatenated along ``out``; a part is a node holding all experts (``[E, ...]``)
    or a tuple of per-expert nodes to stack. ``out_in``: stored as ``[..., out, in]``
    (``nn.Linear``'s layout), so the op gets a transposed view.
    """

    parts: tuple
    out_in: bool = False


@dataclasses.dataclass(frozen=True)
class Projection:
    input: Node
    weight: Weight
    bias: Weight | None
    nodes: frozenset
    bias_index: Node | None = None  # per-row expert ids a stacked bias is gathered with


@dataclasses.dataclass(frozen=True)
class ExpertMLP:
    activation: Activation
    w1: Weight
    b1: Weight | None
    w2: Weight
    b2: Weight | None
    input: Node  # the rows the body reads
    nodes: frozenset  # the body's nodes, input excluded
    bias_indices: frozenset  # per-row expert ids the style must vouch for
    row_scale: Node | None = None  # a [rows, 1] column scaling the down projection's input


Project = Callable[[Node], Projection]


def skip_noop_casts(node: Node) -> tuple[Node, set]:
    """Walk back through ``.to(...)``/``.contiguous()`` that change nothing (HF's ``x.to(w.dtype)``)."""
    skipped = set()
    while (c := call(node)) and c.name in ("to", "contiguous") and dtype(c["input"]) == dtype(node):
        skipped.add(node)
        node = c["input"]
    return node, skipped


def _product(node: Node) -> tuple[list, set]:
    """(factors, mul nodes) of a product ``a * b * ...`` in any grouping; inner products count
    as groupings only where nothing else reads them."""
    c = call(node)
    if c is None or c.name != "mul" or c.inplace:
        return [node], set()
    factors, nodes = [], {node}
    for operand in (c["input"], c["other"]):
        if isinstance(operand, Node) and is_call(operand, "mul") and len(operand.users) == 1:
            inner, inner_nodes = _product(operand)
            factors, nodes = factors + inner, nodes | inner_nodes
        else:
            factors.append(operand)
    return factors, nodes


def _elementwise(node: Node) -> tuple[str, Node, set] | None:
    """(function, input, nodes) for a supported elementwise activation, including ``x * sigmoid(x)``."""
    c = call(node)
    if c is None:
        return None
    if c.name in ("silu", "relu"):
        return c.name, c["input"], {node}
    if c.name == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}[c["approximate"]], c["input"], {node}
    if c.name == "mul":
        for p, q in ((c["input"], c["other"]), (c["other"], c["input"])):
            if is_call(q, "sigmoid") and call(q)["input"] is p:
                return "silu", p, {node, q}
    return None


def _columns(index: object, start: int, ndim: int) -> bool:
    """``index`` is ``[..., start::2]`` (or ``[:, start::2]``): every other column of the last dim."""
    if not isinstance(index, tuple) or not index:
        return False
    *lead, last = index
    full = all(i is Ellipsis or i == slice(None) for i in lead) and (Ellipsis in lead or len(index) == ndim)
    return full and isinstance(last, slice) and (last.start or 0) == start and last.stop is None and last.step == 2


def _split_gate_up(gate: Node, up: Node) -> tuple[Node, bool, set] | None:
    """(h, interleaved, nodes) if gate, up are ``h.chunk(2, -1)``'s halves in that order, or
    (interleaved) ``h[..., ::2]`` and ``h[..., 1::2]``; None if they are no split of one tensor."""
    if not (is_call(gate, "getitem") and is_call(up, "getitem")):
        return None
    source = call(gate)["input"]
    if call(up)["input"] is not source:
        return None
    chunk = call(source)
    if chunk is None or chunk.name != "chunk":
        ndim = len(shape(source))
        if _columns(call(gate)["index"], 0, ndim) and _columns(call(up)["index"], 1, ndim):
            return source, True, set()
        return None
    if chunk["chunks"] != 2:
        return None
    if not is_last_dim(chunk["dim"], len(shape(chunk["input"]))):
        return None
    halves = getitem_users(chunk.node)
    require(halves.get(0) is gate and halves.get(1) is up, "gate is the second half of the fused projection")
    return chunk["input"], False, {source}


def _concat(a: Weight | None, b: Weight | None) -> Weight | None:
    if a is None and b is None:
        return None
    require(a is not None and b is not None, "only one of the gate and up projections has a bias")
    require(a.out_in == b.out_in, "gate and up weights are stored in different layouts")
    return Weight(a.parts + b.parts, a.out_in)


_SUPPORTED = ", ".join(sorted(ACTIVATIONS))


def _operands(c, want) -> tuple | None:
    """(first, second) of a commutative call with ``want(first)`` true, trying both orders."""
    for first, second in ((c["input"], c["other"]), (c["other"], c["input"])):
        if want(first):
            return first, second
    return None


def _clamped_swiglu(a: Node) -> tuple[str, Node, Node, set, dict] | None:
    """gpt-oss's ``(clamp(up, -limit, limit) + 1) * (g * sigmoid(g * alpha))``, ``g = clamp(gate, max=limit)``."""
    c = call(a)
    if c is None or c.name != "mul":
        return None
    pair = _operands(c, lambda n: is_call(n, "add") and call(n)["alpha"] == 1 and
                     _operands(call(n), lambda m: number(m) == 1.0) is not None)
    if pair is None:
        return None
    plus_one, glu = pair
    up_clamp = _operands(call(plus_one), lambda m: number(m) == 1.0)[1]
    g = call(glu)
    if not (is_call(glu, "mul") and is_call(up_clamp, "clamp")):
        return None
    found = _operands(g, lambda n: is_call(n, "sigmoid") and is_call(call(n)["input"], "mul"))
    if found is None:
        return None
    sigmoid, gate_clamp = found
    scaled = call(call(sigmoid)["input"])
    alpha_gate = _operands(scaled, lambda n: n is gate_clamp)
    if alpha_gate is None or number(alpha_gate[1]) is None or not is_call(gate_clamp, "clamp"):
        return None
    gc, uc = call(gate_clamp), call(up_clamp)
    limit = number(gc["max"])
    require(gc["min"] is None and limit is not None, f"gate clamp to [{gc['min']}, {gc['max']}] is not clamp(max=limit)")
    require(number(uc["min"]) == -limit and number(uc["max"]) == limit,
            f"up is clamped to [{uc['min']}, {uc['max']}], the gate at max={limit}: not gpt-oss's clamped SwiGLU")
    nodes = {a, plus_one, glu, sigmoid, scaled.node, gate_clamp, up_clamp}
    return "swiglu_oai", gc["input"], uc["input"], nodes, {"alpha": number(alpha_gate[1]), "limit": limit}


def _gated_product(a: Node) -> tuple[str, Node, Node, set, dict] | None:
    """(function, gate, up, activation nodes, parameters) for ``act(gate) * up`` or gpt-oss's
    clamped SwiGLU; None if ``a`` is no product."""
    if (found := _clamped_swiglu(a)) is not None:
        return found
    c = call(a)
    if c is None or c.name != "mul" or _elementwise(a) is not None:
        return None
    factors, products = _product(a)
    sigmoids = [f for f in factors if is_call(f, "sigmoid") and call(f)["input"] in factors]
    if len(factors) == 3 and len(sigmoids) == 1:  # up * gate * sigmoid(gate), grouped any way
        gate = call(sigmoids[0])["input"]
        up = [f for f in factors if f is not gate and f is not sigmoids[0]]
        if len(up) == 1:
            return "silu", gate, up[0], products | {sigmoids[0]}, {}
    for gate_side, up_side in ((c["input"], c["other"]), (c["other"], c["input"])):
        if (found := _elementwise(gate_side)) is not None:
            return found[0], found[1], up_side, found[2], {}
    raise NoMatch(
        f"expert activation {describe(c['input'])} * {describe(c['other'])} is not supported "
        f"(supported: {_SUPPORTED})"
    )


def _row_scaled(node: Node) -> tuple[Node, Node, set] | None:
    """(rows, column, nodes) for ``rows * column`` with a ``[rows, 1]`` column, also cast after:
    routing weights applied before the down projection."""
    inner, nodes = node, set()
    if is_call(inner, "to"):
        nodes.add(inner)
        inner = call(inner)["input"]
    c = call(inner)
    if c is None or c.name != "mul":
        return None
    for rows, column in ((c["input"], c["other"]), (c["other"], c["input"])):
        if isinstance(column, Node) and isinstance(rows, Node) and len(shape(column)) == len(shape(rows)) == 2 \
                and same_size(shape(column)[1], 1) and not same_size(shape(rows)[1], 1):
            return rows, column, nodes | {inner}
    return None


def match_mlp(out: Node, project: Project) -> ExpertMLP:
    """Match ``out`` as an expert body's output; NoMatch says what did not fit."""
    down = project(out)
    row_scale, nodes = None, set()
    a = down.input
    if (scaled := _row_scaled(a)) is not None:
        a, row_scale, nodes = scaled
    a, casts = skip_noop_casts(a)
    nodes |= casts | {a}
    projections = [down]
    gated = _gated_product(a)
    interleaved, parameters = False, {}
    if gated is not None:
        function, gate, up, act_nodes, parameters = gated
        nodes |= act_nodes | {gate, up}
        if (split := _split_gate_up(gate, up)) is not None:
            h, interleaved, split_nodes = split
            nodes |= split_nodes
            projections.append(project(h))
            w1, b1 = projections[-1].weight, projections[-1].bias
        else:
            projections += [project(gate), project(up)]
            g, u = projections[-2:]
            require(g.input is u.input, "gate and up projections read different rows")
            w1, b1 = _concat(g.weight, u.weight), _concat(g.bias, u.bias)
    else:
        found = _elementwise(a)
        require(found is not None, f"expert activation {describe(a)} is not supported (supported: {_SUPPORTED})")
        function, h, act_nodes = found
        nodes |= act_nodes
        projections.append(project(h))
        w1, b1 = projections[-1].weight, projections[-1].bias
    name = activation_name(function, gated is not None)
    require(name is not None, f"{'gated ' if gated else ''}{function} is not a supported activation")
    activation = Activation(name, interleaved, **parameters)
    rows = projections[-1].input
    for p in projections:
        nodes |= p.nodes
    nodes.discard(rows)
    bias_indices = frozenset(p.bias_index for p in projections if p.bias_index is not None)
    return ExpertMLP(activation, w1, b1, down.weight, down.bias, rows, frozenset(nodes), bias_indices, row_scale)


def linear_projection(node: Node) -> Projection:
    """One expert's projection: ``F.linear(v, W, b)`` (an ``nn.Linear``), ``v @ W`` or ``v @ W.t()``,
    plus an optional bias vector (``v @ W + b``)."""
    y, bias, nodes = node, None, {node}
    c = call(node)
    if c is not None and c.name == "add" and c["alpha"] == 1:
        found = _operands(c, lambda n: is_call(n, "matmul", "linear"))
        if found is not None and isinstance(found[1], Node) and len(shape(found[1])) == 1:
            y, bias = found[0], Weight((found[1],))
            nodes.add(y)
    c = expect(y, "linear", "matmul", what="expert projection")
    if c.name == "linear":
        require(bias is None or c["bias"] is None, f"{node} adds a second bias")
        bias = bias or (None if c["bias"] is None else Weight((c["bias"],)))
        weight, out_in = c["weight"], True
    else:
        weight, out_in = c["other"], False
        if is_call(weight, "transpose") and len(shape(weight)) == 2:  # v @ W.t() with W [out, in]
            nodes.add(weight)
            weight, out_in = call(weight)["input"], True
    require(len(shape(weight)) == 2, f"expert weight {weight} is not a matrix")
    return Projection(c["input"], Weight((weight,), out_in), bias, frozenset(nodes))


def expert_index(node: Node, what: str) -> tuple[Node, object]:
    """The stacked ``[E, ...]`` node behind ``W[expert ids]`` / ``W.index_select(0, ids)``."""
    c = expect(node, "getitem", "index_select", what=what)
    if c.name == "getitem":
        return c["input"], c["index"]
    require(c["dim"] == 0, f"{what} selects along dim {c['dim']}")
    return c["input"], c["index"]


def biased(node: Node) -> tuple[Node, Weight | None, Node | None, set]:
    """Split ``y + B[index]`` (also in place) into (y, stacked bias B, index, nodes)."""
    c = call(node)
    if c is None or c.name != "add" or c["alpha"] != 1:
        return node, None, None, set()
    for y, b in ((c["input"], c["other"]), (c["other"], c["input"])):
        try:
            stacked, index = expert_index(b, "bias")
        except NoMatch:
            continue
        if isinstance(index, Node) and len(shape(stacked)) == 2 and len(shape(index)) == 1:
            return y, Weight((stacked,)), index, {node, b}
    return node, None, None, set()


def with_bias(node: Node) -> Node:
    """``node + B[index]`` if that is node's only use, else node: where an expert body ends."""
    users = list(node.users)
    if len(users) == 1 and biased(users[0])[1] is not None:
        return users[0]
    return node

"""How tokens reach their experts: one matcher per style of MoE block.

Each matcher starts at an anchor node and proves that the block around it computes

    out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])

It returns a Block, None when the anchor is no candidate at all, or raises NoMatch with the reason
a near miss must be left alone. Styles:

    sorted_grouped_mm   pairs sorted by expert, torch._grouped_mm with offsets (HF grouped_mm,
                        torchtitan, hand-written), unpermuted by inverse permutation or index_add_
    gathered_bmm        expert weights gathered per pair, bmm (HF batched_mm)
    dense_loop          every expert on every token, weighted by a [T, E] matrix zero off the top-k
    masked_loop         for e: torch.where(mask[e]), expert e on those rows, index_add_ back
"""

import dataclasses
import functools
import operator

import torch
from torch.fx import Node

from . import combine
from .experts import ExpertMLP, Projection, Weight, biased, linear_projection, match_mlp, skip_noop_casts, with_bias
from .fx import NoMatch, call, expect, is_call, is_last_dim, require, same_shape, same_size, scattered_constant, shape


@dataclasses.dataclass
class Block:
    pattern: str
    x: Node  # [T, H] token rows
    ids: Node  # [T, k] expert ids
    weights: Node  # [T, k] routing weights
    mlp: ExpertMLP
    result: Node  # the combined [T, H] value
    accumulators: tuple  # zero tensors updated in place into the result: later reads see it too
    nodes: set  # the block's nodes, erased once nothing else uses them
    shareable: set  # routing metadata that other code may keep using

    def __post_init__(self):
        self.nodes, self.shareable = set(self.nodes), set(self.shareable)


# --- routing tensors -----------------------------------------------------------------------------


def _flat(node: Node, what: str) -> Node:
    """The ``[T, k]`` tensor behind ``t.reshape(-1)``, ``t.view(-1)`` or ``t.flatten()``."""
    c = expect(node, "reshape", "flatten", what=what)
    source = c["input"]
    require(len(shape(source)) == 2 and len(shape(node)) == 1, f"{what} {node} is not a flattened [tokens, k] tensor")
    return source


def _is_floordiv(node: object, numerator: Node, k) -> bool:
    """``numerator // k`` in any spelling."""
    c = call(node)
    if c is None or c.name not in ("floordiv", "div") or c["input"] is not numerator:
        return False
    floor = c.name == "floordiv" or c.args.get("rounding_mode") == "floor"
    return floor and same_size(c["other"], k)


def _sort_permutation(perm: Node) -> tuple[Node, Node | None, set]:
    """(flat ids, sort node or None, nodes) for ``sort(flat)[1]`` or ``argsort(flat)``, ascending."""
    c = call(perm)
    if c is not None and c.name == "getitem" and c["index"] == 1 and is_call(c["input"], "sort"):
        sort, nodes = call(c["input"]), {perm, c["input"]}
    elif c is not None and c.name == "argsort":
        sort, nodes = c, {perm}
    else:
        raise NoMatch(f"row order {perm} is not a sort of the expert ids")
    require(not sort["descending"] and sort["dim"] in (0, -1), f"{sort.node} does not sort ascending along the ids")
    return sort["input"], (sort.node if sort.name == "sort" else None), nodes


def _gathered(node: Node, what: str) -> tuple[Node, Node, set]:
    """(source, index, nodes) for ``source[index]``, ``source.index_select(0, index)`` or
    ``source[None, index].reshape(-1, H)`` with a 1-D integer index."""
    c = expect(node, "getitem", "index_select", "reshape", what=what)
    nodes = {node}
    if c.name == "reshape":
        inner = expect(c["input"], "getitem", what=what)
        index = inner["index"]
        require(
            isinstance(index, tuple) and len(index) == 2 and index[0] is None
            and len(shape(node)) == 2 and len(shape(inner["input"])) == 2,
            f"{what} {node} is not a row gather",
        )
        return inner["input"], index[1], nodes | {inner.node}
    if c.name == "index_select":
        require(c["dim"] == 0, f"{what} {node} selects along dim {c['dim']}")
    index = c["index"]
    require(isinstance(index, Node) and len(shape(index)) == 1, f"{what} {node} is not a row gather")
    return c["input"], index, nodes


def _expert_offsets(offsets: Node, num_experts: int) -> tuple[Node, set]:
    """(counted ids, nodes) for ``cumsum(histc(ids, E, 0, E-1))`` or ``cumsum(bincount(ids, minlength=E))``."""
    nodes = set()
    node = offsets
    if is_call(node, "to"):
        nodes.add(node)
        node = call(node)["input"]
    c = expect(node, "cumsum", what="grouped_mm offsets")
    require(c["dim"] in (0, -1), f"offsets {offsets} are a cumsum over dim {c['dim']}")
    nodes.add(node)
    if (found := _routing_map_counts(c["input"], num_experts)) is not None:
        return found
    counts = call(c["input"])
    require(counts is not None and counts.name in ("histc", "bincount"), f"offsets {offsets} do not count the expert ids")
    nodes.add(counts.node)
    if counts.name == "histc":
        require(
            (counts["bins"], counts["min"], counts["max"]) == (num_experts, 0, num_experts - 1),
            f"{counts.node} does not count ids into {num_experts} unit bins",
        )
    else:
        require(
            counts["weights"] is None and counts["minlength"] == num_experts,
            f"{counts.node} does not count ids into {num_experts} experts",
        )
    ids = counts["input"]
    if is_call(ids, "to"):
        nodes.add(ids)
        ids = call(ids)["input"]
    return ids, nodes


def _routing_map_counts(counts: Node, num_experts: int) -> tuple[Node, set] | None:
    """(ids, nodes) for torchtitan's ``zeros_like(scores, bool).scatter(-1, ids, True).sum(leading dims)``:
    a count of each expert's ids, since top-k ids are distinct within a token."""
    c = call(counts)
    if c is None or c.name != "sum" or not is_call(c["input"], "scatter"):
        return None
    scattered = call(c["input"])
    ndim = len(shape(scattered.node))
    dims = c["dim"] if isinstance(c["dim"], (tuple, list)) else (c["dim"],)
    require({d % ndim for d in dims} == set(range(ndim - 1)) and not c["keepdim"], f"{counts} does not sum over tokens")
    require(is_call(scattered["input"], "zeros_like", "zeros", "new_zeros") and scattered_constant(scattered) is True
            and is_last_dim(scattered["dim"], ndim), f"{counts} is no routing map sum")
    ids = scattered["index"]
    require(_topk_experts(ids) == num_experts, f"{counts} counts {ids}, not top-k ids of {num_experts} experts")
    return ids, {counts, scattered.node, scattered["input"]}


def _stacked_experts(weight: Weight) -> int:
    """E of weights held as stacked ``[E, ...]`` tensors (gate and up may be two)."""
    require(all(isinstance(p, Node) for p in weight.parts), "expert weights are not stacked tensors")
    num_experts = shape(weight.parts[0])[0]
    require(all(same_size(shape(p)[0], num_experts) for p in weight.parts), "stacked weights differ in expert count")
    return num_experts


def _unflattened(node: Node) -> Node:
    """The tensor behind a chain of reshapes/flattens of ``node``."""
    while is_call(node, "reshape", "flatten"):
        node = call(node)["input"]
    return node


def _feeds(node: Node, name: str, depth: int = 12) -> bool:
    """Whether node's value reaches another ``name`` call within a few ops (a first projection)."""
    frontier = set(node.users)
    for _ in range(depth):
        if any(is_call(user, name) for user in frontier):
            return True
        frontier = {u for n in frontier for u in n.users}
    return False


def _routing_weights_in_order(column: Node, perm: Node | None) -> tuple[Node, set]:
    """(weights [T, k], nodes) for a column of ``weights.reshape(-1)`` (perm None) or of
    ``weights.reshape(-1)[perm]``."""
    rows, nodes = combine.column(column)
    if perm is not None:
        rows, index, gather_nodes = _gathered(rows, "routing weights")
        require(index is perm, f"routing weights are gathered with {index}, not with the row order {perm}")
        nodes |= gather_nodes
    nodes.add(rows)
    return _flat(rows, "routing weights"), nodes


def _check_tokens(x: Node, ids: Node, weights: Node) -> None:
    require(same_shape(shape(ids), shape(weights)), f"ids {shape(ids)} and weights {shape(weights)} differ in shape")
    require(len(shape(x)) == 2 and same_size(shape(x)[0], shape(ids)[0]), f"token rows {shape(x)} do not match ids {shape(ids)}")


# --- sorted pairs + torch._grouped_mm ------------------------------------------------------------


def _grouped_projection(node: Node, offsets: Node) -> Projection:
    y, bias, bias_index, nodes = biased(node)
    c = expect(y, "grouped_mm", what="expert projection")
    require(c["offs"] is offsets, f"{y} groups rows by other offsets")
    require(c.args.get("bias") is None and c.args.get("out_dtype") is None, f"{y} has a bias or out_dtype")
    b = c["mat_b"]
    nodes |= {y}
    if is_call(b, "transpose") and {call(b)["dim0"], call(b)["dim1"]} in ({1, 2}, {-1, -2}, {1, -1}, {-2, 2}):
        nodes.add(b)
        weight = Weight((call(b)["input"],), out_in=True)
    else:
        weight = Weight((b,))
    require(len(shape(weight.parts[0])) == 3, f"{y} multiplies by a {len(shape(b))}-d weight")
    rows, casts = skip_noop_casts(c["mat_a"])
    return Projection(rows, weight, bias, frozenset(nodes | casts), bias_index)


def sorted_grouped_mm(anchor: Node) -> Block | None:
    c = call(anchor)
    if c is None or c.name != "grouped_mm" or c["offs"] is None or _feeds(anchor, "grouped_mm"):
        return None
    offsets = c["offs"]
    out = with_bias(anchor)
    mlp = match_mlp(out, functools.partial(_grouped_projection, offsets=offsets))
    x, token_of_row, gather_nodes = _gathered(mlp.input, "expert input rows")
    tok = call(token_of_row)
    require(tok is not None and tok.name in ("floordiv", "div"), f"input rows are gathered with {token_of_row}, not row // k")
    perm = tok["input"]
    flat_ids, sort, perm_nodes = _sort_permutation(perm)
    ids = _flat(flat_ids, "expert ids")
    k = shape(ids)[1]
    require(_is_floordiv(token_of_row, perm, k), f"input rows are gathered with {token_of_row}, not row // {k}")
    num_experts = _stacked_experts(mlp.w1)
    counted, offset_nodes = _expert_offsets(offsets, num_experts)

    def is_sorted_ids(node: Node) -> bool:
        if sort is not None and is_call(node, "getitem") and node.args == (sort, 0):
            return True
        try:
            source, index, _ = _gathered(node, "sorted ids")
        except NoMatch:
            return False
        return source is flat_ids and index is perm

    require(_unflattened(counted) is _unflattened(flat_ids) or is_sorted_ids(counted),
            f"offsets count {counted}, not the expert ids")
    require(all(is_sorted_ids(i) for i in mlp.bias_indices), "biases are gathered with other ids than the rows'")
    scaled, column, scale_nodes = combine.weighted_rows(out)
    weights, weight_nodes = _routing_weights_in_order(column, perm)
    _check_tokens(x, ids, weights)
    result, accumulators, combine_nodes = combine.unpermute_sum(
        scaled, perm, lambda index: index is token_of_row or _is_floordiv(index, perm, k), shape(ids)[0], k
    )
    metadata = perm_nodes | offset_nodes | {flat_ids, token_of_row, counted, *mlp.bias_indices}
    return Block(
        "sorted_grouped_mm_experts", x, ids, weights, mlp, result, accumulators,
        nodes=metadata | mlp.nodes | gather_nodes | {mlp.input} | scale_nodes | weight_nodes | combine_nodes,
        shareable=metadata,
    )


# --- weights gathered per pair + bmm -------------------------------------------------------------


def _batched_projection(node: Node, flat_ids: Node) -> Projection:
    y, bias, bias_index, nodes = biased(node)
    require(bias is None or bias_index is flat_ids, f"bias of {node} is gathered with other ids")
    squeeze = expect(y, "squeeze", what="expert projection")
    bmm = expect(squeeze["input"], "bmm", what="expert projection")
    nodes |= {y, bmm.node}
    # W[ids] @ v.unsqueeze(-1) with W [E, out, in], or v.unsqueeze(1) @ W[ids] with W [E, in, out]
    for gathered, vector, dims, out_in in (
        (bmm["input"], bmm["mat2"], (-1, 2), True),
        (bmm["mat2"], bmm["input"], (1, -2), False),
    ):
        try:
            stacked, index = _gathered_weight(gathered)
        except NoMatch:
            continue
        require(index is flat_ids, f"{gathered} gathers weights with other ids")
        unsqueeze = expect(vector, "unsqueeze", what="bmm operand")
        require(
            squeeze["dim"] in dims and unsqueeze["dim"] in dims,
            f"{y} does not multiply one row by its expert's weight",
        )
        return Projection(unsqueeze["input"], Weight((stacked,), out_in), bias, frozenset(nodes | {gathered, vector}))
    raise NoMatch(f"{bmm.node} does not multiply by gathered expert weights")


def _gathered_weight(node: Node) -> tuple[Node, Node]:
    c = expect(node, "getitem", "index_select", what="gathered weight")
    if c.name == "index_select":
        require(c["dim"] == 0, f"{node} gathers along dim {c['dim']}")
    require(isinstance(c["index"], Node) and len(shape(c["input"])) == 3, f"{node} is not a gather of stacked weights")
    return c["input"], c["index"]


def gathered_bmm(anchor: Node) -> Block | None:
    c = call(anchor)
    if c is None or c.name != "bmm" or _feeds(anchor, "bmm"):
        return None
    operands = [n for n in (c["input"], c["mat2"]) if is_call(n, "getitem", "index_select")]
    for operand in operands:
        try:
            _, flat_ids = _gathered_weight(operand)
            break
        except NoMatch:
            continue
    else:
        return None
    out = with_bias(combine.single_user(anchor, str(anchor)))
    mlp = match_mlp(out, functools.partial(_batched_projection, flat_ids=flat_ids))
    ids = _flat(flat_ids, "expert ids")
    k = shape(ids)[1]
    rep = expect(mlp.input, "repeat_interleave", what="expert input rows")
    require(same_size(rep["repeats"], k) and rep["dim"] == 0, f"{mlp.input} does not repeat each token k={k} times")
    x = rep["input"]
    scaled, column, scale_nodes = combine.weighted_rows(out)
    weights, weight_nodes = _routing_weights_in_order(column, None)
    _check_tokens(x, ids, weights)
    result, sum_nodes = combine.sum_token_rows(scaled, shape(ids)[0], k)
    return Block(
        "gathered_bmm_experts", x, ids, weights, mlp, result, (),
        nodes=mlp.nodes | {mlp.input, flat_ids} | weight_nodes | sum_nodes | scale_nodes,
        shareable={flat_ids},
    )


# --- loops over experts --------------------------------------------------------------------------


def _topk_experts(ids: Node) -> int | None:
    """Number of experts E if ``ids`` are top-k indices (so distinct within a row), else None."""
    c = call(ids)
    if c is None or c.name != "getitem" or c["index"] != 1 or not is_call(c["input"], "topk"):
        return None
    return shape(call(c["input"])["input"])[-1]


def _stack_experts(bodies: list[ExpertMLP], rows: Node) -> ExpertMLP:
    """One ExpertMLP over stacked weights, reading ``rows``, from per-expert bodies."""
    first = bodies[0]
    for e, body in enumerate(bodies):
        require(body.activation == first.activation, f"expert {e} uses {body.activation}, expert 0 {first.activation}")
        for name in ("w1", "b1", "w2", "b2"):
            a, b = getattr(first, name), getattr(body, name)
            require(
                (a is None) == (b is None) and (a is None or (len(a.parts), a.out_in) == (len(b.parts), b.out_in)),
                f"expert {e}'s {name} differs in structure from expert 0's",
            )
            require(a is None or all(same_shape(shape(p), shape(q)) for p, q in zip(a.parts, b.parts)),
                    f"expert {e}'s {name} differs in shape from expert 0's")

    def stacked(name: str) -> Weight | None:
        weights = [getattr(body, name) for body in bodies]
        if weights[0] is None:
            return None
        return Weight(tuple(tuple(w.parts[i] for w in weights) for i in range(len(weights[0].parts))), weights[0].out_in)

    return ExpertMLP(
        first.activation, stacked("w1"), stacked("b1"), stacked("w2"), stacked("b2"), rows,
        frozenset().union(*(body.nodes for body in bodies)), frozenset(),
    )


def _dense_column(use: Node) -> tuple[int, Node, set]:
    """(e, column, nodes) for ``dense[:, e, None]``, ``dense[:, e:e+1]`` or ``dense[:, e].unsqueeze(-1)``."""
    index = expect(use, "getitem", what="use of the dense routing weights")["index"]
    require(isinstance(index, tuple) and index[:1] == (slice(None),), f"{use} is not a column of the routing weights")
    if len(index) == 3 and isinstance(index[1], int) and index[2] is None:
        return index[1], use, {use}
    e = index[1] if len(index) == 2 else None
    if isinstance(e, slice) and e.step in (None, 1) and isinstance(e.start, int) and e.stop == e.start + 1:
        return e.start, use, {use}
    require(isinstance(e, int), f"{use} is not a column of the routing weights")
    unsqueeze = expect(combine.single_user(use, str(use)), "unsqueeze", what=f"use of {use}")
    require(unsqueeze["dim"] in (-1, 1), f"{unsqueeze.node} is not a column")
    return e, unsqueeze.node, {use, unsqueeze.node}


def dense_loop(anchor: Node) -> Block | None:
    c = call(anchor)
    if c is None or c.name != "scatter" or not isinstance(c["src"], Node) or not combine.is_fresh_zeros(c["input"]):
        return None
    num_experts = _topk_experts(c["index"])
    if num_experts is None:
        return None  # scattering something other than a top-k choice: not an MoE router
    dense, ids, weights = anchor, c["index"], c["src"]
    require(c["dim"] in (1, -1) and c["reduce"] is None, f"{anchor} is no plain scatter of weights")
    require(same_shape(shape(dense)[1:], (num_experts,)), f"dense routing weights {shape(dense)} are not [T, E={num_experts}]")
    bodies, terms, nodes = {}, set(), {dense, c["input"]}
    for use in dense.users:
        e, column, column_nodes = _dense_column(use)
        require(e not in bodies, f"dense routing weights of expert {e} are used twice")
        term = combine.single_user(column, f"expert {e}'s routing weights")
        t = expect(term, "mul", what=f"use of expert {e}'s routing weights")
        terms.add(term)
        nodes |= column_nodes
        bodies[e] = match_mlp(t["other"] if t["input"] is column else t["input"], linear_projection)
    require(sorted(bodies) == list(range(num_experts)), f"the loop runs experts {sorted(bodies)}, not all {num_experts}")
    rows = bodies[0].input
    require(all(body.input is rows for body in bodies.values()), "experts of the dense loop read different rows")
    result, adds = _sum_of_terms(terms)
    mlp = _stack_experts([bodies[e] for e in range(num_experts)], rows)
    _check_tokens(rows, ids, weights)
    return Block(
        "dense_loop_experts", rows, ids, weights, mlp, result, (),
        nodes=nodes | mlp.nodes | terms | adds,
        shareable=set(),
    )


def _sum_of_terms(terms: set) -> tuple[Node, set]:
    """(sum, addition nodes) for the tree of additions that adds up exactly ``terms``."""
    result, adds = next(iter(terms)), set()
    while len(result.users) == 1 and is_call(user := next(iter(result.users)), "add"):
        try:
            covered, nodes = _sum_tree(user, terms)
        except NoMatch:
            break  # an addition past the block, such as a residual
        result, adds = user, nodes
        if sorted(covered, key=id) == sorted(terms, key=id):
            return result, adds
    raise NoMatch("expert outputs are not summed exactly once each")


def _sum_tree(node: Node, terms: set) -> tuple[list, set]:
    """(terms, nodes) of a tree of additions over terms, starting from an optional fresh zero tensor."""
    if node in terms:
        return [node], set()
    if combine.is_fresh_zeros(node):
        return [], {node}
    c = expect(node, "add", what="accumulation of expert outputs")
    require(c["alpha"] == 1, f"{node} scales a term")
    left, left_nodes = _sum_tree(c["input"], terms)
    right, right_nodes = _sum_tree(c["other"], terms)
    return left + right, left_nodes | right_nodes | {node}


def _one_hot_labels(node: Node) -> tuple[Node, int, list, set]:
    """(ids, E, dim labels, nodes) for ``one_hot(ids, E)`` under permutes and transposes."""
    c = expect(node, "one_hot", "permute", "transpose", what="expert mask")
    if c.name == "one_hot":
        require(len(shape(c["input"])) == 2 and c["num_classes"] > 0, f"{node} is not a one-hot of [T, k] ids")
        return c["input"], c["num_classes"], ["token", "slot", "expert"], {node}
    ids, num_experts, labels, nodes = _one_hot_labels(c["input"])
    if c.name == "permute":
        dims = c["dims"][0] if len(c["dims"]) == 1 and isinstance(c["dims"][0], (tuple, list)) else c["dims"]
        labels = [labels[d] for d in dims]
    else:
        labels[c["dim0"]], labels[c["dim1"]] = labels[c["dim1"]], labels[c["dim0"]]
    return ids, num_experts, labels, nodes | {node}


def _expert_mask(node: Node) -> tuple[Node, int, int | None, list, set]:
    """(ids, expert e, E or None, dim labels, nodes) for a boolean mask of expert e's pairs."""
    c = call(node)
    if c is not None and c.name == "eq":
        require(isinstance(c["other"], int) and len(shape(c["input"])) == 2, f"mask {node} is not ids == e")
        return c["input"], c["other"], None, ["token", "slot"], {node}
    if c is not None and c.name == "to":
        ids, e, num_experts, labels, nodes = _expert_mask(c["input"])
        return ids, e, num_experts, labels, nodes | {node}
    c = expect(node, "getitem", what="expert mask")
    ids, num_experts, labels, nodes = _one_hot_labels(c["input"])
    index = c["index"] if isinstance(c["index"], tuple) else (c["index"],)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(labels) - len(index) + 1) + index[at + 1:]
    picked = [i for i, item in enumerate(index) if isinstance(item, int)]
    require(
        len(picked) == 1 and labels[picked[0]] == "expert"
        and all(item == slice(None) for i, item in enumerate(index) if i != picked[0]),
        f"mask {node} does not select one expert",
    )
    e = index[picked[0]]
    return ids, e, num_experts, [label for i, label in enumerate(labels) if i != picked[0]], nodes | {node}


def _where_outputs(where: Node) -> tuple[dict, set]:
    """({dim: index node}, assertion nodes) of ``torch.where(mask)``: dynamo adds size asserts."""
    outputs, asserts = {}, set()
    for user in where.users:
        require(is_call(user, "getitem") and isinstance(user.args[1], int), f"{where} is used whole")
        descendants = _assertion_chain(user)
        if descendants is not None:
            asserts |= descendants
            continue
        require(user.args[1] not in outputs, f"{where}[{user.args[1]}] is taken twice")
        outputs[user.args[1]] = user
    return outputs, asserts


_SIZE_ASSERTS = (
    torch.ops.aten.sym_size.int, torch.ops.aten._assert_scalar.default,
    operator.ge, operator.gt, operator.le, operator.lt, operator.eq,
)


def _assertion_chain(node: Node) -> set | None:
    """The nodes of ``_assert_scalar(sym_size(node) >= 0)`` hanging off node, or None."""
    chain, stack = {node}, list(node.users)
    while stack:
        user = stack.pop()
        if user.op != "call_function" or user.target not in _SIZE_ASSERTS:
            return None
        chain.add(user)
        stack += list(user.users)
    return chain if len(chain) > 1 else None


def masked_loop(anchor: Node) -> Block | None:
    if not combine.is_fresh_zeros(anchor):
        return None
    adds = [u for u in anchor.users if is_call(u, "index_add")]
    if not adds or not _derives_from_where(call(adds[0])["index"]):
        return None  # an accumulation, but not of rows picked per expert
    bodies, nodes, inputs, counts = {}, {anchor}, set(), set()
    for add in adds:
        e, body, x, ids, weights, num_experts, expert_nodes = _masked_expert(add, anchor)
        require(e not in bodies, f"expert {e} is added twice")
        bodies[e], nodes, counts = body, nodes | expert_nodes, counts | {num_experts}
        inputs.add((x, ids, weights))
    require(len(inputs) == 1, "the experts of the loop read different tokens, ids or routing weights")
    ((x, ids, weights),) = inputs
    known = counts - {None}  # one_hot's num_classes, when the masks come from one
    require(len(known) <= 1, f"the experts' masks disagree on the number of experts: {known}")
    num_experts = known.pop() if known else _topk_experts(ids)
    require(num_experts is not None, f"expert ids {ids} are not top-k indices: the expert count is unknown")
    require(sorted(bodies) == list(range(num_experts)), f"the loop runs experts {sorted(bodies)}, not all {num_experts}")
    mlp = _stack_experts([bodies[e] for e in range(num_experts)], x)
    _check_tokens(x, ids, weights)
    return Block("masked_loop_experts", x, ids, weights, mlp, adds[-1], (anchor,), nodes, set())


def _masked_expert(add: Node, accumulator: Node):
    """(e, body, x, ids, weights, E or None, nodes) for one
    ``acc.index_add_(0, token, expert_e(x[token]) * weights[token, slot, None])``."""
    c = call(add)
    require(c.inplace and c["input"] is accumulator and c["dim"] == 0, f"{add} is not acc.index_add_(0, ...)")
    source, nodes = skip_noop_casts(c["source"])
    if is_call(source, "to"):  # eager casts to the accumulator's dtype before adding
        nodes.add(source)
        source = call(source)["input"]
    scaled = expect(source, "mul", what="expert rows added to the output")
    ids, e, num_experts, token, slot, where_nodes = _token_slot(c["index"])
    y, weights, weight_nodes = _scaled_by_routing_weights(scaled, token, slot, e)
    body = match_mlp(y, linear_projection)
    x, index, gather_nodes = _gathered(body.input, f"expert {e}'s input rows")
    require(index is token, f"expert {e} reads rows {index}, not its tokens {token}: tokens may be dropped")
    nodes |= {add, source, y, body.input} | where_nodes | weight_nodes | gather_nodes | body.nodes
    return e, body, x, ids, weights, num_experts, nodes


def _scaled_by_routing_weights(scaled, token: Node, slot: Node, e: int) -> tuple[Node, Node, set]:
    """(expert rows, weights, nodes) for ``rows * weights[token, slot, None]`` in either order."""
    for y, column in ((scaled["input"], scaled["other"]), (scaled["other"], scaled["input"])):
        try:
            weights, nodes = _where_weights(column, token, slot)
        except NoMatch:
            continue
        return y, weights, nodes
    raise NoMatch(f"expert {e}'s rows are not scaled by their routing weights[token, slot]")


def _is_where_output(node: object) -> bool:
    return is_call(node, "getitem") and is_call(node.args[0], "where")


def _derives_from_where(node: object, depth: int = 3) -> bool:
    """Whether a torch.where result is among node's nearest producers (a sliced one, say)."""
    if not isinstance(node, Node) or depth < 0:
        return False
    return is_call(node, "where") or any(_derives_from_where(n, depth - 1) for n in node.all_input_nodes)


def _token_slot(token: Node) -> tuple[Node, int, int | None, Node, Node, set]:
    """(ids, e, E, token index, slot index, nodes) behind ``token, slot = where(mask of e)``."""
    require(_is_where_output(token), f"rows are added at {token}, not at a whole torch.where result: tokens may be dropped")
    where = call(token.args[0])
    require(where["input"] is None and where["other"] is None, f"{where.node} is the three-argument where")
    ids, e, num_experts, labels, mask_nodes = _expert_mask(where["condition"])
    outputs, asserts = _where_outputs(where.node)
    require(sorted(labels) == ["slot", "token"] and set(outputs) <= {0, 1}, f"{where.node} does not index [tokens, slots]")
    by_label = {labels[i]: node for i, node in outputs.items()}
    require(by_label.get("token") is token and "slot" in by_label, f"{token} is not the token index of {where.node}")
    return ids, e, num_experts, token, by_label["slot"], mask_nodes | asserts | {where.node, token, by_label["slot"]}


def _where_weights(column: Node, token: Node, slot: Node) -> tuple[Node, set]:
    """(weights, nodes) for ``weights[token, slot, None]`` or ``weights[token, slot].unsqueeze(-1)``."""
    c = expect(column, "getitem", "unsqueeze", what="routing-weight column")
    nodes = {column}
    if c.name == "unsqueeze":
        require(c["dim"] in (-1, 1), f"{column} is not a column")
        c = expect(c["input"], "getitem", what="routing-weight column")
        nodes.add(c.node)
        index = c["index"]
    else:
        index = c["index"]
        require(isinstance(index, tuple) and len(index) == 3 and index[2] is None, f"{column} is not a column")
        index = index[:2]
    require(index == (token, slot), f"{column} does not pick each row's (token, slot) weight")
    return c["input"], nodes


MATCHERS = {
    "sorted_grouped_mm_experts": sorted_grouped_mm,
    "gathered_bmm_experts": gathered_bmm,
    "dense_loop_experts": dense_loop,
    "masked_loop_experts": masked_loop,
}

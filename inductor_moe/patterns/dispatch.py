"""How tokens reach their experts: one matcher per style of MoE block.

Each matcher starts at an anchor node and proves that the block around it computes

    out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])

It returns a Block, None when the anchor is no candidate at all, or raises NoMatch with the reason
a near miss must be left alone. Styles:

    sorted_grouped_mm   pairs sorted by expert, torch._grouped_mm with offsets (HF grouped_mm,
                        torchtitan, hand-written) or a loop over the rows split by expert counts
                        (JetMoE), unpermuted by inverse permutation or index_add_
    gathered_bmm        expert weights gathered per pair, bmm (HF batched_mm)
    dense_loop          every expert on every token, weighted by a [T, E] matrix zero off the top-k
    masked_loop         for e: torch.where(mask[e]), expert e on those rows, index_add_ back
    received_grouped_mm rows an all-to-all brought, by source rank then local expert, regrouped
                        expert-major for torch._grouped_mm and put back (torchtitan's expert
                        parallelism): the experts of one rank
    dense_bmm           every expert on every token at once (bmm over [E, T, H]), weighted by that
                        matrix after the experts or, with bias-free experts, before them (Llama 4)
"""

import dataclasses
import functools
import operator

import torch
from torch.fx import Node

from . import combine
from .experts import ExpertMLP, Projection, Weight, biased, linear_projection, match_mlp, skip_noop_casts, with_bias
from .fx import (
    NoMatch, call, dtype, expect, getitem_users, is_call, is_last_dim, require, same_shape, same_size, scattered_constant,
    shape,
)


@dataclasses.dataclass
class Block:
    pattern: str
    x: Node  # [T, H] token rows
    ids: Node | None  # [T, k] expert ids
    weights: Node | None  # [T, k] routing weights
    mlp: ExpertMLP
    result: Node  # the combined [T, H] value
    accumulators: tuple  # zero tensors updated in place into the result: later reads see it too
    nodes: set  # the block's nodes, erased once nothing else uses them
    shareable: set  # routing metadata that other code may keep using
    scaled_input: bool = False  # the weights scale each expert's input, not its output (Llama 4)
    # rows received by source rank then local expert, [ranks, local experts] counts of them (expert
    # parallelism): the ids are each row's local expert and the weights 1, both made from these
    received: Node | None = None

    def __post_init__(self):
        self.nodes, self.shareable = set(self.nodes), set(self.shareable)


# --- routing tensors -----------------------------------------------------------------------------


def _flat(node: Node, what: str) -> Node:
    """The ``[T, k]`` tensor behind ``t.reshape(-1)``, ``t.view(-1)`` or ``t.flatten()``."""
    c = expect(node, "reshape", "flatten", what=what)
    source = c["input"]
    require(len(shape(source)) == 2 and len(shape(node)) == 1, f"{what} {node} is not a flattened [tokens, k] tensor")
    return source


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
    """(source, index, nodes) for a row gather ``source.index_select(0, index)`` (``source[index]``
    canonically) with a 1-D integer index."""
    c = expect(node, "index_select", what=what)
    require(c["dim"] == 0, f"{what} {node} selects along dim {c['dim']}")
    index = c["index"]
    require(isinstance(index, Node) and len(shape(index)) == 1, f"{what} {node} is not a row gather")
    return c["input"], index, {node}


def _row_tokens(node: Node) -> tuple[Node, object, set]:
    """(perm, k, nodes) for the token of each row in ``perm``'s order: ``perm // k`` or the pairs'
    tokens ``arange(T).repeat_interleave(k)`` gathered by ``perm``."""
    c = expect(node, "floordiv", "index_select", what="the token of each expert row")
    if c.name == "floordiv":
        return c["input"], c["other"], {node}
    pairs = call(c["input"])
    require(c["dim"] == 0 and pairs is not None and pairs.name == "repeat_interleave" and pairs["dim"] in (0, None)
            and is_call(pairs["input"], "arange"), f"input rows are gathered with {node}, not the tokens of sorted pairs")
    arange = call(pairs["input"])
    require(len(arange["args"]) == 1 or (len(arange["args"]) == 2 and arange["args"][0] == 0),
            f"{pairs['input']} does not count the tokens from 0")
    return c["index"], pairs["repeats"], {node, pairs.node, pairs["input"]}


def _counts_of(node: Node, num_experts: int) -> tuple[Node, set] | None:
    """(counted ids, nodes) if ``node`` counts each expert's ids: ``histc(ids, E, 0, E-1)``,
    ``bincount(ids, minlength=E)``, ``one_hot(ids, E).sum(0)``, ``(ids[:, None] == arange(E)).sum(0)``,
    ``zeros(E).scatter_add_(0, ids, ones)`` (also ``index_add``), each of 1-D ids."""
    c = call(node)
    if c is None:
        return None
    if c.name == "histc":
        require((c["bins"], c["min"], c["max"]) == (num_experts, 0, num_experts - 1),
                f"{node} does not count ids into {num_experts} unit bins")
        return c["input"], {node}
    if c.name == "bincount":
        require(c["weights"] is None and c["minlength"] == num_experts, f"{node} does not count ids into {num_experts} experts")
        return c["input"], {node}
    if c.name in ("scatter_add", "index_add"):
        ones, index = (c["src"], c["index"]) if c.name == "scatter_add" else (c["source"], c["index"])
        require(c["dim"] in (0, -1) and is_call(c["input"], "zeros", "new_zeros", "zeros_like")
                and same_shape(shape(c["input"]), (num_experts,)) and is_call(ones, "ones_like")
                and call(ones)["input"] is index, f"{node} does not count ids into {num_experts} experts")
        return index, {node, c["input"], ones}
    if c.name == "sum" and is_call(c["input"], "one_hot", "eq"):
        dims = c["dim"] if isinstance(c["dim"], (tuple, list)) else (c["dim"],)
        if c["keepdim"] or list(dims) != [0]:
            return None
        hot = call(c["input"])
        if hot.name == "one_hot":
            require(hot["num_classes"] == num_experts, f"{node} counts ids into {hot['num_classes']} classes")
            ids = hot["input"]
        else:  # ids[:, None] == arange(E)
            column, experts = hot["input"], hot["other"]
            require(is_call(column, "unsqueeze") and call(column)["dim"] == 1 and is_call(experts, "arange")
                    and same_shape(shape(experts), (num_experts,)) and call(experts)["args"][:1] in ((num_experts,), (0,)),
                    f"{node} does not compare the ids with every expert")
            ids = call(column)["input"]
            return ids, {node, hot.node, column, experts}
        return ids, {node, hot.node}
    return None


def _expert_offsets(groups, num_experts: int) -> tuple[Node | None, set]:
    """(counted ids, nodes) for the rows' grouping by expert: grouped_mm offsets, the cumsum of
    per-expert counts (``_counts_of``, or torchtitan's routing-map sum) cast to int32; or the
    split sizes ``[counts[0].item(), ...]`` of a loop over experts. A single expert's one split
    size is all rows, whatever dynamo made of it (split checks the sizes' sum): counted None."""
    nodes = set()
    if isinstance(groups, tuple) and len(groups) == num_experts == 1 and _count_of_expert(groups[0], 0) is None:
        return None, set()
    if isinstance(groups, tuple):
        counted, nodes = _split_counts(groups, num_experts)
    else:
        found = _cumsum_of(groups)
        require(found is not None, f"grouped_mm offsets {groups} are no cumsum of counts")
        counted, nodes = found
    if is_call(counted, "to"):
        nodes.add(counted)
        counted = call(counted)["input"]
    if (found := _routing_map_counts(counted, num_experts)) is not None:
        return found[0], nodes | found[1]
    found = _counts_of(counted, num_experts)
    require(found is not None, f"the rows' groups do not count the expert ids ({counted})")
    ids, count_nodes = found
    nodes |= count_nodes
    if is_call(ids, "to"):
        nodes.add(ids)
        ids = call(ids)["input"]
    return ids, nodes


def _cumsum_of(offsets: Node) -> tuple[Node, set] | None:
    """(counts, nodes) for grouped_mm offsets ``counts.cumsum(0)``, cast to int32 or not; None otherwise."""
    node, nodes = offsets, set()
    if is_call(node, "to"):
        nodes.add(node)
        node = call(node)["input"]
    c = call(node)
    if c is None or c.name != "cumsum" or c["dim"] not in (0, -1):
        return None
    return c["input"], nodes | {node}


def _split_counts(sizes: tuple, num_experts: int) -> tuple[Node, set]:
    """(counts, nodes) for split sizes ``[counts[e].item() for e in range(E)]`` (``counts.tolist()``,
    ``int(counts[e])``), with the checks dynamo adds on those unbacked sizes."""
    require(len(sizes) == num_experts, f"rows are split into {len(sizes)} groups, not one per expert ({num_experts})")
    sources, nodes = set(), set()
    for e, size in enumerate(sizes):
        found = _count_of_expert(size, e)
        require(found is not None, f"split size {size} is not the count of expert {e}")
        sources.add(found[0])
        nodes |= found[1] | _scalar_checks(found[1])
    require(len(sources) == 1, "the split sizes come from several counts")
    return sources.pop(), nodes


def _count_of_expert(size: object, e: int) -> tuple[Node, set] | None:
    """(counts, nodes) for ``counts[e].item()``, also as ``int(...)`` of a float count; ``counts[0]``
    of a single expert is canonically ``counts.squeeze(0)``."""
    nodes = set()
    if isinstance(size, Node) and size.op == "call_function" and size.target is torch.sym_int:
        nodes.add(size)
        size = size.args[0]
    if not (isinstance(size, Node) and size.op == "call_method" and size.target == "item"):
        return None
    element = call(size.args[0])
    if element is not None and element.name == "getitem" and element["index"] == e:
        return element["input"], nodes | {size, element.node}
    if element is not None and element.name == "squeeze" and e == 0 and shape(element["input"]) == (1,):
        return element["input"], nodes | {size, element.node}
    return None


def _scalar_checks(size: set) -> set:
    """The symbolic arithmetic and runtime asserts dynamo hangs off an unbacked size (``u >= 0``,
    the sizes' sum): the nodes reached from the nodes that make it through values that are no
    tensors."""
    def scalar(node: Node) -> bool:
        return node.op == "call_function" and (node.target is torch.ops.aten._assert_scalar.default or isinstance(
            node.meta.get("example_value"), (torch.SymInt, torch.SymBool, torch.SymFloat, int, float, bool)))

    checks, stack = set(), [u for n in size for u in n.users if u not in size and scalar(u)]
    while stack:
        node = stack.pop()
        checks.add(node)
        stack += [u for u in node.users if u not in checks]
    require(all(scalar(n) for n in checks), "the split sizes are used beyond their checks")
    return checks


def _routing_map_counts(counts: Node, num_experts: int) -> tuple[Node, set] | None:
    """(ids, nodes) for torchtitan's ``zeros_like(scores, bool).scatter(-1, ids, True).sum(leading dims)``
    (or a scatter of ones, cast to integers, JetMoE's): a count of each expert's ids, since top-k ids
    are distinct within a token."""
    c = call(counts)
    if c is None or c.name != "sum":
        return None
    mapped, nodes = c["input"], {counts}
    if is_call(mapped, "to"):
        nodes.add(mapped)
        mapped = call(mapped)["input"]
    if not is_call(mapped, "scatter"):
        return None
    scattered = call(mapped)
    ndim = len(shape(scattered.node))
    dims = c["dim"] if isinstance(c["dim"], (tuple, list)) else (c["dim"],)
    require({d % ndim for d in dims} == set(range(ndim - 1)) and not c["keepdim"], f"{counts} does not sum over tokens")
    require(is_call(scattered["input"], "zeros_like", "zeros", "new_zeros") and scattered_constant(scattered) in (True, 1)
            and is_last_dim(scattered["dim"], ndim), f"{counts} is no routing map sum")
    ids = scattered["index"]
    require(_topk_experts(ids) == num_experts, f"{counts} counts {ids}, not top-k ids of {num_experts} experts")
    return ids, nodes | {scattered.node, scattered["input"]}


def _stacked_experts(weight: Weight) -> int:
    """E of weights held as stacked ``[E, ...]`` tensors or per-expert tuples (gate and up may be two)."""
    counts = [len(p) if isinstance(p, tuple) else shape(p)[0] for p in weight.parts]
    require(all(same_size(n, counts[0]) for n in counts), "stacked weights differ in expert count")
    return counts[0]


def _unflattened(node: Node) -> Node:
    """The tensor behind a chain of reshapes/flattens of ``node``."""
    while is_call(node, "reshape", "flatten"):
        node = call(node)["input"]
    return node


def _feeds(node: Node, test, depth: int = 12) -> bool:
    """Whether node's value reaches a node passing ``test`` within a few ops (a first projection)."""
    frontier = set(node.users)
    for _ in range(depth):
        if any(test(user) for user in frontier):
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


def _groups(node: Node):
    """How ``node`` groups rows by expert, if it is a grouped projection: its grouped_mm offsets, or
    the split sizes (a tuple) of a loop over experts (``_split_loop``); None otherwise."""
    c = call(node)
    if c is not None and c.name == "grouped_mm" and c["offs"] is not None:
        return c["offs"]
    if c is not None and c.name == "cat" and (split := _split_of(node)) is not None:
        return tuple(call(split)["split_size_or_sections"])
    return None


def _split_of(cat: Node) -> Node | None:
    """The split whose parts the first per-expert projection in ``cat`` reads."""
    parts = call(cat)["tensors"]
    if not isinstance(parts, (list, tuple)) or not parts:
        return None
    try:
        part = call(linear_projection(parts[0]).input)
    except NoMatch:
        return None
    if part is None or part.name != "getitem" or not is_call(part["input"], "split"):
        return None
    return part["input"]


def _split_loop(node: Node, sizes: tuple) -> Projection:
    """``cat([expert_e(parts[e]) for e])`` over ``parts = v.split(sizes)``, each expert an
    ``F.linear`` by ``W[e]`` (or an ``nn.Linear`` of its own) or ``@ W[e]``."""
    c = expect(node, "cat", what="expert projection")
    split = _split_of(node)
    require(split is not None and c["dim"] in (0, -2), f"{node} does not join the experts' rows")
    s = call(split)
    require(tuple(s["split_size_or_sections"]) == sizes and s["dim"] == 0, f"{split} splits rows by other sizes")
    parts = getitem_users(split)
    projections = [linear_projection(p) for p in c["tensors"]]
    require(len(projections) == len(sizes) and all(p.input is parts.get(e) for e, p in enumerate(projections)),
            f"{node} does not run expert e on the e-th part of {split}")
    weights = [p.weight for p in projections]
    require(all(w.out_in == weights[0].out_in and len(w.parts) == 1 for w in weights), "expert weights differ in layout")
    biases = [p.bias for p in projections]
    require(all(b is None for b in biases) or all(b is not None and len(b.parts) == 1 for b in biases),
            "only some experts have a bias")
    nodes = {node, split, *parts.values()}.union(*(p.nodes for p in projections))
    weight = Weight((_restacked(tuple(w.parts[0] for w in weights)),), weights[0].out_in)
    bias = None if biases[0] is None else Weight((_restacked(tuple(b.parts[0] for b in biases)),))
    return Projection(s["input"], weight, bias, frozenset(nodes))


def _grouped_projection(node: Node, groups) -> Projection:
    if isinstance(groups, tuple):
        return _split_loop(node, groups)
    y, bias, bias_index, nodes = biased(node)
    c = expect(y, "grouped_mm", what="expert projection")
    require(c["offs"] is groups, f"{y} groups rows by other offsets")
    require(c.args.get("bias") is None and c.args.get("out_dtype") is None, f"{y} has a bias or out_dtype")
    b = c["mat_b"]
    nodes |= {y}
    if is_call(b, "transpose") and (call(b)["dim0"], call(b)["dim1"]) == (1, 2):  # [E, out, in] storage
        nodes.add(b)
        weight = Weight((call(b)["input"],), out_in=True)
    else:
        weight = Weight((b,))
    require(len(shape(weight.parts[0])) == 3, f"{y} multiplies by a {len(shape(b))}-d weight")
    rows, casts = skip_noop_casts(c["mat_a"])
    return Projection(rows, weight, bias, frozenset(nodes | casts), bias_index)


def _weights_of_rows(mlp: ExpertMLP, column: Node | None, sum_weights: Node | None,
                     perm: Node | None) -> tuple[Node, set]:
    """(weights [T, k], nodes) wherever the block applies them: to the rows entering or leaving
    the down projection (in ``perm``'s order, None: pair order), or in the per-token sum."""
    kind, found = combine.routing_weights(mlp.row_scale, column, sum_weights, mlp.b2 is not None)
    return (found, set()) if kind == "sum" else _routing_weights_in_order(found, perm)


def sorted_grouped_mm(anchor: Node) -> Block | None:
    groups = _groups(anchor)
    if groups is None or _feeds(anchor, lambda n: _groups(n) is not None):
        return None
    out = with_bias(anchor)
    mlp = match_mlp(out, functools.partial(_grouped_projection, groups=groups))
    x, token_of_row, gather_nodes = _gathered(mlp.input, "expert input rows")
    if is_call(token_of_row, "add", "sub"):
        return None  # rows regrouped by segment positions: received_grouped_mm's
    perm, divisor, token_nodes = _row_tokens(token_of_row)
    flat_ids, sort, perm_nodes = _sort_permutation(perm)
    ids = _flat(flat_ids, "expert ids")
    k = shape(ids)[1]
    require(same_size(divisor, k), f"input rows are gathered with {token_of_row}: the tokens of {divisor}, not {k}, "
            "slots per token")
    num_experts = _stacked_experts(mlp.w1)
    counted, offset_nodes = _expert_offsets(groups, num_experts)

    def is_sorted_ids(node: Node) -> bool:
        if sort is not None and is_call(node, "getitem") and node.args == (sort, 0):
            return True
        try:
            source, index, _ = _gathered(node, "sorted ids")
        except NoMatch:
            return False
        return source is flat_ids and index is perm

    def is_token_of_row(index: Node) -> bool:
        try:
            return index is token_of_row or _row_tokens(index)[:2] == (perm, divisor)
        except NoMatch:
            return False

    require(counted is None or _unflattened(counted) is _unflattened(flat_ids) or is_sorted_ids(counted),
            f"offsets count {counted}, not the expert ids")
    require(all(is_sorted_ids(i) for i in mlp.bias_indices), "biases are gathered with other ids than the rows'")
    rows, column, scale_nodes = combine.weighted_rows(out)
    result, accumulators, combine_nodes, sum_weights = combine.unpermute_sum(rows, perm, is_token_of_row, shape(ids)[0], k)
    weights, weight_nodes = _weights_of_rows(mlp, column, sum_weights, perm)
    _check_tokens(x, ids, weights)
    metadata = perm_nodes | offset_nodes | token_nodes | {flat_ids, *mlp.bias_indices} | ({counted} - {None})
    return Block(
        "sorted_grouped_mm_experts", x, ids, weights, mlp, result, accumulators,
        nodes=metadata | mlp.nodes | gather_nodes | {mlp.input} | scale_nodes | weight_nodes | combine_nodes,
        shareable=metadata,
    )


# --- rows received from other ranks (expert parallelism) -----------------------------------------


def _column_counts(groups) -> tuple[Node, set] | None:
    """(m, nodes) for grouped_mm offsets ``cumsum(m.sum(0))`` (cast to int32) of a 2-D count matrix
    ``m``: rows received by source rank and local expert, grouped by expert; None otherwise."""
    found = _cumsum_of(groups)
    if found is None or not is_call(found[0], "sum"):
        return None
    counts, nodes = call(found[0]), found[1]
    if counts["dim"] not in (0, (0,), [0]) or counts["keepdim"] or len(shape(counts["input"])) != 2:
        return None
    num_experts = shape(counts["input"])[1]
    try:
        if _counts_of(counts.node, num_experts) is not None or _routing_map_counts(counts.node, num_experts) is not None:
            return None  # one_hot(ids).sum(0), a routing map's sum: counts of ids, sorted_grouped_mm's
    except NoMatch:
        return None
    return counts["input"], nodes | {counts.node}


def _signed_terms(node: Node, sign: int = 1) -> tuple[list, set]:
    """([(sign, term)], nodes) of a sum ``a + b - c ...`` in any grouping."""
    c = call(node)
    if c is None or c.name not in ("add", "sub") or c.inplace or c["alpha"] != 1 or not isinstance(c["other"], Node):
        return [(sign, node)], set()
    left, left_nodes = _signed_terms(c["input"], sign)
    right, right_nodes = _signed_terms(c["other"], sign if c.name == "add" else -sign)
    return left + right, left_nodes | right_nodes | {node}


def _starts(node: Node) -> tuple[Node, set]:
    """(v, nodes) for where each segment of lengths v starts: ``v.cumsum(0) - v``."""
    c = expect(node, "sub", what="segment starts")
    total = call(c["input"])
    require(total is not None and total.name == "cumsum" and total["input"] is c["other"] and total["dim"] in (0, -1)
            and c["alpha"] == 1 and len(shape(node)) == 1, f"{node} is not where segments start (cumsum(v) - v)")
    return c["other"], {node, c["input"]}


def _transposed_flat(node: Node, what: str) -> tuple[Node, set]:
    """(m, nodes) for ``m.transpose(0, 1).reshape(-1)`` of a 2-D m: m's columns one after another."""
    flat = expect(node, "reshape", what=what)
    require(len(shape(node)) == 1, f"{what} {node} is not flat")
    t = expect(flat["input"], "transpose", what=what)
    require((t["dim0"], t["dim1"]) in ((0, 1), (1, 0)) and len(shape(t["input"])) == 2, f"{what} {node} is no matrix's columns")
    return t["input"], {node, t.node}


def _regrouped_by_expert(perm: Node) -> tuple[Node, set]:
    """(m, nodes) if ``perm`` reorders rows that come in segments of ``m[r, e]`` rows, rank-major
    (r, then e), into expert-major order (e, then r): torchtitan's ``_permute``,

        lens = m.t().reshape(-1);  seg = arange(len(lens)).repeat_interleave(lens)
        perm = starts_in.t().reshape(-1)[seg] + arange(n) - (cumsum(lens) - lens)[seg]

    with ``starts_in`` where each rank-major segment starts, laid out as m."""
    terms, nodes = _signed_terms(perm)
    positive = [t for sign, t in terms if sign > 0]
    negative = [t for sign, t in terms if sign < 0]
    require(len(positive) == 2 and len(negative) == 1, f"row order {perm} is no sum of segment positions")
    offsets = [t for t in positive if is_call(t, "arange")]
    require(len(offsets) == 1 and len(call(offsets[0])["args"]) == 1 and same_shape(shape(offsets[0]), shape(perm)),
            f"row order {perm} does not count the rows from 0")
    (start_in,) = [t for t in positive if t is not offsets[0]]
    starts_in, seg, in_nodes = _gathered(start_in, "segment starts")
    starts_out, seg_out, out_nodes = _gathered(negative[0], "segment starts")
    require(seg is seg_out, f"row order {perm} reads its segments twice, differently")
    rep = expect(seg, "repeat_interleave", what="segment of each row")
    count = call(rep["input"])
    require(count is not None and count.name == "arange" and len(count["args"]) == 1 and rep["dim"] in (0, None)
            and same_shape(shape(rep["input"]), shape(rep["repeats"])), f"{seg} does not number the segments")
    lens, start_nodes = _starts(starts_out)
    require(lens is rep["repeats"], f"row order {perm} places segments by other lengths than {lens}")
    matrix, lens_nodes = _transposed_flat(lens, "segment lengths")
    laid_out, starts_nodes = _transposed_flat(starts_in, "segment starts")
    reshaped = expect(laid_out, "reshape", what="segment starts")
    flat, flat_starts = _starts(reshaped["input"])
    require(same_shape(shape(laid_out), shape(matrix)) and _unflattened(flat) is matrix,
            f"row order {perm} takes its segments from other counts than {matrix}")
    return matrix, (nodes | {offsets[0]} | in_nodes | out_nodes | {seg, rep["input"]} | start_nodes | lens_nodes
                    | starts_nodes | {laid_out} | flat_starts | {flat})


def received_grouped_mm(anchor: Node) -> Block | None:
    """The experts of one rank in expert parallelism (torchtitan's all-to-all dispatch): rows that
    came by source rank then local expert (``m[r, e]`` of each), regrouped expert-major for a grouped
    MLP and put back. It becomes the experts op on the rows as they came, each with its local expert
    as id and weight 1: its own sort replaces the regrouping copy. Sound whatever the rows are: the
    ids and the original's groups are both read from m."""
    groups = _groups(anchor)
    if groups is None or isinstance(groups, tuple) or (found := _column_counts(groups)) is None:
        return None
    if _feeds(anchor, lambda n: _groups(n) is not None):
        return None
    matrix, offset_nodes = found
    out = with_bias(anchor)
    mlp = match_mlp(out, functools.partial(_grouped_projection, groups=groups))
    received, perm, gather_nodes = _gathered(mlp.input, "expert input rows")
    if not is_call(perm, "add", "sub"):
        return None  # rows of tokens (sorted_grouped_mm's)
    found_matrix, order_nodes = _regrouped_by_expert(perm)
    require(found_matrix is matrix, f"the rows are grouped by {matrix}, regrouped by {found_matrix}")
    require(same_size(shape(matrix)[1], _stacked_experts(mlp.w1)), f"{matrix} counts rows of other experts than the weights'")
    require(mlp.row_scale is None, "the received rows are scaled inside the experts")
    require(not mlp.bias_indices, "the experts' biases are gathered per row")
    result, casts = out, set()
    while len(result.users) == 1 and is_call(user := next(iter(result.users)), "to") and dtype(user) == dtype(result):
        casts.add(user)
        result = user
    use = combine.single_user(result, "the expert rows")
    back = combine.unpermuted(result, use, perm)
    require(back is not None, f"{use} does not put the expert rows back in the order they came")
    unpermuted, back_nodes = back
    metadata = offset_nodes | order_nodes
    return Block(
        "received_grouped_mm_experts", received, None, None, mlp, unpermuted, (),
        nodes=metadata | mlp.nodes | gather_nodes | {mlp.input} | casts | back_nodes, shareable=metadata,
        received=matrix,
    )


# --- weights gathered per pair + bmm -------------------------------------------------------------


def _batched_projection(node: Node, flat_ids: Node) -> Projection:
    """``W[ids] @ v.unsqueeze(-1)`` with W [E, out, in], or ``v.unsqueeze(1) @ W[ids]`` with W
    [E, in, out], squeezed back to rows (bmm or matmul), plus an optional gathered bias."""
    y, bias, bias_index, nodes = biased(node)
    require(bias is None or bias_index is flat_ids, f"bias of {node} is gathered with other ids")
    squeeze = expect(y, "squeeze", what="expert projection")
    product = expect(squeeze["input"], "bmm", "matmul", what="expert projection")
    nodes |= {y, product.node}
    left, right = product["input"], product["mat2"] if product.name == "bmm" else product["other"]
    squeezed = squeeze["dim"] % 3 if isinstance(squeeze["dim"], int) else None
    for gathered, vector, dim, out_in in ((left, right, 2, True), (right, left, 1, False)):
        try:
            stacked, index = _gathered_weight(gathered)
        except NoMatch:
            continue
        require(index is flat_ids, f"{gathered} gathers weights with other ids")
        unsqueeze = expect(vector, "unsqueeze", what="bmm operand")
        require(squeezed == dim and unsqueeze["dim"] % 3 == dim, f"{y} does not multiply one row by its expert's weight")
        return Projection(unsqueeze["input"], Weight((stacked,), out_in), bias, frozenset(nodes | {gathered, vector}))
    raise NoMatch(f"{product.node} does not multiply by gathered expert weights")


def _gathered_weight(node: Node) -> tuple[Node, Node]:
    c = expect(node, "getitem", "index_select", what="gathered weight")
    if c.name == "index_select":
        require(c["dim"] == 0, f"{node} gathers along dim {c['dim']}")
    require(isinstance(c["index"], Node) and len(shape(c["input"])) == 3, f"{node} is not a gather of stacked weights")
    return c["input"], c["index"]


def gathered_bmm(anchor: Node) -> Block | None:
    c = call(anchor)
    if c is None or c.name not in ("bmm", "matmul") or len(shape(anchor)) != 3 or _feeds(anchor, lambda n: is_call(n, "bmm", "matmul")):
        return None
    operands = [n for n in (c["input"], c["mat2"] if c.name == "bmm" else c["other"]) if is_call(n, "getitem", "index_select")]
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
    rows, column, scale_nodes = combine.weighted_rows(out)
    result, sum_weights, sum_nodes = combine.sum_token_rows(rows, shape(ids)[0], k)
    weights, weight_nodes = _weights_of_rows(mlp, column, sum_weights, None)
    _check_tokens(x, ids, weights)
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

    require(all(body.row_scale is None for body in bodies), "an expert scales its rows before its down projection")

    def stacked(name: str) -> Weight | None:
        weights = [getattr(body, name) for body in bodies]
        if weights[0] is None:
            return None
        return Weight(tuple(_restacked(tuple(w.parts[i] for w in weights)) for i in range(len(weights[0].parts))),
                      weights[0].out_in)

    return ExpertMLP(
        first.activation, stacked("w1"), stacked("b1"), stacked("w2"), stacked("b2"), rows,
        frozenset().union(*(body.nodes for body in bodies)), frozenset(),
    )


def _restacked(parts: tuple) -> Node | tuple:
    """``W`` if the per-expert parts are its slices ``W[0], W[1], ...`` (stacked weights indexed in a
    loop), else the parts, to be stacked."""
    sources = {call(p)["input"] if is_call(p, "getitem") else None for p in parts}
    if len(sources) != 1 or None in sources:
        return parts
    (stacked,) = sources
    if all(call(p)["index"] == e for e, p in enumerate(parts)) and same_size(shape(stacked)[0], len(parts)):
        return stacked
    return parts


def _dense_column(use: Node) -> tuple[int, Node, set]:
    """(e, column, nodes) for ``dense[:, e, None]``, ``dense[:, e:e+1]`` (with two experts
    ``dense.chunk(2, -1)[e]``) or ``dense[:, e].unsqueeze(-1)``."""
    c = expect(use, "getitem", "squeeze", what="use of the dense routing weights")
    if c.name == "getitem" and is_call(c["input"], "chunk") and isinstance(c["index"], int):
        return c["index"], use, {use}
    if c.name == "squeeze":  # dense[:, 0] of a single expert
        require(c["dim"] == 1 and same_size(shape(c["input"])[1], 1), f"{use} is not a column of the routing weights")
        index = (slice(None), 0)
    else:
        index = c["index"]
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


def _dense_weights(anchor: Node) -> tuple[Node, Node, set] | None:
    """(ids, weights, nodes) if ``anchor`` is the [T, E] routing weights, zero off each token's
    top-k: ``zeros(T, E).scatter(1, ids, w)`` or ``(one_hot(ids, E) * w.unsqueeze(-1)).sum(1)``."""
    c = call(anchor)
    if c is not None and c.name == "scatter" and isinstance(c["src"], Node) and combine.is_fresh_zeros(c["input"]):
        require(c["dim"] in (1, -1) and c["reduce"] is None, f"{anchor} is no plain scatter of weights")
        return c["index"], c["src"], {anchor, c["input"]}
    if c is None or c.name != "sum" or not is_call(c["input"], "mul") or c["dim"] not in (1, -2, (1,), (-2,)) or c["keepdim"]:
        return None
    product = call(c["input"])
    for hot, column in ((product["input"], product["other"]), (product["other"], product["input"])):
        nodes = {anchor, product.node, hot, column}
        if is_call(hot, "to"):
            hot = call(hot)["input"]
            nodes.add(hot)
        if is_call(hot, "one_hot") and is_call(column, "unsqueeze") and call(column)["dim"] in (2, -1):
            require(call(hot)["num_classes"] == shape(anchor)[-1], f"{hot} has other classes than {anchor}'s experts")
            return call(hot)["input"], call(column)["input"], nodes
    return None


def dense_loop(anchor: Node) -> Block | None:
    found = _dense_weights(anchor)
    if found is None or not any(is_call(u, "getitem", "squeeze", "chunk") for u in anchor.users):
        return None  # no dense routing weights, or not picked per expert (dense_bmm's, say)
    ids, weights, nodes = found
    num_experts = _topk_experts(ids)
    if num_experts is None:
        return None  # weights of something other than a top-k choice: not an MoE router
    dense = anchor
    require(same_shape(shape(dense)[1:], (num_experts,)), f"dense routing weights {shape(dense)} are not [T, E={num_experts}]")
    bodies, terms = {}, set()
    # dense[:, e:e + 1] of two experts is canonically dense.chunk(2, -1)[e]
    uses = [u for c in dense.users for u in (c.users if is_call(c, "chunk") else [c])]
    nodes |= {c for c in dense.users if is_call(c, "chunk")}
    for use in uses:
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
    c = expect(node, "getitem", "squeeze", what="expert mask")
    ids, num_experts, labels, nodes = _one_hot_labels(c["input"])
    if c.name == "squeeze":  # mask[0] of a single expert's mask
        require(isinstance(c["dim"], int) and labels[c["dim"]] == "expert" and num_experts == 1,
                f"mask {node} does not select one expert")
        return ids, 0, num_experts, [label for label in labels if label != "expert"], nodes | {node}
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
    adds = [u for u in anchor.users if is_call(u, "index_add") or _added_at(u, anchor) is not None]
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
    require(_topk_experts(ids) is not None or all(is_call(add, "index_add") for add in adds),
            f"acc[token] += rows adds a token's rows once only if its ids are distinct, and {ids} are no top-k ids")
    require(sorted(bodies) == list(range(num_experts)), f"the loop runs experts {sorted(bodies)}, not all {num_experts}")
    mlp = _stack_experts([bodies[e] for e in range(num_experts)], x)
    _check_tokens(x, ids, weights)
    result = adds[-1] if is_call(adds[-1], "index_add") else anchor  # acc[token] = ... returns nothing
    return Block("masked_loop_experts", x, ids, weights, mlp, result, (anchor,), nodes, set())


def _added_at(node: Node, accumulator: Node) -> tuple[Node, Node, set] | None:
    """(index, rows, nodes) for ``acc[index] += rows``: ``acc[index] = acc[index] + rows``. It adds
    every row only where the index holds no token twice, which an expert's where() ensures."""
    c = call(node)
    if c is None or c.name != "setitem" or c["input"] is not accumulator or not is_call(c["value"], "add"):
        return None
    total = call(c["value"])
    for read, rows in ((total["input"], total["other"]), (total["other"], total["input"])):
        r = call(read)
        if r is not None and r.name == "index_select" and r["input"] is accumulator and r["index"] is c["index"] \
                and r["dim"] == 0 and total["alpha"] == 1:
            return c["index"], rows, {node, total.node, read}
    return None


def _masked_expert(add: Node, accumulator: Node):
    """(e, body, x, ids, weights, E or None, nodes) for one
    ``acc.index_add_(0, token, expert_e(x[token]) * weights[token, slot, None])`` (or ``acc[token] += ...``)."""
    c = call(add)
    if c.name == "setitem":
        index, rows, nodes = _added_at(add, accumulator)
    else:
        require(c.inplace and c["input"] is accumulator and c["dim"] == 0, f"{add} is not acc.index_add_(0, ...)")
        index, rows, nodes = c["index"], c["source"], set()
    source, casts = skip_noop_casts(rows)
    nodes |= casts
    if is_call(source, "to"):  # eager casts to the accumulator's dtype before adding
        nodes.add(source)
        source = call(source)["input"]
    scaled = expect(source, "mul", what="expert rows added to the output")
    ids, e, num_experts, token, slot, where_nodes = _token_slot(index)
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


# --- every expert on every token, batched ---------------------------------------------------------


def _stacked_projection(node: Node) -> Projection:
    """``v @ W`` (bmm or matmul) of rows v [E, T, in] (or [T, in], broadcast over the experts) by
    stacked weights W [E, in, out] (``W.transpose(1, 2)`` of [E, out, in]), plus an optional
    per-expert bias ``b.unsqueeze(1)``."""
    y, bias, nodes = node, None, {node}
    c = call(node)
    if c is not None and c.name == "add" and c["alpha"] == 1:
        for product, b in ((c["input"], c["other"]), (c["other"], c["input"])):
            if is_call(product, "bmm", "matmul") and is_call(b, "unsqueeze") and call(b)["dim"] == 1 \
                    and len(shape(call(b)["input"])) == 2:
                y, bias, nodes = product, Weight((call(b)["input"],)), {node, b, product}
                break
    p = expect(y, "bmm", "matmul", what="expert projection")
    weight = p["mat2"] if p.name == "bmm" else p["other"]
    out_in = is_call(weight, "transpose") and (call(weight)["dim0"], call(weight)["dim1"]) == (1, 2)
    if out_in:
        nodes.add(weight)
        weight = call(weight)["input"]
    require(len(shape(weight)) == 3 and len(shape(y)) == 3, f"{y} does not multiply by stacked expert weights")
    return Projection(p["input"], Weight((weight,), out_in), bias, frozenset(nodes))


def _expert_major(column: Node) -> tuple[Node, int, set] | None:
    """(dense, rank, nodes) for ``dense.t()`` as a column of every (expert, token): ``[E, T, 1]``
    (``dense.t().unsqueeze(-1)``, rank 3) or ``[E * T, 1]`` (``dense.t().reshape(-1, 1)``, rank 2),
    any reshapes of it (they keep its order); dense through casts."""
    rank, nodes, source = len(shape(column)), set(), column
    while is_call(source, "reshape", "unsqueeze", "squeeze"):
        nodes.add(source)
        source = call(source)["input"]
    t = call(source)
    if t is None or t.name != "transpose" or (t["dim0"], t["dim1"]) != (0, 1) or len(shape(source)) != 2:
        return None
    experts, tokens = shape(source)
    if rank not in (2, 3) or not same_shape(shape(column), (experts, tokens, 1) if rank == 3 else (experts * tokens, 1)):
        return None
    dense, casts = t["input"], {source}
    while is_call(dense, "to"):
        casts.add(dense)
        dense = call(dense)["input"]
    return dense, rank, nodes | casts


def _scaled_by(node: Node, rank: int) -> tuple[Node, Node, set] | None:
    """(other, dense, nodes) for ``other * column`` with an expert-major column of the given rank."""
    c = call(node)
    if c is None or c.name != "mul" or c.inplace:
        return None
    for other, column in ((c["input"], c["other"]), (c["other"], c["input"])):
        found = _expert_major(column)
        if found is not None and found[1] == rank:
            return other, found[0], found[2] | {node}
    return None


def _tokens_for_every_expert(rows: Node, num_experts) -> tuple[Node, Node | None, set]:
    """(x, dense or None, nodes) for the experts' input rows [E, T, H] when every expert reads every
    token x [T, H]: x itself (broadcast by matmul), ``x.unsqueeze(0).expand(E, T, H)``,
    ``x.repeat(E, 1).view(E, T, H)``; or those rows scaled by ``dense[t, e]``:
    ``(x.repeat(E, 1) * dense.t().reshape(-1, 1)).view(E, T, H)`` (Llama 4's), ``x * dense.t().unsqueeze(-1)``."""
    nodes, dense = set(), None
    if len(shape(rows)) == 3 and (scaled := _scaled_by(rows, 3)) is not None:
        rows, dense, nodes = scaled
    if is_call(rows, "reshape") and len(shape(rows)) == 3 and len(shape(call(rows)["input"])) == 2:
        flat = call(rows)["input"]
        nodes.add(rows)
        if dense is None and (scaled := _scaled_by(flat, 2)) is not None:
            flat, dense, scale_nodes = scaled
            nodes |= scale_nodes
        repeat = expect(flat, "repeat", what="the experts' input rows")
        require(tuple(repeat["sizes"]) in ((num_experts, 1), ((num_experts, 1),)),
                f"{flat} does not repeat the tokens once per expert")
        x = repeat["input"]
        nodes.add(flat)
        require(same_shape(shape(rows), (num_experts, *shape(x))), f"{rows} are not the tokens of each expert")
    elif is_call(rows, "expand"):
        nodes.add(rows)
        x = expect(call(rows)["input"], "unsqueeze", what="the experts' input rows")
        require(x["dim"] == 0, f"{rows} does not give every expert the tokens")
        nodes.add(x.node)
        x = x["input"]
    elif is_call(rows, "unsqueeze") and call(rows)["dim"] == 0:
        nodes.add(rows)
        x = call(rows)["input"]
    else:
        x = rows
    require(len(shape(x)) == 2, f"expert rows {rows} are not the tokens of every expert")
    return x, dense, nodes


def dense_bmm(anchor: Node) -> Block | None:
    c = call(anchor)
    if c is None or c.name != "sum" or c["keepdim"] or c["dim"] not in (0, (0,)) or len(shape(c["input"])) != 3:
        return None
    y, nodes = c["input"], {anchor}
    out_scaled = _scaled_by(y, 3)
    if out_scaled is not None:
        y, dense_out, scale_nodes = out_scaled
        nodes |= scale_nodes
    if not is_call(y, "bmm", "matmul", "add"):
        return None  # a sum over something other than every expert's output
    mlp = match_mlp(y, _stacked_projection)
    num_experts = _stacked_experts(mlp.w1)
    x, dense_in, row_nodes = _tokens_for_every_expert(mlp.input, num_experts)
    require((out_scaled is None) != (dense_in is None),
            "the experts' rows are weighted before and after them" if dense_in is not None
            else "the experts' outputs are summed without routing weights")
    dense = dense_in if dense_in is not None else dense_out
    found = _dense_weights(dense)
    require(found is not None, f"{dense} is not [T, E] routing weights zero off each token's top-k")
    ids, weights, dense_nodes = found
    require(_topk_experts(ids) == num_experts, f"routing weights scatter {ids}, not the top-k ids of {num_experts} experts")
    require(same_shape(shape(dense), (shape(x)[0], num_experts)), f"routing weights {shape(dense)} are not [T, E]")
    require(dense_in is None or (mlp.b1 is None and mlp.b2 is None),
            "biased experts weighted before them: an expert off the top-k adds its bias, not zero")
    require(mlp.row_scale is None, "the experts' rows are also scaled inside them")
    _check_tokens(x, ids, weights)
    return Block(
        "dense_bmm_experts", x, ids, weights, mlp, anchor, (),
        nodes=nodes | mlp.nodes | row_nodes | dense_nodes, shareable=set(),
        scaled_input=dense_in is not None,
    )


MATCHERS = {
    "sorted_grouped_mm_experts": sorted_grouped_mm,
    "received_grouped_mm_experts": received_grouped_mm,
    "gathered_bmm_experts": gathered_bmm,
    "dense_loop_experts": dense_loop,
    "masked_loop_experts": masked_loop,
    "dense_bmm_experts": dense_bmm,
}

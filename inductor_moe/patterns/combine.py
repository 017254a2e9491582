"""The combine: each token's k expert outputs, scaled by their routing weights and summed.

    y * w[:, None]                         scale rows by their routing weight (or the rows that
                                           enter the down projection, or the per-token sum below)
    rows.view(T, k, H).sum(1)              rows in pair order (pair = token * k + slot), also
    (rows.view(T, k, H) * w[..., None]).sum(1), w.unsqueeze(1) @ rows.view(T, k, H)  weighted
    unpermute(rows, perm)...               rows in expert order: back in pair order, then summed;
                                           rows[inverse(perm)], out[perm] = rows, index_copy
    zeros(T, H).index_add_(0, tok, rows)   or add them to their tokens (also torchtitan's
                                           deterministic scatter_add)
"""

from collections.abc import Callable

from torch.fx import Node

from .fx import call, dtype, expect, is_call, is_last_dim, require, same_shape, same_size, shape


def single_user(node: Node, what: str) -> Node:
    """The one reader of node's values (``empty_like(node)`` and the like read only its shape)."""
    users = [u for u in node.users if not is_call(u, "empty_like", "zeros_like", "new_empty", "new_zeros")]
    require(len(users) == 1, f"{what} has {len(users)} uses, expected one")
    return users[0]


def column(node: Node) -> tuple[Node, set]:
    """``v`` and the nodes of ``v.unsqueeze(1)`` (``v[:, None]``, ``v.view(-1, 1)`` canonically)."""
    c = expect(node, "unsqueeze", "getitem", "reshape", what="routing-weight column")
    v = c["input"]
    require(len(shape(v)) == 1 and len(shape(node)) == 2 and shape(node)[1] == 1, f"{node} is not a column of {v}")
    if c.name == "getitem":
        require(c["index"] == (slice(None), None), f"{node} indexes its weights with {c['index']}")
    return v, {node}


def weighted_rows(y: Node) -> tuple[Node, Node | None, set]:
    """(rows, column, nodes) for the one use ``y * column`` of the expert outputs, also as
    ``(y.float() * column).to(y.dtype)`` (torchtitan), where the op's float32 accumulation is at
    least as exact; column None where ``y`` is not scaled (its weights apply elsewhere). The
    caller must prove that the column holds each row's routing weight."""
    node, nodes = y, set()
    while is_call(use := single_user(node, "the expert output"), "to") and dtype(use).is_floating_point:
        node = use
        nodes.add(node)
    c = call(use)
    if c is None or c.name != "mul" or not any(
            isinstance(v, Node) and len(shape(v)) == 2 and same_size(shape(v)[1], 1) and v is not node
            for v in (c["input"], c["other"])):
        return node, None, nodes
    require(not c.inplace, "the expert output is scaled in place")
    scale = c["other"] if c["input"] is node else c["input"]
    scaled = use
    if len(scaled.users) == 1 and is_call(back := next(iter(scaled.users)), "to") and dtype(back).is_floating_point:
        nodes.add(scaled)
        scaled = back
    return scaled, scale, nodes | {scaled}


def is_fresh_zeros(node: Node) -> bool:
    """A newly allocated all-zero tensor (so in-place updates of it touch nothing else)."""
    c = call(node)
    return c is not None and c.name in ("zeros", "zeros_like", "new_zeros")


def _per_token(rows: Node, num_tokens, k: int) -> tuple[Node, set]:
    """The one ``[T, k, H]`` view of ``rows`` (``view(T, k, H)``, ``unflatten(0, (T, k))``), the
    writes that filled ``rows`` aside."""
    readers = [u for u in rows.users if not (is_call(u, "setitem") and u.args[0] is rows)]
    require(len(readers) == 1, f"the expert rows in pair order have {len(readers)} uses, expected one")
    view = readers[0]
    expect(view, "reshape", "unflatten", what="the use of the expert rows in pair order")
    require(same_shape(shape(view), (num_tokens, k, shape(rows)[-1])),
            f"expert rows are viewed as {shape(view)}, not [tokens, k={k}, hidden]")
    return view, {view}


def _over_slots(c) -> bool:
    dims = c["dim"] if isinstance(c["dim"], (tuple, list)) else (c["dim"],)
    return len(dims) == 1 and dims[0] in (1, -2) and not c["keepdim"]


def sum_token_rows(rows: Node, num_tokens, k: int) -> tuple[Node, Node | None, set]:
    """(total, weights or None, nodes) for rows in pair order summed per token:
    ``rows.view(T, k, H).sum(1)``, or weighted by ``[T, k]`` weights,
    ``(view * w.unsqueeze(-1)).sum(1)`` or ``(w.unsqueeze(1) @ view).squeeze(1)``."""
    view, nodes = _per_token(rows, num_tokens, k)
    use = single_user(view, "the [tokens, k, hidden] view")
    c = expect(use, "sum", "mul", "matmul", "bmm", what="the reduction over experts")
    if c.name == "sum":
        require(_over_slots(c), f"the sum runs over dim {c['dim']}")
        return use, None, nodes | {use}
    if c.name == "mul":
        weight = c["other"] if c["input"] is view else c["input"]
        total = single_user(use, "the weighted expert rows")
        s = expect(total, "sum", what="the reduction over experts")
        require(_over_slots(s), f"the sum runs over dim {s['dim']}")
        weight, casts = _uncast(weight)
        w = expect(weight, "unsqueeze", what="the per-token routing weights")
        require(is_last_dim(w["dim"], 3), f"{weight} does not scale the rows of each slot")
        return total, w["input"], nodes | casts | {use, total, weight}
    left = c["input"]
    right = c["mat2"] if c.name == "bmm" else c["other"]
    left, casts = _uncast(left)
    w = expect(left, "unsqueeze", what="the per-token routing weights")
    require(right is view and w["dim"] in (1, -2), f"{use} does not weight each token's rows")
    total = single_user(use, "the weighted sum")
    squeeze = expect(total, "squeeze", what="the weighted sum")
    require(squeeze["dim"] in (1, -2), f"{total} squeezes dim {squeeze['dim']}")
    return total, w["input"], nodes | casts | {use, total, left}


def _uncast(node: Node) -> tuple[Node, set]:
    """The tensor behind a floating-point cast (of routing weights to the rows' dtype)."""
    if is_call(node, "to") and dtype(node).is_floating_point:
        return call(node)["input"], {node}
    return node, set()


def _inverse_permutation(inverse: Node, perm: Node) -> set:
    """Nodes proving ``inverse`` is perm's inverse: ``inv[perm] = arange(n)`` or ``perm.argsort()``."""
    c = call(inverse)
    if c is not None and c.name == "argsort":
        require(c["input"] is perm and not c["descending"], f"{inverse} is not the inverse of {perm}")
        return {inverse}
    require(c is not None and c.name == "empty_like" and c["input"] is perm, f"{inverse} is not the inverse of {perm}")
    writes = [u for u in inverse.users if is_call(u, "setitem")]
    require(len(writes) == 1, f"{inverse} is not the inverse of {perm}")
    write = call(writes[0])
    positions = write["value"]
    arange = call(positions)
    require(
        write["index"] is perm and arange is not None and arange.name == "arange"
        and same_shape(shape(positions), shape(perm))
        and (len(arange["args"]) == 1 or arange["args"][0] == 0)
        and len(arange["args"]) < 3,
        f"{inverse} is not the inverse of {perm}",
    )
    return {inverse, writes[0], positions}


def unpermuted(rows: Node, use: Node, perm: Node) -> tuple[Node, set] | None:
    """(rows in pair order, nodes) where ``use`` puts rows (in ``perm``'s order) back in pair
    order: ``rows[inverse(perm)]``, ``out = empty_like(rows); out[perm] = rows`` or
    ``zeros_like(rows).index_copy(0, perm, rows)``; None if ``use`` is none of them."""
    c = call(use)
    if c.name == "index_select" and c["input"] is rows:
        require(c["dim"] == 0 and isinstance(c["index"], Node), f"{use} selects along dim {c['dim']}")
        return use, _inverse_permutation(c["index"], perm) | {use}
    if c.name == "setitem" and c["value"] is rows:
        target = c["input"]
        require(_row_key(c["index"]) is perm and is_call(target, "empty_like", "zeros_like", "new_empty", "new_zeros")
                and call(target)["input"] is rows and same_shape(shape(target), shape(rows)),
                f"{use} writes the rows to {c['index']}, not back by their order {perm}")
        readers = [u for u in target.users if u is not use]
        require(len(readers) == 1, f"{target} is read {len(readers)} times after the rows are written back")
        return target, {use, target}
    if c.name == "index_copy" and c["source"] is rows:
        require(c["dim"] == 0 and c["index"] is perm and is_call(c["input"], "zeros_like", "empty_like", "zeros"),
                f"{use} does not copy the rows back by their order {perm}")
        return use, {use, c["input"]}
    return None


def _row_key(index: object) -> object:
    """``i`` for the row index ``t[i]`` or ``t[i, :]`` (``t[i, ...]``)."""
    if isinstance(index, tuple) and len(index) == 2 and index[1] in (slice(None), Ellipsis):
        return index[0]
    return index


def unpermute_sum(rows: Node, perm: Node, is_token_index: Callable[[Node], bool], num_tokens, k: int):
    """Rows in expert order (row i is pair perm[i]) back to tokens, summed.

    Returns (result, accumulators, nodes, weights): accumulators are zero tensors updated in
    place, whose later reads also see the result; weights the ``[T, k]`` routing weights of a
    weighted per-token sum, or None.
    """
    use = single_user(rows, "the scaled expert rows")
    c = expect(use, "index_select", "setitem", "index_copy", "index_add", "scatter_add",
               what="the use of the scaled expert rows")
    if c.name in ("index_add", "scatter_add"):
        zeros = c["input"]
        source, index = (c["source"], c["index"]) if c.name == "index_add" else (c["src"], _row_index(c["index"], rows))
        require(source is rows and c["dim"] == 0, f"{use} does not add the rows along dim 0")
        require(is_token_index(index), f"{use} adds rows to {index}, not to their tokens")
        require(is_fresh_zeros(zeros), f"{use} accumulates into {zeros}, not a fresh zero tensor")
        require(
            same_shape(shape(zeros), (num_tokens, shape(rows)[-1])),
            f"{use} accumulates into shape {shape(zeros)}",
        )
        nodes = {use, zeros} | ({c["index"], call(c["index"])["input"]} if c.name == "scatter_add" else set())
        return use, ((zeros,) if c.inplace else ()), nodes, None
    found = unpermuted(rows, use, perm)
    require(found is not None, f"{use} does not put the rows back in pair order")
    in_pair_order, nodes = found
    total, weights, sum_nodes = sum_token_rows(in_pair_order, num_tokens, k)
    return total, (), nodes | sum_nodes, weights


def _row_index(index: object, rows: Node) -> Node | None:
    """``i`` for a scatter index ``i.reshape(-1, 1).expand(-1, H)`` (torchtitan's) that sends whole
    rows of ``rows`` to rows ``i``; None otherwise."""
    c = call(index)
    if c is None or c.name != "expand" or not same_shape(shape(index), shape(rows)):
        return None
    column_of = call(c["input"])
    if column_of is None or column_of.name not in ("reshape", "unsqueeze") or shape(c["input"])[-1] != 1:
        return None
    i = column_of["input"]
    return i if len(shape(i)) == 1 else None


def routing_weights(row_scale: Node | None, column: Node | None, sum_weights: Node | None,
                    has_down_bias: bool) -> tuple[str, Node]:
    """Where the one application of the routing weights is: ("rows", column) before or after
    the down projection, or ("sum", weights) in the per-token sum."""
    present = [(kind, v) for kind, v in (("rows", row_scale), ("rows", column), ("sum", sum_weights)) if v is not None]
    require(present, "the expert outputs are not scaled by routing weights")
    require(len(present) == 1, "the expert rows are scaled by routing weights more than once")
    require(row_scale is None or not has_down_bias,
            "the routing weights scale the rows before a biased down projection: each pair adds its bias unweighted")
    return present[0]

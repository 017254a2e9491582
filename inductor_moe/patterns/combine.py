"""The combine: each token's k expert outputs, scaled by their routing weights and summed.

    y * w[:, None]                         scale rows by their routing weight
    rows.view(T, k, H).sum(1)              rows in pair order (pair = token * k + slot)
    rows[inverse(perm)].view(T, k, H)...   rows in expert order: unpermute, then sum
    zeros(T, H).index_add_(0, tok, rows)   or add them to their tokens (also scatter_add with
                                           tok.reshape(-1, 1).expand(-1, H), torchtitan)
"""

from collections.abc import Callable

import torch
from torch.fx import Node

from .fx import call, dtype, expect, is_call, require, same_shape, shape


def single_user(node: Node, what: str) -> Node:
    users = list(node.users)
    require(len(users) == 1, f"{what} has {len(users)} uses, expected one")
    return users[0]


def column(node: Node) -> tuple[Node, set]:
    """``v`` and the nodes of ``v.unsqueeze(-1)``, ``v[:, None]`` or ``v.view(-1, 1)``."""
    c = expect(node, "unsqueeze", "getitem", "reshape", what="routing-weight column")
    v = c["input"]
    require(len(shape(v)) == 1 and len(shape(node)) == 2 and shape(node)[1] == 1, f"{node} is not a column of {v}")
    if c.name == "getitem":
        require(c["index"] == (slice(None), None), f"{node} indexes its weights with {c['index']}")
    return v, {node}


def weighted_rows(y: Node) -> tuple[Node, Node, set]:
    """(scaled, column, nodes) for the one use ``y * column`` of the expert outputs, also as
    ``(y.float() * column).to(y.dtype)`` (torchtitan), where the op's float32 accumulation is at
    least as exact; the caller must prove that the column holds each row's routing weight."""
    node, nodes = y, set()
    while is_call(use := single_user(node, "the expert output"), "to") and dtype(use) in (dtype(y), torch.float32):
        node = use
        nodes.add(node)
    c = expect(use, "mul", what="the use of the expert output")
    require(not c.inplace, "the expert output is scaled in place")
    column = c["other"] if c["input"] is node else c["input"]
    scaled = use
    if len(scaled.users) == 1 and is_call(back := next(iter(scaled.users)), "to") and dtype(back) == dtype(y):
        nodes.add(scaled)
        scaled = back
    return scaled, column, nodes | {scaled}


def is_fresh_zeros(node: Node) -> bool:
    """A newly allocated all-zero tensor (so in-place updates of it touch nothing else)."""
    c = call(node)
    return c is not None and c.name in ("zeros", "zeros_like", "new_zeros")


def sum_token_rows(rows: Node, num_tokens, k: int) -> tuple[Node, set]:
    """``rows.view(T, k, H).sum(1)``: rows in pair order summed per token."""
    view = single_user(rows, "the scaled expert rows")
    expect(view, "reshape", what="the use of the scaled expert rows")
    require(
        same_shape(shape(view), (num_tokens, k, shape(rows)[-1])),
        f"scaled rows are viewed as {shape(view)}, not [tokens, k={k}, hidden]",
    )
    total = single_user(view, "the [tokens, k, hidden] view")
    c = expect(total, "sum", what="the reduction over experts")
    require(c["dim"] in (1, -2, (1,), (-2,)) and not c["keepdim"], f"the sum runs over dim {c['dim']}")
    return total, {view, total}


def _row_index(index: object, rows: Node) -> Node | None:
    """``i`` for a scatter index ``i.reshape(-1, 1).expand(-1, H)`` (or ``i.unsqueeze(-1)``, ``expand_as``)
    that sends whole rows of ``rows`` to rows ``i``; None otherwise."""
    c = call(index)
    if c is None or c.name != "expand" or not same_shape(shape(index), shape(rows)):
        return None
    column_of = call(c["input"])
    if column_of is None or column_of.name not in ("reshape", "unsqueeze") or shape(c["input"])[-1] != 1:
        return None
    i = column_of["input"]
    return i if len(shape(i)) == 1 else None


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


def unpermute_sum(rows: Node, perm: Node, is_token_index: Callable[[Node], bool], num_tokens, k: int):
    """Rows in expert order (row i is pair perm[i]) back to tokens, summed.

    Returns (result, accumulators, nodes); accumulators are zero tensors updated in place, whose
    later reads also see the result.
    """
    use = single_user(rows, "the scaled expert rows")
    c = expect(use, "getitem", "index_select", "index_add", "scatter_add", what="the use of the scaled expert rows")
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
        return use, ((zeros,) if c.inplace else ()), nodes
    inverse = c["index"]
    if c.name == "index_select":
        require(c["dim"] == 0, f"{use} selects along dim {c['dim']}")
    require(isinstance(inverse, Node), f"{use} indexes the rows with {inverse}")
    nodes = _inverse_permutation(inverse, perm) | {use}
    total, sum_nodes = sum_token_rows(use, num_tokens, k)
    return total, (), nodes | sum_nodes


"""The combine: each token's k expert outputs, scaled by their routing weights and summed.

    y * w[:, None]                         scale rows by their routing weight
    rows.view(T, k, H).sum(1)              rows in pair order (pair = token * k + slot)
    rows[inverse(perm)].view(T, k, H)...   rows in expert order: unpermute, then sum
    zeros(T, H).index_add_(0, tok, rows)   or scatter-add them to their tokens
"""

from collections.abc import Callable

from torch.fx import Node

from .fx import call, expect, is_call, require, same_shape, shape


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


def weighted_rows(y: Node) -> tuple[Node, Node]:
    """(scaled, column) for the one use ``y * column`` of the expert outputs; the caller must
    prove that the column holds each row's routing weight."""
    scaled = single_user(y, "the expert output")
    c = expect(scaled, "mul", what="the use of the expert output")
    require(not c.inplace, "the expert output is scaled in place")
    return scaled, c["other"] if c["input"] is y else c["input"]


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
    c = expect(use, "getitem", "index_select", "index_add", what="the use of the scaled expert rows")
    if c.name == "index_add":
        zeros = c["input"]
        require(c["source"] is rows and c["dim"] == 0, f"{use} does not add the rows along dim 0")
        require(is_token_index(c["index"]), f"{use} adds rows to {c['index']}, not to their tokens")
        require(is_fresh_zeros(zeros), f"{use} accumulates into {zeros}, not a fresh zero tensor")
        require(
            same_shape(shape(zeros), (num_tokens, shape(rows)[-1])),
            f"{use} accumulates into shape {shape(zeros)}",
        )
        return use, ((zeros,) if c.inplace else ()), {use, zeros}
    inverse = c["index"]
    if c.name == "index_select":
        require(c["dim"] == 0, f"{use} selects along dim {c['dim']}")
    require(isinstance(inverse, Node), f"{use} indexes the rows with {inverse}")
    nodes = _inverse_permutation(inverse, perm) | {use}
    total, sum_nodes = sum_token_rows(use, num_tokens, k)
    return total, (), nodes | sum_nodes


"""The router: softmax over the experts, top-k, optionally renormalised, becomes ``route``.

    probs = softmax(logits.float(), -1)           # or F.softmax(logits, -1, dtype=torch.float32)
    weights, ids = probs.topk(k, -1)
    weights = weights / weights.sum(-1, keepdim=True)   # optional, also in place (/=)

The softmax must run in float32: the route op computes it so, and a lower-precision softmax can
round two scores into a tie that top-k breaks differently.
"""

import dataclasses

import torch
from torch.fx import Node

from .fx import call, dtype, getitem_users, is_call, is_last_dim, require, shape


@dataclasses.dataclass
class Router:
    logits: Node
    k: int
    renormalize: bool
    weights: Node | None  # replaced by the route op's weights
    ids: Node  # replaced by its ids (as int64, like topk's)
    nodes: set
    shareable: set  # softmax and casts other code may keep using


def _renormalized(values: Node) -> Node | None:
    """The node ``values / values.sum(-1, keepdim=True)`` if that is all values is used for."""
    users = list(values.users)
    if len(users) != 2:
        return None
    total = next((u for u in users if is_call(u, "sum")), None)
    div = next((u for u in users if is_call(u, "div")), None)
    if total is None or div is None or list(total.users) != [div]:
        return None
    s, d = call(total), call(div)
    if not (s["input"] is values and is_last_dim(s["dim"], len(shape(values))) and s["keepdim"] and s["dtype"] is None):
        return None
    if d["input"] is not values or d["other"] is not total or d.args.get("rounding_mode") is not None:
        return None
    return div


def softmax_topk(anchor: Node) -> Router | None:
    c = call(anchor)
    if c is None or c.name != "topk" or not is_call(c["input"], "softmax"):
        return None
    probs = c["input"]
    softmax = call(probs)
    ndim = len(shape(probs))
    require(is_last_dim(softmax["dim"], ndim) and is_last_dim(c["dim"], ndim), "softmax or top-k is not over the experts (last dim)")
    require(c["largest"] and isinstance(c["k"], int), f"{anchor} is not a top-k of the largest scores")
    require(
        dtype(probs) == torch.float32,
        f"router softmax runs in {dtype(probs)}: compute it in float32 (logits.float()) to fuse it",
    )
    logits, shareable = softmax["input"], {probs}
    if is_call(logits, "to") and dtype(logits) == torch.float32:  # route upcasts itself
        shareable.add(logits)
        logits = call(logits)["input"]
    outputs = getitem_users(anchor)
    require(1 in outputs, f"{anchor}'s expert ids are not used")
    values = outputs.get(0)
    renormalized = _renormalized(values) if values is not None else None
    nodes = {anchor, *outputs.values(), *shareable}
    if renormalized is not None:
        nodes |= set(values.users)
    return Router(
        logits, c["k"], renormalized is not None, renormalized or values, outputs[1], nodes, shareable
    )

"""The router, in the spellings the model families use, becomes ``route``:

    softmax(logits.float()) -> topk -> [/ sum] [* scale]                 Mixtral, Qwen, OLMoE
    sigmoid(logits) [+ bias] [group mask] -> topk -> scores.gather(ids)
        -> [/ (sum + eps)] [* scale]                                      DeepSeek-V3
    topk(logits) -> softmax(values)                                       gpt-oss

The group mask ranks the groups by ``choice.view(-1, G, E // G).topk(2)[0].sum(-1)`` and masks
all but the best ``topk_group``: DeepSeek-V3's code scatters ones into zeros, expands them over
the experts and ``masked_fill``s the choice; torchtitan's scatters False into ones and
``masked_fill``s the grouped choice before flattening it back. Logits may have leading dims
(torchtitan routes ``[B, L, E]``). Scores must be computed in float32: the route op computes
them so, and lower precision can round two scores into a tie that top-k breaks differently.
"""

import dataclasses

import torch
from torch.fx import Node

from .fx import (
    call, dtype, expect, getitem_users, is_call, is_last_dim, number, require, same_shape, scattered_constant, shape,
)


@dataclasses.dataclass
class Router:
    logits: Node
    k: int
    options: dict  # the route op's keyword arguments besides logits and k
    weights: Node | None  # replaced by the route op's weights (cast back to its dtype)
    ids: Node  # replaced by its ids (as int64, like topk's)
    nodes: set
    shareable: set  # scores, casts, the group mask: other code may keep using them


def _scores(node: Node) -> tuple[str, Node, set] | None:
    """(scoring, logits, shareable nodes) for softmax/sigmoid scores of float32 logits."""
    c = call(node)
    if c is None or c.name not in ("softmax", "sigmoid"):
        return None
    if c.name == "softmax":
        require(is_last_dim(c["dim"], len(shape(node))), "the router softmax is not over the experts (last dim)")
    require(
        dtype(node) == torch.float32,
        f"router {c.name} runs in {dtype(node)}: compute it in float32 (logits.float()) to fuse it",
    )
    logits, shareable = c["input"], {node}
    if is_call(logits, "to") and dtype(logits) == torch.float32:  # route upcasts itself
        shareable.add(logits)
        logits = call(logits)["input"]
    return c.name, logits, shareable


def _kept_groups(picked: Node) -> tuple[Node, int, set]:
    """(grouped, topk_group, nodes) if ``picked`` is ``topk(topk(grouped, 2)[0].sum(-1), topk_group)[1]``
    for choices ``grouped`` [..., n_group, E / n_group]: the groups whose two best sum highest."""
    picked_c = expect(picked, "getitem", what="kept groups")
    group_topk = expect(picked_c["input"], "topk", what="kept groups")
    require(picked_c["index"] == 1 and group_topk["largest"], "kept groups are not the top-k groups")
    group_scores = expect(group_topk["input"], "sum", what="group scores")
    best_two = expect(group_scores["input"], "getitem", what="group scores")
    pair = expect(best_two["input"], "topk", what="group scores")
    grouped = pair["input"]
    ndim = len(shape(grouped))
    require(
        ndim >= 3 and pair["k"] == 2 and best_two["index"] == 0 and is_last_dim(pair["dim"], ndim)
        and is_last_dim(group_scores["dim"], ndim) and not group_scores["keepdim"],
        "a group's score is not the sum of its two best",
    )
    return grouped, group_topk["k"], {picked, group_topk.node, group_scores.node, best_two.node, pair.node}


def _grouping(grouped: Node, choice: Node, name: str) -> int:
    """n_group if ``grouped`` is ``choice`` [..., E] split as [..., n_group, E / n_group] by a ``name`` call."""
    c = call(grouped)
    require(c is not None and c.name == name and c["input"] is choice and len(shape(grouped)) == len(shape(choice)) + 1,
            "groups are ranked on another score than the experts")
    return shape(grouped)[-2]


def _group_mask(node: Node, choice: Node) -> tuple[int, int, set]:
    """(n_group, topk_group, nodes) if ``node`` is ~mask for the mask that keeps the best groups
    of ``choice`` (DeepSeek-V3's code: a scatter of ones into zeros, expanded over each group)."""
    c = expect(node, "invert", what="group mask")
    cast = expect(c["input"], "to", what="group mask")
    reshaped = expect(cast["input"], "reshape", what="group mask")
    expanded = expect(reshaped["input"], "expand", what="group mask")
    unsqueezed = expect(expanded["input"], "unsqueeze", what="group mask")
    scattered = expect(unsqueezed["input"], "scatter", what="group mask")
    require(is_call(scattered["input"], "zeros_like", "zeros", "new_zeros") and scattered_constant(scattered) == 1,
            "the group mask is not a scatter of ones into zeros")
    grouped, topk_group, nodes = _kept_groups(scattered["index"])
    require(same_shape(shape(node), shape(choice)), "the group mask does not cover the experts")
    nodes |= {node, cast.node, reshaped.node, expanded.node, unsqueezed.node, scattered.node, scattered["input"], grouped}
    return _grouping(grouped, choice, "reshape"), topk_group, nodes


def _masked_groups(node: Node) -> tuple[Node, dict, set] | None:
    """(choice, group options, nodes) for torchtitan's group-limited choice:
    ``grouped.masked_fill(dropped.unsqueeze(-1), fill).flatten(-2)`` with ``grouped`` the choice
    unflattened into groups and ``dropped`` a scatter of False (the kept groups) into ones."""
    c = call(node)
    if c is None or c.name != "flatten" or not is_call(c["input"], "masked_fill"):
        return None
    filled = call(c["input"])
    ndim = len(shape(c["input"]))
    require(c["start_dim"] in (-2, ndim - 2) and c["end_dim"] in (-1, ndim - 1), "the masked groups are not flattened back")
    unsqueezed = expect(filled["mask"], "unsqueeze", what="group mask")
    scattered = expect(unsqueezed["input"], "scatter", what="group mask")
    require(is_call(scattered["input"], "ones_like") and scattered_constant(scattered) is False
            and is_last_dim(unsqueezed["dim"], ndim), "the group mask is not a scatter of False into ones")
    grouped, topk_group, nodes = _kept_groups(scattered["index"])
    require(filled["input"] is grouped, "the mask applies to other scores than the ranked groups")
    require(isinstance(filled["value"], (int, float)), "the group mask fills with a tensor")
    choice = call(grouped)["input"] if is_call(grouped, "unflatten") else None
    n_group = _grouping(grouped, choice, "unflatten")
    nodes |= {node, filled.node, unsqueezed.node, scattered.node, scattered["input"], grouped}
    return choice, dict(n_group=n_group, topk_group=topk_group, group_fill=float(filled["value"])), nodes


def _selection(choice: Node):
    """What a router's top-k chooses on: (scoring, logits, scores, bias, groups, nodes, shareable)."""
    nodes, groups = set(), None
    c = call(choice)
    if c is not None and c.name == "masked_fill":
        n_group, topk_group, mask_nodes = _group_mask(c["mask"], c["input"])
        require(isinstance(c["value"], (int, float)), "the group mask fills with a tensor")
        groups = dict(n_group=n_group, topk_group=topk_group, group_fill=float(c["value"]))
        nodes |= mask_nodes | {choice}
        choice = c["input"]
        c = call(choice)
    elif (masked := _masked_groups(choice)) is not None:
        choice, groups, mask_nodes = masked
        nodes |= mask_nodes
        c = call(choice)
    bias = None
    if c is not None and c.name == "add" and not c.inplace:
        for scores, other in ((c["input"], c["other"]), (c["other"], c["input"])):
            if _scores(scores) is not None and isinstance(other, Node) and len(shape(other)) == 1:
                nodes.add(choice)
                choice, bias = scores, other
                break
    found = _scores(choice)
    if found is None:
        if bias is not None or groups is not None:
            return None
        return "softmax_of_topk", choice, None, None, None, nodes, set()
    scoring, logits, shareable = found
    return scoring, logits, choice, bias, groups, nodes, shareable


def _postprocessing(weights: Node) -> tuple[Node, bool, float, float, set]:
    """(final weights, renormalized, eps, scale, nodes) after ``/ (sum [+ eps])`` and ``* scale``."""
    node, renormalized, eps, scale, nodes = weights, False, 0.0, 1.0, set()
    users = list(node.users)
    divisions = [u for u in users if is_call(u, "div")]
    if len(divisions) == 1 and call(divisions[0])["input"] is node:
        total = call(divisions[0])["other"]
        added = call(total)
        nodes_eps, sum_eps = set(), 0.0
        if added is not None and added.name == "add" and isinstance(added["other"], float) and added["other"] >= 0:
            # kept exactly: with sigmoid scores the sum can be as small as the eps (LFM2's 1e-6)
            nodes_eps, sum_eps = {total}, added["other"]
            total = added["input"]
        s = call(total)
        if (s is not None and s.name == "sum" and s["input"] is node and s["keepdim"]
                and is_last_dim(s["dim"], len(shape(node))) and set(users) == {divisions[0], total}):
            renormalized, eps, node = True, sum_eps, divisions[0]
            nodes |= {divisions[0], total} | nodes_eps
    users = list(node.users)
    if len(users) == 1 and is_call(users[0], "mul"):
        m = call(users[0])
        factor = number(m["other"] if m["input"] is node else m["input"])
        if factor is not None:
            node, scale = users[0], factor
            nodes.add(node)
    return node, renormalized, eps, scale, nodes


def match_router(anchor: Node) -> Router | None:
    c = call(anchor)
    if c is None or c.name != "topk" or not c["largest"] or not isinstance(c["k"], int):
        return None
    if not is_last_dim(c["dim"], len(shape(c["input"]))):
        return None
    outputs = getitem_users(anchor)
    if 1 not in outputs or len(shape(c["input"])) < 2:
        return None
    ids, values = outputs[1], outputs.get(0)
    selection = _selection(c["input"])
    if selection is None:
        return None
    scoring, logits, scores, bias, groups, nodes, shareable = selection
    nodes |= {anchor, *outputs.values()}
    if scoring == "softmax_of_topk":
        softmax = [u for u in values.users if is_call(u, "softmax")] if values is not None else []
        if len(softmax) != 1 or len(values.users) != 1 or not is_last_dim(call(softmax[0])["dim"], len(shape(values))):
            return None  # a top-k of something that is not turned into routing weights
        weights = softmax[0]
    elif scores is c["input"] and values is not None:
        weights = values
    else:
        gathers = [u for u in ids.users if is_call(u, "gather") and call(u)["input"] is scores]
        require(len(gathers) == 1 and is_last_dim(call(gathers[0])["dim"], len(shape(ids))),
                "the routing weights are not the chosen scores")
        weights = gathers[0]
    nodes.add(weights)
    weights, renormalized, eps, scale, post_nodes = _postprocessing(weights)
    options = dict(renormalize=renormalized, scoring=scoring, bias=bias, scale=scale, eps=eps, **(groups or {}))
    options = {name: v for name, v in options.items() if name == "renormalize" or v != _DEFAULTS[name]}
    return Router(logits, c["k"], options, weights, ids, nodes | post_nodes, shareable)


# the route op's defaults, left out of the rewritten graph so that it reads like the model
_DEFAULTS = dict(scoring="softmax", bias=None, n_group=1, topk_group=1, scale=1.0, group_fill=0.0, eps=0.0)

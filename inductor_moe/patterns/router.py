"""The router, in the spellings the model families use, becomes ``route``:

    softmax(logits.float()) -> topk -> [/ sum] [* scale]                 Mixtral, Qwen, OLMoE
    sigmoid(logits) [+ bias] [group mask] -> topk -> scores.gather(ids)
        -> [/ (sum + eps)] [* scale]                                      DeepSeek-V3, LongCat-Flash
    softmax(logits) [group mask] -> topk -> values * scale               DeepSeek-V2
    topk(logits) -> softmax(values)                                       gpt-oss
    topk(logits) -> sigmoid(values) -> [/ sum]                           Cohere2-MoE, Llama 4

The group mask ranks the groups by ``choice.view(-1, G, E // G).topk(2)[0].sum(-1)`` (or by
their best, ``.max(-1).values``) and masks all but the best ``topk_group``: DeepSeek's code
scatters ones into zeros, expands them over the experts and ``masked_fill``s the choice;
torchtitan's scatters False into ones and ``masked_fill``s the grouped choice before flattening
it back. Logits may have leading dims (torchtitan routes ``[B, L, E]``). Scores must be computed in float32: the route op computes
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


def _group_score(node: Node) -> tuple[Node, int, set]:
    """(grouped, group_top, nodes) if ``node`` scores each group of choices ``grouped``
    [..., n_group, E / n_group] by the sum of its group_top best: ``topk(grouped, n)[0].sum(-1)``,
    or by its best, ``grouped.max(-1)[0]`` or ``grouped.amax(-1)``."""
    c = expect(node, "sum", "getitem", "amax", what="group scores")
    if c.name == "amax":
        best, grouped, top, nodes = c, c["input"], 1, {node}
    elif c.name == "getitem":
        best = expect(c["input"], "max", what="group scores")
        require(c["index"] == 0 and isinstance(best["dim"], int), f"{node} is not the groups' best scores")
        grouped, top, nodes = best["input"], 1, {node, best.node}
    else:
        values = expect(c["input"], "getitem", what="group scores")
        best = expect(values["input"], "topk", what="group scores")
        require(values["index"] == 0 and best["largest"] and isinstance(best["k"], int) and not c["keepdim"]
                and is_last_dim(c["dim"], len(shape(values.node))), f"{node} is not a sum of each group's best")
        grouped, top, nodes = best["input"], best["k"], {node, values.node, best.node}
    ndim = len(shape(grouped))
    require(ndim >= 3 and is_last_dim(best["dim"], ndim) and not (best.name != "topk" and best["keepdim"]),
            f"{node} does not score each group over its experts")
    return grouped, top, nodes


def _kept_groups(picked: Node) -> tuple[Node, dict, set]:
    """(grouped, options, nodes) if ``picked`` is ``topk(group scores, topk_group)[1]`` for choices
    ``grouped`` [..., n_group, E / n_group] (``_group_score``)."""
    picked_c = expect(picked, "getitem", what="kept groups")
    group_topk = expect(picked_c["input"], "topk", what="kept groups")
    require(picked_c["index"] == 1 and group_topk["largest"], "kept groups are not the top-k groups")
    grouped, group_top, nodes = _group_score(group_topk["input"])
    options = dict(topk_group=group_topk["k"], group_top=group_top)
    return grouped, options, nodes | {picked, group_topk.node}


def _grouping(grouped: Node, choice: Node, name: str) -> int:
    """n_group if ``grouped`` is ``choice`` [..., E] split as [..., n_group, E / n_group] by a ``name`` call."""
    c = call(grouped)
    require(c is not None and c.name == name and c["input"] is choice and len(shape(grouped)) == len(shape(choice)) + 1,
            "groups are ranked on another score than the experts")
    return shape(grouped)[-2]


def _group_mask(node: Node, choice: Node) -> tuple[dict, set]:
    """(group options, nodes) if ``node`` is ~mask for the mask that keeps the best groups of
    ``choice`` (DeepSeek's code: a scatter of ones into zeros, expanded over each group)."""
    c = expect(node, "invert", what="group mask")
    cast = expect(c["input"], "to", what="group mask")
    reshaped = expect(cast["input"], "reshape", what="group mask")
    expanded = expect(reshaped["input"], "expand", what="group mask")
    unsqueezed = expect(expanded["input"], "unsqueeze", what="group mask")
    scattered = expect(unsqueezed["input"], "scatter", what="group mask")
    require(is_call(scattered["input"], "zeros_like", "zeros", "new_zeros") and scattered_constant(scattered) == 1,
            "the group mask is not a scatter of ones into zeros")
    grouped, options, nodes = _kept_groups(scattered["index"])
    require(same_shape(shape(node), shape(choice)), "the group mask does not cover the experts")
    nodes |= {node, cast.node, reshaped.node, expanded.node, unsqueezed.node, scattered.node, scattered["input"], grouped}
    return dict(n_group=_grouping(grouped, choice, "reshape"), **options), nodes


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
    grouped, options, nodes = _kept_groups(scattered["index"])
    require(filled["input"] is grouped, "the mask applies to other scores than the ranked groups")
    require(isinstance(filled["value"], (int, float)), "the group mask fills with a tensor")
    choice = call(grouped)["input"] if is_call(grouped, "unflatten") else None
    n_group = _grouping(grouped, choice, "unflatten")
    nodes |= {node, filled.node, unsqueezed.node, scattered.node, scattered["input"], grouped}
    return choice, dict(n_group=n_group, group_fill=float(filled["value"]), **options), nodes


def _bias_vector(node: object) -> Node | None:
    """The ``[E]`` bias behind ``bias`` or ``bias.unsqueeze(0)`` (LongCat-Flash's)."""
    if isinstance(node, Node) and len(shape(node)) == 1:
        return node
    c = call(node)
    if c is not None and c.name == "unsqueeze" and c["dim"] == 0 and len(shape(c["input"])) == 1:
        return c["input"]
    return None


def _selection(choice: Node):
    """What a router's top-k chooses on: (scoring, logits, scores, bias, groups, nodes, shareable)."""
    nodes, groups = set(), None
    c = call(choice)
    if c is not None and c.name == "masked_fill":
        groups, mask_nodes = _group_mask(c["mask"], c["input"])
        require(isinstance(c["value"], (int, float)), "the group mask fills with a tensor")
        groups["group_fill"] = float(c["value"])
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
            if _scores(scores) is not None and (vector := _bias_vector(other)) is not None:
                nodes |= {choice, other}
                choice, bias = scores, vector
                break
    found = _scores(choice)
    if found is None:
        if bias is not None or groups is not None:
            return None
        return None, choice, None, None, None, nodes, set()  # a top-k of the logits themselves
    scoring, logits, shareable = found
    return scoring, logits, choice, bias, groups, nodes, shareable


def _plus_constant(node: Node) -> tuple[Node, float]:
    """(v, c) for ``v + c`` with a constant c >= 0, else (node, 0)."""
    c = call(node)
    if c is not None and c.name == "add" and c["alpha"] == 1 and (eps := number(c["other"])) is not None and eps >= 0:
        return c["input"], eps
    return node, 0.0


def _row_sum(total: Node, weights: Node) -> tuple[float, set] | None:
    """(eps, nodes) if ``total`` is the weights' sum over the experts as a column, plus eps:
    ``w.sum(-1, keepdim=True) [+ eps]`` or ``(w.sum(-1) [+ eps]).unsqueeze(-1)``, or the 1-norm
    ``w.norm(p=1, ...)`` (DBRX's), the same sum of the scores, which are positive."""
    ndim = len(shape(weights))
    node, eps = _plus_constant(total)
    nodes = {total}
    unsqueezed = call(node)
    if unsqueezed is not None and unsqueezed.name == "unsqueeze" and is_last_dim(unsqueezed["dim"], ndim):
        nodes |= {node, unsqueezed["input"]}
        node, inner_eps = _plus_constant(unsqueezed["input"])
        if inner_eps and eps:
            return None
        eps, keepdim = eps or inner_eps, False
    else:
        keepdim = True
    nodes.add(node)
    s = call(node)
    if s is None or not (s.name == "sum" or (s.name == "norm" and number(s["p"]) == 1.0)) or s["input"] is not weights \
            or s["keepdim"] != keepdim:
        return None
    dims = s["dim"] if isinstance(s["dim"], (tuple, list)) else (s["dim"],)
    return (eps, nodes) if len(dims) == 1 and is_last_dim(dims[0], ndim) else None


def _postprocessing(weights: Node) -> tuple[Node, bool, float, float, set]:
    """(final weights, renormalized, eps, scale, nodes) after ``/ (sum [+ eps])`` and ``* scale``."""
    node, renormalized, eps, scale, nodes = weights, False, 0.0, 1.0, set()
    divisions = [u for u in node.users if is_call(u, "div") and call(u)["input"] is node]
    if len(divisions) == 1 and (found := _row_sum(call(divisions[0])["other"], node)) is not None:
        eps, total_nodes = found
        if set(node.users) <= {divisions[0], *total_nodes}:
            renormalized, node = True, divisions[0]
            nodes |= {divisions[0], *total_nodes}
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
    if scoring is None:
        scored = _scored_values(values) if values is not None else None
        if scored is None:
            return None  # a top-k of something that is not turned into routing weights
        scoring, weights, cast = scored
        nodes |= cast
    elif values is not None and (scores is c["input"] or (bias is None and groups and groups["group_fill"] <= 0)):
        # the chosen values are the scores, also where the group mask filled the others with
        # at most 0: positive scores of kept groups always win over them (DeepSeek-V2)
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


def _scored_values(values: Node) -> tuple[str, Node, set] | None:
    """(scoring, weights, casts) for the one use of top-k logits that scores them:
    ``softmax(values)`` over the last dim or ``sigmoid(values)``, also of ``values.float()``
    (route computes them in float32 anyway)."""
    node, casts = values, set()
    while len(node.users) == 1 and is_call(user := next(iter(node.users)), "to") and dtype(user).is_floating_point:
        node = user
        casts.add(node)
    users = list(node.users)
    if len(users) != 1:
        return None
    if is_call(users[0], "softmax") and is_last_dim(call(users[0])["dim"], len(shape(values))):
        return "softmax_of_topk", users[0], casts
    if is_call(users[0], "sigmoid"):
        return "sigmoid_of_topk", users[0], casts
    return None


# the route op's defaults, left out of the rewritten graph so that it reads like the model
_DEFAULTS = dict(scoring="softmax", bias=None, n_group=1, topk_group=1, scale=1.0, group_fill=0.0, eps=0.0, group_top=2)

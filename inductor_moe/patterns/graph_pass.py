"""The pre-grad pass: run every matcher over dynamo's graph and rewrite what they find.

Every decision is logged (logger ``inductor_moe``, also through ``TORCH_LOGS=inductor_moe``) and,
inside ``recording()``, kept as a ``Decision`` for ``inductor_moe.explain``.
"""

import contextlib
import dataclasses
import logging
import os
import re

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from .. import config
from ..ops import fp8
from . import dispatch, normalize, rewrite, router
from .dispatch import Block
from .fx import NoMatch, call, describe, is_call, view_source
from .router import Router

log = logging.getLogger(__name__)

# pattern name -> (matcher, rewrite): experts blocks first, so each sees the router it reads from
PATTERNS = {
    **{name: (matcher, rewrite.rewrite_experts) for name, matcher in dispatch.MATCHERS.items()},
    "router": (router.match_router, rewrite.rewrite_router),
}


def _module(node: Node) -> str:
    """The innermost module that made ``node``, by its name in the compiled model (dynamo's L['self'])."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        return ""
    name = re.sub(r"^L\['self'\]\.?", "", stack[-1][0])
    return f" in {name or 'the model'} ({stack[-1][1].__name__})"


def _where(node: Node) -> str:
    """The node, its module and the user's source line that made it, for log messages."""
    lines = node.meta.get("stack_trace", "").splitlines()
    frames = [(i, m) for i, line in enumerate(lines) if (m := re.match(r'\s*File "(.*)", line (\d+)', line))]
    if not frames:
        return node.name + _module(node)
    i, match = frames[-1]
    code = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return f"{node.name}{_module(node)}, {os.path.basename(match[1])}:{match[2]}: {code}"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a matcher concluded about one candidate region."""

    pattern: str
    where: str  # the region's last node and the user's source line
    rewritten: bool
    detail: str  # the canonical op it became, or why it was left alone


_recorders: list[list[Decision]] = []


@contextlib.contextmanager
def recording():
    """Collect the decisions of every ``rewrite_moe`` run inside the block."""
    decisions: list[Decision] = []
    _recorders.append(decisions)
    try:
        yield decisions
    finally:
        _recorders.remove(decisions)


def _decide(decision: Decision, level: int = logging.INFO, exc_info: bool = False) -> None:
    verb = "rewrote the block ending at" if decision.rewritten else "left alone"
    log.log(level, "%s: %s %s: %s", decision.pattern, verb, decision.where, decision.detail, exc_info=exc_info)
    for decisions in _recorders:
        decisions.append(decision)


def _became(found: Block | Router) -> str:
    """The canonical op call a region became, for the log."""
    if isinstance(found, Router):
        options = {"k": found.k, **found.options}
        shown = ", ".join(f"{k}={v.name if isinstance(v, Node) else repr(v)}" for k, v in options.items())
        return f"inductor_moe.route({shown})"
    precision = "" if config.fp8 is None else f", fp8={config.fp8}"
    return f"inductor_moe.experts({found.mlp.activation}{precision})"


def rewrite_moe(graph: Graph) -> None:
    """Rewrite every MoE block and router in ``graph`` into canonical ops."""
    if config.fp8 not in (None, *fp8.RECIPES):  # a typo must not silently leave the model unquantized
        raise ValueError(f"inductor_moe.config.fp8 must be None or one of {list(fp8.RECIPES)}, got {config.fp8!r}")
    if not any("example_value" in node.meta for node in graph.nodes):
        return  # no dynamo graph: an exported program's ATen (inductor_moe.export rewrote it before)
    normalize.normalize(graph)
    routers_left_alone = set()
    for name, (matcher, rewrite_block) in PATTERNS.items():
        if name in config.disabled_patterns:
            continue
        # Latest first: a block's last node comes before its earlier ones, which then go with it.
        for node in reversed(list(graph.nodes)):
            if node._erased:
                continue
            try:
                found = matcher(node)
                if found is None or not rewrite_block(graph, found):
                    continue
            except NoMatch as reason:
                _decide(Decision(name, _where(node), False, str(reason)))
                if name == "router":
                    routers_left_alone.add(node)
                continue
            except Exception as error:  # a matcher bug must cost speed, never the user's compile
                _decide(Decision(name, _where(node), False, f"internal error ({error!r})"), logging.WARNING, True)
                continue
            counters["inductor_moe"][name] += 1
            _decide(Decision(name, _where(node), True, _became(found)))
    if "router" not in config.disabled_patterns:
        _explain_unrouted(graph, routers_left_alone)


def _explain_unrouted(graph: Graph, routers_left_alone: set) -> None:
    """Say why the router stayed as written where an experts op's ids come from no route op (also
    through edits such as LongCat-Flash's identity experts) and no router was left alone with a
    reason of its own: Phi-MoE's sparsemixer, say."""
    for op in graph.find_nodes(op="call_function", target=torch.ops.inductor_moe.experts.default):
        source = _producer(op.args[1])
        ancestors, frontier = set(), {source}
        for _ in range(8):  # a router is a few ops from the ids it makes
            frontier = {n for node in frontier for n in node.all_input_nodes} - ancestors
            ancestors |= frontier
        routed = any(n.target == torch.ops.inductor_moe.route.default for n in ancestors | {source})
        if routed or ancestors & routers_left_alone:
            continue
        made_by = ", ".join(dict.fromkeys(describe(_producer(n)) for n in source.all_input_nodes)) or "nothing"
        _decide(Decision("router", _where(source), False,
                         f"the expert ids are a {describe(source)} of {made_by}, not a top-k of router scores or "
                         "logits: the routing stays as written"))


def _producer(node: Node) -> Node:
    """The op behind views, casts and the picking of one of its outputs."""
    while True:
        if is_call(node, "to", "contiguous") or view_source(node) is not None:
            node = call(node)["input"]
        elif is_call(node, "getitem") and isinstance(node.args[0], Node) and isinstance(node.args[1], int):
            node = node.args[0]
        else:
            return node

"""The pre-grad pass: run every matcher over dynamo's graph and rewrite what they find."""

import logging
import os
import re

from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from .. import config
from . import dispatch, normalize, rewrite, router
from .fx import NoMatch

log = logging.getLogger(__name__)

# pattern name -> (matcher, rewrite): experts blocks first, so each sees the router it reads from
PATTERNS = {
    **{name: (matcher, rewrite.rewrite_experts) for name, matcher in dispatch.MATCHERS.items()},
    "router": (router.match_router, rewrite.rewrite_router),
}


def _where(node: Node) -> str:
    """The node and the user's source line that made it, for log messages."""
    lines = node.meta.get("stack_trace", "").splitlines()
    frames = [(i, m) for i, line in enumerate(lines) if (m := re.match(r'\s*File "(.*)", line (\d+)', line))]
    if not frames:
        return node.name
    i, match = frames[-1]
    code = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return f"{node.name} ({os.path.basename(match[1])}:{match[2]}: {code})"


def rewrite_moe(graph: Graph) -> None:
    """Rewrite every MoE block and router in ``graph`` into canonical ops."""
    normalize.functionalize(graph)
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
                log.info("%s: left %s alone: %s", name, _where(node), reason)
                continue
            except Exception:  # a matcher bug must cost speed, never the user's compile
                log.warning("%s: internal error at %s; block left alone", name, _where(node), exc_info=True)
                continue
            counters["inductor_moe"][name] += 1
            log.info("%s: rewrote the block ending at %s", name, _where(node))

"""The pre-grad pass that runs every matcher, and its installation into Inductor's config.

It is chained onto ``torch._inductor.config.pre_grad_custom_pass`` (a pass the user set keeps
running, first), and its ``uuid()`` covers every source file of the package and every config
value, so Inductor's caches never serve code compiled under other code or other settings.
"""

import logging
import pathlib

from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes, get_hash_for_files
from torch.fx import Graph, Node

from .. import config
from . import dispatch, rewrite, router
from .fx import NoMatch

log = logging.getLogger(__name__)

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
_SOURCES = tuple(str(p) for p in sorted(_PACKAGE.rglob("*.py")))

# pattern name -> (matcher, rewrite): experts blocks first, so each sees the router it reads from
PATTERNS = {
    **{name: (matcher, rewrite.rewrite_experts) for name, matcher in dispatch.MATCHERS.items()},
    "softmax_topk_router": (router.softmax_topk, rewrite.rewrite_router),
}


def _where(node: Node) -> str:
    """The user's source line of a node, for log messages."""
    trace = node.meta.get("stack_trace", "").strip().splitlines()
    return f"{node.name} ({trace[-2].strip()})" if len(trace) >= 2 else node.name


def rewrite_moe(graph: Graph) -> None:
    """Rewrite every MoE block and router in ``graph`` into canonical ops."""
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


class MoEGraphPass(CustomGraphPass):
    """inductor_moe's pre-grad pass, chained after the pass that was configured before it."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, graph: Graph) -> None:
        for previous in get_custom_graph_passes(self.previous):
            previous(graph)
        if config.enabled:
            rewrite_moe(graph)

    def uuid(self):
        previous = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in get_custom_graph_passes(self.previous)]
        if None in previous:
            return None  # a chained pass without a uuid: Inductor then runs passes before its cache lookup
        return get_hash_for_files(_SOURCES).hex(), config.get_hash().hex(), tuple(previous)


def install() -> None:
    """Chain the pass onto ``pre_grad_custom_pass``; again after a user replaced that setting."""
    current = inductor_config.pre_grad_custom_pass
    if not any(isinstance(p, MoEGraphPass) for p in get_custom_graph_passes(current)):
        inductor_config.pre_grad_custom_pass = MoEGraphPass(current)

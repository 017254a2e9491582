"""inductor_moe's two graph passes and their installation into Inductor's config.

    pre_grad_custom_pass       patterns.graph_pass.rewrite_moe: MoE blocks -> canonical ops
    post_grad_custom_pre_pass  lowerings.post_grad: canonical ops on CPU -> traced CPU code;
                               extern experts calls whose h nothing reads skip storing it

Each is chained onto what the setting held before (a user's pass keeps running, first). Their
``uuid()`` covers every source file of the package and every config value, so Inductor's caches
never serve code compiled under other code or other settings.
"""

import pathlib

from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

from . import config, transformers_experts
from .lowerings import post_grad
from .patterns.graph_pass import rewrite_moe


def _passes_of(value) -> tuple:
    """The passes a pass setting holds: None, one pass, or (torch >= 2.12) a list of them."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


_SOURCES = tuple(str(p) for p in sorted(pathlib.Path(__file__).resolve().parent.rglob("*.py")))


class ChainedPass(CustomGraphPass):
    """Runs the pass configured before it, then ``run`` while inductor_moe is enabled."""

    def __init__(self, run, previous=None):
        self.run, self.previous = run, previous

    def __call__(self, graph: Graph) -> None:
        for previous in _passes_of(self.previous):
            previous(graph)
        if config.enabled:
            self.run(graph)

    def uuid(self):
        previous = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in _passes_of(self.previous)]
        if None in previous:
            return None  # a chained pass without a uuid: Inductor then runs passes before its cache lookup
        own = (self.run.__qualname__, get_hash_for_files(_SOURCES).hex(), config.get_hash().hex())
        return (*own, tuple(previous))


def install() -> None:
    """Chain both passes onto Inductor's config (again after a user replaced those settings), and
    have transformers' eager experts traced as tensor code."""
    transformers_experts.install()
    for setting, run in (("pre_grad_custom_pass", rewrite_moe), ("post_grad_custom_pre_pass", post_grad)):
        current = getattr(inductor_config, setting)
        if not any(isinstance(p, ChainedPass) for p in _passes_of(current)):
            setattr(inductor_config, setting, ChainedPass(run, current))

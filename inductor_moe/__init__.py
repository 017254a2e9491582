"""inductor_moe: torch.compile finds plain Mixture-of-Experts code and runs it as fused ops.

    import torch, inductor_moe
    model = torch.compile(model)

Importing the package registers the canonical ops (``torch.ops.inductor_moe.*``) and chains its
graph passes onto Inductor's config (see ``passes``). ``inductor_moe.config`` holds the knobs; every rewrite
counts in ``torch._dynamo.utils.counters["inductor_moe"]`` and is logged (logger ``inductor_moe``).
"""

from . import config, lowerings, ops  # noqa: F401
from .passes import install

install()

__all__ = ["config", "install"]

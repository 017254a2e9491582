"""inductor_moe: torch.compile finds plain Mixture-of-Experts code and runs it as fused ops.

    import torch, inductor_moe
    model = torch.compile(model)

Importing the package registers the canonical ops (``torch.ops.inductor_moe.*``) and chains its
graph passes onto Inductor's config (see ``passes``). ``inductor_moe.config`` holds the knobs; every rewrite
counts in ``torch._dynamo.utils.counters["inductor_moe"]`` and is logged (logger ``inductor_moe``,
``TORCH_LOGS=inductor_moe``); ``inductor_moe.explain(model, *inputs)`` reports every decision;
``inductor_moe.export`` is ``torch.export.export`` with the blocks rewritten (for AOTInductor;
``inductor_moe.for_executorch`` then prepares such a program for ExecuTorch).
"""

import torch._logging._internal

from . import config, lowerings, ops  # noqa: F401
from .deploy import export, for_executorch
from .explain import explain
from .passes import install

install()

# TORCH_LOGS=inductor_moe shows every decision, formatted like Inductor's own logs. torch parses
# TORCH_LOGS as it is imported and imports a package it names (this one) to log it; parsing again
# here would give every torch logger a second handler, and every log line twice.
torch._logging._internal.register_log("inductor_moe", "inductor_moe")

__all__ = ["config", "explain", "export", "for_executorch", "install"]

"""inductor_moe's knobs, in one place (Inductor's config style).

Read at compile time: change a value, then compile again. Every value enters the graph pass's
``uuid()``, so the FX graph cache never serves code compiled under other settings. Use
``inductor_moe.config.patch(enabled=False)`` as a context manager or decorator for a scoped change.
"""

import os
import sys

from torch.utils._config_module import install_config_module

# Rewrite MoE blocks at all. False gives exactly stock torch.compile at the next compile.
enabled: bool = True

# Pattern names (the keys of counters["inductor_moe"]) to leave alone, e.g. ["dense_loop_experts"].
disabled_patterns: list[str] = []

# The transformers experts implementation that torch.compile traces where a model runs "eager"
# (a loop over nonzero() that graph-breaks); None traces eager as it is. See transformers_experts.
transformers_eager_experts: str | None = "grouped_mm"

# Run the rewritten experts' grouped GEMMs in float8 e4m3: None, "rowwise" (a scale per activation
# row and weight output row), "blockwise" (1x128 activation, 128x128 weight blocks) or "mxfp8"
# (1x32 blocks, power-of-two scales). See ops/fp8.py.
fp8: str | None = None

# With fp8 set, also run the weight-gradient GEMMs in FP8; False keeps them in the model's dtype.
fp8_weight_grad: bool = True

# Spread every rewritten block's experts over this torch.distributed process group (its name),
# each rank running its share: see expert_parallel.parallelize. None: each rank runs every expert.
expert_parallel: str | None = None

# Run the Triton kernels for CPU tensors too, through Triton's interpreter (slow: for tests). The
# interpreter must be on (TRITON_INTERPRET=1) before inductor_moe.kernels is imported.
triton_on_cpu: bool = os.environ.get("TRITON_INTERPRET") == "1"

install_config_module(sys.modules[__name__])

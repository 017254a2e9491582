"""Inductor lowerings of the canonical ops.

``cpu``: decompositions into aten, so Inductor fuses the pointwise parts around extern grouped
GEMMs. Where a decomposition declines (other devices, dtypes ``_grouped_mm`` cannot compile),
the op runs as one extern call of its eager implementation: the fallbacks registered here.
Importing this package registers both.
"""

import torch
from torch._inductor.lowering import make_fallback

from . import cpu  # noqa: F401  (registration)

for _op in (
    torch.ops.inductor_moe.route.default,
    torch.ops.inductor_moe.experts.default,
    torch.ops.inductor_moe.experts_backward.default,
):
    # override_decomp: the decompositions above apply only where they can (they return NotImplemented otherwise)
    make_fallback(_op, warn=False, override_decomp=True)

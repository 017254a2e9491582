"""How Inductor lowers the canonical ops.

``cpu``: a post-grad pass replaces each op by its CPU code traced into aten, so Inductor fuses
the pointwise parts around extern grouped GEMMs. Where that does not apply (other devices, dtypes
``_grouped_mm`` cannot compile), the op runs as one extern call of its eager implementation: the
fallbacks registered here.
"""

import torch
from torch._inductor.lowering import make_fallback

from . import cpu  # noqa: F401

for _op in (
    torch.ops.inductor_moe.route.default,
    torch.ops.inductor_moe.route_backward.default,
    torch.ops.inductor_moe.experts.default,
    torch.ops.inductor_moe.experts_backward.default,
):
    make_fallback(_op, warn=False)

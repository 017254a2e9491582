"""The canonical ops, ``torch.ops.inductor_moe.*``: every pattern rewrites into these.

Importing this package registers them (schema, fake implementation, autograd, CPU implementation).
"""

from . import experts, grouped_mm, route  # noqa: F401  (registration)

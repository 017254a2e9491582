"""The canonical ops, ``torch.ops.inductor_moe.*``: every pattern rewrites into these.

Importing this package registers them (schema, fake implementation, autograd, CPU implementation).
"""

from . import experts, grouped_mm, route  # noqa: F401  (registration)


def bound_arguments(op, args, kwargs) -> dict:
    """A canonical op's arguments by name, defaults filled in (graphs omit defaulted ones)."""
    schema = op._schema
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update(zip((a.name for a in schema.arguments), args))
    values.update(kwargs)
    return values

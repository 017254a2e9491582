"""The expert activations the ``experts`` op models, forward and backward.

A gated activation (``swiglu``, ``geglu``, ...) reads the first projection's output as two halves,
``gate, up = h.chunk(2, -1)``, and computes ``act(gate) * up``; a plain one (``gelu``, ...) is
``act(h)``. Math runs in the dtype of ``h``, as the eager modules do.
"""

import torch
import torch.nn.functional as F

aten = torch.ops.aten

# elementwise function name -> (forward, backward(grad, x))
_FUNCTIONS = {
    "silu": (F.silu, aten.silu_backward),
    "gelu": (F.gelu, lambda g, x: aten.gelu_backward(g, x)),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda g, x: aten.gelu_backward(g, x, approximate="tanh"),
    ),
    "relu": (F.relu, lambda g, x: aten.threshold_backward(g, x, 0)),
}

# activation name -> (elementwise function, gated)
ACTIVATIONS = {
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),
    "reglu": ("relu", True),
    **{name: (name, False) for name in _FUNCTIONS},
}


def activation_name(function: str, gated: bool) -> str | None:
    """The ``experts`` activation for an elementwise function, or None if it is not modelled."""
    for name, spec in ACTIVATIONS.items():
        if spec == (function, gated):
            return name
    return None


def is_gated(activation: str) -> bool:
    return ACTIVATIONS[activation][1]


def check(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"inductor_moe: unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)}"
        )


def forward(activation: str, h: torch.Tensor) -> torch.Tensor:
    function, gated = ACTIVATIONS[activation]
    act = _FUNCTIONS[function][0]
    if not gated:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def backward(activation: str, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to ``h`` of ``forward(activation, h)``, given the output's ``grad``."""
    function, gated = ACTIVATIONS[activation]
    act, act_backward = _FUNCTIONS[function]
    if not gated:
        return act_backward(grad, h)
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([act_backward(grad * up, gate), grad * act(gate)], dim=-1)

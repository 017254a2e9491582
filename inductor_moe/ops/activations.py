"""The expert activations the ``experts`` op models, forward and backward, in torch.

A gated activation reads the first projection's output ``h`` as gate and up: the two halves
(``gate, up = h.chunk(2, -1)``) or, ``interleaved``, the even and odd columns (gpt-oss), and
computes ``act(gate) * up``. ``swiglu_oai`` is gpt-oss's clamped SwiGLU:
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``.
A plain activation is ``act(h)``. Math runs in the dtype of ``h``, as the eager modules do. The
Triton kernels implement the same functions (``kernels/activations.py``).
"""

import dataclasses

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
    "swiglu_oai": ("swiglu_oai", True),
    **{name: (name, False) for name in _FUNCTIONS},
}


def activation_name(function: str, gated: bool) -> str | None:
    """The ``experts`` activation for an elementwise function, or None if it is not modelled."""
    for name, spec in ACTIVATIONS.items():
        if spec == (function, gated):
            return name
    return None


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation as the ``experts`` op's arguments describe it."""

    name: str
    interleaved: bool = False
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def of(cls, arguments: dict) -> "Activation":
        """The activation an ``experts`` call's bound arguments describe."""
        return cls(arguments["activation"], arguments["interleaved"], arguments["alpha"], arguments["limit"])

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"inductor_moe: unknown activation {self.name!r}; supported: {sorted(ACTIVATIONS)}")
        if self.interleaved and not self.gated:
            raise ValueError(f"inductor_moe: {self.name} is not gated, so it has no interleaved gate and up")

    def __str__(self) -> str:
        options = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)[1:]
                   if getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(options)})" if options else self.name

    @property
    def function(self) -> str:
        """The elementwise function (of the gate, when gated)."""
        return ACTIVATIONS[self.name][0]

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.name][1]

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) of a gated activation's input."""
        if self.interleaved:
            return h[..., 0::2], h[..., 1::2]
        return h.chunk(2, dim=-1)

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The inverse of ``split``: gate and up back into one tensor."""
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return _FUNCTIONS[self.function][0](h)
        gate, up = self.split(h)
        if self.function == "swiglu_oai":
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))  # gpt-oss's rounding order
        return _FUNCTIONS[self.function][0](gate) * up

    def backward(self, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient with respect to ``h`` of ``forward(h)``, given the output's ``grad``."""
        if not self.gated:
            return _FUNCTIONS[self.function][1](grad, h)
        gate, up = self.split(h)
        if self.function == "swiglu_oai":
            g, u = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            s = torch.sigmoid(self.alpha * g)
            grad_gate = grad * (u + 1) * s * (1 + self.alpha * g * (1 - s)) * (gate <= self.limit)
            grad_up = grad * g * s * (up.abs() <= self.limit)
            return self.join(grad_gate.to(h.dtype), grad_up.to(h.dtype))
        act, act_backward = _FUNCTIONS[self.function]
        return self.join(act_backward(grad * up, gate), grad * act(gate))

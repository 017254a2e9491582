"""``inductor_moe::grouped_mm``: one grouped GEMM, the choice point of Inductor's max-autotune.

    out[r] = act(a[rows[r]] @ b[e])  for the sorted rows r of expert e (offsets: their int32 ends)

a ``[M_a, K]``; ``rows`` ``[M]`` int32 picks a's row for each sorted row (None: row r); b
``[E, K, N]`` (any strides), offsets ``[E]``; ``activation`` (ops/activations.py) None or a name, a
gated one halving N. out ``[M, N or N / 2]`` in a's dtype. Eager it is the Triton kernel on CUDA
and the torch code elsewhere (ops/implementation.py). The experts op never calls it: only while its
kernels are traced for Inductor with ``choosing()`` on (the lowering does so under max-autotune)
do its GEMMs without bias or FP8 become this op (the up projection only where nothing stores its
pre-activation: inference), which lowerings/autotune.py has Inductor time against
``torch._grouped_mm``.
"""

import contextlib

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import implementation
from .activations import Activation

_CHOOSING = [False]


@contextlib.contextmanager
def choosing():
    """While on, traced grouped GEMMs are this op (an autotuning choice) instead of a launch."""
    _CHOOSING[0], before = True, _CHOOSING[0]
    try:
        yield
    finally:
        _CHOOSING[0] = before


def is_choice_point(a: Tensor) -> bool:
    return _CHOOSING[0] and is_fake(a)


def activation_of(activation: str | None, interleaved: bool, alpha: float, limit: float) -> Activation | None:
    return None if activation is None else Activation(activation, interleaved, alpha, limit)


@torch.library.custom_op("inductor_moe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, rows: Tensor | None = None, activation: str | None = None,
               interleaved: bool = False, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    torch._check(a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1] and offsets.shape == (b.shape[0],),
                 lambda: f"inductor_moe.grouped_mm: a [M, K], b [E, K, N], offsets [E], got {tuple(a.shape)}, "
                 f"{tuple(b.shape)}, {tuple(offsets.shape)}")
    act = activation_of(activation, interleaved, alpha, limit)
    return implementation.of(a).grouped_mm(a, b, offsets, rows, act)


@grouped_mm.register_fake
def _(a, b, offsets, rows=None, activation=None, interleaved=False, alpha=1.702, limit=7.0):
    act = activation_of(activation, interleaved, alpha, limit)
    width = b.shape[2] // 2 if act is not None and act.gated else b.shape[2]
    return a.new_empty(a.shape[0] if rows is None else rows.shape[0], width)

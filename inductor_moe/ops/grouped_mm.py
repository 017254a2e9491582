"""``inductor_moe::grouped_mm``: a plain grouped GEMM, the choice point of Inductor's max-autotune.

    out[r] = a[r] @ b[e]  for the rows r of expert e (rows sorted by expert; offsets: int32 ends)

a ``[M, K]``, b ``[E, K, N]`` (any strides), offsets ``[E]``; out ``[M, N]`` in a's dtype. Eager it is
the Triton kernel on CUDA and the torch code elsewhere (ops/implementation.py). The experts op
never calls it: only while its kernels are traced for Inductor with ``choosing()`` on (the lowering
does so under max-autotune) does a plain GEMM (no gather, activation, bias or FP8: the down
projection) become this op, which lowerings/autotune.py has Inductor time against
``torch._grouped_mm``.
"""

import contextlib

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import implementation

_CHOOSING = [False]


@contextlib.contextmanager
def choosing():
    """While on, traced plain grouped GEMMs are this op (an autotuning choice) instead of a launch."""
    _CHOOSING[0], before = True, _CHOOSING[0]
    try:
        yield
    finally:
        _CHOOSING[0] = before


def is_choice_point(a: Tensor) -> bool:
    return _CHOOSING[0] and is_fake(a)


@torch.library.custom_op("inductor_moe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    torch._check(a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1] and offsets.shape == (b.shape[0],),
                 lambda: f"inductor_moe.grouped_mm: a [M, K], b [E, K, N], offsets [E], got {tuple(a.shape)}, "
                 f"{tuple(b.shape)}, {tuple(offsets.shape)}")
    return implementation.of(a).grouped_mm(a, b, offsets)


@grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[2])

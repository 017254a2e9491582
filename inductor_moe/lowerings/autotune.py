"""Max-autotune's choice for the grouped GEMMs (``inductor_moe::grouped_mm``, ops/grouped_mm.py).

Inductor times each choice on the GPU while it compiles and inlines the winner into its output code:

- our Triton kernel, traced (``kernels/grouped_gemm.py``: a user-defined kernel in the output code,
  the gather in its prologue, the activation in its epilogue);
- ``torch._grouped_mm`` (cuBLAS / CUTLASS; under max-autotune Inductor also tries its own persistent
  TMA template for it), where it takes the operands: bfloat16 on sm_90 or newer, 16-byte strides;
  the gather and the activation are then Inductor's own kernels around it;
- the op itself, an extern call (Inductor always adds its fallback).

Benchmark inputs: the rows split evenly over the experts (random ends would index out of bounds).
Without ``register_custom_op_autotuning`` and its ``config_generator`` (torch < 2.10) the op is an
extern call of the kernel.
"""

import inspect

import torch

from ..ops import cpu, grouped_mm
from ..ops.grouped_mm import activation_of


def _kernel(a, b, offsets, rows=None, activation=None, interleaved=False, alpha=1.702, limit=7.0):
    from ..ops import triton_impl  # imports Triton: only when kernels are wanted

    return triton_impl.grouped_mm(a, b, offsets, rows, activation_of(activation, interleaved, alpha, limit))


def _vendor(a, b, offsets, rows=None, activation=None, interleaved=False, alpha=1.702, limit=7.0):
    """The torch code: the gather and the activation as torch ops (Inductor's kernels) around
    torch._grouped_mm (``_vendor_takes``: it takes the operands)."""
    return cpu.grouped_mm(a, b, offsets, rows, activation_of(activation, interleaved, alpha, limit))


def _vendor_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.is_cuda and a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
            and cpu._grouped_mm_accepts(a, b))


class _EvenRows:
    """Benchmark inputs: a's rows (generated first, in argument order), then ends splitting them
    evenly over the experts."""

    rows = 0

    @classmethod
    def a(cls, fake: torch.Tensor) -> torch.Tensor:
        cls.rows = fake.shape[0]
        return torch.randn(fake.shape, dtype=fake.dtype, device=fake.device)

    @classmethod
    def offsets(cls, fake: torch.Tensor) -> torch.Tensor:
        experts = fake.shape[0]
        ends = torch.arange(1, experts + 1, device=fake.device) * cls.rows // experts
        return ends.to(torch.int32)


def register() -> bool:
    """Have Inductor autotune the op; False where this torch cannot (the op then stays extern)."""
    try:
        from torch._inductor.kernel.custom_op import CustomOpConfig, register_custom_op_autotuning
    except ImportError:
        return False
    if "config_generator" not in inspect.signature(register_custom_op_autotuning).parameters:
        return False

    def choices(inputs: dict) -> list:
        a, b = inputs["a"], inputs["b"]
        return [CustomOpConfig(_kernel)] + ([CustomOpConfig(_vendor)] if _vendor_takes(a, b) else [])

    register_custom_op_autotuning(grouped_mm.grouped_mm, config_generator=choices,
                                  input_gen_fns={"a": _EvenRows.a, "offsets": _EvenRows.offsets})
    return True

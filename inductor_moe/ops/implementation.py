"""Which code runs a canonical op: the Triton kernels, or the torch code of ``ops/cpu.py``.

The kernels run on CUDA tensors, and on CPU tensors when ``config.triton_on_cpu`` (through
Triton's interpreter); the torch code everywhere else, and for dtypes the kernels do not take.
"""

import torch

from .. import config
from . import cpu

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def uses_kernels(tensor: torch.Tensor) -> bool:
    on_device = tensor.device.type == "cuda" or (tensor.device.type == "cpu" and config.triton_on_cpu)
    return on_device and tensor.dtype in _KERNEL_DTYPES


def of(tensor: torch.Tensor):
    """The module implementing the ops for ``tensor``'s device and dtype."""
    if uses_kernels(tensor):
        from . import triton_impl  # imports Triton: only when kernels are wanted

        return triton_impl
    return cpu

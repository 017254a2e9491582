"""Triton kernels for the canonical ops: plain ``@triton.jit`` code with a launch function each,
importable without Inductor.

    routing         router scores -> top-k weights and ids, and its backward to the logits
    align           counting sort of (token, slot) pairs by expert, per-expert offsets and tiles
    grouped_gemm    grouped GEMM over expert-sorted rows: gathered A rows, activation epilogue,
                    the activation's backward epilogue, per-expert weight gradients
    unpermute       each token's k expert rows, weighted and summed in float32
    quantize        FP8 e4m3 block quantization (rowwise, blockwise, MX scales), bit for bit ops/fp8.py

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
in the environment before this package is imported).
"""

import functools
import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (read once, as Triton reads it when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# the launch functions' arithmetic: triton.cdiv and triton.next_power_of_2 are constexpr
# functions, 3-4 us a host call, and a forward makes some twenty of them
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def traced(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is being traced into a graph (Inductor lowering a canonical op, or timing a
    choice): a fake tensor, or any tensor while make_fx records (torch 2.11 traces autotuning
    choices with factory calls outside the fake mode)."""
    return is_fake(tensor) or get_proxy_mode() is not None


def launchable(kernel, tensor: torch.Tensor):
    """``kernel``, or while ``tensor`` is traced its ``torch.library.wrap_triton`` form: the launch
    is recorded in the graph, and Inductor emits the kernel's source into its output code."""
    return torch.library.wrap_triton(kernel) if traced(tensor) else kernel

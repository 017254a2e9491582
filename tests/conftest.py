import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU tensors in Triton's interpreter, which must be on before
    # Triton (imported by torch._dynamo) decorates anything. Tests that want the kernels on CPU
    # tensors set config.triton_on_cpu.
    os.environ["TRITON_INTERPRET"] = "1"

from torch._dynamo.utils import counters  # noqa: E402

import inductor_moe  # noqa: E402  (installs the passes)


@pytest.fixture(autouse=True)
def fresh_random_inputs():
    """Fresh random weights and inputs in every run; the seed is printed for a failing test."""
    print(f"torch seed: {torch.seed()}")


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Every test compiles from scratch: no dynamo code, no cached graphs, zeroed counters; and
    CPU tensors run the torch code unless a test asks for the kernels.

    With caches on, a cache hit skips the pre-grad pass and its counters (the caching test
    turns them back on itself).
    """
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True), inductor_moe.config.patch(triton_on_cpu=False):
        yield
    torch._dynamo.reset()

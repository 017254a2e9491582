import pytest
import torch
from torch._dynamo.utils import counters

import inductor_moe  # noqa: F401  (installs the pass)


@pytest.fixture(autouse=True)
def fresh_random_inputs():
    """Fresh random weights and inputs in every run; the seed is printed for a failing test."""
    print(f"torch seed: {torch.seed()}")


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Every test compiles from scratch: no dynamo code, no cached graphs, zeroed counters.

    With caches on, a cache hit skips the pre-grad pass and its counters (the caching test
    turns them back on itself).
    """
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()

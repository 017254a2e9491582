"""Shared test helpers: graph capture for expecttest, reference comparisons with dtype tolerances."""

import copy
import difflib
import os
import pathlib
import re

import torch
from torch._dynamo.utils import counters

import inductor_moe
from inductor_moe.patterns.graph_pass import rewrite_moe

# Error allowed against a reference, by dtype: relative in the 2-norm, plus an absolute floor per
# element (RMS) for values that are zero up to rounding, such as a router gradient with k = 1.
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 1e-4)}


def rewritten_code(model, *inputs, dynamic: bool = True) -> str:
    """The dynamo graph of ``model`` after inductor_moe's rewrite, compacted for expecttest."""
    graphs = []

    def capture(gm, example_inputs):
        rewrite_moe(gm.graph)
        gm.recompile()
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=dynamic)(*inputs)
    assert len(graphs) == 1, f"expected one graph, dynamo made {len(graphs)}"
    lines = [line for line in graphs[0].code.splitlines() if line.strip() and not line.strip().startswith("#")]
    code = "\n".join(lines[1:])  # the signature is long and says nothing new
    code = re.sub(r";  [^\n]*= None", "", code)  # dynamo's "x = None" frees
    code = re.sub(r"\bl_self_", "", code).replace("modules_", "").replace("parameters_", "")
    return code + "\n"


_EXPECTED = pathlib.Path(__file__).parent / "expected"


def assert_expected_file(name: str, actual: str) -> None:
    """``actual`` is tests/expected/<name>.txt (expecttest for long graphs); EXPECTTEST_ACCEPT=1 records it."""
    path = _EXPECTED / f"{name}.txt"
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        path.write_text(actual)
        return
    assert path.exists(), f"{path} is missing: record it with EXPECTTEST_ACCEPT=1"
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "expected", "actual"))
    assert actual == expected, f"{name} differs (EXPECTTEST_ACCEPT=1 records the new one):\n{diff}"


def rewrites() -> dict:
    return dict(counters["inductor_moe"])


def _bound(expected: torch.Tensor, dtype: torch.dtype) -> float:
    relative, floor = TOLERANCE[dtype]
    return relative * expected.double().norm().item() + floor * expected.numel() ** 0.5


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).norm().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", bound=None) -> None:
    """Within the dtype's tolerance of ``expected`` (or within ``bound``, if larger)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error, bound = _error(actual, expected), max(_bound(expected, dtype), bound or 0.0)
    assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g} (norm {expected.norm():.3g}, {dtype})"


def main_output(out):
    """A model's main output: a tensor, a tuple's first element, or a transformers output's logits."""
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "logits", out)


def forward_and_grads(model, x: torch.Tensor, grad_like):
    """Output and gradients for x (if floating point) and every parameter, for the output gradient
    ``grad_like(output)``."""
    inputs = [x.detach().requires_grad_()] if x.is_floating_point() else []
    out = main_output(model(*inputs or [x]))
    return [out, *torch.autograd.grad(out, [*inputs, *model.parameters()], grad_like(out), allow_unused=True)]


def assert_matches_eager(model, compiled, x: torch.Tensor) -> None:
    """Compiled forward and every gradient match eager within the dtype's tolerance.

    Below float32 both are held against a float32 run of the same model: the compiled error may
    be 4x eager's own, since ill-conditioned values (a router gradient through the
    renormalisation, say) carry a large low-precision error in eager too. Where it is more, the
    value is compared with stock torch.compile's: a gradient that nearly cancels is as far off as
    the rounding of the compiler's intermediates makes it, and the plugin may be no worse than 2x.
    """
    dtype = next(model.parameters()).dtype
    seed = int(torch.randint(2**31, ()))

    def grad_like(out):  # the same values in every run, rounded to the model's dtype
        return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, dtype).to(out.dtype)

    names = ["output", *(["grad of x"] if x.is_floating_point() else []),
             *(f"grad of {name}" for name, _ in model.named_parameters())]
    eager = forward_and_grads(model, x, grad_like)
    actual = forward_and_grads(compiled, x, grad_like)
    if dtype == torch.float32:
        reference, bounds = eager, [None] * len(eager)
    else:
        upcast = x.float() if x.is_floating_point() else x
        reference = forward_and_grads(copy.deepcopy(model).float(), upcast, grad_like)
        bounds = [None if e is None else 4 * _error(e, r) for e, r in zip(eager, reference)]
    stock = None
    for i, (name, a, r, bound) in enumerate(zip(names, actual, reference, bounds, strict=True)):
        assert (a is None) == (r is None), f"{name}: compiled {a is None}, eager {r is None}"
        if r is None:
            continue
        if dtype != torch.float32 and _error(a, r) > max(_bound(r, dtype), bound):
            stock = stock or _stock_compile(model, x, grad_like)
            bound = 2 * _error(stock[i], r)
        assert_close(a, r, dtype, name, bound)


def _stock_compile(model, x: torch.Tensor, grad_like):
    """forward_and_grads of ``model`` compiled by stock torch.compile (inductor_moe off)."""
    torch._dynamo.reset()  # dynamo would reuse the code it compiled with the plugin
    with inductor_moe.config.patch(enabled=False):
        return forward_and_grads(torch.compile(model), x, grad_like)

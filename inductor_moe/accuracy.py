"""FP8 accuracy: signal-to-quantization-noise ratios of the FP8 experts against float32.

Measured given the same routing (the same top-k ids and weights): comparing whole models across
dtypes would measure routing flips, not quantization. ``benchmarks/fp8.py`` prints the table;
tests hold the bars.
"""

import torch

from . import config

GRADIENTS = ("x", "w1", "w2")


def sqnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (actual.double() - reference.double()).square().sum()
    return (10 * torch.log10(reference.double().square().sum() / noise)).item()


def run_experts(operands: dict, grad_out: torch.Tensor, **options) -> dict:
    """The experts op's output and gradients (x, w1, w2) on leaf copies of ``operands``."""
    leaves = {name: t.detach().requires_grad_(name in GRADIENTS) if t is not None else None for name, t in operands.items()}
    out = torch.ops.inductor_moe.experts(*leaves.values(), **options)[0]
    out.backward(grad_out)
    return {"out": out.detach(), **{f"grad_{name}": leaves[name].grad for name in GRADIENTS}}


def experts_sqnr(recipe: str, operands: dict, activation: str = "swiglu", weight_grad: bool = True, **options) -> dict:
    """SQNR (dB) of the FP8 experts op's output and its x, w1, w2 gradients against the float32 op
    on the same float32 operands (x, ids, weights, w1, w2, b1, b2) and output gradient;
    ``options``: the activation's (interleaved, alpha, limit)."""
    operands = {name: t.float() if t is not None and name != "ids" else t for name, t in operands.items()}
    grad_out = torch.randn_like(operands["x"])
    reference = run_experts(operands, grad_out, activation=activation, **options)
    fp8 = run_experts(operands, grad_out, activation=activation, fp8_recipe=recipe, fp8_weight_grad=weight_grad,
                       **options)
    return {name: sqnr(fp8[name], reference[name]) for name in reference}


def block_sqnr(model: torch.nn.Module, x: torch.Tensor, recipe: str) -> dict:
    """SQNR (dB) of a float32 MoE block compiled with ``config.fp8 = recipe`` against its eager
    output and input gradient (the router runs in float32 either way: the same routing)."""
    def run(fn):
        inputs = x.detach().float().requires_grad_()
        out = fn(inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_out)
        return out.detach(), inputs.grad

    model = model.float()
    grad_out = torch.randn(x.shape, device=x.device)
    reference = run(model)
    torch._dynamo.reset()
    with config.patch(fp8=recipe):
        quantized = run(torch.compile(model))
    torch._dynamo.reset()
    return {"out": sqnr(quantized[0], reference[0]), "grad_x": sqnr(quantized[1], reference[1])}

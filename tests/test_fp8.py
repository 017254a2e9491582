"""FP8 recipes in torch (ops/fp8.py): scales, e4m3 rounding and the edge cases the Triton
quantizers must reproduce bit for bit."""

import pytest
import torch

from inductor_moe.ops import fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BLOCKS = {"rowwise": (1, 0, False), "1x128": (1, 128, False), "128x128": (128, 128, False), "mx 1x32": (1, 32, True)}


@pytest.mark.parametrize("shape", [(1, 7), (33, 200), (130, 257)])
@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip_within_e4m3_precision(block, shape):
    rows, cols, power_of_two = BLOCKS[block]
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]
    q, scales = fp8.quantize(x, rows, cols, power_of_two)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    expected_scale_shape = (-(-shape[0] // rows), -(-shape[1] // (cols or shape[1])))
    assert scales.shape == expected_scale_shape
    back = fp8.dequantize(q, scales, rows, cols)
    scale_of = fp8.dequantize(torch.ones_like(q), scales, rows, cols)
    # 3 mantissa bits: half an ulp is 2**-4 relative; e4m3's subnormal spacing is 2**-9 (of the
    # scale); MX saturates what lands above 448 (amax-based scales never do)
    bound = 2**-4 * x.abs() + 2**-10 * scale_of + (x.abs() - 448 * scale_of).clamp(min=0)
    assert ((back - x).abs() <= bound).all()


@pytest.mark.parametrize("block", ["rowwise", "1x128"])
def test_block_maximum_maps_onto_448(block):
    rows, cols, _ = BLOCKS[block]
    x = torch.randn(8, 128) * 1e-2
    q, _ = fp8.quantize(x, rows, cols)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), 448.0))


def test_mx_scales_are_powers_of_two_and_saturate():
    x = torch.randn(4, 64) * 100
    x[0, 0] = 511.0  # floor(log2) = 8: scale 1, 511 saturates to 448
    q, scales = fp8.quantize(x, 1, 32, power_of_two=True)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))
    assert scales[0, 0] == 1.0 and q[0, 0].float() == 448.0
    assert (q.float().abs() <= 448).all()


@pytest.mark.parametrize("block", BLOCKS)
def test_zeros_huge_and_subnormal_values_stay_finite(block):
    rows, cols, power_of_two = BLOCKS[block]
    x = torch.zeros(3, 64)
    x[1] = 3e38
    x[2] = 1e-40  # float32 subnormals
    q, scales = fp8.quantize(x, rows, cols, power_of_two)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    back = fp8.dequantize(q, scales, rows, cols)
    assert torch.isfinite(back).all()
    assert (back[0] == 0).all()
    assert torch.allclose(back[1], x[1], rtol=2**-4)


def test_fake_quantize_uses_the_recipe_blocks():
    w = torch.randn(256, 256)
    assert not torch.equal(fp8.fake_quantize(w, "blockwise", "w"), fp8.fake_quantize(w, "blockwise", "a"))
    assert torch.equal(fp8.fake_quantize(w, "rowwise", "w"), fp8.fake_quantize(w, "rowwise", "a"))


def sqnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return (10 * torch.log10(reference.double().square().sum() / (actual.double() - reference.double()).square().sum())).item()


# The bar for the MoE output against float32 given the same routing.
BAR_DB = {"rowwise": 22.5, "blockwise": 22.5, "mxfp8": 21.0}


@pytest.mark.parametrize("recipe", BAR_DB)
def test_experts_output_sqnr_with_the_same_routing(recipe):
    """FP8 in both GEMMs against float32, on the same top-k ids and weights: quantization alone."""
    from references import make_experts

    from inductor_moe.ops import cpu
    from inductor_moe.ops.activations import Activation

    x, ids, weights, w1, w2, b1, b2 = make_experts(512, 256, 128, 8, 2, Activation("swiglu"), torch.float32, bias=False)
    reference = cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, Activation("swiglu"))[0]
    out = cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, Activation("swiglu"), fp8_recipe=recipe)[0]
    assert sqnr(out, reference) >= BAR_DB[recipe]
    rounded = cpu.experts_forward(x.bfloat16(), ids, weights, w1.bfloat16(), w2.bfloat16(), b1, b2, Activation("swiglu"))[0]
    assert sqnr(out, reference) < sqnr(rounded, reference)  # e4m3 is coarser than bf16: the path is taken


@pytest.mark.parametrize("shape", [(1, 7), (37, 300), (130, 257)])
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_kernel_is_bit_exact(block, shape):
    """The Triton quantizer (under the interpreter without a GPU) against the torch recipe: values
    and scales bit for bit, with rows of zeros, huge values and subnormals."""
    from inductor_moe.kernels import quantize as kernel

    rows, cols, power_of_two = BLOCKS[block]
    x = torch.randn(shape, device=DEVICE) * torch.logspace(-3, 3, shape[0], device=DEVICE)[:, None]
    x[0, : shape[1] // 2] = 0.0
    if shape[0] > 2:
        x[1] = 3e38
        x[2] = 1e-40
    q, scales = kernel.quantize(x, rows, cols, power_of_two)
    expected_q, expected_scales = fp8.quantize(x, rows, cols, power_of_two)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))

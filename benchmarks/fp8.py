"""FP8 experts: accuracy per recipe, and on a GPU throughput against our bfloat16.

Accuracy: SQNR (dB) against float32 given the same routing (inductor_moe.accuracy), of the experts
op's output and its x, w1, w2 gradients on Gaussian data, the same for the recipe's exact torch
emulation (ops/cpu.py), and of every transformers family block compiled with config.fp8 (output
and input gradient). Throughput (CUDA only), bf16 against each recipe at SonicMoE's shapes: the
experts op forward (weights quantized once and h not stored, as in inference), the same replayed
from a CUDA graph (no host launches: the GPU's own time; FP8 weights quantized in each replay),
and forward + backward (weights quantized every step, as in training; rowwise also with bf16
weight gradients, config.fp8_weight_grad = False); medians from triton.testing.do_bench.

    python benchmarks/fp8.py --no-families --json benchmarks/results/<device>_fp8.json
    python benchmarks/fp8.py --accuracy-only --json benchmarks/results/cpu_fp8_accuracy.json
"""

import argparse
import json
import sys

import torch

from inductor_moe import accuracy, benchmark, models
from inductor_moe.ops import fp8, triton_impl

SHAPES = [(24576, 1536, 256, 128, 8), (24576, 1536, 1024, 32, 2), (32768, 4096, 512, 128, 8), (32768, 4096, 1024, 64, 4)]
FAMILY_CFG = models.MoEConfig(hidden=256, intermediate=128, num_experts=8, top_k=2)


def gaussian_experts(tokens, d, n, experts, k, device, dtype=torch.float32) -> dict:
    """The experts op's operands: unit-variance activations, weights stored [E, out, in] with
    unit-variance outputs, random top-k ids and softmax weights."""
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    ids = torch.rand(tokens, experts, device=device).topk(k, dim=-1).indices.int()
    weights = torch.rand(tokens, k, device=device).softmax(-1)
    w1 = (torch.randn(experts, 2 * n, d, device=device, dtype=dtype) * d**-0.5).transpose(1, 2)
    w2 = (torch.randn(experts, d, n, device=device, dtype=dtype) * n**-0.5).transpose(1, 2)
    return dict(x=x, ids=ids, weights=weights, w1=w1, w2=w2, b1=None, b2=None)


def accuracy_rows(device: str, families: bool) -> list[dict]:
    rows = []
    operands = gaussian_experts(4096, 1024, 512, 16, 4, device)
    for recipe in fp8.RECIPES:
        for impl, tensors in (("inductor_moe", operands), ("torch emulation", {k: None if v is None else v.cpu()
                                                                               for k, v in operands.items()})):
            torch.manual_seed(0)
            rows.append({"benchmark": "experts, Gaussian data", "shape": "T=4096 d=1024 n=512 E=16 K=4",
                         "recipe": recipe, "impl": impl, "device": str(tensors["x"].device),
                         "sqnr_db": accuracy.experts_sqnr(recipe, tensors)})
        for family in models.FAMILIES if families else ():
            model = models.transformers_model(family, "grouped_mm", FAMILY_CFG).to(device)
            x = torch.randn(2, 64, FAMILY_CFG.hidden, device=device)
            rows.append({"benchmark": f"{family} block", "shape": "B=2 S=64 d=256 n=128 E=8 K=2", "recipe": recipe,
                         "impl": "inductor_moe", "device": device, "sqnr_db": accuracy.block_sqnr(model, x, recipe)})
    return rows


def throughput_rows() -> list[dict]:
    import triton

    rows = []
    for tokens, d, n, experts, k in SHAPES:
        shape = {"T": tokens, "d": d, "n": n, "E": experts, "K": k}
        operands = gaussian_experts(tokens, d, n, experts, k, "cuda", torch.bfloat16)
        flops = 2 * tokens * k * d * 3 * n  # up (2n wide) and down projections
        grad = torch.randn_like(operands["x"])
        leaves = {name: t.detach().requires_grad_(name in accuracy.GRADIENTS) if t is not None else None
                  for name, t in operands.items()}
        medians = {}
        # (name, recipe, FP8 weight gradients): config.fp8_weight_grad = False keeps dW in bf16
        variants = [("bf16", None, True)]
        for recipe in fp8.RECIPES:
            variants.append((recipe, recipe, True))
            if recipe == "rowwise":
                variants.append(("rowwise, bf16 dW", recipe, False))
        for impl, recipe, fp8_dw in variants:
            def forward(recipe=recipe):  # as a compiled inference graph calls it: h not stored
                with torch.no_grad():
                    return torch.ops.inductor_moe.experts(*operands.values(), "swiglu", fp8_recipe=recipe,
                                                          store_h=False)

            def train_step(recipe=recipe, fp8_dw=fp8_dw):
                triton_impl._QUANTIZED_WEIGHTS.clear()  # training: weights change every step
                out = torch.ops.inductor_moe.experts(*leaves.values(), "swiglu", fp8_recipe=recipe,
                                                     fp8_weight_grad=fp8_dw)[0]
                torch.autograd.grad(out, [leaves[name] for name in accuracy.GRADIENTS], grad)

            modes = [("forward + backward", lambda: train_step, 3 * flops)]
            if fp8_dw:  # the weight gradients' precision changes nothing forward
                modes[:0] = [("forward", lambda: forward, flops),
                             ("forward, CUDA graph", lambda: benchmark.cuda_graph(forward)[0].replay, flops)]
            for mode, make, mode_flops in modes:
                ms = triton.testing.do_bench(make(), return_mode="median")
                medians[mode, recipe] = medians.get((mode, recipe), ms)
                rows.append({"benchmark": f"experts {mode}", "shape": shape, "impl": impl,
                             "median_ms": round(ms, 4), "tflops": round(mode_flops / ms / 1e9, 1),
                             "speedup_vs_bf16": round(medians[mode, None] / ms, 3)})
                print(f"{str(tuple(shape.values())):30} {mode:20} {impl:17} {ms:9.3f} ms "
                      f"{rows[-1]['tflops']:7.1f} TFLOP/s {rows[-1]['speedup_vs_bf16']:5.2f}x", flush=True)
        del operands, leaves
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--accuracy-only", action="store_true")
    parser.add_argument("--no-families", action="store_true", help="skip the family blocks (a compile each)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = benchmark.environment()
    if device == "cuda":
        result["device"] = torch.cuda.get_device_name()
    if device == "cuda" and not args.accuracy_only:
        result["throughput"] = throughput_rows()
    result["accuracy"] = accuracy_rows(device, not args.no_families)
    print(f"{'benchmark':24} {'recipe':10} {'impl':16} SQNR dB")
    for row in result["accuracy"]:
        print(f"{row['benchmark']:24} {row['recipe']:10} {row['impl']:16} "
              + "  ".join(f"{name} {db:5.1f}" for name, db in row["sqnr_db"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

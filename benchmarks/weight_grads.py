"""bf16 weight gradients on a Hopper GPU: the experts op's training step with them by our Triton
kernel (the routing weights times act(H) from a pass of its own, rows gathered as it loads them) against
torch._grouped_mm on materialised operands (``triton_impl.vendor_weight_grads`` picks one),
interleaved in one process at SonicMoE's shapes; medians and the gradients' relative difference.

    python benchmarks/weight_grads.py --json benchmarks/results/<device>_weight_grads.json
"""

import argparse
import json
import sys

import torch
import triton

from fp8 import SHAPES, gaussian_experts
from inductor_moe import accuracy, benchmark
from inductor_moe.ops import triton_impl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    vendor = triton_impl.vendor_weight_grads
    choices = {"triton kernel": lambda *_: False, "torch._grouped_mm": lambda *_: True}
    result, rows = {**benchmark.environment(), "device": torch.cuda.get_device_name()}, []
    for tokens, d, n, experts, k in SHAPES:
        operands = gaussian_experts(tokens, d, n, experts, k, "cuda", torch.bfloat16)
        leaves = {name: t.detach().requires_grad_(name in accuracy.GRADIENTS) if t is not None else None
                  for name, t in operands.items()}
        grad = torch.randn_like(operands["x"])

        def step():
            out = torch.ops.inductor_moe.experts(*leaves.values(), "swiglu")[0]
            return torch.autograd.grad(out, [leaves[name] for name in accuracy.GRADIENTS], grad)

        times, grads = {name: [] for name in choices}, {}
        for _ in range(2):  # interleaved: A B A B
            for name, choice in choices.items():
                triton_impl.vendor_weight_grads = choice
                grads[name] = step()
                times[name].append(triton.testing.do_bench(step, return_mode="median"))
        triton_impl.vendor_weight_grads = vendor
        ms = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        flops = 3 * 2 * tokens * k * d * 3 * n
        differences = {name: ((a.float() - b.float()).norm() / b.float().norm()).item()
                       for name, a, b in zip(accuracy.GRADIENTS, *grads.values())}
        shape = {"T": tokens, "d": d, "n": n, "E": experts, "K": k}
        for name in choices:
            rows.append({"benchmark": "experts forward + backward, bf16", "shape": shape, "weight_grads": name,
                         "median_ms": round(ms[name], 4), "tflops": round(flops / ms[name] / 1e9, 1),
                         "speedup_vs_kernel": round(ms["triton kernel"] / ms[name], 3)})
        rows[-1]["relative_difference"] = {name: round(v, 5) for name, v in differences.items()}
        print(f"{str(tuple(shape.values())):30} kernel {ms['triton kernel']:8.3f} ms  _grouped_mm "
              f"{ms['torch._grouped_mm']:8.3f} ms  {rows[-1]['speedup_vs_kernel']:5.2f}x  differences {differences}",
              flush=True)
        del operands, leaves
        torch.cuda.empty_cache()
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""MoE layers on a GPU: eager, stock torch.compile (default and max-autotune) and torch.compile +
inductor_moe, forward and forward + backward, with peak memory for training.

    python benchmarks/layers.py --json benchmarks/results/<device>_layers.json
    python benchmarks/layers.py --smoke     # the code path on CPU, tiny shapes

Shapes: SonicMoE's (T, d, n, E, K) and Mixtral-, Qwen3-MoE- and DeepSeek-V3-shaped blocks (their
hidden size, expert width, expert count and top-k; the sorted-pairs + torch._grouped_mm block).
Rows follow benchmarks/results' schema: {"benchmark", "shape", "impl", "median_ms", "tflops",
"peak_mem_gb"}; the "torch.compile" row is the faster of stock's two modes, the "inductor_moe"
row the faster of ours. Each layer is also
put against a roofline estimate: its FLOPs at the device's dense bf16 matmul rate, and the bytes
it must move (weights, tokens in and out) at its copy rate.
"""

import argparse
import json
import sys

import torch
import triton

from inductor_moe import benchmark, models

SHAPES = {  # name -> (T, d, n, E, K)
    "sonicmoe 1": (24576, 1536, 256, 128, 8),
    "sonicmoe 2": (24576, 1536, 1024, 32, 2),
    "sonicmoe 3": (32768, 4096, 512, 128, 8),
    "sonicmoe 4": (32768, 4096, 1024, 64, 4),
    "mixtral-8x7b": (8192, 4096, 14336, 8, 2),
    "qwen3-30b-a3b": (8192, 2048, 768, 128, 8),
    "deepseek-v3": (8192, 7168, 2048, 256, 8),
}
SMOKE = {"smoke": (64, 64, 32, 8, 2)}


def layer_bytes(tokens, d, n, experts, k, backward) -> int:
    weights = experts * 3 * d * n * 2
    activations = 2 * tokens * d * 2
    return (3 if backward else 1) * (weights + activations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shapes", nargs="+", help=f"a subset of {list(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-max-autotune", action="store_true", help="the default mode only (max-autotune compiles long)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = benchmark.roofline(device)
    print(f"roofline: {peak['matmul_tflops']:.0f} TFLOP/s, {peak['copy_gbps']:.0f} GB/s", flush=True)
    shapes = SMOKE if args.smoke else {name: SHAPES[name] for name in args.shapes or SHAPES}
    rows = []
    for name, (tokens, d, n, experts, k) in shapes.items():
        cfg = models.MoEConfig(hidden=d, intermediate=n, num_experts=experts, top_k=k)
        shape = {"T": tokens, "d": d, "n": n, "E": experts, "K": k}
        for backward in (False, True):
            torch._dynamo.reset()  # each layer compiles models.py's forward afresh: no recompile limit across layers
            torch.manual_seed(0)
            model = models.SortedGroupedMM(cfg).to(device=device, dtype=torch.bfloat16)
            x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
            fns = benchmark.variants(model)
            if not args.no_max_autotune:
                fns |= benchmark.variants(model, max_autotune=True)
            medians, peaks, rewrites = benchmark.measure(model, x, backward=backward, rounds=args.rounds, fns=fns)
            stock = min((name for name in medians if name.startswith("torch.compile")), key=medians.__getitem__)
            ours = min((name for name in medians if name.startswith("inductor_moe")), key=medians.__getitem__)
            flops = models.expert_flops(cfg, tokens) * (3 if backward else 1)
            bound_ms = max(flops / peak["matmul_tflops"] / 1e9, layer_bytes(tokens, d, n, experts, k, backward) / peak["copy_gbps"] / 1e6)
            label = f"{name} {'forward + backward' if backward else 'forward'}"
            for impl, source in (("eager", "eager"), ("torch.compile", stock), ("inductor_moe", ours)):
                rows.append({"benchmark": label, "shape": shape, "impl": impl, "compiled_as": source,
                             "median_ms": round(medians[source], 4), "tflops": round(flops / medians[source] / 1e9, 1),
                             "peak_mem_gb": None if peaks[source] is None else round(peaks[source], 3),
                             "roofline_ms": round(bound_ms, 4)})
            print(f"{label:36} rewrites {rewrites}; roofline {bound_ms:.3f} ms", flush=True)
            for row in rows[-3:]:
                print(f"   {row['impl']:14} {row['median_ms']:10.3f} ms {row['tflops']:8.1f} TFLOP/s "
                      f"{medians[stock] / row['median_ms']:6.2f}x  peak {row['peak_mem_gb']} GB  ({row['compiled_as']})", flush=True)
            if args.json:  # after each layer: a long run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__, "triton": triton.__version__, "roofline": peak,
                               "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Kernel benchmark (GPU): the grouped GEMM with fused gather against torch._grouped_mm and a
dense matmul of the same FLOPs, the routing, align and unpermute kernels, and the FP8 rowwise
quantizer's passes of a training step, at SonicMoE's shapes and at decode sizes. Medians from
triton.testing.do_bench, TFLOP/s or GB/s, and the share of this device's roofline measured in
the same run (a dense bf16 matmul, a copy).

    python benchmarks/kernels.py --json benchmarks/results/<device>_kernels.json
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke    # the code path on CPU, tiny shapes
"""

import argparse
import json
import statistics
import time

import torch
import triton

from inductor_moe import benchmark
from inductor_moe.kernels import align, grouped_gemm, quantize, routing, unpermute
from inductor_moe.ops.activations import Activation

# SonicMoE's (T, d, n, E, K) and decode sizes
SHAPES = [
    (24576, 1536, 256, 128, 8),
    (24576, 1536, 1024, 32, 2),
    (32768, 4096, 512, 128, 8),
    (32768, 4096, 1024, 64, 4),
    *((tokens, 4096, 1024, 64, 4) for tokens in (1, 8, 64)),
]
SMOKE_SHAPES = [(37, 64, 32, 8, 2), (1, 64, 32, 8, 2)]


def median_ms(fn) -> float:
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def row(name, shape, impl, ms, flops=0, bytes_moved=0, peak=None):
    result = {"benchmark": name, "shape": shape, "impl": impl, "median_ms": round(ms, 5)}
    if flops:
        result["tflops"] = round(flops / ms / 1e9, 2)
        result["roofline_pct"] = round(100 * result["tflops"] / peak["matmul_tflops"], 1)
    if bytes_moved:
        result["gbps"] = round(bytes_moved / ms / 1e6, 1)
        result["roofline_pct"] = round(100 * result["gbps"] / peak["copy_gbps"], 1)
    return result


def bench_shape(tokens, d, n, experts, k, device, dtype, peak) -> list[dict]:
    shape = {"T": tokens, "d": d, "n": n, "E": experts, "K": k}
    act = Activation("swiglu")
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    logits = torch.randn(tokens, experts, device=device, dtype=dtype)
    weights, ids = routing.route(logits, k, True)
    w1 = torch.randn(experts, 2 * n, d, device=device, dtype=dtype).transpose(1, 2) * d**-0.5  # [E, out, in] storage
    w2 = torch.randn(experts, d, n, device=device, dtype=dtype).transpose(1, 2) * n**-0.5
    order, inverse, token_of_row, offsets = align.align(ids, experts)
    rows = tokens * k
    up_flops = 2 * rows * d * 2 * n
    gathered = x[token_of_row.long()]
    a, h = grouped_gemm.gemm(x, w1, offsets, a_rows=token_of_row, activation=act, store_h=True)
    y, _ = grouped_gemm.gemm(a, w2, offsets)
    dense_a, dense_b = torch.randn(rows, d, device=device, dtype=dtype), torch.randn(d, 2 * n, device=device, dtype=dtype)
    results = [
        row("route", shape, "inductor_moe", median_ms(lambda: routing.route(logits, k, True)),
            bytes_moved=logits.numel() * logits.element_size() + tokens * k * 8, peak=peak),
        row("align", shape, "inductor_moe", median_ms(lambda: align.align(ids, experts)), bytes_moved=rows * 16, peak=peak),
        row("up projection + SwiGLU", shape, "inductor_moe (gather fused)", peak=peak, flops=up_flops,
            ms=median_ms(lambda: grouped_gemm.gemm(x, w1, offsets, a_rows=token_of_row, activation=act))),
        row("up projection", shape, "torch._grouped_mm (rows gathered first)", peak=peak, flops=up_flops,
            ms=median_ms(lambda: torch._grouped_mm(x[token_of_row.long()], w1, offs=offsets))),
        row("up projection", shape, "torch._grouped_mm (pre-gathered rows)", peak=peak, flops=up_flops,
            ms=median_ms(lambda: torch._grouped_mm(gathered, w1, offs=offsets))),
        row("up projection", shape, "dense matmul of the same FLOPs", peak=peak, flops=up_flops,
            ms=median_ms(lambda: dense_a @ dense_b)),
        row("down projection", shape, "inductor_moe", peak=peak, flops=up_flops // 2,
            ms=median_ms(lambda: grouped_gemm.gemm(a, w2, offsets))),
        row("down projection", shape, "torch._grouped_mm", peak=peak, flops=up_flops // 2,
            ms=median_ms(lambda: torch._grouped_mm(a, w2, offs=offsets))),
        row("unpermute-reduce", shape, "inductor_moe", peak=peak, bytes_moved=(rows + tokens) * d * y.element_size(),
            ms=median_ms(lambda: unpermute.unpermute_reduce(y, inverse, weights, tokens, k))),
    ]
    # FP8 rowwise: (pass, its call, bytes moved: bf16 read once, e4m3 written)
    starts = quantize.segment_starts(offsets, 0)
    fp8_passes = [
        ("x", lambda: quantize.quantize(x, 1, 0), 3 * x.numel()),
        ("w1, forward orientation", lambda: quantize.quantize_weight(w1, 1, 0), 3 * w1.numel()),
        ("w1, backward orientation (transposed view)", lambda: quantize.quantize_weight(w1.transpose(1, 2), 1, 0),
         3 * w1.numel()),
        ("x gathered, by expert segment", lambda: quantize.quantize_segments(x, offsets, starts, 0, rows=token_of_row),
         3 * rows * d),
        ("act(H) from H, by expert segment", lambda: quantize.quantize_segments(h, offsets, starts, 0, activation=act),
         5 * rows * n),  # H's 2n columns read, act(H)'s n written
    ]
    for name, call, bytes_moved in fp8_passes:
        results.append(row(f"FP8 rowwise quantize: {name}", shape, "inductor_moe", median_ms(call),
                           bytes_moved=bytes_moved, peak=peak))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: exercise the code path, e.g. on CPU")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    peak = benchmark.roofline(device)
    print(f"roofline: {peak['matmul_tflops']:.0f} TFLOP/s dense bf16 matmul, {peak['copy_gbps']:.0f} GB/s copy")
    results = []
    for shape in SMOKE_SHAPES if args.smoke else SHAPES:
        results += bench_shape(*shape, device, dtype, peak)
    for r in results:
        speed = f"{r['tflops']:8.1f} TFLOP/s" if "tflops" in r else f"{r.get('gbps', 0):8.1f} GB/s   "
        print(f"{str(tuple(r['shape'].values())):32} {r['benchmark']:62} {r['impl']:42} {r['median_ms']:9.4f} ms "
              f"{speed} {r.get('roofline_pct', 0):5.1f}% of roofline")
    if args.json:
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                       "roofline": peak, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()

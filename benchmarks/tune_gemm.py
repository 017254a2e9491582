"""Tile-config sweep for the grouped GEMM (GPU): the up projection with fused gather and SwiGLU
(storing H, as the experts op does), and the down projection, in bf16, FP8 blockwise and MXFP8 (tiles dequantized to bf16 in the
kernel, so bf16's configs are its candidates), at two SonicMoE shapes. Prints each
config's median and TFLOP/s; the best ones go into kernels/grouped_gemm.py's ``_config``.

    python benchmarks/tune_gemm.py --json benchmarks/results/<device>_gemm_configs.json
"""

import argparse
import json

import torch
import triton

from inductor_moe import benchmark
from inductor_moe.kernels import align, grouped_gemm, quantize
from inductor_moe.ops.activations import Activation

SHAPES = [(32768, 4096, 1024, 64, 4), (24576, 1536, 256, 128, 8)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
BF16 = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
        (128, 128, 32, 4, 4), (128, 64, 64, 4, 4)]
# blockwise keeps each K block's product beside the accumulators (two of each when gated): the
# candidates with 8 warps and 64-row tiles hold them in registers
FP8 = [(128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4),
       (64, 256, 128, 8, 3), (64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (128, 64, 128, 8, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    original = grouped_gemm._config
    for tokens, d, n, experts, k in SHAPES:
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(tokens, experts, device="cuda").topk(k, dim=-1).indices.int()
        w1 = (torch.randn(experts, 2 * n, d, device="cuda", dtype=torch.bfloat16) * d**-0.5).transpose(1, 2)
        w2 = (torch.randn(experts, d, n, device="cuda", dtype=torch.bfloat16) * n**-0.5).transpose(1, 2)
        _, _, token_of_row, offsets = align.align(ids, experts)
        a = torch.randn(tokens * k, n, device="cuda", dtype=torch.bfloat16)
        operands = {
            "bf16": (x, w1, a, w2),
            "fp8 blockwise": (quantize.quantize(x, 1, 128), quantize.quantize_weight(w1, 128, 128),
                              quantize.quantize(a, 1, 128), quantize.quantize_weight(w2, 128, 128)),
            "mxfp8": (quantize.quantize(x, 1, 32, True), quantize.quantize_weight(w1, 1, 32, True),
                      quantize.quantize(a, 1, 32, True), quantize.quantize_weight(w2, 1, 32, True)),
        }
        for precision, configs in (("bf16", BF16), ("fp8 blockwise", FP8), ("mxfp8", BF16)):
            x_op, w1_op, a_op, w2_op = operands[precision]
            for bm, bn, bk, warps, stages in configs:
                config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                grouped_gemm._config = lambda *_, config=config, **__: dict(config)
                for name, fn, flops in (
                    ("up + SwiGLU, H stored", lambda: grouped_gemm.gemm(
                        x_op, w1_op, offsets, a_rows=token_of_row, activation=Activation("swiglu"), store_h=True,
                        out_dtype=torch.bfloat16),
                     2 * tokens * k * d * 2 * n),
                    ("down", lambda: grouped_gemm.gemm(a_op, w2_op, offsets, out_dtype=torch.bfloat16),
                     2 * tokens * k * d * n),
                ):
                    try:
                        ms = triton.testing.do_bench(fn, return_mode="median")
                    except Exception as error:  # e.g. out of shared memory: not a candidate
                        print(f"{precision} {config} {name}: {type(error).__name__}", flush=True)
                        continue
                    rows.append({"shape": [tokens, d, n, experts, k], "precision": precision, "gemm": name,
                                 "config": config, "median_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
                    print(f"{str((tokens, d, n, experts, k)):28} {precision:14} {name:22} {bm:4} {bn:4} {bk:4} "
                          f"{warps:2} {stages:2} {ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
            grouped_gemm._config = original
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**benchmark.environment(), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Tile-config sweep for the grouped GEMMs (GPU), each called as the experts op calls it: the up
projection with fused gather and SwiGLU (storing H), the down projection, the backward's dH (its
GEMM with the SwiGLU backward in the epilogue) and dW2 (bf16: the routing weights times the
recomputed activation in a pass before the GEMM; FP8: both operands quantized by segment), in
bf16, FP8 rowwise and blockwise, and MXFP8 (tiles dequantized to bf16 in the kernel, so bf16's
configs are its candidates), at two SonicMoE shapes. Prints each config's
median and TFLOP/s; the best ones go into kernels/grouped_gemm.py's ``_config``. ``--gemms`` and
``--precisions`` pick a subset (a GPU command may run 10 minutes at most). FP8 e4m3 tiles load
weights (and rows not gathered) by Hopper's tensor copy engine, as the experts op does;
``--tma both`` also times each config with pointer loads (``off``: those only). ``--group-m``
sweeps the tile order's groups of row tiles, ``--persistent both`` a program per tile against a
program per SM looping over tiles, ``--tuned-tiles`` on the kernels' own tiles only.

Without a GPU, ``--ptxas`` compiles each config for Hopper (sm_90) instead and records what ptxas
reports, registers and spilled bytes, with the shared memory and how the K loop runs
(tests/kernel_builds.py). On the H100 the configs that spilled kilobytes were the slow ones
(benchmarks/results/h100_gemm_configs.json against sm90_ptxas_gemm_configs.json).

    python benchmarks/tune_gemm.py --gemms up down --json benchmarks/results/<device>_gemm_configs.json
    python benchmarks/tune_gemm.py --ptxas --json benchmarks/results/sm90_ptxas_gemm_configs.json
"""

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import re
import sys

import torch
import triton

from inductor_moe import benchmark
from inductor_moe.kernels import align, grouped_gemm
from inductor_moe.ops.activations import Activation
from inductor_moe.ops.triton_impl import activation_operand, epilogue_blocks, weight_grad_options, weight_operand

SHAPES = [(32768, 4096, 1024, 64, 4), (24576, 1536, 256, 128, 8)]
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
BF16 = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
        (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 8, 3)]
# blockwise keeps each K block's product beside the accumulators (two of each when gated): 64-row
# tiles with 8 warps spill the least (--ptxas)
FP8 = [(128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4),
       (64, 256, 128, 8, 3), (64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (128, 64, 128, 8, 3)]
# rowwise steps need not match a scale block: 256 of K halve a short K loop (the down projection
# at n = 512: two steps, not four); sm_90 builds them without spills, persistent too
ROWWISE = FP8 + [(128, 256, 256, 8, 2), (128, 128, 256, 8, 3)]
# name in the results -> (FP8 recipe, candidates); MX tiles are dequantized to bf16 in the kernel
PRECISIONS = {"bf16": (None, BF16), "fp8 rowwise": ("rowwise", ROWWISE), "fp8 blockwise": ("blockwise", FP8),
              "mxfp8": ("mxfp8", BF16)}
# what each GEMM of the experts op is (SwiGLU): the names in the results
GEMMS = {"up": "up + SwiGLU, H stored", "down": "down",
         "dH": "dH: grad_out @ w2^T, SwiGLU backward", "dW2": "dW2: act(H)^T @ grad_out (scaled)"}


def problem(tokens, d, n, experts, k, device):
    """(x, w1, a, w2, grad_out, h, scale) in bf16 (scale float32), and the rows' sort."""
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    ids = torch.rand(tokens, experts, device=device).topk(k, dim=-1).indices.int()
    w1 = (torch.randn(experts, 2 * n, d, device=device, dtype=torch.bfloat16) * d**-0.5).transpose(1, 2)
    w2 = (torch.randn(experts, d, n, device=device, dtype=torch.bfloat16) * n**-0.5).transpose(1, 2)
    _, _, token_of_row, offsets = align.align(ids, experts)
    a = torch.randn(tokens * k, n, device=device, dtype=torch.bfloat16)
    h = torch.randn(tokens * k, 2 * n, device=device, dtype=torch.bfloat16)
    scale = torch.rand(tokens * k, device=device)
    return (x, w1, a, w2, torch.randn_like(x), h, scale), token_of_row, offsets


def swept_config(original, tile, tma, group_m, persistent, kernel, *args, **kwargs) -> dict:
    """A candidate in place of grouped_gemm._config: ``tile`` (None: the kernels' own), the copy
    engine, the tile order's GROUP_M and the persistent grid, which the weight gradient's kernel
    has none of."""
    if tile is None:
        config = original(kernel, *args, **kwargs)
    else:
        config = dict(zip(TILE_KEYS, tile))
    if kernel == "weight_grad":
        config.pop("TMA", None)
        return config
    return {**config, "TMA": tma, "GROUP_M": group_m, "PERSISTENT": persistent}


def timed(fn, flops: int) -> dict:
    ms = triton.testing.do_bench(fn, return_mode="median")
    return {"median_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}


def compiled_for_hopper(fn, flops: int) -> dict:
    """ptxas's report on the last kernel that ``fn`` launches, compiled for sm_90 instead of run,
    its shared memory and how its K loop runs (tests/kernel_builds.py's ``main_loop``)."""
    import kernel_builds

    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's log (TRITON_DUMP_PTXAS_LOG)
        fn()
    entry = log.getvalue().rsplit("Compiling entry function", 1)[-1]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    return {"registers": int(re.search(r"Used (\d+) registers", entry).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            **kernel_builds.hopper_builds[-1][2]}


def compile_instead_of_running() -> None:
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import kernel_builds
    from triton.backends.compiler import GPUTarget

    kernel_builds.compile_instead_of_running([GPUTarget("cuda", 90, 32)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--ptxas", action="store_true", help="no GPU: compile for sm_90, record registers and spills")
    parser.add_argument("--gemms", nargs="+", choices=GEMMS, default=GEMMS, help="a subset (one run may take long)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--tma", choices=["on", "off", "both"], default="on",
                        help="e4m3 tiles by the tensor copy engine (as the experts op), by pointers, or both")
    parser.add_argument("--shapes", nargs="+", metavar="T,d,n,E,K", help=f"default {SHAPES}")
    parser.add_argument("--persistent", choices=["on", "off", "both"], default="off",
                        help="a program per SM looping over the tiles, a program per tile, or both")
    parser.add_argument("--tuned-tiles", action="store_true", help="only the tiles the kernels pick")
    parser.add_argument("--group-m", nargs="+", type=int, default=[grouped_gemm.GROUP_M],
                        help="row tiles per group of the tile order")
    args = parser.parse_args()
    if args.ptxas:
        compile_instead_of_running()
    measure, device = (compiled_for_hopper, "cpu") if args.ptxas else (timed, "cuda")
    rows = []
    original = grouped_gemm._config
    swiglu = Activation("swiglu")
    # --ptxas: not the reports of the kernels that make the operands
    quiet = (lambda: contextlib.redirect_stdout(io.StringIO())) if args.ptxas else contextlib.nullcontext
    shapes = [tuple(int(v) for v in shape.split(",")) for shape in args.shapes] if args.shapes else SHAPES
    for tokens, d, n, experts, k in shapes:
        with quiet():
            (x, w1, a, w2, grad_out, h, scale), token_of_row, offsets = problem(tokens, d, n, experts, k, device)
        for precision in args.precisions:
            recipe, configs = PRECISIONS[precision]
            with quiet():
                # the operands as the experts op makes them; the up projection quantizes its output
                # for the down projection as it does too (BLOCK_N at least the block)
                x_op, w1_op = activation_operand(x, recipe), weight_operand(w1, recipe)
                a_op, w2_op = activation_operand(a, recipe), weight_operand(w2, recipe)
                grad_op, w2_t_op = activation_operand(grad_out, recipe), weight_operand(w2.transpose(1, 2), recipe)
            gemms = {  # name -> (the call as the experts op makes it, FLOPs)
                "up": (lambda: grouped_gemm.gemm(x_op, w1_op, offsets, a_rows=token_of_row, activation=swiglu,
                                                 store_h=True, out_dtype=torch.bfloat16,
                                                 fp8_out=epilogue_blocks(recipe)), 2 * tokens * k * d * 2 * n),
                "down": (lambda: grouped_gemm.gemm(a_op, w2_op, offsets, out_dtype=torch.bfloat16),
                         2 * tokens * k * d * n),
                "dH": (lambda: grouped_gemm.gemm_act_backward(grad_op, token_of_row, w2_t_op, offsets, h, scale, swiglu),
                       2 * tokens * k * d * n),
                "dW2": (lambda: grouped_gemm.weight_grad(h, grad_out, offsets, torch.empty_like(w2),
                                                         a_activation=swiglu, b_rows=token_of_row, scale=scale,
                                                         **weight_grad_options(recipe)), 2 * tokens * k * d * n),
            }
            e4m3 = recipe in ("rowwise", "blockwise")
            copy_engine = {"on": [True], "off": [False], "both": [True, False]}[args.tma] if e4m3 else [False]
            tiles = [None] if args.tuned_tiles else configs  # None: the kernels' own choice
            persistent_grids = {"on": [True], "off": [False], "both": [False, True]}[args.persistent]
            for tile, tma, group_m, persistent in itertools.product(tiles, copy_engine, args.group_m, persistent_grids):
                grouped_gemm._config = functools.partial(swept_config, original, tile, tma, group_m, persistent)
                for name in args.gemms:
                    fn, flops = gemms[name]
                    try:
                        result = measure(fn, flops)
                    except Exception as error:  # e.g. out of shared memory: not a candidate
                        print(f"{precision} {tile} {name}: {type(error).__name__}", flush=True)
                        continue
                    tiles_used = dict(zip(TILE_KEYS, tile)) if tile else {"tiles": "the kernels' own"}
                    config = {**tiles_used, "TMA": tma, "GROUP_M": group_m, "PERSISTENT": persistent}
                    rows.append({"shape": [tokens, d, n, experts, k], "precision": precision, "gemm": GEMMS[name],
                                 "config": config, **result})
                    print(f"{str((tokens, d, n, experts, k)):28} {precision:14} {name:5} {tile or 'tuned'} "
                          f"{'tma' if tma else 'ptr'} group {group_m}{' persistent' if persistent else ''}  "
                          + "  ".join(f"{key} {value}" for key, value in result.items()), flush=True)
            grouped_gemm._config = original
    if args.json:
        target = "sm_90 (ptxas, not run)" if args.ptxas else torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump({**benchmark.environment(), "device": target, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

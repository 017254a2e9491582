"""Compile every kernel, as its launch function calls it, for Hopper (sm_90) and Ampere (sm_80)
GPUs (FP8 kernels for Hopper only), on a machine without one: Triton ships ptxas. Run without
TRITON_INTERPRET.

Each kernel is specialized as a launch specializes it (integer arguments equal to 1, 16-byte
aligned pointers and multiples of 16): without that the loads do not vectorize, the software
pipeliner leaves the K loops alone, and the code is not the code a GPU runs."""

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from inductor_moe.kernels import align, grouped_gemm, quantize, routing, unpermute
from inductor_moe.ops import fp8
from inductor_moe.ops.activations import Activation

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
built = []
# sm_90 builds: (kernel, FP8 mode, report: shared memory, the narrowest global load and warp
# run, and the K loop of a grouped GEMM)
hopper_builds = []


def compile_like_launch(kernel: JITFunction, target: GPUTarget, *args, **kwargs):
    """``kernel`` compiled for ``target`` with the signature, constants and specialization a
    launch with these arguments would give it (Triton's own binder)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def main_loop(ttgir: str) -> dict:
    """How the loop that issues a GEMM's MMAs runs on Hopper, from its TTGIR (its K loop; a
    persistent GEMM's loop over tiles, their K loops flattened into it): how many tiles it copies
    into shared memory asynchronously (software-pipelined), how many of those by the tensor copy
    engine (TMA), and how many it loads into registers and waits for; how many operand tiles it
    computes in registers and stores back to shared memory for the MMA; how many warpgroup MMAs it
    issues, and how many of them start from zero instead of accumulating in place (a separate
    addition then waits for each); whether it also stores output tiles (the epilogue in the loop)."""
    for match in re.finditer(r"scf\.for ", ttgir):
        start = ttgir.rindex("\n", 0, match.start()) + 1
        indent = len(ttgir[start:]) - len(ttgir[start:].lstrip(" "))
        loop = ttgir[start:ttgir.index("\n" + " " * indent + "}", start)]  # to the loop's closing brace
        if "ttng.warp_group_dot " in loop and loop.count("scf.for ") == 1:
            break  # the innermost loop with the MMAs
    dots = re.findall(r"ttng.warp_group_dot (%[\w#]+), (%[\w#]+), (%[\w#]+)", loop)
    tma_tiles = len(re.findall(r"ttng.async_tma_copy_global_to_local ", loop))
    return {"async_tiles": len(re.findall(r"ttg.async_copy_global_to_local [^\n]*tensor<\d+x\d+x", loop)) + tma_tiles,
            "tma_tiles": tma_tiles,
            "register_tiles": len(re.findall(r"= tt.load [^\n]*: tensor<\d+x\d+x", loop)),
            "stored_operands": len(re.findall(r"ttg.local_alloc %", loop)),
            "mma": len(dots), "mma_from_zero": sum(acc.startswith("%cst") for *_, acc in dots),
            "epilogue_in_loop": "tt.store " in loop}


def stack_bytes(cubin: bytes) -> int:
    """A thread's stack in the kernel's binary (cuobjdump's resource usage): its spilled registers."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(cubin)
        binary.flush()
        usage = subprocess.run([tool, "-res-usage", binary.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def narrowest_load_bytes(ptx: str) -> int:
    """The fewest bytes any global load of the kernel reads per thread (16: all are 16-byte vectors)."""
    loads = re.findall(r"ld\.global[.\w:]*?(?:\.v(\d))?\.[bfsu](\d+) ", ptx)
    return min((int(vector or 1) * int(bits) // 8 for vector, bits in loads), default=0)


_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "f8E4M3FN": 1, "i8": 1, "i32": 4, "i64": 8}


def narrowest_warp_run(ttgir: str) -> int:
    """The fewest contiguous bytes a warp reads along a tile's contiguous dim in any 2-D load into
    registers: under 32, each 32-byte sector it touches is read for a part (a transposed view
    read 8 rows at a time reads 16-byte halves)."""
    layouts = {name: [[int(v) for v in values.split(",")] for values in fields] for name, *fields in re.findall(
        r"^(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
        r"warpsPerCTA = \[[\d, ]+\], order = \[([\d, ]+)\]", ttgir, re.M)}
    runs = []
    for shape, dtype, layout in re.findall(r"= tt\.load [^\n]*: tensor<(\d+x\d+)x!tt\.ptr<(\w+)>, (#blocked\d*)>", ttgir):
        per_thread, threads, order = layouts[layout]
        fast = order[0]
        runs.append(min(per_thread[fast] * threads[fast], int(shape.split("x")[fast])) * _BYTES[dtype])
    return min(runs, default=0)


def _compile_instead_of_run(kernel: JITFunction, *args, grid, warmup, **kwargs):
    fp8_mode = kwargs.get("FP8", 0)
    e4m3 = fp8_mode or any(isinstance(arg, torch.Tensor) and arg.dtype == torch.float8_e4m3fn for arg in args)
    for target in TARGETS:
        if e4m3 and target.arch < 89:
            continue  # e4m3 needs Ada or Hopper
        compiled = compile_like_launch(kernel, target, *args, **kwargs)
        if target.arch == 90:
            ttgir = compiled.asm["ttgir"]
            report = {"shared_bytes": compiled.metadata.shared, "stack_bytes": stack_bytes(compiled.asm["cubin"]),
                      "load_bytes": narrowest_load_bytes(compiled.asm["ptx"]),
                      "warp_run_bytes": narrowest_warp_run(ttgir),
                      **(main_loop(ttgir) if "warp_group_dot" in ttgir else {})}
            a_dtype = str(args[0].dtype).removeprefix("torch.") if isinstance(args[0], torch.Tensor) else "descriptor"
            hopper_builds.append((kernel.fn.__name__, fp8_mode,
                                  report | {"persistent": kwargs.get("PERSISTENT", False), "a_dtype": a_dtype}))
    built.append(kernel.fn.__name__)


def compile_instead_of_running(targets=TARGETS) -> None:
    """Every kernel launch from now on compiles for ``targets`` instead, as a Hopper GPU would launch
    it (e4m3 tiles by the copy engine; e4m3 kernels build for sm_90 only)."""
    global TARGETS
    TARGETS = targets
    JITFunction.run = _compile_instead_of_run
    grouped_gemm._copy_engine = lambda tensor: True


def compile_all() -> None:
    compile_instead_of_running()
    experts, tokens, k, hidden, inner = 8, 40, 2, 256, 128
    for dtype in (torch.bfloat16, torch.float32):
        ids = torch.randint(0, experts, (tokens, k))
        logits = torch.randn(tokens, experts, dtype=dtype)
        routing.route(logits, k, True, True, torch.zeros(experts), 4, 2, 2.0)
        routing.route_backward(torch.randn(tokens, k), logits, ids.int(), True, False, 1.0)
        align.align(ids, experts)
        offsets = torch.arange(1, experts + 1, dtype=torch.int32) * 10
        rows = torch.arange(tokens * k, dtype=torch.int32) // k
        x = torch.randn(tokens, hidden, dtype=dtype)
        for act in (Activation("swiglu"), Activation("swiglu_oai", interleaved=True), Activation("gelu")):
            width = 2 * inner if act.gated else inner
            w1 = torch.randn(experts, width, hidden, dtype=dtype).transpose(1, 2)
            _, h = grouped_gemm.gemm(x, w1, offsets, a_rows=rows, bias=torch.zeros(experts, width, dtype=dtype),
                                     activation=act, store_h=True)
            w2 = torch.randn(experts, inner, hidden, dtype=dtype)
            grouped_gemm.gemm_act_backward(x, rows, w2.transpose(1, 2), offsets, h, torch.ones(tokens * k), act)
            grouped_gemm.weight_grad(h, x, offsets, torch.empty(experts, inner, hidden, dtype=dtype), a_activation=act,
                                     b_rows=rows, scale=torch.ones(tokens * k), bias_grad=torch.empty(experts, hidden, dtype=dtype))
        grouped_gemm.gemm(h, w1.transpose(1, 2), offsets)
        grouped_gemm.weight_grad(x, h, offsets, torch.empty(experts, hidden, 2 * inner, dtype=dtype), a_rows=rows)
        unpermute.unpermute_reduce(torch.randn(tokens * k, hidden, dtype=dtype), rows, torch.rand(tokens, k), tokens, k)
        for block_rows, block_cols, power_of_two in ((1, 0, False), (1, 128, False), (128, 128, False), (1, 32, True)):
            quantize.quantize(x, block_rows, block_cols, power_of_two)
        quantize.quantize(torch.randn(2048, 64, dtype=dtype).t(), 1, 0)  # transposed, too long to hold: two sweeps
    act, dtype = Activation("swiglu"), torch.bfloat16  # FP8 GEMMs as models call them: bf16 in and out
    x = x.to(dtype)
    for recipe, ((a_rows, a_cols), (w_rows, w_cols)) in fp8.RECIPES.items():
        power_of_two = recipe == "mxfp8"
        w1 = torch.randn(experts, 2 * inner, hidden, dtype=dtype).transpose(1, 2)
        w1_q = quantize.quantize_weight(w1, w_rows, w_cols, power_of_two)
        a, h = grouped_gemm.gemm(quantize.quantize(x, a_rows, a_cols, power_of_two), w1_q, offsets, a_rows=rows,
                                 activation=act, store_h=True, out_dtype=dtype,
                                 fp8_out=(a_cols, power_of_two) if a_cols else None)
        a = a if a_cols else quantize.quantize(a, a_rows, a_cols, power_of_two)
        w2 = torch.randn(experts, hidden, inner, dtype=dtype)  # [E, out, in] storage: the backward's B
        grouped_gemm.gemm(a, quantize.quantize_weight(w2.transpose(1, 2), w_rows, w_cols, power_of_two), offsets,
                          out_dtype=dtype)
        w2_t = quantize.quantize_weight(w2, w_rows, w_cols, power_of_two)
        grouped_gemm.gemm_act_backward(quantize.quantize(x, a_rows, a_cols, power_of_two), rows, w2_t, offsets, h,
                                       torch.ones(tokens * k), act)
        grouped_gemm.weight_grad(h, x, offsets, torch.empty(experts, inner, hidden, dtype=dtype), a_activation=act,
                                 b_rows=rows, scale=torch.ones(tokens * k), fp8_rows=fp8.SEGMENT_ROWS[recipe],
                                 power_of_two=power_of_two)
    # the persistent grid's candidates, on a GPU untimed yet: the down projection in bf16 and e4m3
    config = grouped_gemm._config
    grouped_gemm._config = lambda *args, **kwargs: config(*args, **kwargs) | dict(PERSISTENT=True)
    activations = torch.randn(tokens * k, inner, dtype=dtype)
    grouped_gemm.gemm(activations, w2.transpose(1, 2), offsets)
    grouped_gemm.gemm(quantize.quantize(activations, 1, 0), quantize.quantize_weight(w2.transpose(1, 2), 1, 0), offsets,
                      out_dtype=dtype)
    grouped_gemm._config = config
    print(f"compiled {len(built)} kernel builds for {len(TARGETS)} targets: {sorted(set(built))}")
    for name, fp8_mode, report in hopper_builds:
        print("sm_90:", json.dumps({"kernel": name, "fp8": fp8_mode, **report}))

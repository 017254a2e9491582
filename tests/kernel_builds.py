"""Compile every kernel, as its launch function calls it, for Hopper (sm_90) and Ampere (sm_80)
GPUs (FP8 kernels for Hopper only), on a machine without one: Triton ships ptxas. Run without
TRITON_INTERPRET."""

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from inductor_moe.kernels import align, grouped_gemm, quantize, routing, unpermute
from inductor_moe.ops import fp8
from inductor_moe.ops.activations import Activation

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}
TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
built = []


def _compile_instead_of_run(kernel: JITFunction, *args, grid, warmup, **kwargs):
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        else:
            signature[param.name] = "i32" if isinstance(value, int) else "fp32"
    for target in TARGETS:
        if ("*fp8e4nv" in signature.values() or constexprs.get("FP8")) and target.arch < 89:
            continue  # e4m3 needs Ada or Hopper
        triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs), target=target, options=options)
    built.append(kernel.fn.__name__)


def compile_all() -> None:
    JITFunction.run = _compile_instead_of_run
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
    act = Activation("swiglu")
    for recipe, ((a_rows, a_cols), (w_rows, w_cols)) in fp8.RECIPES.items():
        power_of_two = recipe == "mxfp8"
        w1 = torch.randn(experts, 2 * inner, hidden, dtype=dtype).transpose(1, 2)
        w1_q = quantize.quantize_weight(w1, w_rows, w_cols, power_of_two)
        _, h = grouped_gemm.gemm(quantize.quantize(x, a_rows, a_cols, power_of_two), w1_q, offsets, a_rows=rows,
                                 activation=act, store_h=True, out_dtype=dtype,
                                 fp8_out=(a_cols, power_of_two) if a_cols else None)
        w2_t = quantize.quantize_weight(torch.randn(experts, hidden, inner, dtype=dtype), w_rows, w_cols, power_of_two)
        grouped_gemm.gemm_act_backward(quantize.quantize(x, a_rows, a_cols, power_of_two), rows, w2_t, offsets, h,
                                       torch.ones(tokens * k), act)
        grouped_gemm.weight_grad(h, x, offsets, torch.empty(experts, inner, hidden, dtype=dtype), a_activation=act,
                                 b_rows=rows, scale=torch.ones(tokens * k), fp8_rows=fp8.SEGMENT_ROWS[recipe],
                                 power_of_two=power_of_two)
    print(f"compiled {len(built)} kernel builds for {len(TARGETS)} targets: {sorted(set(built))}")

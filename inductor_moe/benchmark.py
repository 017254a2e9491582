"""Eager vs torch.compile vs torch.compile + inductor_moe on one model, timed in one process.

The variants take turns in short blocks of calls, so that a machine whose speed drifts affects
them alike; the first calls of each block are not counted, so that the aftermath of the previous
variant (caches swept by eager batched_mm, a clock lowered by a long AVX-512 kernel) does not
slow the next one down. The numbers are medians.
``python -m inductor_moe`` runs this on a built-in model; ``benchmarks/styles.py`` on every style.
"""

import argparse
import json
import logging
import platform
import statistics
import time

import torch
from torch._dynamo.utils import counters

from . import config, models

IMPLS = ("eager", "torch.compile", "inductor_moe")


def variants(model: torch.nn.Module, max_autotune: bool = False) -> dict:
    """Eager, stock torch.compile and torch.compile + inductor_moe (in max-autotune if asked)."""
    extra = {"max_autotune": True} if max_autotune else {}
    suffix = " max-autotune" if max_autotune else ""
    # Distinct options keep dynamo from reusing one compile's code for the other.
    stock = torch.compile(model, options={"pre_grad_custom_pass": None, **extra})
    return {
        "eager": model,
        "torch.compile" + suffix: _without_plugin(stock),
        "inductor_moe" + suffix: torch.compile(model, options=extra),
    }


def _without_plugin(fn):
    """``fn`` compiled and run with inductor_moe off: stock torch.compile, transformers' experts as configured."""

    def run(*args):
        with config.patch(enabled=False):
            return fn(*args)

    return run


def _main(out):
    return out[0] if isinstance(out, tuple) else out  # blocks that also return their router logits


def _step(model, fn, x: torch.Tensor, backward: bool):
    if not backward:
        return lambda: fn(x)

    def train_step():
        model.zero_grad(set_to_none=True)  # as a training loop does: no accumulation into .grad
        _main(fn(x)).float().square().mean().backward()

    return train_step


def measure(model: torch.nn.Module, x: torch.Tensor, *, backward: bool = False, rounds: int = 20, fns=None):
    """(median ms, peak memory GB, inductor_moe's rewrites) per implementation of ``model(x)``
    (and backward); ``fns`` defaults to ``variants(model)``."""
    x = x.detach().requires_grad_(backward)
    steps, rewrites, peaks = {}, {}, {}
    cuda = x.device.type == "cuda"
    # every compile runs the pass: a cache hit would skip it and its counters
    with torch._inductor.config.patch(force_disable_caches=True), torch.set_grad_enabled(backward):
        for name, fn in (fns or variants(model)).items():
            before = dict(counters["inductor_moe"])
            steps[name] = _step(model, fn, x, backward)
            steps[name]()  # compile and warm up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            steps[name]()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            if name.startswith("inductor_moe"):
                rewrites = {k: v - before.get(k, 0) for k, v in counters["inductor_moe"].items() if v > before.get(k, 0)}
        return _interleaved(steps, rounds, torch.cuda.synchronize if cuda else lambda: None), peaks, rewrites


def _interleaved(steps: dict, rounds: int, synchronize, block: int = 6, skip: int = 2) -> dict:
    """Median ms of each step, the steps taking turns in blocks whose first calls are not counted."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for call in range(block):
                synchronize()
                start = time.perf_counter()
                step()
                synchronize()
                if call >= skip:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def roofline(device: str) -> dict:
    """This device's dense bf16 matmul TFLOP/s and copy GB/s (read plus write), measured now."""
    size = 8192 if device == "cuda" else 512
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    src = torch.empty(1 << (30 if device == "cuda" else 24), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    medians = _interleaved({"matmul": lambda: a @ b, "copy": lambda: dst.copy_(src)}, 3, sync)
    return {"matmul_tflops": 2 * size**3 / medians["matmul"] / 1e9, "copy_gbps": 2 * src.numel() / medians["copy"] / 1e6}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict:
    try:
        import triton
    except ImportError:  # triton is a dependency on Linux only
        triton = None
    return {
        "device": f"{_cpu_name()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
    }


def cuda_graph(fn):
    """(graph, what ``fn`` returned while captured): ``fn`` run once off the capturing stream (lazy
    initialisation, kernel compiles), then captured in a CUDA graph; ``graph.replay()`` reruns its
    kernels on whatever the captured tensors then hold, without the host's launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def rows(benchmark: str, shape: dict, medians: dict, flops: int) -> list[dict]:
    return [
        {
            "benchmark": benchmark,
            "shape": shape,
            "impl": impl,
            "median_ms": round(ms, 4),
            "tflops": round(flops / ms / 1e9, 4),
            "speedup_vs_torch_compile": round(medians["torch.compile"] / ms, 3),
        }
        for impl, ms in medians.items()
    ]


def print_table(all_rows: list[dict]) -> None:
    print(f"{'benchmark':28} {'impl':14} {'median ms':>10} {'GFLOP/s':>9} {'vs compile':>10}")
    for row in all_rows:
        print(
            f"{row['benchmark']:28} {row['impl']:14} {row['median_ms']:10.3f} {1e3 * row['tflops']:9.1f} "
            f"{row['speedup_vs_torch_compile']:9.2f}x"
        )


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--backward", action="store_true", help="time forward + backward (training)")
    p.add_argument("--rounds", type=int, default=8, help="turns of each variant (4 timed calls each)")
    p.add_argument("--json", help="write the rows here")
    return p


def run(styles: list[str], args) -> list[dict]:
    """Measure every style at the shape in ``args``; print and optionally save the table."""
    cfg = models.MoEConfig(args.hidden, args.intermediate, args.experts, args.top_k)
    dtype = getattr(torch, args.dtype)
    shape = {"T": args.tokens, "H": args.hidden, "I": args.intermediate, "E": args.experts, "k": args.top_k,
             "dtype": args.dtype, "backward": args.backward}
    flops = models.expert_flops(cfg, args.tokens) * (3 if args.backward else 1)
    # the torch.where loop is one graph only with data-dependent output shapes captured
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    all_rows, all_rewrites = [], {}
    for style in styles:
        if dtype != torch.bfloat16 and style in models.BFLOAT16_ONLY:
            print(f"{style}: skipped, stock torch.compile takes torch._grouped_mm in bfloat16 only")
            continue
        torch.manual_seed(0)
        model = models.build(style, cfg).to(dtype)
        x = torch.randn(args.tokens, args.hidden, dtype=dtype)
        if style not in models.STYLES:  # transformers blocks take [batch, sequence, hidden]
            x = x.view(1, args.tokens, args.hidden)
        medians, _, rewrites = measure(model, x, backward=args.backward, rounds=args.rounds)
        print(f"{style}: inductor_moe rewrote {rewrites or 'nothing'}")
        all_rows += rows(style, shape, medians, flops)
        all_rewrites[style] = rewrites
    print_table(all_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**environment(), "rewrites": all_rewrites, "rows": all_rows}, f, indent=1)
    return all_rows


def bf16_matmul_emulated() -> bool:
    """Whether this CPU multiplies bfloat16 matrices far slower than float32 ones: without AVX-512
    or AMX torch emulates bfloat16 (~1 GFLOP/s on two AVX2 cores, ~100 in float32)."""
    a = torch.randn(256, 256)
    b = a.bfloat16()
    medians = _interleaved({"bfloat16": lambda: b @ b, "float32": lambda: a @ a}, 5, lambda: None)
    return medians["bfloat16"] > 4 * medians["float32"]


def main_defaults(dtype: str | None, style: str | None, bf16_emulated=bf16_matmul_emulated) -> tuple[str, str]:
    """The main job's dtype and block where not given: bfloat16 and the hand-written grouped-GEMM
    block; where bfloat16 is emulated, float32 and the per-expert loop (torch.compile takes the
    block's torch._grouped_mm in bfloat16 only)."""
    if dtype is None:
        dtype = "float32" if bf16_emulated() else "bfloat16"
        if dtype == "float32":
            print("bfloat16 matmuls are emulated on this CPU (no AVX-512 or AMX): float32 and the dense_loop block")
    style = style or ("sorted_grouped_mm" if dtype == "bfloat16" else "dense_loop")
    if style in models.BFLOAT16_ONLY and dtype != "bfloat16":
        raise ValueError(f"--style {style} needs --dtype bfloat16: torch.compile takes torch._grouped_mm in bfloat16 only")
    return dtype, style


def main() -> None:
    p = parser("Compile a built-in MoE block eagerly, with torch.compile and with torch.compile + "
               "inductor_moe; print what was rewritten and the throughput of each.")
    p.add_argument("--style", help=f"one of {sorted(models.STYLES)} (default sorted_grouped_mm, dense_loop in "
                   f"float32), or <family>_<grouped_mm|batched_mm|eager> for a transformers family in "
                   f"{sorted(models.FAMILIES)}")
    p.set_defaults(dtype=None)  # bfloat16 where this CPU multiplies it natively, else float32
    args = p.parse_args()
    try:
        args.dtype, args.style = main_defaults(args.dtype, args.style)
    except ValueError as error:
        p.error(str(error))
    logging.basicConfig(format="%(message)s")
    logging.getLogger("inductor_moe").setLevel(logging.INFO)
    run([args.style], args)

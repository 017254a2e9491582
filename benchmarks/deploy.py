"""Deployment on this CPU: one MoE block eager, as an AOTInductor package and as ExecuTorch programs
(XNNPACK; float, int8 and int4 expert weights), each one program for every token count: sizes, and
latency against eager. Needs the executorch extra (see the README).

    python benchmarks/deploy.py --json benchmarks/results/cpu_deploy.json
"""

import argparse
import json
import pathlib
import tempfile

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
from executorch.runtime import Runtime
from torch.export import Dim

import inductor_moe
from inductor_moe import benchmark, models


def _exported(model, x, max_tokens: int):
    return inductor_moe.export(model, (x,), dynamic_shapes=({0: Dim("tokens", max=max_tokens)},))


def _aoti(model, x, directory: pathlib.Path, name: str):
    """(package path, loaded package) of ``model`` with a dynamic token count."""
    program = _exported(model, x, 4096)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(directory / f"{name}.pt2"))
    return path, torch._inductor.aoti_load_package(path)


def _executorch(program, expert_weights):
    """(.pte bytes, loaded program, its forward method) of an exported program (the method lives
    only as long as its program)."""
    lowered = to_edge_transform_and_lower(inductor_moe.for_executorch(program, expert_weights),
                                          partitioner=[XnnpackPartitioner()])
    buffer = lowered.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())).buffer
    loaded = Runtime.get().load_program(buffer)
    return len(buffer), loaded, loaded.load_method("forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = models.MoEConfig(hidden=args.hidden, intermediate=args.intermediate, num_experts=args.experts, top_k=args.top_k)
    torch.manual_seed(0)
    model = models.build("dense_loop", cfg).eval()
    bf16 = models.build("dense_loop", cfg).eval().bfloat16()
    bf16.load_state_dict(model.state_dict())
    sizes = {"parameters float32": sum(p.numel() * 4 for p in model.parameters())}
    rows, keep = [], []  # keep: the loaded ExecuTorch programs, whose methods live only as long
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        example = torch.randn(9, cfg.hidden)
        packages = {}
        for name, m in (("aoti float32", model), ("aoti bfloat16", bf16)):
            path, packages[name] = _aoti(m, example.to(next(m.parameters()).dtype), pathlib.Path(tmp), name.split()[1])
            sizes[name] = pathlib.Path(path).stat().st_size
        program = _exported(model, example, max(args.tokens))
        for weights in (None, "int8", "int4"):
            name = f"executorch {weights or 'float32'}"
            sizes[name], loaded, packages[name] = _executorch(program, weights)
            keep.append(loaded)
        for tokens in args.tokens:
            x = torch.randn(tokens, cfg.hidden)
            steps = {"eager float32": lambda: model(x), "aoti float32": lambda: packages["aoti float32"](x),
                     "eager bfloat16": lambda: bf16(x.bfloat16()), "aoti bfloat16": lambda: packages["aoti bfloat16"](x.bfloat16())}
            for weights in (None, "int8", "int4"):
                name = f"executorch {weights or 'float32'}"
                method = packages[name]
                steps[name] = (lambda method: lambda: method.execute([x]))(method)
                error = (method.execute([x])[0] - model(x)).norm() / model(x).norm()
                rows.append({"tokens": tokens, "program": name, "relative error vs eager": float(error)})
            medians = benchmark._interleaved(steps, args.rounds, lambda: None)
            for name, ms in medians.items():
                base = medians["eager bfloat16" if "bfloat16" in name else "eager float32"]
                rows.append({"tokens": tokens, "program": name, "median ms": ms, "speedup vs eager": base / ms})
    for name, size in sizes.items():
        print(f"{name:>22}: {size / 2**20:7.2f} MiB")
    for row in rows:
        if "median ms" in row:
            print(f"T={row['tokens']:<3} {row['program']:>20}: {row['median ms']:8.3f} ms  x{row['speedup vs eager']:.2f}")
        else:
            print(f"T={row['tokens']:<3} {row['program']:>20}: error {row['relative error vs eager']:.2e}")
    if args.json:
        result = {**benchmark.environment(), "shape": vars(args) | {"style": "dense_loop"}, "sizes_bytes": sizes,
                  "rows": rows}
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The cost model (inductor_moe.perf_model) against measurements, with its error per part.

    python benchmarks/perf_model.py --json benchmarks/results/perf_model.json --svg benchmarks/results/perf_model.svg

1. H100: the committed kernel timings (h100_kernels.json: route, align, up projection + SwiGLU, down
   projection, combine, at 7 shapes) and layer timings (h100_fp8.json: the experts op forward in bf16
   and each FP8 recipe; h100_layers.json: the whole layer, forward and training).
2. This CPU: the same parts as the torch code runs them (the CPU's rates measured first).
3. Expert parallelism on gloo (2 processes on 127.0.0.1): the layer per rank over a sweep of
   sparsity regimes (E, k, T, skew), the link's rate measured first by one large all-to-all.

Error is (predicted - measured) / measured. The SVG plots every point, predicted against measured.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inductor_moe import benchmark, expert_parallel, perf_model
from inductor_moe.ops import cpu

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# h100_kernels.json's benchmark names -> the model's parts
H100_PARTS = {"route": "route", "align": "align", "up projection + SwiGLU": "up", "down projection": "down",
              "unpermute-reduce": "combine"}
EXPERTS_OP = ("align", "quantize", "up", "down", "combine")  # what h100_fp8.json times: the experts op


def _layer(shape: dict) -> perf_model.Layer:
    return perf_model.Layer(shape["T"], shape["d"], shape["n"], shape["E"], shape["K"])


def _point(source: str, what: str, shape, predicted: float, measured: float, bound: str = "") -> dict:
    return {"source": source, "what": what, "shape": shape, "predicted_ms": round(predicted, 5),
            "measured_ms": round(measured, 5), "error": round((predicted - measured) / measured, 3), "bound": bound}


def h100_points() -> list[dict]:
    points = []
    with open(os.path.join(RESULTS, "h100_kernels.json")) as f:
        for row in json.load(f)["rows"]:
            part = H100_PARTS.get(row["benchmark"])
            if part and row["impl"].startswith("inductor_moe"):
                predicted = perf_model.predict(_layer(row["shape"]), perf_model.H100)[part]
                points.append(_point("H100 kernels", part, row["shape"], predicted.ms, row["median_ms"], predicted.bound))
    with open(os.path.join(RESULTS, "h100_fp8.json")) as f:
        for row in json.load(f)["throughput"]:
            recipe = None if row["impl"] == "bf16" else row["impl"].split(",")[0]
            if "bf16 dW" in row["impl"]:
                continue
            backward = "backward" in row["benchmark"]
            parts = perf_model.predict(_layer(row["shape"]), perf_model.H100, recipe=recipe, backward=backward)
            predicted = sum(p.ms for name, p in parts.items() if name.removesuffix(" backward") in EXPERTS_OP)
            points.append(_point("H100 experts op", f"{row['benchmark']}, {row['impl']}", row["shape"], predicted,
                                 row["median_ms"]))
    with open(os.path.join(RESULTS, "h100_layers.json")) as f:
        for row in json.load(f)["rows"]:
            if row["impl"] == "inductor_moe":
                backward = "backward" in row["benchmark"]
                predicted = perf_model.total_ms(perf_model.predict(_layer(row["shape"]), perf_model.H100, backward=backward))
                points.append(_point("H100 layer", row["benchmark"], row["shape"], predicted, row["median_ms"]))
    return points


def _median_ms(fn, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cpu_hardware(link_gbps: float = 1.0) -> perf_model.Hardware:
    """This CPU's rates, measured now (the bf16 matmul and copy of benchmark.roofline)."""
    rates = benchmark.roofline("cpu")
    return perf_model.Hardware(f"{benchmark.environment()['device']}", matmul_tflops=rates["matmul_tflops"],
                               fp8_tflops=rates["matmul_tflops"], memory_gbps=rates["copy_gbps"], link_gbps=link_gbps,
                               launch_us=10.0, program_gbps=rates["copy_gbps"], grouped_efficiency=0.75)


def _cpu_parts(tokens, hidden, inner, experts, k):
    """The parts as the torch code runs them on this CPU (bf16)."""
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    gate = torch.randn(experts, hidden, dtype=torch.bfloat16)
    logits = x @ gate.t()
    weights, ids = cpu.route_forward(logits, k, True, "softmax", None, 1, 1, 1.0, float("-inf"), 0.0, 2)
    order, offsets = cpu.sort_by_expert(ids.reshape(-1).long(), experts)
    rows = cpu.gather_rows(x, order // k)
    w1 = torch.randn(experts, hidden, 2 * inner, dtype=torch.bfloat16)
    w2 = torch.randn(experts, inner, hidden, dtype=torch.bfloat16)
    h = cpu.grouped_mm(rows, w1, offsets)
    a = torch.randn(h.shape[0], inner, dtype=torch.bfloat16)
    y = cpu.grouped_mm(a, w2, offsets)
    return {
        "gate": lambda: x @ gate.t(),
        "route": lambda: cpu.route_forward(logits, k, True, "softmax", None, 1, 1, 1.0, float("-inf"), 0.0, 2),
        "align": lambda: cpu.sort_by_expert(ids.reshape(-1).long(), experts),
        "up": lambda: cpu.grouped_mm(cpu.gather_rows(x, order // k), w1, offsets),
        "down": lambda: cpu.grouped_mm(a, w2, offsets),
        "combine": lambda: cpu.unpermute_reduce(y, order, weights, tokens, k),
    }


CPU_SHAPES = [(4096, 512, 256, 16, 2), (2048, 1024, 512, 8, 2), (8192, 256, 128, 64, 4)]


def cpu_points(hw: perf_model.Hardware) -> list[dict]:
    points = []
    for shape in CPU_SHAPES:
        predicted = perf_model.predict(perf_model.Layer(*shape), hw)
        for part, fn in _cpu_parts(*shape).items():
            named = dict(zip("TdnEK", shape, strict=True))
            points.append(_point("CPU parts", part, named, predicted[part].ms, _median_ms(fn), predicted[part].bound))
    return points


# (T per rank, E, k, skew): dense-ish to sparse, even to skewed
EP_SWEEP = [(512, 8, 2, 1.0), (2048, 8, 2, 1.0), (2048, 16, 4, 1.0), (4096, 32, 8, 1.0), (2048, 8, 2, 1.5),
            (4096, 64, 2, 1.0), (1024, 4, 1, 1.9), (8192, 16, 2, 1.0)]
EP_HIDDEN, EP_INNER = 256, 128


def _ep_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    payload = torch.empty(16 << 20, dtype=torch.uint8)  # the link: one 16 MB all-to-all
    exchange = lambda: dist.all_to_all_single(torch.empty_like(payload), payload)  # noqa: E731
    link_gbps = payload.numel() * (world - 1) / world / _median_ms(exchange) / 1e6
    rows = []
    for tokens, experts, k, skew in EP_SWEEP:
        x = torch.randn(tokens, EP_HIDDEN, dtype=torch.bfloat16)
        w1 = torch.randn(experts // world, EP_HIDDEN, 2 * EP_INNER, dtype=torch.bfloat16)
        w2 = torch.randn(experts // world, EP_INNER, EP_HIDDEN, dtype=torch.bfloat16)
        # skew: rank 0's experts get `skew` times the mean share of the pairs (pairs moved to them)
        generator = torch.Generator().manual_seed(rank)
        ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
        moved = torch.rand(tokens, k, generator=generator) < (skew - 1) / (world - 1)
        ids = torch.where(moved, ids % (experts // world), ids)
        weights = torch.rand(tokens, k).softmax(-1)
        run = lambda: expert_parallel.experts(x, ids, weights, w1, w2, group=None)  # noqa: E731
        dist.barrier()
        measured = _median_ms(run, repeat=5)
        rows.append({"T": tokens, "E": experts, "K": k, "skew": skew, "ms": measured})
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"link_gbps": link_gbps, "rows": rows}, f)
    dist.destroy_process_group()


def ep_points(world: int = 2) -> tuple[list[dict], float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(RESULTS, ".ep_measured.json")
    mp.spawn(_ep_worker, args=(world, port, out), nprocs=world, join=True)
    with open(out) as f:
        measured = json.load(f)
    os.remove(out)
    torch.set_num_threads(1)  # as each rank ran
    hw = cpu_hardware(link_gbps=measured["link_gbps"])
    torch.set_num_threads(os.cpu_count())
    points = []
    for row in measured["rows"]:
        layer = perf_model.Layer(row["T"], EP_HIDDEN, EP_INNER, row["E"], row["K"])
        parts = perf_model.predict(layer, hw, world=world, skew=row["skew"])
        predicted = sum(p.ms for name, p in parts.items() if name not in ("gate", "route"))
        shape = {"T": row["T"], "d": EP_HIDDEN, "n": EP_INNER, "E": row["E"], "K": row["K"], "skew": row["skew"]}
        points.append(_point(f"gloo EP, {world} ranks", "layer per rank", shape, predicted, row["ms"],
                             max(parts, key=lambda name: parts[name].ms)))
    return points, measured["link_gbps"]


def svg(points: list[dict], path: str) -> None:
    """Predicted against measured, log-log, a colour per source; the diagonal is a perfect model."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    sources = list(dict.fromkeys(p["source"] for p in points))
    values = [v for p in points for v in (p["predicted_ms"], p["measured_ms"]) if v > 0]
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    size, margin = 520, 60

    def at(value: float) -> float:
        return margin + (math.log10(value) - lo) / (hi - lo) * (size - 2 * margin)

    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" font-size="11">',
             f'<line x1="{margin}" y1="{size - margin}" x2="{size - margin}" y2="{margin}" stroke="#bbb"/>']
    for decade in range(lo, hi + 1):
        position = at(10.0**decade)
        lines.append(f'<text x="{position}" y="{size - margin + 16}" text-anchor="middle">{10.0**decade:g}</text>')
        lines.append(f'<text x="{margin - 6}" y="{size - position + 4}" text-anchor="end">{10.0**decade:g}</text>')
    lines.append(f'<text x="{size / 2}" y="{size - 20}" text-anchor="middle">measured (ms)</text>')
    lines.append(f'<text x="16" y="{size / 2}" transform="rotate(-90 16 {size / 2})" text-anchor="middle">predicted (ms)</text>')
    for i, source in enumerate(sources):
        color = colors[i % len(colors)]
        lines.append(f'<text x="{margin + 6}" y="{margin + 14 * i}" fill="{color}">{source}</text>')
        for p in points:
            if p["source"] == source and p["predicted_ms"] > 0:
                lines.append(f'<circle cx="{at(p["measured_ms"]):.1f}" cy="{size - at(p["predicted_ms"]):.1f}" r="3" '
                             f'fill="{color}" fill-opacity="0.7"><title>{p["what"]} {p["shape"]}</title></circle>')
    lines.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--svg")
    parser.add_argument("--no-measure", action="store_true", help="the committed H100 results only")
    args = parser.parse_args()
    points = h100_points()
    extra = {}
    if not args.no_measure:
        points += cpu_points(cpu_hardware())
        ep, extra["gloo_link_gbps"] = ep_points()
        points += ep
    for source in dict.fromkeys(p["source"] for p in points):
        print(f"\n{source}")
        rows = [p for p in points if p["source"] == source]
        for p in rows:
            print(f"  {p['what']:<48} {str(tuple(p['shape'].values())):<34} predicted {p['predicted_ms']:9.4f} ms  "
                  f"measured {p['measured_ms']:9.4f} ms  error {p['error']:+6.0%}  {p['bound']}")
        errors = [abs(p["error"]) for p in rows]
        print(f"  median |error| {statistics.median(errors):.0%}, worst {max(errors):.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**benchmark.environment(), **extra, "h100": dataclasses.asdict(perf_model.H100), "points": points},
                      f, indent=1)
    if args.svg:
        svg(points, args.svg)


if __name__ == "__main__":
    sys.exit(main())

"""Where an MoE layer's time goes: a roofline model of each part, for a shape, routing skew,
expert-parallel world size, precision and hardware.

Each part is a count of FLOPs, device-memory bytes and link bytes (what the parts must move at the
least, as the kernels are written), and its time is the largest of those counts at the hardware's
rates plus its kernel launches; the largest names the part's bound:

    gate        the router's GEMM (T x d x E)
    route       the route kernel (softmax or sigmoid, top-k)
    align       the counting sort of the T * k (token, slot) pairs; its scan is one program
    quantize    FP8: activations and weights to e4m3 (rowwise: one pass each; blockwise and MX
                quantize the up projection's output in its epilogue)
    up, down    the grouped GEMMs: rows padded to each expert's tiles, the weights of the experts
                that get tokens read once, gathered rows in, outputs out
    combine     each token's k rows, weighted, summed in float32
    dispatch, return    expert parallelism: the rows to and from the experts' ranks (all-to-all)

Training adds the backward of each (twice the GEMM FLOPs, the activation's backward fused into
dH). Skew is the busiest expert-parallel rank's share of the rows over the mean share (1: even):
that rank's GEMMs and exchanges set the pace. ``benchmarks/perf_model.py`` checks the model
against the committed H100 results and against this machine, and prints the error per part. It
explains the measurements; it never replaces them.
"""

import dataclasses
import math

# the GEMM tiles' rows (kernels/grouped_gemm.py's configs at these shapes): each expert pads to them
TILE_ROWS = 128
# an output tile's fixed cost, in units of its reduced dim (the H100's down projections: K = 256
# reached 0.57 of K = 4096's rate, K = 1024 0.96)
TILE_OVERHEAD_K = 128
# the counting sort's pairs per program (kernels/align.py)
ALIGN_BLOCK = 128
# Each FP8 recipe's GEMMs: (MMAs on e4m3, their share of that dtype's rate), as the H100 measured
# them (benchmarks/results/h100_fp8.json): rowwise scales once per output tile; blockwise scales
# every K step's partial product beside the accumulator; MX dequantizes its tiles to bf16 in
# registers, and multiplies in bf16, at half the bf16 rate.
RECIPE_GEMMS = {None: (False, 1.0), "rowwise": (True, 1.0), "blockwise": (True, 0.6), "mxfp8": (False, 0.5)}
# The backward's GEMMs (dX, dH with the activation's backward in its epilogue, per-expert dW) reach
# this share of the forward's rate (the H100's bf16 experts op: backward 2.4x the forward's time
# for twice its FLOPs)
BACKWARD_EFFICIENCY = 0.85


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Achieved rates (not datasheet peaks): what a dense GEMM and a copy reach on the device."""

    name: str
    matmul_tflops: float  # dense bf16 GEMM
    fp8_tflops: float  # dense e4m3 GEMM
    memory_gbps: float  # device memory, read plus write
    link_gbps: float  # one rank's all-to-all bandwidth, each direction
    launch_us: float  # a kernel launch, back to back
    program_gbps: float  # one program's (SM's) memory rate: align's scan is a single program
    grouped_efficiency: float = 0.8  # a grouped GEMM's share of the dense rate at full tiles and long K


# The H100 SXM as measured (benchmarks/results/h100_kernels.json's roofline: an 8192^3 bf16 matmul
# and a 1 GB copy); e4m3 at twice bf16 (its tensor cores' ratio); NVLink 4: 450 GB/s each way.
H100 = Hardware("NVIDIA H100 80GB HBM3", matmul_tflops=748.0, fp8_tflops=1496.0, memory_gbps=2920.0,
                link_gbps=450.0, launch_us=4.0, program_gbps=25.0)


@dataclasses.dataclass(frozen=True)
class Layer:
    tokens: int  # T, on this rank (expert parallel: per rank)
    hidden: int  # d
    inner: int  # n, the expert width
    experts: int  # E
    top_k: int  # k
    gated: bool = True  # SwiGLU-style: the up projection is 2n wide
    itemsize: int = 2  # bf16

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def up_width(self) -> int:
        return 2 * self.inner if self.gated else self.inner


@dataclasses.dataclass(frozen=True)
class Part:
    """One part's counts and the rates they run at. Its time: the slowest of compute, memory and link
    (they overlap), plus what runs on one program alone and the launches (they do not)."""

    rates: Hardware
    flops: float = 0.0
    bytes: float = 0.0
    link_bytes: float = 0.0
    serial_bytes: float = 0.0  # read by a single program (align's scan)
    launches: int = 1
    fp8: bool = False
    efficiency: float = 1.0  # the share of the GEMM rate its tiles reach

    @property
    def times_ms(self) -> dict:
        hw = self.rates
        tflops = (hw.fp8_tflops if self.fp8 else hw.matmul_tflops) * self.efficiency
        return {"compute": self.flops / tflops / 1e9, "memory": self.bytes / hw.memory_gbps / 1e6,
                "link": self.link_bytes / hw.link_gbps / 1e6, "serial": self.serial_bytes / hw.program_gbps / 1e6,
                "launch": self.launches * hw.launch_us / 1e3}

    @property
    def ms(self) -> float:
        t = self.times_ms
        return max(t["compute"], t["memory"], t["link"]) + t["serial"] + t["launch"]

    @property
    def bound(self) -> str:
        times = self.times_ms
        return max(times, key=times.get)


def experts_touched(tokens: int, layer: Layer) -> float:
    """The experts expected to get at least one of ``tokens`` * k pairs, routed uniformly."""
    return layer.experts * (1 - (1 - layer.top_k / layer.experts) ** tokens)


def _gemm(hw: Hardware, rows: float, fan_in: int, fan_out: int, experts: float, itemsize: int,
          recipe: str | None) -> Part:
    """A grouped GEMM over ``rows`` rows of ``experts`` experts: each pads to its tiles (half a tile
    on average), and its weights, its rows in and its rows out each cross memory once."""
    padded = rows + experts * TILE_ROWS / 2
    e4m3, rate = RECIPE_GEMMS[recipe]
    operand = itemsize if recipe is None else 1
    moved = experts * fan_in * fan_out * operand + rows * fan_in * operand + rows * fan_out * itemsize
    # each output tile also pays a fixed cost (filling the pipeline, the epilogue's stores): as
    # much as TILE_OVERHEAD_K more of the reduced dim
    short_k = fan_in / (fan_in + TILE_OVERHEAD_K)
    return Part(hw, flops=2 * rows * fan_in * fan_out, bytes=moved, fp8=e4m3,
                efficiency=hw.grouped_efficiency * rate * short_k * (rows / padded if padded else 1.0))


def predict(layer: Layer, hw: Hardware, *, world: int = 1, skew: float = 1.0, recipe: str | None = None,
            backward: bool = False) -> dict[str, Part]:
    """Each part of the layer on one rank of ``world`` (the busiest: ``skew`` times the mean rows)."""
    b, d, n, up, fp8 = layer.itemsize, layer.hidden, layer.inner, layer.up_width, recipe is not None
    rows = layer.rows * skew  # the rows this rank's experts take (all T * k pairs at world 1)
    # the experts of this rank that get a row: of the whole group's tokens
    touched = min(layer.experts / world, experts_touched(layer.tokens * world, layer) / world)
    blocks = math.ceil(layer.rows / ALIGN_BLOCK)
    parts = {
        "gate": Part(hw, flops=2 * layer.tokens * d * layer.experts, bytes=(layer.tokens + layer.experts) * d * b),
        "route": Part(hw, bytes=layer.tokens * layer.experts * 4 * 2),
        # count and scatter pass over the pairs; the scan reads every block's counts twice, alone
        "align": Part(hw, bytes=layer.rows * 4 * 5, serial_bytes=2 * blocks * layer.experts * 4 * 2, launches=3),
    }
    if fp8:  # x per token and each weight, every call; rowwise also the down projection's input
        elements = layer.experts / world * d * (up + n) + layer.tokens * d + (rows * n if recipe == "rowwise" else 0)
        parts["quantize"] = Part(hw, bytes=elements * (b + 1), launches=3 if recipe == "rowwise" else 2)
    parts["up"] = _gemm(hw, rows, d, up, touched, b, recipe)
    parts["down"] = _gemm(hw, rows, n, d, touched, b, recipe)
    parts["combine"] = Part(hw, bytes=layer.rows * (d * b + 8) + layer.tokens * d * b)
    if world > 1:  # the rows for other ranks' experts, there and back (read and written locally too)
        remote = layer.rows * (world - 1) / world * skew * d * b
        parts["dispatch"] = Part(hw, link_bytes=remote, bytes=2 * remote, launches=2)
        parts["return"] = Part(hw, link_bytes=remote, bytes=2 * remote)
    if backward:
        for name in [name for name in parts if name != "align"]:
            forward = parts[name]
            # twice the forward's work: the input's gradient and the weights' (GEMMs: dX and dW)
            parts[f"{name} backward"] = dataclasses.replace(
                forward, flops=2 * forward.flops, bytes=2 * forward.bytes, launches=2 * forward.launches,
                efficiency=forward.efficiency * (BACKWARD_EFFICIENCY if forward.flops else 1.0))
        if fp8:  # the weight gradients' operands, quantized by expert segment: gathered x, act(H), dY, dH
            parts["quantize backward"] = dataclasses.replace(
                parts["quantize backward"], bytes=parts["quantize backward"].bytes + rows * (2 * d + up + n) * (b + 1))
    return parts


def total_ms(parts: dict[str, Part]) -> float:
    return sum(part.ms for part in parts.values())

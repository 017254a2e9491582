"""The cost model: the bounds it names in each regime, how skew, expert parallelism and FP8 move
it, and its error against the H100 kernel timings committed in benchmarks/results/."""

import json
import os
import statistics

import pytest

from inductor_moe import perf_model as pm

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
LARGE = pm.Layer(tokens=32768, hidden=4096, inner=1024, experts=64, top_k=4)


def test_bounds_follow_the_regime():
    """Many tokens: the GEMMs are compute-bound, the combine memory-bound. One token (decode): the
    GEMMs read the weights of its k experts and are memory-bound. Expert parallelism over a slow
    link: the exchanges are link-bound."""
    large = pm.predict(LARGE, pm.H100)
    assert (large["up"].bound, large["down"].bound, large["combine"].bound) == ("compute", "compute", "memory")
    decode = pm.predict(pm.Layer(1, 4096, 1024, 64, 4), pm.H100)
    assert decode["up"].bound == decode["down"].bound == "memory"
    # one token reads its 4 experts' weights, not all 64
    assert decode["up"].bytes == pytest.approx(4 * 4096 * 2048 * 2, rel=0.01)
    slow_link = pm.Hardware("test", 700.0, 1400.0, 3000.0, link_gbps=25.0, launch_us=4.0, program_gbps=25.0)
    ep = pm.predict(LARGE, slow_link, world=8)
    assert ep["dispatch"].bound == ep["return"].bound == "link"


def test_skew_and_world_size_move_the_busiest_rank():
    even = pm.predict(LARGE, pm.H100, world=8)
    skewed = pm.predict(LARGE, pm.H100, world=8, skew=2.0)
    for part in ("up", "down", "dispatch", "return"):
        assert skewed[part].ms > 1.5 * even[part].ms, part
    assert "dispatch" not in pm.predict(LARGE, pm.H100)  # one rank: nothing to exchange
    # the exchanged rows: the pairs whose expert lives elsewhere, (world - 1) / world of them
    assert even["dispatch"].link_bytes == pytest.approx(LARGE.rows * 7 / 8 * 4096 * 2)


def test_training_and_fp8_add_their_parts():
    training = pm.predict(LARGE, pm.H100, backward=True)
    assert pm.total_ms(training) > 2.5 * pm.total_ms(pm.predict(LARGE, pm.H100))
    rowwise = pm.predict(LARGE, pm.H100, recipe="rowwise")
    mx = pm.predict(LARGE, pm.H100, recipe="mxfp8")
    bf16 = pm.predict(LARGE, pm.H100)
    assert rowwise["up"].ms < 0.6 * bf16["up"].ms < mx["up"].ms  # e4m3 MMAs; MX dequantizes to bf16
    assert "quantize" in rowwise and "quantize" not in bf16


def test_explains_the_h100_kernels():
    """Against the committed H100 timings of the GEMMs and the combine at the large shapes (T of
    8192 and more): the model's error stays within a quarter, its median within a tenth."""
    with open(os.path.join(RESULTS, "h100_kernels.json")) as f:
        rows = json.load(f)["rows"]
    parts = {"up projection + SwiGLU": "up", "down projection": "down", "unpermute-reduce": "combine"}
    errors = []
    for row in rows:
        if row["benchmark"] in parts and row["impl"].startswith("inductor_moe") and row["shape"]["T"] >= 8192:
            shape = row["shape"]
            layer = pm.Layer(shape["T"], shape["d"], shape["n"], shape["E"], shape["K"])
            predicted = pm.predict(layer, pm.H100)[parts[row["benchmark"]]].ms
            errors.append(abs(predicted - row["median_ms"]) / row["median_ms"])
    assert len(errors) == 12
    assert max(errors) < 0.25 and statistics.median(errors) < 0.1, errors

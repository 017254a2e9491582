"""The CUDA lowering, read from the code Inductor generates for an H100 on this CPU-only machine.

``cuda_codegen.py`` (run once, in a subprocess without Triton's interpreter) compiles each case of
``cuda_codegen.cases()`` through Inductor for a fake sm_90 device and compiles every Triton kernel
of the output for sm_90 with Triton's bundled ptxas. The tests read what it wrote: every canonical
op is our Triton kernels in the output code (no extern call of the op, no host sync), forward and
backward, every FP8 recipe; under max-autotune the grouped GEMMs are timed against
``torch._grouped_mm``; the token count stays symbolic (one graph for every count); CUDA graphs can
capture every graph.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)

# kernels of inductor_moe.kernels that each graph must launch (names as Inductor numbers them: _<n>)
ROUTE_AND_ALIGN = {"_route_kernel", "_count_kernel", "_scan_kernel", "_scatter_kernel", "_tile_starts_kernel"}
FORWARD = ROUTE_AND_ALIGN | {"_gemm_kernel", "_unpermute_reduce_kernel"}
BACKWARD = {"_route_backward_kernel", "_count_kernel", "_scan_kernel", "_scatter_kernel", "_gemm_act_backward_kernel",
            "_weight_grad_kernel", "_gemm_kernel", "_unpermute_reduce_kernel"}
FP8_FORWARD = FORWARD | {"_quantize_kernel"}
FP8_BACKWARD = BACKWARD | {"_quantize_kernel", "_quantize_segments_kernel"}
EXPECTED = {
    "inference": [FORWARD],
    "training": [FORWARD, BACKWARD],
    "fp8_rowwise": [FP8_FORWARD, FP8_BACKWARD],
    "fp8_blockwise": [FP8_FORWARD, FP8_BACKWARD],
    "fp8_mxfp8": [FP8_FORWARD, FP8_BACKWARD],
    "max_autotune": [FORWARD],
    "max_autotune_vendor": [ROUTE_AND_ALIGN - {"_tile_starts_kernel"} | {"_unpermute_reduce_kernel"}],
    "max_autotune_training": [FORWARD, BACKWARD],
    "deepseek_v3": [FORWARD],
    "gpt_oss": [FORWARD, BACKWARD],
}
# what would stop the GPU for the host: reading a value back, a data-dependent shape
HOST_SYNC = re.compile(r"\.item\(\)|\.cpu\(\)|\.tolist\(\)|synchronize\(|_local_scalar_dense|nonzero|\.to\(['\"]?cpu")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "cases.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_codegen.py"), str(path)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-6000:]
    return json.loads(path.read_text())


def launched(code: str) -> set[str]:
    """Our kernels the output code's call() launches (Inductor's own are named triton_*)."""
    call = code[code.index("def call("):]
    return set(re.findall(r"^\s+(_\w+_kernel)_\d+\.run\(", call, re.M))


def constants(code: str, kernel: str) -> list[dict]:
    """The constexpr values of each definition of ``kernel`` in the output code."""
    return [eval(found, {"triton": __import__("triton")}) for found in re.findall(  # noqa: S307 (Inductor's own repr)
        rf"'kernel_name': '{kernel}_\d+'.*?'constants': (\{{.*?\}}), 'configs'", code, re.S)]


@pytest.mark.parametrize("case", EXPECTED)
def test_every_op_is_our_triton_kernels(generated, case):
    graphs = generated[case]
    assert len(graphs) == len(EXPECTED[case]), f"{case}: {len(graphs)} graphs compiled (one more: a recompile)"
    for graph, kernels in zip(graphs, EXPECTED[case]):
        code = graph["code"]
        assert kernels <= launched(code), f"{case}: missing {kernels - launched(code)}"
        assert "torch.ops.inductor_moe" not in code, f"{case}: a canonical op stayed an extern call"
        assert not HOST_SYNC.search(code[code.index("def call("):]), f"{case}: host sync {HOST_SYNC.search(code)}"


@pytest.mark.parametrize("case", EXPECTED)
def test_token_count_stays_symbolic(generated, case):
    """One graph serves 20, 33 and 257 tokens: buffers and grids are expressions of the count."""
    code = generated[case][0]["code"]
    call = code[code.index("def call("):]
    launch = re.search(r"_unpermute_reduce_kernel_\d+\.run\(.*\)", call).group()
    assert re.search(r"\bs\d+\b", launch), f"{case}: the combine's launch does not depend on the token count: {launch}"


@pytest.mark.parametrize("case", EXPECTED)
def test_cuda_graphs_can_capture_every_graph(generated, case):
    assert [graph["cudagraph_blocker"] for graph in generated[case]] == [None] * len(generated[case])


@pytest.mark.parametrize("case", EXPECTED)
def test_every_kernel_compiles_for_sm90(generated, case):
    for graph in generated[case]:
        assert graph["sm90_errors"], f"{case}: no kernel was compiled"
        failed = {name: error for name, error in graph["sm90_errors"].items() if error}
        assert not failed, f"{case}: {failed}"


def test_inference_does_not_store_h(generated):
    """Nothing reads h in inference: the up projection's epilogue skips storing it; training stores it."""
    inference = constants(generated["inference"][0]["code"], "_gemm_kernel")
    training = constants(generated["training"][0]["code"], "_gemm_kernel")
    assert [c["STORE_H"] for c in inference] == [False, False]
    assert sorted(c["STORE_H"] for c in training) == [False, True]


@pytest.mark.parametrize("recipe, mode", [("rowwise", 1), ("blockwise", 2), ("mxfp8", 3)])
def test_fp8_gemms_take_e4m3_operands(generated, recipe, mode):
    forward, backward = (graph["code"] for graph in generated[f"fp8_{recipe}"])
    assert [c["FP8"] for c in constants(forward, "_gemm_kernel")] == [mode, mode]
    assert {c["FP8"] for c in constants(backward, "_gemm_act_backward_kernel")} == {mode}
    assert {c["FP8"] for c in constants(backward, "_weight_grad_kernel")} == {mode}


def test_group_limited_routing_in_the_kernel(generated):
    """DeepSeek-V3's sigmoid, bias-corrected, group-limited router is the route kernel's constants."""
    (route,) = constants(generated["deepseek_v3"][0]["code"], "_route_kernel")
    assert route["SIGMOID"] and route["HAS_BIAS"] and route["N_GROUP"] > 1


def _grouped_mm_choices(graph) -> list[list[str]]:
    """Each grouped_mm selection's choices, by kind: _kernel, _vendor or fallback."""
    return [[re.search(r"__(kernel|vendor)_|(fallback)", name).group(1, 2)[0] or "fallback" for name in names]
            for names in graph["autotuned"] if any("grouped_mm" in name for name in names)]


def test_max_autotune_times_our_kernel_against_grouped_mm(generated):
    """Under max-autotune each grouped GEMM without bias or FP8 is a choice: our kernel,
    torch._grouped_mm, the op's extern call. In inference both projections; in training the down
    projection (the up projection stores its pre-activation for the backward: our kernel)."""
    (inference,) = generated["max_autotune"]
    assert _grouped_mm_choices(inference) == [["kernel", "vendor", "fallback"]] * 2
    assert len(re.findall(r"_gemm_kernel_\d+\.run\(", inference["code"])) == 2  # our kernel won: inlined
    forward, backward = generated["max_autotune_training"]
    assert _grouped_mm_choices(forward) == [["kernel", "vendor", "fallback"]]
    assert _grouped_mm_choices(backward) == []


def test_max_autotune_can_pick_grouped_mm(generated):
    (graph,) = generated["max_autotune_vendor"]
    call = graph["code"][graph["code"].index("def call("):]
    assert len(re.findall(r"extern_kernels\._grouped_mm\(", call)) == 2
    assert not re.findall(r"_gemm_kernel_\d+\.run\(", call)


# --- on a GPU: the same lowering run -------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the generated code: needs a GPU")


@needs_gpu
def test_compiled_on_the_gpu_matches_eager():
    """The traced kernels run: compiled forward and gradients match eager for three token counts,
    one graph for all (counted by the plugin's rewrites: a recompile rewrites again)."""
    from helpers import assert_matches_eager

    from inductor_moe import models

    cfg = models.MoEConfig(hidden=256, intermediate=128, num_experts=8, top_k=2)
    model = models.build("dense_loop", cfg).to("cuda", torch.bfloat16)
    compiled = torch.compile(model, dynamic=True)
    for tokens in (20, 33, 257):
        assert_matches_eager(model, compiled, torch.randn(tokens, cfg.hidden, device="cuda", dtype=torch.bfloat16))
    assert torch._dynamo.utils.counters["inductor_moe"]["dense_loop_experts"] == 1


@needs_gpu
def test_max_autotune_on_the_gpu_matches_eager():
    """Whichever grouped GEMM choices Inductor times fastest, inference and training match eager."""
    from helpers import assert_matches_eager

    from inductor_moe import models

    cfg = models.MoEConfig(hidden=256, intermediate=128, num_experts=8, top_k=2)
    model = models.build("dense_loop", cfg).to("cuda", torch.bfloat16)
    compiled = torch.compile(model, mode="max-autotune-no-cudagraphs")
    x = torch.randn(300, cfg.hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=3e-2, rtol=3e-2)
    assert_matches_eager(model, compiled, x)


@needs_gpu
@pytest.mark.parametrize("recipe", ["rowwise", "blockwise", "mxfp8"])
def test_compiled_fp8_on_the_gpu_keeps_its_accuracy(recipe):
    """The traced FP8 kernels hold the recipes' accuracy bars (tests/test_fp8.py's) against float32."""
    from inductor_moe import accuracy, models

    cfg = models.MoEConfig(hidden=256, intermediate=128, num_experts=8, top_k=2)
    model = models.build("dense_loop", cfg).to("cuda")
    result = accuracy.block_sqnr(model, torch.randn(300, cfg.hidden, device="cuda"), recipe)
    assert result["out"] >= 20.0 and result["grad_x"] >= 20.0, result


@needs_gpu
def test_cuda_graph_replays_the_compiled_block():
    """mode="reduce-overhead": the compiled block is captured into a CUDA graph and replayed with
    new inputs, matching eager each time."""
    from inductor_moe import models

    cfg = models.MoEConfig(hidden=256, intermediate=128, num_experts=8, top_k=2)
    model = models.build("dense_loop", cfg).to("cuda", torch.bfloat16)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(64, cfg.hidden, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x).clone(), model(x), atol=3e-2, rtol=3e-2)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0

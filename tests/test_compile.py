"""torch.compile with the plugin against eager: forward and every gradient, shapes, dynamic token
counts, and the plugin's switches (enabled, disabled patterns, caches, a user's own pass)."""

import pytest
import torch
from helpers import assert_close, assert_matches_eager, rewrites
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import inductor_moe
from inductor_moe import models

STYLES = {  # style -> its pattern, and the dtypes stock torch.compile can trace it in
    "sorted_grouped_mm": ("sorted_grouped_mm_experts", [torch.bfloat16]),  # _grouped_mm: bf16 only
    "dense_loop": ("dense_loop_experts", [torch.float32, torch.bfloat16]),
    "masked_loop": ("masked_loop_experts", [torch.float32, torch.bfloat16]),
    "transformers_grouped_mm": ("sorted_grouped_mm_experts", [torch.float32, torch.bfloat16]),
    "transformers_batched_mm": ("gathered_bmm_experts", [torch.float32, torch.bfloat16]),
}
CASES = [(style, dtype) for style, (_, dtypes) in STYLES.items() for dtype in dtypes]

SHAPES = {  # name -> (config, tokens)
    "mixtral-like": (models.MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2), 24),
    "one token": (models.MoEConfig(hidden=64, intermediate=32, num_experts=4, top_k=2), 1),
    "k=1, idle experts": (models.MoEConfig(hidden=32, intermediate=16, num_experts=16, top_k=1), 5),
    "E=32, k=4, bias, gelu": (
        models.MoEConfig(hidden=32, intermediate=24, num_experts=32, top_k=4, bias=True, activation="gelu"), 40),
    "odd sizes, no renorm": (
        models.MoEConfig(hidden=36, intermediate=20, num_experts=6, top_k=3, renormalize=False), 17),
}


def applicable(style, dtype, cfg) -> bool:
    """The Mixtral block has no biases, SwiGLU only and always renormalises; eager
    torch._grouped_mm in bf16 needs rows of a multiple of 16 bytes."""
    if style.startswith("transformers_") and (cfg.bias or cfg.activation != "swiglu" or not cfg.renormalize):
        return False
    return not ("grouped_mm" in style and dtype == torch.bfloat16 and (cfg.hidden % 8 or cfg.intermediate % 8))


def inputs(style, cfg, tokens, dtype):
    x = torch.randn(tokens, cfg.hidden, dtype=dtype)
    return x.view(1, tokens, -1) if style.startswith("transformers_") else x


COMPILE_CASES = [
    (style, dtype, shape) for style, dtype in CASES for shape, (cfg, _) in SHAPES.items() if applicable(style, dtype, cfg)
]


@pytest.mark.parametrize("style, dtype, shape", COMPILE_CASES, ids=[f"{s}-{str(d)[6:]}-{c}" for s, d, c in COMPILE_CASES])
def test_compiled_matches_eager(style, dtype, shape):
    cfg, tokens = SHAPES[shape]
    model = models.build(style, cfg).to(dtype)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, dynamic=False)
        assert_matches_eager(model, compiled, inputs(style, cfg, tokens, dtype))
    assert rewrites().get(STYLES[style][0], 0) >= 1, rewrites()


def test_no_recompile_when_only_the_token_count_changes():
    cfg = models.MoEConfig(num_experts=8, top_k=2)
    model = models.DenseLoop(cfg)
    compiled = torch.compile(model, dynamic=True)
    for tokens in (8, 13, 40, 3):
        x = torch.randn(tokens, cfg.hidden)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert rewrites() == {"dense_loop_experts": 1, "router": 1}


def test_mark_dynamic_token_count_with_training():
    cfg = models.MoEConfig(num_experts=8, top_k=2)
    model = models.SortedGroupedMM(cfg).bfloat16()
    compiled = torch.compile(model)
    for tokens in (16, 24, 9):
        x = torch.randn(tokens, cfg.hidden, dtype=torch.bfloat16, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x).sum().backward()
        expected = x.detach().requires_grad_()
        model(expected).sum().backward()
        assert_close(x.grad, expected.grad, torch.bfloat16, "grad of x")
    assert counters["stats"]["unique_graphs"] == 1
    assert rewrites() == {"sorted_grouped_mm_experts": 1, "router": 1}


def test_disabled_plugin_is_stock_torch_compile():
    model = models.DenseLoop(models.MoEConfig())
    x = torch.randn(8, 64)
    with inductor_moe.config.patch(enabled=False):
        _, (code,) = run_and_get_code(torch.compile(model), x)
    assert rewrites() == {} and "inductor_moe" not in code


def test_disabled_patterns_knob():
    model = models.DenseLoop(models.MoEConfig())
    with inductor_moe.config.patch(disabled_patterns=["dense_loop_experts"]):
        torch.compile(model)(torch.randn(8, 64))
    assert rewrites() == {"router": 1}


def test_switching_enabled_never_serves_the_other_settings_code(tmp_path, monkeypatch):
    """With Inductor's caches on, each setting compiles (or loads) its own code."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(8, 64)

    def compiled_code(enabled):
        torch._dynamo.reset()
        with inductor_moe.config.patch(enabled=enabled), torch.no_grad():
            _, (code,) = run_and_get_code(torch.compile(models.DenseLoop(models.MoEConfig())), x)
        return code

    with torch._inductor.config.patch(force_disable_caches=False, fx_graph_cache=True):
        for enabled in (True, False, True, False):
            code = compiled_code(enabled)
            assert ("torch.ops.inductor_moe.experts" in code) == enabled, f"enabled={enabled}"
        assert counters["inductor"]["fxgraph_cache_hit"] >= 2


def test_uuid_follows_config():
    graph_pass = torch._inductor.config.pre_grad_custom_pass
    uuid = graph_pass.uuid()
    with inductor_moe.config.patch(enabled=False):
        assert graph_pass.uuid() != uuid
    with inductor_moe.config.patch(disabled_patterns=["masked_loop_experts"]):
        assert graph_pass.uuid() != uuid
    assert graph_pass.uuid() == uuid


class CountingPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        CountingPass.calls += 1

    def uuid(self):
        return "counting-pass"


def test_a_users_pre_grad_pass_keeps_running():
    ours = torch._inductor.config.pre_grad_custom_pass
    try:
        torch._inductor.config.pre_grad_custom_pass = CountingPass()  # a user replaces the setting
        inductor_moe.install()  # and chains ours back on
        chained = torch._inductor.config.pre_grad_custom_pass
        assert "counting-pass" in repr(chained.uuid())
        torch.compile(models.DenseLoop(models.MoEConfig()))(torch.randn(8, 64))
        assert CountingPass.calls == 1 and rewrites()["dense_loop_experts"] == 1
        inductor_moe.install()  # idempotent
        assert torch._inductor.config.pre_grad_custom_pass is chained
    finally:
        torch._inductor.config.pre_grad_custom_pass = ours


def saved_shapes(fn, *args) -> list:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fn(*args)
    return saved


def test_training_keeps_no_gathered_rows_or_activations():
    """Saved for backward: inputs, the first projection's output, routing metadata. Not the
    gathered copies of x [T*k, H] nor the activation [T*k, I]: the backward recomputes them."""
    cfg = models.MoEConfig(hidden=48, intermediate=16, num_experts=4, top_k=2)  # H, I, 2I all differ
    model = models.SortedGroupedMM(cfg).bfloat16()
    x = torch.randn(24, cfg.hidden, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_shapes(torch.compile(model), x)
    pairs = 24 * cfg.top_k
    assert (pairs, 2 * cfg.intermediate) in saved
    assert (pairs, cfg.hidden) not in saved and (pairs, cfg.intermediate) not in saved, saved


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_cpu_output_code_has_grouped_gemms_and_no_host_sync(mode):
    """bf16 on CPU: the ops become Inductor's C++ around extern torch._grouped_mm calls; the
    torch.where loop's nonzero is gone. No .item()/.tolist() anywhere in the compiled code."""
    model = models.MaskedLoop(models.MoEConfig()).bfloat16()
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out, (code,) = run_and_get_code(torch.compile(model, mode=None if mode == "default" else mode), x)
        expected = model(x)
    assert code.count("extern_kernels._grouped_mm(") == 2, code
    for sync in ("nonzero", ".item()", ".tolist()", "inductor_moe.experts.default("):
        assert sync not in code, sync
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_cpu_output_code_calls_the_op_where_grouped_mm_cannot_compile():
    """float32 on CPU (torch._grouped_mm compiles for bf16 only): one extern call of the op."""
    model = models.DenseLoop(models.MoEConfig())
    with torch.no_grad():
        _, (code,) = run_and_get_code(torch.compile(model), torch.randn(16, 64))
    assert code.count("torch.ops.inductor_moe.experts.default(") == 1, code
    assert "_grouped_mm" not in code and "nonzero" not in code

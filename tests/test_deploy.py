"""Deployment: ``inductor_moe.export`` (torch.export with the blocks rewritten, the token dimension
dynamic) run eagerly against the model; AOTInductor packages of it loaded and run in a fresh
process that never imports inductor_moe (bfloat16 blocks lower to C++), and float32 blocks, whose
ops stay calls that the loading process must register."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close, rewrites
from torch.export import Dim

import inductor_moe
from inductor_moe import models

CFG = models.MoEConfig(hidden=32, intermediate=16, num_experts=4, top_k=2)
TOKENS = Dim("tokens", min=1, max=4096)


def _model(style: str, dtype: torch.dtype):
    """(model, example input, dynamic shapes): a block over [T, H] tokens, a transformers block over
    [1, T, H] hidden states, or a tiny transformers causal LM over [1, T] token ids."""
    if style.endswith("_causal_lm"):
        model = models.transformers_model(style.removesuffix("_causal_lm"), "grouped_mm", CFG, num_layers=1)
        model.config.use_cache = False
        return model.eval().to(dtype), torch.randint(0, 64, (1, 9)), ({1: Dim("seq", min=2, max=64)},)
    model = models.build(style, CFG).eval().to(dtype)
    if style.startswith(tuple(models.FAMILIES)):
        return model, torch.randn(1, 9, CFG.hidden, dtype=dtype), ({1: TOKENS},)
    return model, torch.randn(9, CFG.hidden, dtype=dtype), ({0: TOKENS},)


def _other_lengths(x: torch.Tensor, dim: int) -> list:
    """Inputs of other token counts than the example's (one token included, where allowed)."""
    lengths = (2, 17) if x.dtype == torch.long else (1, 17)
    shape = list(x.shape)
    inputs = []
    for n in lengths:
        shape[dim] = n
        inputs.append(torch.randint(0, 64, shape) if x.dtype == torch.long else torch.randn(shape, dtype=x.dtype))
    return inputs


def _main(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def _canonical_ops(program) -> set:
    return {str(n.target) for n in program.graph.nodes if str(n.target).startswith("inductor_moe.")}


@pytest.mark.parametrize("style, dtype, rewritten", [
    ("dense_loop", torch.float32, "dense_loop_experts"),
    ("masked_loop", torch.float32, "masked_loop_experts"),
    ("sorted_grouped_mm", torch.bfloat16, "sorted_grouped_mm_experts"),
    ("qwen3_moe_grouped_mm", torch.bfloat16, "sorted_grouped_mm_experts"),
    ("mixtral_causal_lm", torch.bfloat16, "sorted_grouped_mm_experts"),
])
def test_exported_program_is_rewritten_and_matches_eager(style, dtype, rewritten):
    model, x, dynamic = _model(style, dtype)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # the masked loop's where()
        program = inductor_moe.export(model, (x,), dynamic_shapes=dynamic)
    assert rewrites() == {rewritten: 1, "router": 1}
    assert _canonical_ops(program) == {"inductor_moe.experts.default", "inductor_moe.route.default"}
    assert program.state_dict.keys() == model.state_dict().keys()  # the model's names, not dynamo's
    for tokens in _other_lengths(x, dim=next(iter(dynamic[0]))):  # one program, any token count
        assert_close(_main(program.module()(tokens)), _main(model(tokens)), dtype, f"{style}, {tuple(tokens.shape)}")


def test_export_when_disabled_is_torch_export():
    model, x, dynamic = _model("dense_loop", torch.float32)
    with inductor_moe.config.patch(enabled=False):
        program = inductor_moe.export(model, (x,), dynamic_shapes=dynamic)
    assert _canonical_ops(program) == set() and rewrites() == {}


_LOAD = """
import sys, torch
{imports}
package = torch._inductor.aoti_load_package(sys.argv[1])
inputs = torch.load(sys.argv[2])
assert ("inductor_moe" in sys.modules) == {needs_ops}, "the package must run without inductor_moe"
outputs = [package(x) for x in inputs]
torch.save([o.logits if hasattr(o, "logits") else o[0] if isinstance(o, (tuple, list)) else o for o in outputs], sys.argv[3])
"""


def _load_and_run(path, inputs: list, tmp_path, needs_ops: bool) -> subprocess.CompletedProcess:
    """Run the package on ``inputs`` in a fresh Python (importing inductor_moe only if ``needs_ops``;
    transformers' output classes, which the package's output spec names, always)."""
    imports = "import transformers.modeling_outputs" + ("; import inductor_moe" if needs_ops else "")
    script = _LOAD.format(imports=imports, needs_ops=needs_ops)
    torch.save(inputs, tmp_path / "inputs.pt")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=300)


# torch 2.11's AOTInductor has no C shim for torch._grouped_mm, and its packages' calls of Python
# custom ops return nothing: packages need torch >= 2.12
needs_aoti = pytest.mark.skipif(torch.__version__ < "2.12", reason="AOTInductor packages need torch >= 2.12")


def _package(style: str, dtype: torch.dtype, tmp_path):
    model, x, dynamic = _model(style, dtype)
    program = inductor_moe.export(model, (x,), dynamic_shapes=dynamic)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / f"{style}.pt2"))
    return model, _other_lengths(x, dim=next(iter(dynamic[0]))), path


@needs_aoti
@pytest.mark.parametrize("style", ["sorted_grouped_mm", "dense_loop", "mixtral_causal_lm"])
def test_aoti_package_runs_without_inductor_moe(style, tmp_path):
    model, inputs, path = _package(style, torch.bfloat16, tmp_path)
    run = _load_and_run(path, inputs, tmp_path, needs_ops=False)
    assert run.returncode == 0, run.stderr[-3000:]
    for x, out in zip(inputs, torch.load(tmp_path / "outputs.pt"), strict=True):
        assert_close(out, _main(model(x)), torch.bfloat16, f"{style}, {tuple(x.shape)}")


@needs_aoti
def test_aoti_float32_package_needs_the_ops_registered(tmp_path):
    """float32 blocks stay calls of the ops (torch._grouped_mm compiles in bfloat16 only on CPU):
    the loading process imports inductor_moe, and a clear error says so where it does not."""
    model, inputs, path = _package("dense_loop", torch.float32, tmp_path)
    without = _load_and_run(path, inputs, tmp_path, needs_ops=False)
    assert without.returncode != 0 and "inductor_moe::" in without.stderr, without.stderr[-3000:]
    run = _load_and_run(path, inputs, tmp_path, needs_ops=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for x, out in zip(inputs, torch.load(tmp_path / "outputs.pt"), strict=True):
        assert_close(out, _main(model(x)), torch.float32, f"float32, {tuple(x.shape)}")

"""ExecuTorch: a model's rewritten blocks, decomposed by ``inductor_moe.for_executorch`` (float, or
weight-only int8 / int4 experts), lowered with the XNNPACK partitioner, run by ExecuTorch's runtime
against eager (the ``executorch`` extra)."""

import pytest
import torch
from helpers import assert_close, rewrites
from torch.export import Dim

import inductor_moe
from inductor_moe import models

pytest.importorskip("executorch.runtime", reason="the executorch extra (see the README)")
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: E402
from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower  # noqa: E402
from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass  # noqa: E402
from executorch.runtime import Runtime  # noqa: E402

CFG = models.MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2)


def _run_on_executorch(program, *inputs: torch.Tensor) -> list:
    """The program's output for each input, by ExecuTorch's runtime (memory planned for the
    largest token count the program allows)."""
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    buffer = lowered.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())).buffer
    method = Runtime.get().load_program(buffer).load_method("forward")
    return [method.execute([x])[0] for x in inputs]


@pytest.mark.parametrize("style", ["dense_loop", "masked_loop"])
def test_rewritten_block_runs_on_executorch(style):
    """One program for every token count up to 64."""
    model = models.build(style, CFG).eval()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        program = inductor_moe.export(model, (torch.randn(9, CFG.hidden),), dynamic_shapes=({0: Dim("tokens", max=64)},))
    assert rewrites() == {f"{style}_experts": 1, "router": 1}
    inputs = [torch.randn(tokens, CFG.hidden) for tokens in (9, 1, 33)]
    for x, out in zip(inputs, _run_on_executorch(inductor_moe.for_executorch(program), *inputs), strict=True):
        assert_close(out, model(x), torch.float32, f"{style}, {x.shape[0]} tokens")


@pytest.mark.parametrize("expert_weights, error", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_expert_weights(expert_weights, error):
    """Weight-only int8 / int4 experts: the .pte is smaller, computes what the quantized program
    computes in PyTorch, and stays near the float model (int4: 32-row groups, ~12% on random
    weights, which int4 rounds by a quarter of their spread)."""
    model = models.build("dense_loop", CFG).eval()
    x = torch.randn(9, CFG.hidden)
    program = inductor_moe.export(model, (x,))
    quantized = inductor_moe.for_executorch(program, expert_weights=expert_weights)
    sizes = [len(to_edge_transform_and_lower(p, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
             for p in (inductor_moe.for_executorch(program), quantized)]
    expert_bytes = 3 * CFG.num_experts * CFG.hidden * CFG.intermediate * 4
    saved = expert_bytes * (1 - {"int8": 1 / 4, "int4": 1 / 8}[expert_weights])
    assert sizes[0] - sizes[1] > 0.9 * saved, sizes
    (out,) = _run_on_executorch(quantized, x)
    assert_close(out, quantized.module()(x), torch.float32, expert_weights)
    expected = model(x)
    assert (out - expected).norm() < error * expected.norm()


def test_bad_expert_weights_option():
    program = inductor_moe.export(models.build("dense_loop", CFG).eval(), (torch.randn(3, CFG.hidden),))
    with pytest.raises(ValueError, match="expert_weights must be None, 'int8' or 'int4'"):
        inductor_moe.for_executorch(program, expert_weights="int3")


def test_training_program_is_refused():
    model = models.build("dense_loop", CFG)
    program = torch.export.export(_Saving(model), (torch.randn(4, CFG.hidden),))
    with pytest.raises(ValueError, match="reads more of the experts op than its output"):
        inductor_moe.for_executorch(program)


class _Saving(torch.nn.Module):
    """The experts op with its saved first projection read, as a training graph would."""

    def __init__(self, model):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(CFG.num_experts, CFG.hidden, 2 * CFG.intermediate))
        self.w2 = torch.nn.Parameter(torch.randn(CFG.num_experts, CFG.intermediate, CFG.hidden))

    def forward(self, x):
        ids = torch.zeros(x.shape[0], 2, dtype=torch.int64)
        ids[:, 1] = 1
        weights = torch.full((x.shape[0], 2), 0.5)
        out, h, _, _ = torch.ops.inductor_moe.experts(x, ids, weights, self.w1, self.w2, None, None, "swiglu")
        return out, h

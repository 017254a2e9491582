"""Every transformers MoE family, found without being named: each MoE block with the
``grouped_mm``, ``batched_mm`` and default ``eager`` experts implementations, and a 2-layer
``...ForCausalLM``, rewritten into the canonical ops and matching eager forward and gradients.

The rewritten block graphs live in tests/expected/ (``EXPECTTEST_ACCEPT=1`` records them).
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import assert_expected_file, assert_matches_eager, rewrites, rewritten_code

import inductor_moe
from inductor_moe import models

pytest.importorskip("transformers", reason="the families are transformers' own code")

FAMILIES = list(models.FAMILIES)
IMPLEMENTATIONS = {  # experts implementation -> the pattern that finds it
    "grouped_mm": "sorted_grouped_mm_experts",
    "batched_mm": "gathered_bmm_experts",
    "eager": "sorted_grouped_mm_experts",  # traced as grouped_mm (config.transformers_eager_experts)
}
CFG = models.MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_block_is_rewritten_and_matches_eager(family, implementation):
    model = models.transformers_model(family, implementation, CFG).bfloat16()
    assert_matches_eager(model, torch.compile(model), torch.randn(2, 9, CFG.hidden, dtype=torch.bfloat16))
    assert rewrites() == {"router": 1, IMPLEMENTATIONS[implementation]: 1}


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rewritten_block_graph(family, implementation):
    model = models.transformers_model(family, implementation, CFG).bfloat16()
    code = rewritten_code(model, torch.randn(2, 5, CFG.hidden, dtype=torch.bfloat16))
    assert_expected_file(f"{family}_{implementation}", code)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_layer_causal_lm_is_rewritten_and_matches_eager(family):
    # float32: in bf16 the second layer's router sees the first layer's rounding, and a top-k tie
    # flipped by it changes the output by far more than any tolerance (eager vs stock compile too)
    model = models.transformers_model(family, "grouped_mm", CFG, num_layers=2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 7))
    assert_matches_eager(model, torch.compile(model), tokens)
    assert rewrites() == {"router": 2, "sorted_grouped_mm_experts": 2}


def test_eager_experts_are_left_to_graph_break_when_switched_off():
    model = models.transformers_model("mixtral", "eager", CFG)
    with inductor_moe.config.patch(transformers_eager_experts=None):
        report = inductor_moe.explain(model, torch.randn(1, 5, CFG.hidden))
    assert [d.pattern for d in report.rewritten] == ["router"]
    assert any("nonzero" in b.reason for b in report.graph_breaks), report.graph_breaks
    assert report.eager_experts == (("experts", "MixtralExperts"),)
    assert "experts_implementation='grouped_mm'" in str(report)


def test_eager_experts_keep_their_own_forward_outside_compile():
    import transformers.integrations.moe as moe

    def own_forward():
        pass

    assert moe.ALL_EXPERTS_FUNCTIONS.get_interface("eager", own_forward) is own_forward


@pytest.mark.parametrize("first", ["transformers", "inductor_moe"])
def test_dispatch_is_patched_whichever_is_imported_first(first):
    imports = ["import transformers.integrations.moe", "import inductor_moe"]
    code = "; ".join([*(imports if first == "transformers" else imports[::-1]),
                      "import transformers.integrations.moe as moe",
                      "print(moe.ExpertsInterface.get_interface.__module__)"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(pathlib.Path(inductor_moe.__file__).parents[1])})
    assert result.stdout.strip() == "inductor_moe.transformers_experts", result.stdout + result.stderr

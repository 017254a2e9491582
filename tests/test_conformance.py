"""The transformers families with routers or experts code of their own (models.MORE_FAMILIES):
each block compiled with the plugin matches eager, forward and every gradient, and is rewritten
or left alone exactly as the README's conformance table says, with the reason it gives.
"""

import pytest
import torch
from helpers import assert_expected_file, assert_matches_eager, rewritten_code

import inductor_moe
from inductor_moe import models

pytest.importorskip("transformers", reason="the families are transformers' own code")

CFG = models.MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2)

# family -> (what is rewritten, what is left alone: (pattern, words of the reason), words of a graph break's hint)
CONFORMANCE = {
    "cohere2_moe": ({"router": 1, "sorted_grouped_mm_experts": 1}, None, None),  # top-k, then sigmoid
    "deepseek_v2": ({"router": 1, "sorted_grouped_mm_experts": 1}, None, None),  # groups ranked by their best
    "longcat_flash": ({"router": 1, "sorted_grouped_mm_experts": 1}, None, None),  # [1, E] bias, identity experts
    "llama4": ({"router": 1, "dense_bmm_experts": 1}, None, None),  # every expert, inputs scaled
    "jetmoe": ({"router": 1, "sorted_grouped_mm_experts": 1}, None, None),  # a loop over rows split by counts
    "phimoe": ({"sorted_grouped_mm_experts": 1}, ("router", "not a top-k"), None),  # sparsemixer
    "dbrx": ({"router": 1}, None, "loop over range(num_experts)"),  # experts loop over nonzero()
    "switch_transformers": ({}, None, "loop over range(num_experts)"),  # and a capacity drops tokens
    "nllb_moe": ({}, None, "loop over range(num_experts)"),
}


@pytest.mark.parametrize("family", CONFORMANCE)
def test_family_is_rewritten_or_left_alone_with_its_reason(family):
    rewritten, left_alone, hint = CONFORMANCE[family]
    # eval(): no dropout, router jitter or sampled routing (Switch, NLLB-MoE, Phi-MoE), which eager
    # and compiled runs would draw differently
    model = models.transformers_model(family, "grouped_mm", CFG).eval()
    x = torch.randn(2, 9, CFG.hidden)
    # JetMoE's counts.tolist() and the nonzero() loops need these to stay in one graph at all
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        report = inductor_moe.explain(model, x)
        torch._dynamo.reset()
        assert_matches_eager(model, torch.compile(model), x)
    assert {d.pattern: sum(e.pattern == d.pattern for e in report.rewritten) for d in report.rewritten} == rewritten, report
    reasons = [(d.pattern, d.detail) for d in report.left_alone]
    if left_alone is None:
        assert reasons == [], report
    else:
        pattern, words = left_alone
        assert any(p == pattern and words in detail for p, detail in reasons), report
    assert (hint is None) == (not report.graph_breaks), report
    if hint is not None:
        assert any(hint in b.hint for b in report.graph_breaks), report


@pytest.mark.parametrize("family", [f for f, (rewritten, _, hint) in CONFORMANCE.items() if rewritten and hint is None])
def test_rewritten_family_graph(family):
    model = models.transformers_model(family, "grouped_mm", CFG).eval()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        code = rewritten_code(model, torch.randn(2, 5, CFG.hidden))
    assert_expected_file(family, code)

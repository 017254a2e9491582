"""What the user is told: ``inductor_moe.explain`` and the ``inductor_moe`` log under TORCH_LOGS."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from test_patterns import SMALL, MishSortedGroupedMM
from torch import nn

import inductor_moe
from inductor_moe import models


def test_explain_names_what_each_region_became():
    report = inductor_moe.explain(models.DenseLoop(SMALL), torch.randn(5, SMALL.hidden))
    assert sorted((d.pattern, d.detail) for d in report.rewritten) == [
        ("dense_loop_experts", "inductor_moe.experts(swiglu)"),
        ("router", "inductor_moe.route(k=2, renormalize=True)"),
    ]
    assert report.left_alone == [] and report.graph_breaks == () and report.graph_count == 1
    text = str(report)
    assert "rewritten (2):" in text and "-> inductor_moe.experts(swiglu)" in text, text


def test_explain_says_why_a_block_was_left_alone():
    report = inductor_moe.explain(MishSortedGroupedMM(SMALL).bfloat16(), torch.randn(5, SMALL.hidden).bfloat16())
    (left,) = report.left_alone
    assert left.pattern == "sorted_grouped_mm_experts" and "mish" in left.detail, left
    assert "models.py:" in left.where and "torch._grouped_mm(self.activate(h)" in left.where, left.where
    assert "because expert activation mish * getitem is not supported" in str(report), str(report)


def test_explain_reports_graph_breaks():
    class Printing(models.DenseLoop):
        def forward(self, x):
            out = super().forward(x)
            print("a side effect dynamo cannot trace")  # noqa: T201
            return out * 2

    report = inductor_moe.explain(Printing(SMALL), torch.randn(5, SMALL.hidden))
    assert len(report.graph_breaks) == 1 and "print" in report.graph_breaks[0].where, report.graph_breaks
    assert [d.pattern for d in report.rewritten].count("dense_loop_experts") == 1


def test_explain_without_moe_and_when_disabled():
    report = inductor_moe.explain(nn.Linear(4, 4), torch.randn(2, 4))
    assert report.decisions == () and "no MoE-like region" in str(report)
    with inductor_moe.config.patch(enabled=False):
        report = inductor_moe.explain(models.DenseLoop(SMALL), torch.randn(5, SMALL.hidden))
    assert report.decisions == () and "disabled" in str(report)


def test_torch_logs_turns_on_the_decision_log():
    code = (
        "import torch, inductor_moe; from inductor_moe import models;"
        "torch.compile(models.DenseLoop(models.MoEConfig()))(torch.randn(3, 64))"
    )
    env = {**os.environ, "TORCH_LOGS": "inductor_moe", "PYTHONPATH": str(pathlib.Path(inductor_moe.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("dense_loop_experts: rewrote the block ending at") == 1, result.stderr  # not twice
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env={k: v for k, v in env.items() if k != "TORCH_LOGS"})
    assert "rewrote the block" not in quiet.stderr, quiet.stderr


def test_explain_hints_at_what_keeps_known_moe_breaks_in_one_graph():
    pytest.importorskip("transformers", reason="JetMoE is transformers' own code")
    cfg = models.MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2)
    model = models.transformers_model("jetmoe", "grouped_mm", cfg).eval()
    with torch._dynamo.config.patch(capture_scalar_outputs=False):
        report = inductor_moe.explain(model, torch.randn(2, 5, cfg.hidden))
    assert any(".tolist()" in b.where and "capture_scalar_outputs = True" in b.hint for b in report.graph_breaks), report
    assert "hint: torch._dynamo.config.capture_scalar_outputs = True" in str(report)

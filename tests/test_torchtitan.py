"""torchtitan's MoE layer, found as it is written: token-choice router (softmax, or sigmoid with
the load-balancing bias and node-limited groups), expert-sorted rows, ``torch._grouped_mm``
experts and its scatter-add combine.

On CPU torchtitan's float32 autocast leaves the bf16 router gate in bf16 (CPU autocast has no
float32 policy), a softmax the plugin rightly leaves alone; so the experts are tested in bf16 and
the router in float32, each as torchtitan computes it on a GPU.
"""

import pytest
import torch
from helpers import assert_expected_file, assert_matches_eager, rewrites, rewritten_code
from torch import nn

from inductor_moe import models

pytest.importorskip("torchtitan.models.common.moe", reason="torchtitan (see the README's test command)")

CFG = models.MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2)
ROUTERS = {  # name -> torchtitan_moe options
    "softmax": {},
    "sigmoid, bias, groups, scale": {"scoring": "sigmoid", "groups": (4, 2), "scale": 2.5},
}


def test_moe_layer_experts_are_rewritten_and_match_eager():
    model = models.torchtitan_moe(CFG).bfloat16()
    assert_matches_eager(model, torch.compile(model), torch.randn(2, 9, CFG.hidden, dtype=torch.bfloat16))
    assert rewrites() == {"sorted_grouped_mm_experts": 1}


def test_rewritten_moe_layer_graph():
    model = models.torchtitan_moe(CFG, **ROUTERS["sigmoid, bias, groups, scale"]).bfloat16().eval()
    assert_expected_file("torchtitan_moe", rewritten_code(model, torch.randn(2, 5, CFG.hidden, dtype=torch.bfloat16)))


class Routing(nn.Module):
    """The layer's router with its load-balancing bias, as ``MoE.forward`` calls it."""

    def __init__(self, moe):
        super().__init__()
        self.router, self.expert_bias = moe.router, moe.expert_bias_E

    def forward(self, x):
        return self.router(x, self.expert_bias)


@pytest.mark.parametrize("router", ROUTERS)
def test_router_is_rewritten_and_matches_eager(router):
    model = Routing(models.torchtitan_moe(CFG, **ROUTERS[router]))
    compiled = torch.compile(model)
    x = torch.randn(2, 9, CFG.hidden)
    assert torch.equal(model(x)[1], compiled(x)[1])  # the same experts chosen
    assert rewrites() == {"router": 1}
    assert_matches_eager(model, compiled, x)  # weights, and gradients of x and the gate

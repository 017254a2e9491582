"""Graph rewrites: every supported style becomes the canonical ops (expecttest on the rewritten
graph), and near misses stay exactly as they were, with the reason logged.

Update the expected graphs with ``EXPECTTEST_ACCEPT=1 pytest tests/test_patterns.py``.
"""

import dataclasses
import logging

import torch
import torch.nn.functional as F
from expecttest import TestCase
from helpers import rewrites, rewritten_code
from torch import nn

from inductor_moe import models
from inductor_moe.patterns import normalize
from inductor_moe.patterns.graph_pass import rewrite_moe

SMALL = models.MoEConfig(hidden=16, intermediate=8, num_experts=3, top_k=2)


def x_for(dtype=torch.float32, tokens=6):
    return torch.randn(tokens, SMALL.hidden, dtype=dtype)


class RewrittenGraphs(TestCase):
    def test_sorted_grouped_mm(self):
        model = models.SortedGroupedMM(models.MoEConfig(hidden=16, intermediate=8, num_experts=3, bias=True))
        code = rewritten_code(model.bfloat16(), x_for(torch.bfloat16))
        self.assertExpectedInline(code, """\
    l_x_ = L_x_
    router_gate_weight_ = L_self_router_gate_weight_
    w1_ = L_self_w1_
    b1_ = L_self_b1_
    w2_ = L_self_w2_
    b2_ = L_self_b2_
    linear = torch._C._nn.linear(l_x_, router_gate_weight_, None)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = True)
    getitem_13 = route_default[1]
    to_2 = getitem_13.to(torch.int64)
    getitem_14 = route_default[0]
    experts_default = torch.ops.inductor_moe.experts.default(l_x_, to_2, getitem_14, w1_, w2_, b1_, b2_, 'swiglu')
    getitem_12 = experts_default[0]
    view_as = getitem_12.view_as(l_x_)
    return (view_as,)
""")
        self.assertEqual(rewrites(), {"sorted_grouped_mm_experts": 1, "router": 1})

    def test_transformers_grouped_mm(self):
        block = models.transformers_block("grouped_mm", SMALL).bfloat16()
        code = rewritten_code(block, x_for(torch.bfloat16).view(2, 3, -1))
        self.assertExpectedInline(code, """\
    l_hidden_states_ = L_hidden_states_
    gate_weight_ = L_self_gate_weight_
    experts_gate_up_proj_ = L_self_experts_gate_up_proj_
    experts_down_proj_ = L_self_experts_down_proj_
    size = l_hidden_states_.size()
    getitem_2 = size[2]
    size_1 = l_hidden_states_.size()
    getitem_5 = size_1[2]
    hidden_states = l_hidden_states_.view(-1, getitem_5)
    router_logits = torch._C._nn.linear(hidden_states, gate_weight_)
    transpose_4 = experts_gate_up_proj_.transpose(1, 2)
    transpose_5 = experts_down_proj_.transpose(1, 2)
    route_default = torch.ops.inductor_moe.route.default(router_logits, 2, renormalize = True)
    getitem_16 = route_default[1]
    to_3 = getitem_16.to(torch.int64)
    getitem_17 = route_default[0]
    experts_default = torch.ops.inductor_moe.experts.default(hidden_states, to_3, getitem_17, transpose_4, transpose_5, None, None, 'swiglu')
    getitem_15 = experts_default[0]
    hidden_states_3 = getitem_15.reshape(s47, s87, getitem_2)
    return (hidden_states_3,)
""")

    def test_transformers_grouped_mm_fallback_op(self):
        # float32 under compile: transformers calls its own transformers::grouped_mm_fallback op
        code = rewritten_code(models.transformers_block("grouped_mm", SMALL), x_for().view(2, 3, -1))
        self.assertExpectedInline(code, """\
    l_hidden_states_ = L_hidden_states_
    gate_weight_ = L_self_gate_weight_
    experts_gate_up_proj_ = L_self_experts_gate_up_proj_
    experts_down_proj_ = L_self_experts_down_proj_
    size = l_hidden_states_.size()
    getitem_2 = size[2]
    size_1 = l_hidden_states_.size()
    getitem_5 = size_1[2]
    hidden_states = l_hidden_states_.view(-1, getitem_5)
    router_logits = torch._C._nn.linear(hidden_states, gate_weight_)
    transpose_4 = experts_gate_up_proj_.transpose(1, 2)
    transpose_5 = experts_down_proj_.transpose(1, 2)
    route_default = torch.ops.inductor_moe.route.default(router_logits, 2, renormalize = True)
    getitem_16 = route_default[1]
    to_3 = getitem_16.to(torch.int64)
    getitem_17 = route_default[0]
    experts_default = torch.ops.inductor_moe.experts.default(hidden_states, to_3, getitem_17, transpose_4, transpose_5, None, None, 'swiglu')
    getitem_15 = experts_default[0]
    hidden_states_3 = getitem_15.reshape(s47, s87, getitem_2)
    return (hidden_states_3,)
""")

    def test_transformers_batched_mm(self):
        code = rewritten_code(models.transformers_block("batched_mm", SMALL), x_for().view(2, 3, -1))
        self.assertExpectedInline(code, """\
    l_hidden_states_ = L_hidden_states_
    gate_weight_ = L_self_gate_weight_
    experts_gate_up_proj_ = L_self_experts_gate_up_proj_
    experts_down_proj_ = L_self_experts_down_proj_
    size = l_hidden_states_.size()
    getitem_2 = size[2]
    size_1 = l_hidden_states_.size()
    getitem_5 = size_1[2]
    hidden_states = l_hidden_states_.view(-1, getitem_5)
    router_logits = torch._C._nn.linear(hidden_states, gate_weight_)
    transpose = experts_gate_up_proj_.transpose(1, 2)
    transpose_1 = experts_down_proj_.transpose(1, 2)
    route_default = torch.ops.inductor_moe.route.default(router_logits, 2, renormalize = True)
    getitem_13 = route_default[1]
    to_1 = getitem_13.to(torch.int64)
    getitem_14 = route_default[0]
    experts_default = torch.ops.inductor_moe.experts.default(hidden_states, to_1, getitem_14, transpose, transpose_1, None, None, 'swiglu')
    getitem_12 = experts_default[0]
    hidden_states_3 = getitem_12.reshape(s47, s87, getitem_2)
    return (hidden_states_3,)
""")

    def test_dense_loop(self):
        code = rewritten_code(models.DenseLoop(SMALL), x_for())
        self.assertExpectedInline(code, """\
    l_x_ = L_x_
    router_gate_weight_ = L_self_router_gate_weight_
    experts_0_gate_proj_weight_ = L_self_experts_0_gate_proj_weight_
    experts_0_up_proj_weight_ = L_self_experts_0_up_proj_weight_
    experts_0_down_proj_weight_ = L_self_experts_0_down_proj_weight_
    experts_1_gate_proj_weight_ = L_self_experts_1_gate_proj_weight_
    experts_1_up_proj_weight_ = L_self_experts_1_up_proj_weight_
    experts_1_down_proj_weight_ = L_self_experts_1_down_proj_weight_
    experts_2_gate_proj_weight_ = L_self_experts_2_gate_proj_weight_
    experts_2_up_proj_weight_ = L_self_experts_2_up_proj_weight_
    experts_2_down_proj_weight_ = L_self_experts_2_down_proj_weight_
    linear = torch._C._nn.linear(l_x_, router_gate_weight_, None)
    cat = torch.cat([experts_0_gate_proj_weight_, experts_0_up_proj_weight_, experts_1_gate_proj_weight_, experts_1_up_proj_weight_, experts_2_gate_proj_weight_, experts_2_up_proj_weight_])
    view = cat.view(3, -1, 16)
    transpose = view.transpose(1, 2)
    stack = torch.stack([experts_0_down_proj_weight_, experts_1_down_proj_weight_, experts_2_down_proj_weight_])
    transpose_1 = stack.transpose(1, 2)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = True)
    getitem_8 = route_default[1]
    to_1 = getitem_8.to(torch.int64)
    getitem_9 = route_default[0]
    experts_default = torch.ops.inductor_moe.experts.default(l_x_, to_1, getitem_9, transpose, transpose_1, None, None, 'swiglu')
    getitem_7 = experts_default[0]
    view_as = getitem_7.view_as(l_x_)
    return (view_as,)
""")

    def test_masked_loop(self):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            code = rewritten_code(models.MaskedLoop(SMALL), x_for())
        self.assertExpectedInline(code, """\
    l_x_ = L_x_
    router_gate_weight_ = L_self_router_gate_weight_
    experts_0_gate_proj_weight_ = L_self_experts_0_gate_proj_weight_
    experts_0_up_proj_weight_ = L_self_experts_0_up_proj_weight_
    experts_0_down_proj_weight_ = L_self_experts_0_down_proj_weight_
    experts_1_gate_proj_weight_ = L_self_experts_1_gate_proj_weight_
    experts_1_up_proj_weight_ = L_self_experts_1_up_proj_weight_
    experts_1_down_proj_weight_ = L_self_experts_1_down_proj_weight_
    experts_2_gate_proj_weight_ = L_self_experts_2_gate_proj_weight_
    experts_2_up_proj_weight_ = L_self_experts_2_up_proj_weight_
    experts_2_down_proj_weight_ = L_self_experts_2_down_proj_weight_
    linear = torch._C._nn.linear(l_x_, router_gate_weight_, None)
    cat = torch.cat([experts_0_gate_proj_weight_, experts_0_up_proj_weight_, experts_1_gate_proj_weight_, experts_1_up_proj_weight_, experts_2_gate_proj_weight_, experts_2_up_proj_weight_])
    view = cat.view(3, -1, 16)
    transpose_1 = view.transpose(1, 2)
    stack = torch.stack([experts_0_down_proj_weight_, experts_1_down_proj_weight_, experts_2_down_proj_weight_])
    transpose_2 = stack.transpose(1, 2)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = True)
    getitem_21 = route_default[1]
    to_3 = getitem_21.to(torch.int64)
    getitem_22 = route_default[0]
    experts_default = torch.ops.inductor_moe.experts.default(l_x_, to_3, getitem_22, transpose_1, transpose_2, None, None, 'swiglu')
    getitem_20 = experts_default[0]
    view_as = getitem_20.view_as(l_x_)
    return (view_as,)
""")

    def test_router_without_renormalisation(self):
        router = models.TopKRouter(models.MoEConfig(hidden=16, num_experts=5, top_k=2, renormalize=False))
        code = rewritten_code(router, x_for())
        self.assertExpectedInline(code, """\
    gate_weight_ = L_self_gate_weight_
    l_x_ = L_x_
    linear = torch._C._nn.linear(l_x_, gate_weight_, None)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = False)
    getitem_2 = route_default[1]
    to = getitem_2.to(torch.int64)
    getitem_3 = route_default[0]
    return (getitem_3, to)
""")


# --- near misses ---------------------------------------------------------------------------------

    def test_group_limited_sigmoid_router(self):
        code = rewritten_code(GroupLimitedRouter(), x_for())
        self.assertExpectedInline(code, """\
    gate_weight_ = L_self_gate_weight_
    l_x_ = L_x_
    bias_ = L_self_bias_
    linear = torch._C._nn.linear(l_x_, gate_weight_, None)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = True, scoring = 'sigmoid', bias = bias_, scale = 2.5, eps = 1e-20, n_group = 4, topk_group = 2, group_fill = -inf)
    getitem_6 = route_default[1]
    to = getitem_6.to(torch.int64)
    getitem_7 = route_default[0]
    return (getitem_7, to)
""")
        self.assertEqual(rewrites(), {"router": 1})

    def test_groups_ranked_by_their_best(self):
        code = rewritten_code(GroupLimitedRouter(group_score="max"), x_for())
        self.assertExpectedInline(code, """\
    gate_weight_ = L_self_gate_weight_
    l_x_ = L_x_
    bias_ = L_self_bias_
    linear = torch._C._nn.linear(l_x_, gate_weight_, None)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = True, scoring = 'sigmoid', bias = bias_, scale = 2.5, eps = 1e-20, n_group = 4, topk_group = 2, group_top = 1, group_fill = -inf)
    getitem_4 = route_default[1]
    to = getitem_4.to(torch.int64)
    getitem_5 = route_default[0]
    return (getitem_5, to)
""")
        self.assertEqual(rewrites(), {"router": 1})

    def test_renormalisation_eps_is_kept(self):
        router, x = SigmoidRouterWithEps(), x_for()
        torch._dynamo.reset()
        weights, ids = torch.compile(router)(x)
        self.assertEqual(rewrites(), {"router": 1})
        expected_weights, expected_ids = router(x)
        self.assertTrue(torch.equal(ids, expected_ids))
        self.assertLess(expected_weights.max().item(), 0.9)  # the eps shows in these weights
        torch.testing.assert_close(weights, expected_weights)

    def test_topk_then_softmax_router(self):
        code = rewritten_code(TopKThenSoftmaxRouter().bfloat16(), x_for(torch.bfloat16))
        self.assertExpectedInline(code, """\
    gate_weight_ = L_self_gate_weight_
    gate_bias_ = L_self_gate_bias_
    l_x_ = L_x_
    linear = torch._C._nn.linear(l_x_, gate_weight_, gate_bias_)
    route_default = torch.ops.inductor_moe.route.default(linear, 2, renormalize = False, scoring = 'softmax_of_topk')
    getitem_2 = route_default[1]
    to = getitem_2.to(torch.int64)
    getitem_3 = route_default[0]
    to_1 = getitem_3.to(torch.bfloat16)
    return (to_1, to)
""")
        self.assertEqual(rewrites(), {"router": 1})

    def test_interleaved_clamped_swiglu(self):
        code = rewritten_code(InterleavedExperts(SMALL).bfloat16(), x_for(torch.bfloat16))
        self.assertIn("'swiglu_oai', interleaved = True, limit = 1.5)", code)
        self.assertEqual(rewrites(), {"router": 1, "sorted_grouped_mm_experts": 1})

    def test_interleaved_swiglu(self):
        code = rewritten_code(InterleavedExperts(SMALL, clamped=False).bfloat16(), x_for(torch.bfloat16))
        self.assertIn("'swiglu', interleaved = True)", code)
        self.assertEqual(rewrites(), {"router": 1, "sorted_grouped_mm_experts": 1})


class CapacityLimitedLoop(models.MaskedLoop):
    """Each expert takes at most `capacity` tokens: the rest are dropped."""

    capacity = 2

    def forward(self, x):
        weights, ids = self.router(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=self.cfg.num_experts).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            slot, token = slot[: self.capacity], token[: self.capacity]
            out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(x.dtype))
        return out


class NormalisedExpert(models.ExpertMLP):
    """An expert with a LayerNorm inside: not an MLP the experts op models."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.norm = nn.LayerNorm(cfg.intermediate)

    def forward(self, x):
        return self.down_proj(self.norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class TanhExpert(models.ExpertMLP):
    """A plain MLP with an activation the experts op does not model."""

    def forward(self, x):
        return self.down_proj(torch.tanh(self.up_proj(x)))


class HalfBiasedGeGLU(models.ExpertMLP):
    """A GeGLU expert whose up projection has a bias and whose gate has none."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=True)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class MishSortedGroupedMM(models.SortedGroupedMM):
    def activate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return F.mish(gate) * up


class LowPrecisionRouter(models.TopKRouter):
    def forward(self, x):
        weights, ids = self.gate(x).softmax(dim=-1).topk(self.cfg.top_k, dim=-1)
        return weights, ids


class ExposedActivation(models.SortedGroupedMM):
    """Returns the expert activation too: the block is not closed."""

    def forward(self, x):
        cfg = self.cfg
        weights, ids = self.router(x)
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        offsets = torch.histc(flat_ids.float(), bins=cfg.num_experts, min=0, max=cfg.num_experts - 1).cumsum(0).int()
        a = models.activate(cfg, torch._grouped_mm(x[order // cfg.top_k], self.w1, offs=offsets))
        y = torch._grouped_mm(a, self.w2, offs=offsets) * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros(x.shape, dtype=y.dtype).index_add_(0, order // cfg.top_k, y).to(x.dtype), a


class SkippedExpertLoop(models.DenseLoop):
    """The last expert is never run: its tokens would lose their contribution."""

    def forward(self, x):
        weights, ids = self.router(x)
        dense = weights.new_zeros(x.shape[0], self.cfg.num_experts).scatter(1, ids, weights)
        out = torch.zeros_like(x, dtype=dense.dtype)
        for e, expert in enumerate(self.experts[:-1]):
            out = out + dense[:, e, None] * expert(x)
        return out.to(x.dtype)


class SoftMixture(models.DenseLoop):
    """Every expert weighted by the full softmax: dense by design, not a sparse MoE."""

    def forward(self, x):
        probs = self.router.gate(x).float().softmax(dim=-1)
        out = torch.zeros_like(x, dtype=probs.dtype)
        for e, expert in enumerate(self.experts):
            out = out + probs[:, e, None] * expert(x)
        return out.to(x.dtype)


class GroupLimitedRouter(nn.Module):
    """DeepSeek-V3's router written out: sigmoid scores, a score-correction bias for the choice,
    the best 2 of 4 expert groups, renormalised and scaled weights. ``group_score`` "top2" is V3's,
    "max" is DeepSeek-V2's; ``weights_from`` "choice" would weight by the biased scores."""

    def __init__(self, group_score="top2", weights_from="scores"):
        super().__init__()
        self.gate = nn.Linear(SMALL.hidden, 8, bias=False)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.group_score, self.weights_from = group_score, weights_from

    def forward(self, x):
        scores = self.gate(x).float().sigmoid()
        choice = scores + self.bias
        grouped = choice.view(-1, 4, 2)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if self.group_score == "top2" else grouped.amax(dim=-1)
        group_idx = torch.topk(group_scores, k=2, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, 4, 2).reshape(-1, 8)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=2, dim=-1, sorted=False)[1]
        weights = (scores if self.weights_from == "scores" else choice).gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * 2.5, ids


class SigmoidRouterWithEps(nn.Module):
    """LFM2-MoE's renormalisation, top-k sigmoid scores / (their sum + 1e-6), on logits about
    -14: scores about the eps, which roughly halves the one weight."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(SMALL.hidden, 8)
        nn.init.normal_(self.gate.weight, std=0.01)
        nn.init.constant_(self.gate.bias, -14.0)

    def forward(self, x):
        weights, ids = torch.topk(self.gate(x).float().sigmoid(), k=1, dim=-1)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-6), ids


class TopKThenSoftmaxRouter(nn.Module):
    """gpt-oss's order: the top-k logits, then a softmax over them (``largest=False`` is no router)."""

    def __init__(self, largest=True):
        super().__init__()
        self.gate = nn.Linear(SMALL.hidden, SMALL.num_experts)
        self.largest = largest

    def forward(self, x):
        values, ids = torch.topk(self.gate(x), SMALL.top_k, dim=-1, largest=self.largest)
        return F.softmax(values, dim=1, dtype=values.dtype), ids


class InterleavedExperts(models.SortedGroupedMM):
    """Gate and up as the even and odd columns of one projection, with gpt-oss's clamped SwiGLU
    (``up_limit`` other than the gate's limit is no such thing) or a plain SwiGLU."""

    def __init__(self, cfg, clamped=True, up_limit=1.5):
        super().__init__(cfg)
        self.clamped, self.up_limit = clamped, up_limit

    def activate(self, h):
        gate, up = h[..., ::2], h[..., 1::2]
        if not self.clamped:
            return F.silu(gate) * up
        gate, up = gate.clamp(min=None, max=1.5), up.clamp(min=-self.up_limit, max=self.up_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * 1.702))


def graph_code_and_logs(model, x):
    """(code before, code after, log messages) of the rewrite of model's dynamo graph, ``before``
    once functionalized (the rewrite's first step, which changes no value)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(model, backend=capture)(x)
    (gm,) = graphs
    normalize.normalize(gm.graph)  # canonical spellings, functional updates: the same values
    before = gm.graph.python_code("self").src
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("inductor_moe")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        rewrite_moe(gm.graph)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return before, gm.graph.python_code("self").src, [r.getMessage() for r in records]


def dense_loop_of(expert: type, cfg: models.MoEConfig) -> models.DenseLoop:
    model = models.DenseLoop(cfg)
    model.experts = nn.ModuleList(expert(cfg) for _ in range(cfg.num_experts))
    return model


class NearMisses(TestCase):
    def assert_experts_left_alone(self, model, x, *reasons: str):
        """No experts op in the rewritten graph, and one log message giving every one of ``reasons``."""
        _, after, messages = graph_code_and_logs(model, x)
        self.assertNotIn("inductor_moe.experts", after)
        self.assertTrue(any(all(r in m for r in reasons) for m in messages), messages)

    def assert_untouched(self, model, x, reason: str | None):
        before, after, messages = graph_code_and_logs(model, x)
        self.assertEqual(before, after)
        self.assertEqual(rewrites(), {})
        if reason is None:
            self.assertEqual(messages, [])
        else:
            self.assertTrue(any(reason in m for m in messages), f"no log says {reason!r}: {messages}")

    def test_capacity_limited_routing_drops_tokens(self):
        self.assert_experts_left_alone(CapacityLimitedLoop(SMALL), x_for(), "tokens may be dropped")

    def test_expert_with_layer_norm(self):
        self.assert_experts_left_alone(dense_loop_of(NormalisedExpert, SMALL), x_for(), "dense_loop_experts: left", "layer_norm")

    def test_unsupported_activation(self):
        self.assert_experts_left_alone(MishSortedGroupedMM(SMALL).bfloat16(), x_for(torch.bfloat16), "mish", "not supported")

    def test_low_precision_softmax_router(self):
        model = LowPrecisionRouter(SMALL).bfloat16()
        self.assert_untouched(model, x_for(torch.bfloat16), "router softmax runs in torch.bfloat16")

    def test_block_whose_activation_is_used_outside(self):
        self.assert_experts_left_alone(ExposedActivation(SMALL).bfloat16(), x_for(torch.bfloat16), "also used outside the block")

    def test_loop_that_skips_an_expert(self):
        self.assert_experts_left_alone(SkippedExpertLoop(SMALL), x_for(), "not all 3")

    def test_soft_mixture_is_not_an_moe(self):
        model = SoftMixture(SMALL)
        before, after, messages = graph_code_and_logs(model, x_for())
        self.assertEqual(before, after)
        self.assertEqual(messages, [])

    def test_weights_from_the_biased_scores(self):
        self.assert_untouched(GroupLimitedRouter(weights_from="choice"), x_for(),
                              "the routing weights are not the chosen scores")

    def test_bottom_k_is_no_router(self):
        self.assert_untouched(TopKThenSoftmaxRouter(largest=False), x_for(), None)

    def test_clamped_swiglu_with_another_up_limit(self):
        self.assert_experts_left_alone(
            InterleavedExperts(SMALL, up_limit=2.0).bfloat16(), x_for(torch.bfloat16), "up is clamped to [-2.0, 2.0]"
        )

    def test_plain_mlp_with_an_unmodelled_activation(self):
        model = dense_loop_of(TanhExpert, dataclasses.replace(SMALL, activation="gelu"))
        self.assert_experts_left_alone(model, x_for(), "expert activation tanh is not supported")

    def test_geglu_with_a_bias_on_up_only(self):
        model = dense_loop_of(HalfBiasedGeGLU, dataclasses.replace(SMALL, activation="geglu"))
        self.assert_experts_left_alone(model, x_for(), "only one of the gate and up projections has a bias")

"""Built-in MoE blocks, written the plain way people write them: one per supported style.

They are the demo's, the tests' and the benchmarks' models; nothing in them knows about
inductor_moe. Each maps ``[..., hidden]`` to the same shape. ``transformers_model`` builds a
transformers family's MoE block or tiny LM with a chosen experts implementation (needs
``transformers``), ``torchtitan_moe`` torchtitan's MoE layer (needs ``torchtitan``).
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class MoEConfig:
    hidden: int = 64
    intermediate: int = 32
    num_experts: int = 8
    top_k: int = 2
    activation: str = "swiglu"  # swiglu | geglu | gelu | relu
    bias: bool = False
    renormalize: bool = True

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")


_FUNCTIONS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


def activate(cfg: MoEConfig, h: torch.Tensor) -> torch.Tensor:
    """The activation on a fused projection output (gate and up as its two halves when gated)."""
    act = _FUNCTIONS[cfg.activation]
    if cfg.gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


class TopKRouter(nn.Module):
    """Float32 softmax over the experts, top-k, optional renormalisation (Mixtral, Qwen-MoE)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).float().softmax(dim=-1)
        weights, ids = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class ExpertMLP(nn.Module):
    """One expert as separate linears: down(act(gate(x)) * up(x)), or down(act(up(x)))."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.gated:
            act = _FUNCTIONS[self.cfg.activation]
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(activate(self.cfg, self.up_proj(x)))


class SortedGroupedMM(nn.Module):
    """Sort the (token, slot) pairs by expert, torch._grouped_mm, index_add_ back (torchtitan-like).

    Stacked weights: w1 ``[E, hidden, N]``, w2 ``[E, intermediate, hidden]``.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(cfg)
        width = 2 * cfg.intermediate if cfg.gated else cfg.intermediate
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden, width))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.intermediate, cfg.hidden))
        self.b1 = nn.Parameter(torch.zeros(cfg.num_experts, width)) if cfg.bias else None
        self.b2 = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden)) if cfg.bias else None
        nn.init.normal_(self.w1, std=cfg.hidden**-0.5)
        nn.init.normal_(self.w2, std=cfg.intermediate**-0.5)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return activate(self.cfg, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        tokens = x.reshape(-1, cfg.hidden)
        weights, ids = self.router(tokens)
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of_row = order // cfg.top_k
        counts = torch.histc(flat_ids.float(), bins=cfg.num_experts, min=0, max=cfg.num_experts - 1)
        offsets = counts.cumsum(dim=0).to(torch.int32)
        h = torch._grouped_mm(tokens[token_of_row], self.w1, offs=offsets)
        if self.b1 is not None:
            h = h + self.b1[flat_ids[order]]
        y = torch._grouped_mm(self.activate(h), self.w2, offs=offsets)
        if self.b2 is not None:
            y = y + self.b2[flat_ids[order]]
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros(tokens.shape, dtype=y.dtype, device=x.device).index_add_(0, token_of_row, y)
        return out.to(x.dtype).view_as(x)


class ExpertList(nn.Module):
    """A router and one ExpertMLP module per expert (Mixtral's original layout)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(cfg)
        self.experts = nn.ModuleList(ExpertMLP(cfg) for _ in range(cfg.num_experts))


class DenseLoop(ExpertList):
    """Every expert runs on every token; a routing weight that is zero off the top-k masks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.cfg.hidden)
        weights, ids = self.router(tokens)
        dense = weights.new_zeros(tokens.shape[0], self.cfg.num_experts).scatter(1, ids, weights)
        out = torch.zeros_like(tokens, dtype=dense.dtype)
        for e, expert in enumerate(self.experts):
            out = out + dense[:, e, None] * expert(tokens)
        return out.to(x.dtype).view_as(x)


class MaskedLoop(ExpertList):
    """The classic loop: ``torch.where`` on each expert's mask, run it, ``index_add_`` back.

    One graph only with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.cfg.hidden)
        weights, ids = self.router(tokens)
        out = torch.zeros_like(tokens)
        mask = F.one_hot(ids, num_classes=self.cfg.num_experts).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            y = expert(tokens[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(tokens.dtype))
        return out.view_as(x)


STYLES = {
    "sorted_grouped_mm": SortedGroupedMM,
    "dense_loop": DenseLoop,
    "masked_loop": MaskedLoop,
}
BFLOAT16_ONLY = {"sorted_grouped_mm"}  # torch.compile takes torch._grouped_mm in bfloat16 only


@dataclasses.dataclass(frozen=True)
class Family:
    """A transformers MoE model family: where its classes live and how our config maps to its."""

    module: str  # transformers.models.<module>.modeling_<module>
    config: str
    block: str
    causal_lm: str
    moe_arguments: object  # MoEConfig -> dict of the family config's MoE arguments
    model_arguments: dict = dataclasses.field(default_factory=dict)  # for a whole tiny model
    block_arguments: object = lambda cfg: {}  # MoEConfig -> the block's own arguments besides the config


FAMILIES = {
    "mixtral": Family(
        "mixtral", "MixtralConfig", "MixtralSparseMoeBlock", "MixtralForCausalLM",
        lambda c: dict(intermediate_size=c.intermediate, num_local_experts=c.num_experts),
    ),
    "qwen2_moe": Family(
        "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock", "Qwen2MoeForCausalLM",
        lambda c: dict(moe_intermediate_size=c.intermediate, num_experts=c.num_experts, norm_topk_prob=c.renormalize,
                       shared_expert_intermediate_size=2 * c.intermediate),
    ),
    "qwen3_moe": Family(
        "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", "Qwen3MoeForCausalLM",
        lambda c: dict(moe_intermediate_size=c.intermediate, num_experts=c.num_experts, norm_topk_prob=c.renormalize),
    ),
    "olmoe": Family(
        "olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock", "OlmoeForCausalLM",
        lambda c: dict(intermediate_size=c.intermediate, num_experts=c.num_experts, norm_topk_prob=c.renormalize),
    ),
    "deepseek_v3": Family(
        "deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE", "DeepseekV3ForCausalLM",
        lambda c: dict(moe_intermediate_size=c.intermediate, n_routed_experts=c.num_experts, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, n_shared_experts=1, norm_topk_prob=c.renormalize),
        dict(first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=8, head_dim=8),  # MLA: the rotary part of a head
    ),
    "gpt_oss": Family(
        "gpt_oss", "GptOssConfig", "GptOssMLP", "GptOssForCausalLM",
        lambda c: dict(intermediate_size=c.intermediate, num_local_experts=c.num_experts, swiglu_limit=1.5),
        dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    ),
}


# Families with routers or experts code of their own, each block tested for what the plugin
# makes of it (tests/test_conformance.py): rewritten, or left alone and why.
MORE_FAMILIES = {
    "cohere2_moe": Family(
        "cohere2_moe", "Cohere2MoeConfig", "Cohere2MoeSparseMoeBlock", "",
        lambda c: dict(intermediate_size=c.intermediate, num_experts=c.num_experts, expert_selection_fn="sigmoid",
                       norm_topk_prob=c.renormalize),
    ),
    "deepseek_v2": Family(
        "deepseek_v2", "DeepseekV2Config", "DeepseekV2Moe", "",
        lambda c: dict(moe_intermediate_size=c.intermediate, n_routed_experts=c.num_experts, n_shared_experts=1,
                       topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0),
    ),
    "longcat_flash": Family(
        "longcat_flash", "LongcatFlashConfig", "LongcatFlashMoE", "",
        lambda c: dict(expert_ffn_hidden_size=c.intermediate, n_routed_experts=c.num_experts, zero_expert_num=2,
                       routed_scaling_factor=6.0),
    ),
    "llama4": Family(
        "llama4", "Llama4TextConfig", "Llama4TextMoe", "",
        lambda c: dict(intermediate_size=c.intermediate, num_local_experts=c.num_experts),
    ),
    "jetmoe": Family(
        "jetmoe", "JetMoeConfig", "JetMoeMoE", "",
        lambda c: dict(intermediate_size=c.intermediate, num_local_experts=c.num_experts),
    ),
    "phimoe": Family(
        "phimoe", "PhimoeConfig", "PhimoeSparseMoeBlock", "",
        lambda c: dict(intermediate_size=c.intermediate, num_local_experts=c.num_experts),
    ),
    "dbrx": Family(
        "dbrx", "DbrxConfig", "DbrxFFN", "",
        lambda c: dict(d_model=c.hidden, ffn_config=dict(ffn_hidden_size=c.intermediate, moe_num_experts=c.num_experts,
                                                         moe_top_k=c.top_k)),
    ),
    "switch_transformers": Family(
        "switch_transformers", "SwitchTransformersConfig", "SwitchTransformersSparseMLP", "",
        lambda c: dict(d_ff=c.intermediate, num_experts=c.num_experts, expert_capacity=4),
    ),
    "nllb_moe": Family(
        "nllb_moe", "NllbMoeConfig", "NllbMoeSparseMLP", "",
        lambda c: dict(num_experts=c.num_experts, expert_capacity=4),
        block_arguments=lambda c: dict(ffn_dim=c.intermediate),
    ),
}


def transformers_model(family: str, experts_implementation: str, cfg: MoEConfig, num_layers: int = 0) -> nn.Module:
    """A transformers family's MoE block, or with ``num_layers`` a tiny ``...ForCausalLM``, with
    the ``grouped_mm``, ``batched_mm`` or ``eager`` experts implementation, random weights."""
    import importlib

    spec = FAMILIES[family] if family in FAMILIES else MORE_FAMILIES[family]
    module = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
    arguments = dict(hidden_size=cfg.hidden, num_experts_per_tok=cfg.top_k, **spec.moe_arguments(cfg))
    if num_layers:
        arguments |= dict(vocab_size=64, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                          head_dim=cfg.hidden // 2, max_position_embeddings=64) | spec.model_arguments
    config = getattr(importlib.import_module("transformers"), spec.config)(**arguments)
    config._experts_implementation = experts_implementation
    model = getattr(module, spec.causal_lm)(config) if num_layers else getattr(module, spec.block)(config, **spec.block_arguments(cfg))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dim() >= 2:  # weights: unit-variance outputs; biases, norms: small noise around their init
            nn.init.normal_(tensor, std=tensor.shape[-1] ** -0.5)
        elif tensor.is_floating_point() and "norm" not in name:
            nn.init.normal_(tensor, std=0.1)
    return model


def torchtitan_moe(cfg: MoEConfig, scoring: str = "softmax", groups: tuple[int, int] | None = None,
                   scale: float = 1.0, ep_mesh=None) -> nn.Module:
    """torchtitan's MoE layer (token-choice router, expert-sorted rows, ``torch._grouped_mm``,
    scatter-add) with random weights; ``groups`` = (n_group, topk_group). Needs ``torchtitan``.

    With ``ep_mesh`` (a 1-D DeviceMesh) it is expert-parallel as torchtitan shards it: the expert
    weights DTensors sharded by expert over the mesh, tokens exchanged by its all-to-all dispatcher
    (torchtitan's DTensor SPMD backend is switched on for that). The same seed gives the same full
    weights either way."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

    n_group, topk_group = groups or (None, None)
    dispatcher = LocalTokenDispatcher if ep_mesh is None else AllToAllTokenDispatcher
    model = MoE.Config(
        num_experts=cfg.num_experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=cfg.hidden, hidden_dim=cfg.intermediate, num_experts=cfg.num_experts),
            token_dispatcher=dispatcher.Config(num_experts=cfg.num_experts, top_k=cfg.top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=cfg.num_experts, gate=Linear.Config(in_features=cfg.hidden, out_features=cfg.num_experts),
            top_k=cfg.top_k, score_func=scoring, route_norm=cfg.renormalize, route_scale=scale,
            num_expert_groups=n_group, num_limited_groups=topk_group,
        ),
    ).build()
    for tensor in model.parameters():
        nn.init.normal_(tensor, std=tensor.shape[-1] ** -0.5)
    if model.expert_bias_E is not None:  # the load-balancing bias an optimizer hook would have learned
        model.expert_bias_E.normal_(std=0.1)
    if ep_mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor
        from torchtitan.distributed.utils import set_spmd_backend

        set_spmd_backend("dtensor")  # its default needs torchtitan's own trainer to set meshes up
        experts = model.routed_experts.inner_experts
        for name, weight in list(experts.named_parameters()):
            setattr(experts, name, nn.Parameter(distribute_tensor(weight.detach(), ep_mesh, [Shard(0)])))
        model.routed_experts.token_dispatcher.wire_meshes(ep_mesh=ep_mesh)
    return model


def transformers_block(experts_implementation: str, cfg: MoEConfig) -> nn.Module:
    """Hugging Face's Mixtral block with ``grouped_mm``, ``batched_mm`` or ``eager`` experts."""
    return transformers_model("mixtral", experts_implementation, cfg)


def build(style: str, cfg: MoEConfig) -> nn.Module:
    """A block by style name: a key of STYLES, ``transformers_<implementation>`` (Mixtral),
    ``<family>_<implementation>`` for a key of FAMILIES, or ``torchtitan``."""
    if style == "torchtitan":
        return torchtitan_moe(cfg)
    if style.startswith("transformers_"):
        return transformers_block(style.removeprefix("transformers_"), cfg)
    for family in FAMILIES:
        if style.startswith(family + "_"):
            return transformers_model(family, style.removeprefix(family + "_"), cfg)
    return STYLES[style](cfg)


def expert_flops(cfg: MoEConfig, num_tokens: int) -> int:
    """Forward FLOPs of the routed experts (the useful work), for throughput numbers."""
    width = 2 * cfg.intermediate if cfg.gated else cfg.intermediate
    return 2 * num_tokens * cfg.top_k * cfg.hidden * (width + cfg.intermediate)

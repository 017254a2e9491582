"""The spelling fuzzer: random but equivalent ways to write one MoE block, and near misses.

A case draws a block (its style, sizes, router, expert activation, where the routing weights
apply, a shared expert...), then for every part of it one of the ways people write that part
(``x[idx]`` or ``x.index_select(0, idx)``, ``histc`` or ``bincount`` or ``one_hot().sum()``,
``index_add_`` or ``scatter_add_`` or ``index_put_(accumulate=True)``, ...), and emits the Python
source of an ``nn.Module``. ``check`` compiles it with a backend that runs inductor_moe's rewrite
and then the rewritten graph itself (the canonical ops' eager code), and holds its forward and
every gradient against eager. A near miss changes the math in one place (a token dropped, one
expert with a bias the others lack, weights that are not the routing weights, ...): it must
stay as written, with a logged reason, and match eager all the same.

    python tests/spellings.py --cases 3000 [--seed 0] [--jobs 2] [--json benchmarks/results/spellings.json]

runs a longer campaign than CI's and prints every failure's seed; ``--show SEED`` prints one
case's source. Seeds are reproducible: a case is a function of its seed alone.
"""

import argparse
import collections
import copy
import dataclasses
import functools
import json
import linecache
import logging
import math
import multiprocessing
import pathlib
import random
import sys
import time

import torch
import torch.nn.functional as F

STYLES = ("sorted_grouped_mm", "split_loop", "gathered_bmm", "dense_loop", "dense_bmm", "masked_loop")
GATED = ("swiglu", "geglu", "geglu_tanh", "reglu")
PLAIN = ("silu", "gelu", "relu")
_ACT = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu",
        "silu": "silu", "gelu": "gelu", "relu": "relu"}


@dataclasses.dataclass
class Spec:
    """The block's math: what every spelling of a case computes."""

    style: str
    tokens: int
    lead: tuple  # leading dims of the input: (tokens,) or (batch, length)
    hidden: int
    inner: int
    experts: int
    k: int
    dtype: torch.dtype
    scoring: str  # softmax | sigmoid | softmax_of_topk | sigmoid_of_topk
    groups: tuple | None  # (n_group, topk_group, group_top): DeepSeek's group-limited choice
    renormalize: bool
    scale: float | None
    activation: str
    layout: str  # gated: fused | interleaved | separate
    bias: bool
    out_in: bool  # stacked weights stored [E, out, in]
    weights_at: str  # after (the down projection) | before (it) | sum (the final sum) | input (of the experts)
    shared: str | None  # None | plain | gated
    dynamic: bool


@dataclasses.dataclass
class Case:
    seed: int
    spec: Spec
    source: str
    spellings: dict  # part -> the spelling drawn
    near_miss: str | None  # what changes the math, or None for an equivalent spelling


class Writer:
    """Collects the module's source while the parts draw their spellings."""

    def __init__(self, rng: random.Random, spec: Spec, near_miss: str | None = None):
        self.rng, self.spec, self.near_miss = rng, spec, near_miss
        self.init: list[str] = []
        self.body: list[str] = []
        self.spellings: dict[str, str] = {}
        self.classes: list[str] = []

    def pick(self, part: str, options: dict):
        name = self.rng.choice(sorted(options))
        self.spellings[part] = name
        return options[name]

    def chance(self, part: str, p: float) -> bool:
        taken = self.rng.random() < p
        self.spellings[part] = str(taken)
        return taken

    def line(self, code: str) -> None:
        self.body.append(code)

    def param(self, name: str, *shape: int, std: float | None = None) -> str:
        std = std if std is not None else shape[-1 if len(shape) < 3 else -2] ** -0.5
        self.init.append(f"self.{name} = nn.Parameter(torch.randn({', '.join(map(str, shape))}) * {std:.4g})")
        return f"self.{name}"


# --- router ----------------------------------------------------------------------------------------


def _logits(w: Writer) -> str:
    """Router logits of the tokens ``x``. A bfloat16 model computes them in float32, as DeepSeek's
    routers do: bf16 logits of many experts tie often, and top-k breaks ties as it likes."""
    s = w.spec
    x, cast = ("x.float()", ".float()") if s.dtype == torch.bfloat16 else ("x", "")
    kind = w.pick("router logits", {"linear module": 0, "F.linear": 1, "matmul by .t()": 2, "@ stored [H, E]": 3})
    if kind == 0:
        w.init.append(f"self.gate = nn.Linear({s.hidden}, {s.experts}, bias=False)")
        return f"F.linear({x}, self.gate.weight{cast})" if cast else "self.gate(x)"
    if kind == 3:
        return f"({x} @ {w.param('router_t', s.hidden, s.experts, std=s.hidden ** -0.5)}{cast})"
    weight = w.param("router", s.experts, s.hidden, std=s.hidden ** -0.5) + cast
    return f"F.linear({x}, {weight})" if kind == 1 else f"({x} @ {weight}.t())"


def _float(w: Writer, value: str) -> str:
    return w.pick("float32 cast", {".float()": f"{value}.float()", ".to(float32)": f"{value}.to(torch.float32)",
                                   ".type(float32)": f"{value}.type(torch.float32)"})


def _topk(w: Writer, scores: str, values: str, ids: str) -> None:
    k = w.spec.k
    spellings = {
        "torch.topk": f"{values}, {ids} = torch.topk({scores}, {k}, dim=-1)",
        "method": f"{values}, {ids} = {scores}.topk({k})",
        "dim=1, unsorted": f"{values}, {ids} = {scores}.topk({k}, dim=1, sorted=False)",
        "named fields": f"top = torch.topk({scores}, k={k})\n{values}, {ids} = top.values, top.indices",
    }
    if w.near_miss is not None:  # a near miss can depend on the slots' order, which sorted=False leaves open
        del spellings["dim=1, unsorted"]
    w.line(w.pick("topk", spellings))


def _renormalize(w: Writer, weights: str, eps: bool) -> None:
    plus = " + 1e-20" if eps else ""
    spellings = {
        "/ sum keepdim": f"{weights} = {weights} / ({weights}.sum(dim=-1, keepdim=True){plus})",
        "/=": f"{weights} /= {weights}.sum(-1, keepdim=True){plus}",
        "torch.sum": f"{weights} = {weights} / (torch.sum({weights}, dim=1, keepdim=True){plus})",
        ".div": f"{weights} = {weights}.div({weights}.sum(dim=-1, keepdim=True){plus})",
        "[:, None]": f"{weights} = {weights} / ({weights}.sum(-1){plus})[:, None]",
        "unsqueeze": f"{weights} = {weights} / ({weights}.sum(-1){plus}).unsqueeze(-1)",
        "keepdims": f"{weights} = {weights} / (torch.sum({weights}, dim=-1, keepdims=True){plus})",
        "1-norm": f"{weights} = {weights} / ({weights}.norm(p=1, dim=-1, keepdim=True){plus})",
    }
    if w.spec.scoring == "sigmoid_of_topk":  # sigmoid's backward reads its output: no update in place
        del spellings["/="]
    w.line(w.pick("renormalisation", spellings))


def _group_limited(w: Writer, choice: str, fills: tuple) -> str:
    """Lines keeping only the choices of the best groups of experts (DeepSeek's, torchtitan's);
    returns the masked choice."""
    s = w.spec
    groups, kept, top = s.groups
    size = s.experts // groups
    fill = w.pick("group fill", {f: f for f in fills})
    best = {1: {".max values": "grouped.max(dim=-1).values", "amax": "grouped.amax(-1)", ".max[0]": "grouped.max(-1)[0]"},
            2: {"topk sum": "grouped.topk(2, dim=-1)[0].sum(dim=-1)",
                "torch.topk values sum": "torch.topk(grouped, 2, dim=-1).values.sum(-1)"}}[top]
    layout = w.pick("group mask", {"DeepSeek": 0, "torchtitan": 1})
    grouped = f"{choice}.view(-1, {groups}, {size})" if layout == 0 else f"{choice}.unflatten(-1, ({groups}, {size}))"
    w.line(f"grouped = {grouped}")
    w.line(f"group_scores = {w.pick('group score', best)}")
    w.line(f"group_idx = torch.topk(group_scores, k={kept}, dim=-1, sorted=False)[1]")
    if layout == 0:
        w.line("group_mask = torch.zeros_like(group_scores)")
        w.line("group_mask.scatter_(1, group_idx, 1)")
        w.line(f"score_mask = group_mask.unsqueeze(-1).expand(-1, {groups}, {size}).reshape(-1, {s.experts})")
        w.line(f"masked = {choice}.masked_fill(~score_mask.bool(), {fill})")
    else:
        w.line("dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter(-1, group_idx, False)")
        w.line(f"masked = grouped.masked_fill(dropped.unsqueeze(-1), {fill}).flatten(-2)")
    return "masked"


_SCORED_TOP_K = {  # scoring -> spellings of the top-k logits' weights
    "softmax_of_topk": {"F.softmax float": "F.softmax(top_logits, dim=-1, dtype=torch.float32)",
                        "method": "top_logits.float().softmax(dim=1)", "torch.softmax": "torch.softmax(top_logits, -1)"},
    "sigmoid_of_topk": {"torch.sigmoid float": "torch.sigmoid(top_logits.float())", "method": "top_logits.float().sigmoid()",
                        "F.sigmoid": "F.sigmoid(top_logits.to(torch.float32))"},
}


def write_router(w: Writer) -> None:
    """Routing weights ``w`` [T, k] and int64 expert ids ``ids`` from the tokens ``x``."""
    s = w.spec
    logits = _logits(w)
    if s.scoring.endswith("_of_topk"):
        w.line(f"logits = {logits}")
        _topk(w, "logits", "top_logits", "ids")
        w.line("w = " + w.pick(s.scoring, _SCORED_TOP_K[s.scoring]))
    elif s.scoring == "softmax":
        upcast = _float(w, logits)
        w.line("probs = " + w.pick("softmax", {
            "F.softmax dtype": f"F.softmax({logits}, dim=-1, dtype=torch.float32)",
            "method": f"{upcast}.softmax(dim=-1)",
            "torch.softmax": f"torch.softmax({upcast}, dim=1)",
            "F.softmax": f"F.softmax({upcast}, -1)",
        }))
        choice = _group_limited(w, "probs", fills=("0.0", "float('-inf')")) if s.groups else "probs"
        _topk(w, choice, "w", "ids")  # values: the scores, the masked ones at most 0 and never chosen
    else:  # sigmoid, with a score-correction bias for the choice only
        upcast = _float(w, logits)
        w.line("scores = " + w.pick("sigmoid", {"torch.sigmoid": f"torch.sigmoid({upcast})", "method": f"{upcast}.sigmoid()",
                                                 "F.sigmoid": f"F.sigmoid({upcast})"}))
        bias = w.param("choice_bias", s.experts, std=0.1)
        w.line(f"choice = scores + {bias}")
        choice = _group_limited(w, "choice", fills=("float('-inf')",)) if s.groups else "choice"
        _topk(w, choice, "_", "ids")
        w.line("w = " + w.pick("gather the scores", {"method": "scores.gather(1, ids)",
                                                      "torch.gather": "torch.gather(scores, -1, ids)",
                                                      "keywords": "scores.gather(dim=-1, index=ids)"}))
    if s.renormalize:
        _renormalize(w, "w", eps=s.scoring == "sigmoid" and w.chance("renormalisation eps", 0.5))
    if s.scale is not None:
        scales = {"w * s": f"w = w * {s.scale}", "s * w": f"w = {s.scale} * w", "*=": f"w *= {s.scale}"}
        if s.scoring.endswith("_of_topk"):  # softmax's and sigmoid's backward read their output: no update in place
            del scales["*="]
        w.line(w.pick("scale", scales))


# --- the expert body -------------------------------------------------------------------------------


def _activation(w: Writer, value: str) -> str:
    function = _ACT[w.spec.activation]
    options = {
        "silu": {"F.silu": f"F.silu({value})", "x * sigmoid": f"{value} * torch.sigmoid({value})",
                 "sigmoid * x": f"{value}.sigmoid() * {value}", "nn.SiLU": f"self.act({value})"},
        "gelu": {"F.gelu": f"F.gelu({value})", "approximate none": f"F.gelu({value}, approximate='none')",
                 "nn.GELU": f"self.act({value})"},
        "gelu_tanh": {"F.gelu tanh": f"F.gelu({value}, approximate='tanh')", "nn.GELU": f"self.act({value})"},
        "relu": {"F.relu": f"F.relu({value})", "torch.relu": f"torch.relu({value})", "method": f"{value}.relu()",
                 "nn.ReLU": f"self.act({value})"},
    }[function]
    spelled = w.pick(f"{function}", options)
    if "self.act" in spelled and not any(line.startswith("self.act =") for line in w.init):
        module = {"silu": "nn.SiLU()", "gelu": "nn.GELU()", "gelu_tanh": "nn.GELU(approximate='tanh')",
                  "relu": "nn.ReLU()"}[function]
        w.init.append(f"self.act = {module}")
    return spelled


def _gated(w: Writer, gate: str, up: str) -> str:
    act = _activation(w, gate)
    return w.pick("gated product", {"act(g) * u": f"{act} * {up}", "u * act(g)": f"{up} * {act}",
                                    "torch.mul": f"torch.mul({act}, {up})"})


def _split(w: Writer, h: str, prefix: str) -> str:
    """Lines splitting the fused projection ``h`` into gate and up; returns the activation."""
    inner = w.spec.inner
    g, u = f"{prefix}g", f"{prefix}u"
    rows_2d = w.spec.style != "dense_bmm"  # dense_bmm's rows are [E, T, n]
    if w.spec.layout == "interleaved":
        w.line(w.pick("interleaved split", {
            "[..., ::2]": f"{g}, {u} = {h}[..., ::2], {h}[..., 1::2]",
            **({"[:, 0::2]": f"{g}, {u} = {h}[:, 0::2], {h}[:, 1::2]"} if rows_2d else {}),
        }))
    else:
        w.line(w.pick("halves", {
            "chunk": f"{g}, {u} = {h}.chunk(2, dim=-1)",
            "torch.chunk": f"{g}, {u} = torch.chunk({h}, 2, -1)",
            "split": f"{g}, {u} = {h}.split({inner}, dim=-1)",
            "torch.split list": f"{g}, {u} = torch.split({h}, [{inner}, {inner}], dim=-1)",
            "slices": f"{g}, {u} = {h}[..., :{inner}], {h}[..., {inner}:]",
            **({"2-d slices": f"{g}, {u} = {h}[:, :{inner}], {h}[:, {inner}:]"} if rows_2d else {}),
        }))
    return _gated(w, g, u)


def _transposed(w: Writer, stacked: str) -> str:
    """``stacked`` [E, out, in] as its [E, in, out] view."""
    return w.pick("transpose", {".transpose(1, 2)": f"{stacked}.transpose(1, 2)", ".mT": f"{stacked}.mT",
                                ".transpose(-1, -2)": f"{stacked}.transpose(-1, -2)",
                                ".permute(0, 2, 1)": f"{stacked}.permute(0, 2, 1)",
                                ".swapaxes(1, 2)": f"{stacked}.swapaxes(1, 2)"})


@dataclasses.dataclass
class Stacked:
    """The expert weights as stacked parameters: names of [E, in, out] views, biases [E, out]."""

    w1: list  # one fused projection, or gate and up
    w2: str
    b1: list
    b2: str | None


def stacked_weights(w: Writer, near_miss: str | None = None) -> Stacked:
    s = w.spec
    width = 2 * s.inner if s.activation in GATED and s.layout != "separate" else s.inner
    parts = [("w1", width)] if s.activation in PLAIN or s.layout != "separate" else [("w_gate", s.inner), ("w_up", s.inner)]

    def weight(name, rows, cols):
        if s.out_in:
            return _transposed(w, w.param(name, s.experts, cols, rows, std=rows ** -0.5))
        return w.param(name, s.experts, rows, cols, std=rows ** -0.5)

    w1 = [weight(name, s.hidden, n) for name, n in parts]
    w2 = weight("w2", s.inner, s.hidden)
    b1 = [w.param(f"b{name[1:]}", s.experts, n, std=0.1) for name, n in parts] if s.bias else []
    b2 = w.param("b2", s.experts, s.hidden, std=0.1) if s.bias else None
    return Stacked(w1, w2, b1, b2)


def expert_body(w: Writer, rows: str, project, prefix: str = "") -> str:
    """Lines of an expert body on ``rows``; ``project(value, index)`` spells the index-th first
    projection (index None: the down projection) of a value. Returns the activation's name."""
    s = w.spec
    a = f"{prefix}a"
    if s.activation in PLAIN:
        w.line(f"{prefix}h = {project(rows, 0)}")
        w.line(f"{a} = {_activation(w, prefix + 'h')}")
    elif s.layout == "separate":
        w.line(f"{prefix}g = {project(rows, 0)}")
        w.line(f"{prefix}u = {project(rows, 1)}")
        w.line(f"{a} = {_gated(w, prefix + 'g', prefix + 'u')}")
    else:
        w.line(f"{prefix}h = {project(rows, 0)}")
        w.line(f"{a} = {_split(w, prefix + 'h', prefix)}")
    return a


# --- styles ----------------------------------------------------------------------------------------


def _flat_ids(w: Writer) -> str:
    return w.pick("flat ids", {"flatten": "ids.flatten()", "view(-1)": "ids.view(-1)", "reshape(-1)": "ids.reshape(-1)",
                               "torch.flatten": "torch.flatten(ids)"})


def _column(w: Writer, flat_weights: str, order: str | None) -> str:
    """Each row's routing weight as a column, rows in ``order`` (None: pair order)."""
    if order is None:
        return w.pick("weight column", {"[:, None]": f"{flat_weights}[:, None]", "unsqueeze": f"{flat_weights}.unsqueeze(-1)",
                                        "view(-1, 1)": f"{flat_weights}.view(-1, 1)", "[..., None]": f"{flat_weights}[..., None]"})
    return w.pick("weight column", {
        "[order, None]": f"{flat_weights}[{order}, None]",
        "[order].unsqueeze": f"{flat_weights}[{order}].unsqueeze(-1)",
        "[order][:, None]": f"{flat_weights}[{order}][:, None]",
        "index_select": f"{flat_weights}.index_select(0, {order}).unsqueeze(1)",
        "gather": f"torch.gather({flat_weights}, 0, {order}).unsqueeze(-1)",
        "[order].view(-1, 1)": f"{flat_weights}[{order}].view(-1, 1)",
    })


def _scale_rows(w: Writer, rows: str, column: str) -> str:
    return w.pick("scale rows", {"y * c": f"{rows} * {column}", "c * y": f"{column} * {rows}", ".mul": f"{rows}.mul({column})",
                                 "torch.mul": f"torch.mul({rows}, {column})"})


def _weighted_experts(w: Writer, project, flat_weights: str, order: str | None) -> None:
    """Lines of the experts on the rows ``xs`` up to their outputs ``y``, the routing weights (of
    the rows in ``order``; None: pair order) scaling the rows entering or leaving the down
    projection where the spec puts them."""
    a = expert_body(w, "xs", project)
    if w.spec.weights_at == "before":
        w.line(f"a = ({_scale_rows(w, a, _column(w, flat_weights, order))}).to(xs.dtype)")
        a = "a"
    w.line(f"y = {project(a, None)}")
    if w.spec.weights_at == "after":
        w.line(f"y = {_scale_rows(w, 'y', _column(w, flat_weights, order))}")


def _weights_flat(w: Writer) -> str:
    return w.pick("flat weights", {"flatten": "w.flatten()", "view(-1)": "w.view(-1)", "reshape(-1)": "w.reshape(-1)"})


def write_sorted_grouped_mm(w: Writer, near_miss: str | None, split: bool = False) -> None:
    """Pairs sorted by expert, then ``torch._grouped_mm`` with offsets or, with ``split``, a loop
    over the rows split by the experts' counts (JetMoE's)."""
    s = w.spec
    k, E = s.k, s.experts
    modules = split and w.chance("nn.Linear experts", 0.4)
    weights = None if modules else stacked_weights(w)
    w.line(f"flat = {_flat_ids(w)}")
    descending = ", descending=True" if near_miss == "sort descending" else ""
    sorts = {
        "argsort": f"order = flat.argsort({descending.lstrip(', ')})",
        "argsort stable": f"order = torch.argsort(flat, stable=True{descending})",
        "sort[1]": f"sorted_ids, order = torch.sort(flat{descending})",
        "sort().indices": f"order = flat.sort(stable=True{descending}).indices",
    }
    if near_miss is not None:  # what a near miss computes can depend on the order within an expert
        sorts = {name: code for name, code in sorts.items() if "stable" in code}
    w.line(w.pick("sort", sorts))
    counted = f"((flat + 1) % {E})" if near_miss == "counts of other ids" else "flat"
    counts = {
        "histc": f"torch.histc({counted}.float(), bins={E}, min=0, max={E - 1})",
        "bincount": f"torch.bincount({counted}, minlength={E})",
        "one_hot sum": f"F.one_hot({counted}, {E}).sum(0)",
        "== arange sum": f"({counted}[:, None] == torch.arange({E}, device=x.device)).sum(0)",
        "scatter_add ones": f"torch.zeros({E}, dtype=torch.long, device=x.device).scatter_add_(0, {counted}, torch.ones_like({counted}))",
    }
    if near_miss != "counts of other ids":  # JetMoE's map of each token's experts
        counts["routing map sum"] = f"torch.zeros(x.shape[0], {E}, device=x.device).scatter(1, ids, 1).long().sum(0)"
    if split:  # bincount's length depends on the ids, and so would the split sizes' count
        del counts["bincount"]
    w.line("counts = " + w.pick("counts", counts))
    if split:
        w.line("sizes = " + w.pick("sizes", {"tolist": "counts.long().tolist()", "item": f"[int(counts[e]) for e in range({E})]"}))
    else:
        w.line("offs = " + w.pick("offsets", {"cumsum int": "counts.cumsum(0).int()",
                                              "torch.cumsum to": "torch.cumsum(counts, dim=0).to(torch.int32)",
                                              "cumsum dtype": "counts.cumsum(-1, dtype=torch.int32)"}))
    divisor = k + 1 if near_miss == "token index by k + 1" else k
    w.line("tok = " + w.pick("token of each row", {
        "//": f"order // {divisor}",
        "div floor": f"torch.div(order, {divisor}, rounding_mode='floor')",
        "div trunc": f"order.div({divisor}, rounding_mode='trunc')",
        "floor_divide": f"torch.floor_divide(order, {divisor})",
        "repeat_interleave": f"torch.arange(x.shape[0], device=x.device).repeat_interleave({divisor})[order]",
        "expand": f"torch.arange(x.shape[0], device=x.device)[:, None].expand(-1, {divisor}).reshape(-1)[order]",
    }))
    if near_miss == "token index by k + 1":
        w.line("tok = tok.clamp(max=x.shape[0] - 1)")
    w.line("xs = " + w.pick("gather rows", {
        "x[tok]": "x[tok]", "x[tok, :]": "x[tok, :]", "index_select": "x.index_select(0, tok)",
        "torch.index_select": "torch.index_select(x, 0, tok)",
        "gather expanded": "torch.gather(x, 0, tok[:, None].expand(-1, x.shape[1]))",
    }))
    if split:
        project = _split_projection(w, weights, modules)
    else:
        sorted_ids = None
        if weights.b1:
            sorted_ids = "sorted_ids" if w.spellings["sort"] == "sort[1]" else w.pick(
                "sorted ids", {"flat[order]": "flat[order]", "index_select": "flat.index_select(0, order)"})
        spellings = {"torch._grouped_mm": "torch._grouped_mm"} | ({"F.grouped_mm": "F.grouped_mm"} if hasattr(F, "grouped_mm") else {})
        grouped_mm = w.pick("grouped_mm", spellings)

        def project(value, index):
            weight, bias = (weights.w2, weights.b2) if index is None else (weights.w1[index], (weights.b1 or [None, None])[index])
            product = f"{grouped_mm}({value}, {weight}, offs=offs)"
            return product if bias is None else f"({product} + {bias}[{sorted_ids}])"

    flat_w = _weights_flat(w)
    if near_miss == "weights of other pairs":
        flat_w = f"{flat_w}.flip(0)"
    _weighted_experts(w, project, flat_w, "order")
    w.line("y = y.to(x.dtype)")
    if near_miss == "assign instead of accumulate":
        w.line("out = torch.zeros_like(x)")
        w.line("out[tok] += y")
        return
    if s.weights_at == "sum":
        _unpermute(w, "y", "order")
        w.line("per_token = unpermuted.view(-1, %d, x.shape[1])" % k)
        w.line("out = " + w.pick("weighted sum", {
            "* w[..., None]).sum": "(per_token * w[..., None].to(per_token.dtype)).sum(1)",
            "einsum": "torch.einsum('tkh,tk->th', per_token, w.to(per_token.dtype))",
            "bmm": "torch.bmm(w.unsqueeze(1).to(per_token.dtype), per_token).squeeze(1)",
        }))
        return
    kind = w.pick("combine", {"index_add_": 0, "index_add": 1, "scatter_add_": 2, "index_put_ accumulate": 3, "unpermute + sum": 4})
    if kind == 4:
        _unpermute(w, "y", "order")
        w.line("out = " + w.pick("sum over k", {"view sum(1)": f"unpermuted.view(-1, {k}, x.shape[1]).sum(1)",
                                                 "unflatten sum": f"unpermuted.unflatten(0, (-1, {k})).sum(dim=1)",
                                                 "reshape sum(-2)": f"unpermuted.reshape(-1, {k}, x.shape[-1]).sum(-2)"}))
        return
    w.line("out = " + w.pick("zeros", {"zeros_like": "torch.zeros_like(x)", "new_zeros": "x.new_zeros(x.shape)",
                                       "torch.zeros": "torch.zeros(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)"}))
    w.line([
        "out.index_add_(0, tok, y)",
        "out = out.index_add(0, tok, y)",
        "out.scatter_add_(0, " + w.pick("scatter index", {"[:, None].expand": "tok[:, None].expand(-1, y.shape[1])",
                                                          "unsqueeze.expand_as": "tok.unsqueeze(-1).expand_as(y)",
                                                          "view.expand": "tok.view(-1, 1).expand(-1, x.shape[1])"}) + ", y)",
        "out.index_put_((tok,), y, accumulate=True)",
    ][kind])


def _split_projection(w: Writer, weights: Stacked | None, modules: bool):
    """``project`` of a loop over the rows split by ``sizes``: expert e's projection of part e,
    by stacked weights ``part @ W[e] (+ B[e])`` or by an ``nn.Linear`` per expert and projection."""
    s = w.spec
    names = ["w1"] if s.activation in PLAIN or s.layout != "separate" else ["w_gate", "w_up"]
    if modules:
        width = s.inner if len(names) == 2 or s.activation in PLAIN else 2 * s.inner
        for name, (fan_in, fan_out) in zip([*names, "w2"], [*[(s.hidden, width)] * len(names), (s.inner, s.hidden)]):
            w.init.append(f"self.{name} = nn.ModuleList(nn.Linear({fan_in}, {fan_out}, bias={s.bias}) for _ in range({s.experts}))")
    loop = w.pick("split loop", {"enumerate": 0, "range": 1})

    def project(value, index):
        if modules:
            expert = f"self.{'w2' if index is None else names[index]}[e](part)"
        else:
            weight, bias = (weights.w2, weights.b2) if index is None else (weights.w1[index], (weights.b1 or [None, None])[index])
            expert = f"part @ {weight}[e]" + ("" if bias is None else f" + {bias}[e]")
        if loop == 0:
            return f"torch.cat([{expert} for e, part in enumerate({value}.split(sizes, dim=0))], dim=0)"
        return f"torch.cat([({expert}) for e, part in zip(range({s.experts}), torch.split({value}, sizes))])"

    return project


def _unpermute(w: Writer, rows: str, order: str) -> None:
    """``unpermuted``: rows in expert order back in pair order."""
    w.line(w.pick("unpermute", {
        "[argsort]": f"unpermuted = {rows}[{order}.argsort()]",
        "inverse by setitem": f"inverse = torch.empty_like({order})\ninverse[{order}] = torch.arange({order}.shape[0], device=x.device)\n"
                              f"unpermuted = {rows}[inverse]",
        "scatter by setitem": f"unpermuted = torch.empty_like({rows})\nunpermuted[{order}] = {rows}",
        "index_copy": f"unpermuted = torch.zeros_like({rows}).index_copy_(0, {order}, {rows})",
    }))


def write_gathered_bmm(w: Writer, near_miss: str | None) -> None:
    s = w.spec
    k = s.k
    stored_out_in = w.chance("bmm weights [E, out, in]", 0.5)
    width = 2 * s.inner if s.activation in GATED and s.layout != "separate" else s.inner
    parts = [("w1", width)] if s.activation in PLAIN or s.layout != "separate" else [("w_gate", s.inner), ("w_up", s.inner)]

    def weight(name, rows, cols):
        shape = (s.experts, cols, rows) if stored_out_in else (s.experts, rows, cols)
        return w.param(name, *shape, std=rows ** -0.5)

    w1 = [weight(name, s.hidden, n) for name, n in parts]
    w2 = weight("w2", s.inner, s.hidden)
    b1 = [w.param(f"b{name[1:]}", s.experts, n, std=0.1) for name, n in parts] if s.bias else [None, None]
    b2 = w.param("b2", s.experts, s.hidden, std=0.1) if s.bias else None
    w.line(f"flat = {_flat_ids(w)}")
    w.line("xs = " + w.pick("repeat rows", {
        "repeat_interleave": f"x.repeat_interleave({k}, dim=0)",
        "expand reshape": f"x[:, None].expand(-1, {k}, -1).reshape(-1, x.shape[-1])",
        "unsqueeze expand": f"x.unsqueeze(1).expand(x.shape[0], {k}, x.shape[1]).reshape(-1, x.shape[1])",
    }))
    gather = w.pick("gather weights", {"W[flat]": "{}[flat]", "index_select": "{}.index_select(0, flat)"})

    def project(value, index):
        weight, bias = (w2, b2) if index is None else (w1[index], b1[index])
        gathered = gather.format(weight)
        if stored_out_in:
            product = w.pick("bmm out-in", {"bmm": f"torch.bmm({gathered}, {value}.unsqueeze(-1)).squeeze(-1)",
                                            "@ [..., None]": f"({gathered} @ {value}[..., None])[..., 0]"})
        else:
            product = w.pick("bmm in-out", {"bmm": f"torch.bmm({value}.unsqueeze(1), {gathered}).squeeze(1)",
                                            "matmul": f"torch.matmul({value}[:, None, :], {gathered}).squeeze(1)"})
        return product if bias is None else f"({product} + {bias}[flat])"

    _weighted_experts(w, project, _weights_flat(w), None)
    w.line(f"per_token = y.to(x.dtype).view(-1, {k}, x.shape[-1])")
    if s.weights_at == "sum":
        w.line("out = (per_token * w[..., None].to(per_token.dtype)).sum(1)")
    else:
        w.line("out = " + w.pick("sum over k", {"sum(1)": "per_token.sum(1)", "sum(dim=-2)": "per_token.sum(dim=-2)"}))


def _expert_modules(w: Writer, near_miss: str | None) -> None:
    """``self.experts``: an nn.ModuleList of one module per expert, gated or plain."""
    s = w.spec
    gated, fused = s.activation in GATED, s.layout != "separate"
    lines = ["class Expert(nn.Module):", "    def __init__(self, odd=False):", "        super().__init__()"]
    bias = "True" if s.bias else "odd" if near_miss == "a bias on one expert only" else "False"
    if gated and fused:
        lines.append(f"        self.gate_up = nn.Linear({s.hidden}, {2 * s.inner}, bias={bias})")
    elif gated:
        lines += [f"        self.gate = nn.Linear({s.hidden}, {s.inner}, bias={bias})",
                  f"        self.up = nn.Linear({s.hidden}, {s.inner}, bias={bias})"]
    else:
        lines.append(f"        self.up = nn.Linear({s.hidden}, {s.inner}, bias={bias})")
    lines.append(f"        self.down = nn.Linear({s.inner}, {s.hidden}, bias={bias})")
    inner = Writer(w.rng, s, near_miss)
    inner.spellings = w.spellings
    projections = ["self.gate_up(v)"] if gated and fused else ["self.gate(v)", "self.up(v)"] if gated else ["self.up(v)"]
    a = expert_body(inner, "v", lambda value, index: projections[index].replace("(v)", f"({value})"))
    act_module = [line for line in inner.init if line.startswith("self.act")]
    lines += [f"        {line}" for line in act_module]
    lines += ["    def forward(self, v):", *(f"        {line}" for code in inner.body for line in code.splitlines())]
    if near_miss == "another activation on one expert":
        lines.append(f"        return self.down(torch.tanh({a}) if self.odd else {a})")
        lines.insert(3, "        self.odd = odd")
    else:
        lines.append(f"        return self.down({a})")
    w.classes.append("\n".join(lines))
    w.init.append(f"self.experts = nn.ModuleList(Expert(odd=e == 0) for e in range({s.experts}))")


def _stacked_expert(w: Writer, weights: Stacked, rows: str, e: str, prefix: str) -> str:
    """Lines of expert ``e`` on ``rows`` with stacked weights indexed per expert; returns its output."""
    def product(value, weight):
        return w.pick("per-expert matmul", {"@": f"{value} @ {weight}[{e}]", "torch.matmul": f"torch.matmul({value}, {weight}[{e}])",
                                            "torch.mm": f"torch.mm({value}, {weight}[{e}])",
                                            "einsum": f"torch.einsum('th,hn->tn', {value}, {weight}[{e}])"})

    def project(value, index):
        weight, bias = (weights.w2, weights.b2) if index is None else (weights.w1[index], (weights.b1 or [None, None])[index])
        return product(value, weight) if bias is None else f"({product(value, weight)} + {bias}[{e}])"

    a = expert_body(w, rows, project, prefix)
    return project(a, None)


def _dense(w: Writer, near_miss: str | None) -> None:
    """``dense``: the [T, E] routing weights, zero off each token's top-k."""
    E = w.spec.experts
    if near_miss == "a dense mixture":
        w.line("dense = probs")
        return
    spellings = {
        "zeros scatter": f"torch.zeros(x.shape[0], {E}, dtype=w.dtype, device=x.device).scatter(1, ids, w)",
        "new_zeros scatter_": f"w.new_zeros(x.shape[0], {E}).scatter_(1, ids, w)",
        "one_hot * w": f"(F.one_hot(ids, {E}) * w.unsqueeze(-1)).sum(1)",
    }
    if w.spec.scoring == "sigmoid_of_topk" and not w.spec.renormalize and w.spec.scale is None:  # Llama 4's
        spellings["sigmoid of a scatter into -inf"] = \
            "torch.sigmoid(torch.full_like(logits, float('-inf')).scatter_(1, ids, top_logits).float())"
    w.line("dense = " + w.pick("dense weights", spellings))


def write_dense_loop(w: Writer, near_miss: str | None) -> None:
    s = w.spec
    E = s.experts
    _dense(w, near_miss)
    modules = near_miss in ("a bias on one expert only", "another activation on one expert") or w.chance("nn.Linear experts", 0.5)
    if modules:
        _expert_modules(w, near_miss)
    else:
        weights = stacked_weights(w)
    experts = E - 1 if near_miss == "an expert skipped" else E
    column = w.pick("dense column", {"[:, e, None]": "dense[:, {e}, None]", "[:, e:e+1]": "dense[:, {e}:{e} + 1]",
                                     "[:, e].unsqueeze": "dense[:, {e}].unsqueeze(-1)"})
    accumulate = w.pick("accumulate", {"out = out + t": "out = out + {t}", "out += t": "out += {t}"})
    w.line("out = torch.zeros_like(x, dtype=dense.dtype)")
    w.line(f"for e in range({experts}):")
    if modules:
        term = f"{column.format(e='e')} * self.experts[e](x)"
    else:
        start = len(w.body)
        y = _stacked_expert(w, weights, "x", "e", "e_")
        w.body[start:] = ["    " + line for code in w.body[start:] for line in code.splitlines()]
        term = f"{column.format(e='e')} * ({y})"
    w.line("    " + accumulate.format(t=term))
    w.line("out = out.to(x.dtype)")


def write_masked_loop(w: Writer, near_miss: str | None) -> None:
    s = w.spec
    E = s.experts
    modules = near_miss in ("a bias on one expert only", "another activation on one expert") or w.chance("nn.Linear experts", 0.5)
    if modules:
        _expert_modules(w, near_miss)
    else:
        weights = stacked_weights(w)
    routed = "ids[:, :-1]" if near_miss == "a slot left out" else "ids"
    where = w.pick("expert's pairs", {
        "one_hot permute where": "slot, tok = torch.where(mask[e])",
        "where ids == e": f"tok, slot = torch.where({routed} == e)",
        "nonzero as_tuple": f"tok, slot = torch.nonzero({routed} == e, as_tuple=True)",
        "method nonzero as_tuple": f"tok, slot = ({routed} == e).nonzero(as_tuple=True)",
    })
    if "mask[e]" in where:
        w.line(f"mask = F.one_hot({routed}, num_classes={E}).permute(2, 1, 0)")
    w.line("out = torch.zeros_like(x)")
    w.line(f"for e in range({E}):")
    w.line("    " + where)
    if near_miss == "tokens dropped by a capacity":
        w.line("    tok, slot = tok[:2], slot[:2]")
    weight = w.pick("pair weight", {"[tok, slot, None]": "w[tok, slot, None]", "[tok, slot].unsqueeze": "w[tok, slot].unsqueeze(-1)",
                                    "[tok, slot][:, None]": "w[tok, slot][:, None]"})
    if modules:
        y = "self.experts[e](x[tok])"
    else:
        start = len(w.body)
        w.line("rows = x[tok]")
        y = _stacked_expert(w, weights, "rows", "e", "e_")
        w.body[start:] = ["    " + line for code in w.body[start:] for line in code.splitlines()]
    w.line(f"    y = (({y}) * {weight}).to(x.dtype)")
    w.line("    " + w.pick("accumulate rows", {"index_add_": "out.index_add_(0, tok, y)",
                                                "index_put_ accumulate": "out.index_put_((tok,), y, accumulate=True)",
                                                "out[tok] += y": "out[tok] += y"}))


def write_dense_bmm(w: Writer, near_miss: str | None) -> None:
    """Every expert on every token at once, its [E, T, H] rows through batched products: the
    routing weights scale each expert's input (bias-free experts: Llama 4's) or its output."""
    s = w.spec
    E = s.experts
    _dense(w, near_miss)
    weights = stacked_weights(w)
    if s.weights_at == "input":
        w.line("scores = dense.to(x.dtype)")  # the products run in the tokens' dtype
        w.line("rows = " + w.pick("weighted rows", {
            "repeat * column, view (Llama 4)": f"(x.repeat({E}, 1) * scores.t().reshape(-1, 1)).view({E}, -1, x.shape[-1])",
            "broadcast": "x.unsqueeze(0) * scores.t().unsqueeze(-1)",
            "[None] * .T[..., None]": "x[None] * scores.T[..., None]",
        }))
    else:
        w.line("rows = " + w.pick("rows of every expert", {
            "expand": f"x.unsqueeze(0).expand({E}, -1, -1)",
            "repeat view": f"x.repeat({E}, 1).view({E}, x.shape[0], -1)",
            "[None].expand": f"x[None].expand({E}, x.shape[0], x.shape[1])",
            "x, broadcast by the product": "x",
        }))
    products = {"torch.bmm": "torch.bmm({}, {})", "@": "({} @ {})", "torch.matmul": "torch.matmul({}, {})",
                "einsum": "torch.einsum('etd,edn->etn', {}, {})"}
    product = w.pick("batched product", products)
    broadcast = w.spellings.get("rows of every expert") == "x, broadcast by the product"
    first = w.pick("broadcast product", {"einsum": "torch.einsum('td,edn->etn', {}, {})",
                                         "torch.matmul": "torch.matmul({}, {})"}) if broadcast else product

    def project(value, index):
        weight, bias = (weights.w2, weights.b2) if index is None else (weights.w1[index], (weights.b1 or [None, None])[index])
        y = (first if value == "rows" else product).format(value, weight)
        return y if bias is None else f"({y} + " + w.pick("batched bias", {"unsqueeze": f"{bias}.unsqueeze(1))",
                                                                          "[:, None]": f"{bias}[:, None, :])"})

    a = expert_body(w, "rows", project)
    w.line(f"y = {project(a, None)}")
    if s.weights_at == "input":
        w.line("out = " + w.pick("sum over experts", {"sum(0)": "y.sum(0)", "sum(dim=0)": "y.sum(dim=0)",
                                                      "torch.sum": "torch.sum(y, 0)"}))
    else:
        w.line("out = " + w.pick("weighted sum over experts", {
            "* column": "(y * dense.t().unsqueeze(-1)).sum(0)",
            "column *": "(dense.T[..., None] * y).sum(dim=0)",
        }))
    w.line("out = out.to(x.dtype)")


WRITERS = {"sorted_grouped_mm": write_sorted_grouped_mm, "split_loop": functools.partial(write_sorted_grouped_mm, split=True),
           "gathered_bmm": write_gathered_bmm, "dense_loop": write_dense_loop, "dense_bmm": write_dense_bmm,
           "masked_loop": write_masked_loop}

# near miss -> the styles it applies to
NEAR_MISSES = {
    "sort descending": ("sorted_grouped_mm", "split_loop"),
    "counts of other ids": ("sorted_grouped_mm", "split_loop"),
    "token index by k + 1": ("sorted_grouped_mm", "split_loop"),
    "weights of other pairs": ("sorted_grouped_mm", "split_loop"),
    "assign instead of accumulate": ("sorted_grouped_mm",),
    "a bias on one expert only": ("dense_loop", "masked_loop"),
    "another activation on one expert": ("dense_loop", "masked_loop"),
    "an expert skipped": ("dense_loop",),
    "tokens dropped by a capacity": ("masked_loop",),
    "a slot left out": ("masked_loop",),
    "weights before a biased down projection": ("sorted_grouped_mm", "gathered_bmm"),
    "biased experts, weighted inputs": ("dense_bmm",),
    "a dense mixture": ("dense_bmm",),
}
# near misses whose eager result is itself undefined: index_put_ with repeated indices keeps any one
UNDEFINED = {"assign instead of accumulate"}


# --- drawing a case --------------------------------------------------------------------------------


def _experts_count(rng: random.Random, style: str) -> int:
    """E in 1..64, mostly small; loops unroll E bodies, so they draw up to 32."""
    top = 32 if style in ("dense_loop", "masked_loop", "dense_bmm", "split_loop") else 64
    return min(top, max(1, int(round(math.exp(rng.uniform(0, math.log(top)))))))


def _groups(rng: random.Random, experts: int, k: int) -> tuple | None:
    """(n_group, topk_group, group_top) of a group-limited choice over ``experts``, or None."""
    options = [(g, kept) for g in range(2, experts // 2 + 1) if experts % g == 0
               for kept in range(1, g + 1) if kept * (experts // g) >= k]
    return (*rng.choice(options), rng.choice([1, 2])) if options else None


def draw_spec(rng: random.Random, near_miss: str | None) -> Spec:
    styles = [st for st in STYLES if near_miss is None or st in NEAR_MISSES[near_miss]]
    style = rng.choice(styles)
    experts = _experts_count(rng, style)
    if near_miss in ("a bias on one expert only", "another activation on one expert", "an expert skipped",
                     "sort descending", "counts of other ids"):
        experts = max(experts, 2)
    k = rng.randint(1, min(8, experts))
    if near_miss in ("assign instead of accumulate", "token index by k + 1", "weights of other pairs", "a slot left out"):
        experts, k = max(experts, 2), max(k, 2)
    tokens = rng.randint(1, 300)
    lead = (tokens,) if rng.random() < 0.6 else next(((b, tokens // b) for b in (2, 3, 4) if tokens % b == 0), (tokens,))
    grouped = style == "sorted_grouped_mm"
    # torch._grouped_mm takes bfloat16 only on CPU
    dtype = torch.bfloat16 if grouped or rng.random() < 0.3 else torch.float32
    scoring = "softmax" if near_miss == "a dense mixture" else rng.choice(
        ["softmax", "softmax", "sigmoid", "softmax_of_topk", "sigmoid_of_topk"])
    groups = _groups(rng, experts, k) if scoring in ("softmax", "sigmoid") and rng.random() < 0.3 else None
    activation = rng.choice(GATED + GATED + PLAIN)
    bias = (rng.random() < 0.3 or near_miss in ("weights before a biased down projection", "biased experts, weighted inputs")) \
        and near_miss != "a bias on one expert only"
    weights_at = rng.choice({"sorted_grouped_mm": ["after", "after", "before", "sum"], "split_loop": ["after", "before", "sum"],
                             "gathered_bmm": ["after", "after", "before", "sum"], "dense_bmm": ["after", "input"]}.get(style, ["after"]))
    if near_miss == "weights before a biased down projection":
        weights_at = "before"
    elif near_miss == "biased experts, weighted inputs":
        weights_at = "input"
    elif near_miss == "weights of other pairs" and weights_at == "sum":
        weights_at = "after"
    elif bias and weights_at in ("before", "input"):
        weights_at = "after"
    return Spec(
        style=style, tokens=tokens, lead=lead, hidden=rng.choice([8, 16, 24, 32]), inner=rng.choice([8, 16]),
        experts=experts, k=k, dtype=dtype, scoring=scoring, groups=groups,
        renormalize=scoring != "softmax_of_topk" and rng.random() < 0.6,
        scale=rng.choice([None, None, 2.5]), activation=activation,
        layout=rng.choice(["fused", "fused", "interleaved", "separate"]) if activation in GATED else "fused",
        bias=bias, out_in=rng.random() < 0.5 if grouped or style != "gathered_bmm" else False,
        weights_at=weights_at, shared=rng.choice([None, None, "plain", "gated"]), dynamic=rng.random() < 0.5,
    )


def _shared(w: Writer) -> None:
    s = w.spec
    if s.shared is None:
        return
    w.init.append(f"self.shared = nn.Sequential(nn.Linear({s.hidden}, {s.inner}), nn.SiLU(), nn.Linear({s.inner}, {s.hidden}))")
    if s.shared == "gated":
        w.init.append(f"self.shared_gate = nn.Linear({s.hidden}, 1, bias=False)")
        w.line("out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)")
    else:
        w.line("out = " + w.pick("shared expert", {"out + shared": "out + self.shared(x)", "shared + out": "self.shared(x) + out"}))


def draw(seed: int, near_miss_rate: float = 0.0, near_miss: str | None = None) -> Case:
    """The case of ``seed``: an equivalent spelling, or with probability ``near_miss_rate`` a near
    miss; or the near miss named."""
    rng = random.Random(seed)
    if near_miss is None and rng.random() < near_miss_rate:
        near_miss = rng.choice(sorted(NEAR_MISSES))
    spec = draw_spec(rng, near_miss)
    w = Writer(rng, spec, near_miss)
    if len(spec.lead) > 1:
        w.line("x = " + w.pick("flatten tokens", {"reshape": f"x_in.reshape(-1, {spec.hidden})",
                                                  "view shape": "x_in.view(-1, x_in.shape[-1])",
                                                  "flatten": "x_in.flatten(0, 1)"}))
    else:
        w.line("x = x_in")
    write_router(w)
    WRITERS[spec.style](w, near_miss)
    _shared(w)
    w.line("return out.view_as(x_in)" if len(spec.lead) > 1 else "return out")
    body = "\n".join("        " + line for code in w.body for line in code.splitlines())
    init = "\n".join("        " + line for line in w.init)
    source = "\n\n".join([
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn", *w.classes,
        f"class Block(nn.Module):\n    def __init__(self):\n        super().__init__()\n{init}\n\n"
        f"    def forward(self, x_in):\n{body}\n",
    ])
    return Case(seed, spec, source, w.spellings, near_miss)


# --- checking a case -------------------------------------------------------------------------------


def build(case: Case) -> tuple[torch.nn.Module, torch.Tensor]:
    """The case's module (its source registered, so tracebacks and dynamo show its lines) and an input."""
    filename = f"<spelling {case.seed}>"
    linecache.cache[filename] = (len(case.source), None, case.source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(case.source, filename, "exec"), namespace)
    model = namespace["Block"]().to(case.spec.dtype)
    return model, torch.randn(*case.spec.lead, case.spec.hidden, dtype=case.spec.dtype)


@dataclasses.dataclass
class Outcome:
    seed: int
    style: str
    near_miss: str | None
    rewritten: dict  # pattern -> count
    left_alone: list  # (pattern, reason)
    error: str | None  # a wrong result or a crash; None when the case holds


def _outputs_and_grads(model, x: torch.Tensor, grad: torch.Tensor) -> list:
    x = x.detach().requires_grad_()
    out = model(x)
    return [out, *torch.autograd.grad(out, [x, *model.parameters()], grad.to(out.dtype), allow_unused=True)]


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).norm().item()


def _mismatches(model, compiled, x: torch.Tensor) -> list[str]:
    """What is wrong with each output and gradient of ``compiled`` farther from a more
    precise run of the model than 8x eager's own distance or the dtype's tolerance: a gradient
    that cancels to zero, say with k = E and renormalised weights, is rounding noise in both."""
    from helpers import TOLERANCE

    precise = torch.float64 if x.dtype == torch.float32 else torch.float32
    grad = torch.randn(x.shape)
    eager = _outputs_and_grads(model, x, grad)
    actual = _outputs_and_grads(compiled, x, grad)
    reference = _outputs_and_grads(copy.deepcopy(model).to(precise), x.to(precise), grad)
    names = ["output", "grad of x", *(f"grad of {name}" for name, _ in model.named_parameters())]
    relative, floor = TOLERANCE[x.dtype]
    mismatches = []
    for name, a, e, r in zip(names, actual, eager, reference, strict=True):
        if (a is None) != (r is None) or (r is not None and a.shape != r.shape):
            mismatches.append(f"{name}: compiled {None if a is None else tuple(a.shape)}, "
                              f"eager {None if r is None else tuple(r.shape)}")
            continue
        if r is None:
            continue
        bound = max(relative * r.double().norm().item() + floor * r.numel() ** 0.5, 8 * _distance(e, r))
        error = _distance(a, r)
        if not error <= bound:
            mismatches.append(f"{name}: error {error:.3g} > {bound:.3g} (norm {r.norm():.3g}, {x.dtype})")
    return mismatches


def assert_matches_eager(model, compiled, x: torch.Tensor, compile) -> None:
    """Forward and every gradient of ``compiled`` hold against eager (``_mismatches``). bfloat16
    rounds at other places inside the ops than eager does (a bias added after the GEMM, not inside
    it), and where that moves a pre-activation across a ReLU's kink, a gradient jumps: where
    bfloat16 misses, the block ``compile`` makes of the model in float32 must hold instead, where
    rounding is small. (The ops' bfloat16 precision has bars of its own: tests/test_ops.py.)"""
    mismatches = _mismatches(model, compiled, x)
    if mismatches and x.dtype == torch.bfloat16:
        model32 = copy.deepcopy(model).float()
        mismatches = _mismatches(model32, compile(model32), x.float())
    assert not mismatches, "; ".join(mismatches)


def check(case: Case, compiled: bool = False) -> Outcome:
    """Compile the case with the rewrite (and its graph run as the ops' eager code, or with
    ``compiled`` through Inductor), and hold forward and gradients against eager."""
    import inductor_moe
    from inductor_moe.patterns.graph_pass import recording, rewrite_moe

    def rewrite_only(gm, example_inputs):
        rewrite_moe(gm.graph)
        gm.recompile()
        return gm.forward

    model, x = build(case)

    def compile(module):
        torch._dynamo.reset()
        return torch.compile(module, backend="inductor" if compiled else rewrite_only, dynamic=case.spec.dynamic)

    error = None
    # one graph for the masked loop's where() and the split loop's counts.tolist()
    with recording() as decisions, inductor_moe.config.patch(triton_on_cpu=False), \
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        try:
            compiled_model = compile(model)
            compiled_model(x)  # compiles the block: its decisions, before any float32 rerun's
            decisions = list(decisions)
            if case.near_miss not in UNDEFINED:  # otherwise only the decisions can be checked
                assert_matches_eager(model, compiled_model, x, compile)
        except Exception as failure:  # noqa: BLE001  (a crash is as much a failure as a wrong value)
            error = f"{type(failure).__name__}: {failure}"
    rewritten = collections.Counter(d.pattern for d in decisions if d.rewritten)
    left = [(d.pattern, d.detail) for d in decisions if not d.rewritten]
    outcome = Outcome(case.seed, case.spec.style, case.near_miss, dict(rewritten), left, error)
    if error is None:
        outcome.error = _expectation(case, outcome)
    return outcome


def _expectation(case: Case, outcome: Outcome) -> str | None:
    """What is wrong with a case that matched eager: an equivalent spelling must be rewritten
    (experts and router), a near miss's experts left alone with a reason."""
    experts = sum(n for p, n in outcome.rewritten.items() if p.endswith("_experts"))
    if case.near_miss is None:
        if experts != 1 or outcome.rewritten.get("router", 0) != 1:
            return f"not rewritten: {outcome.rewritten}, left alone: {outcome.left_alone}"
        return None
    if experts:
        return f"near miss {case.near_miss!r} rewritten: {outcome.rewritten}"
    if not any(p.endswith("_experts") for p, _ in outcome.left_alone):
        return f"near miss {case.near_miss!r} left alone without a reason"
    return None


def _check_indexed(item: tuple[int, Case, int]) -> Outcome:
    i, case, compiled_every = item
    return check(case, compiled=bool(compiled_every) and i % compiled_every == 0)


def campaign(cases, compiled_every: int = 0, log=print, jobs: int = 1) -> list[Outcome]:
    """Check each case (every ``compiled_every``-th through Inductor), in ``jobs`` processes; log
    each failure with its seed."""
    cases = list(cases)
    items = [(i, case, compiled_every) for i, case in enumerate(cases)]
    if jobs > 1:
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_setup, initargs=(1,))
        results = pool.imap(_check_indexed, items, chunksize=8)
    else:
        results = map(_check_indexed, items)
    outcomes = []
    for case, outcome in zip(cases, results):
        outcomes.append(outcome)
        if outcome.error:
            near_miss = f", near miss {case.near_miss!r} (--near-miss)" if case.near_miss else ""
            log(f"seed {case.seed} ({case.spec.style}{near_miss}): {outcome.error[:400]}")
    if jobs > 1:
        pool.close()
    return outcomes


def summary(outcomes: list[Outcome]) -> dict:
    """Counts over all cases and by style: equivalent ones rewritten, near misses left alone with
    a reason, and the wrong results or crashes among the failures."""
    def counts(group: list[Outcome]) -> dict:
        equivalent = [o for o in group if o.near_miss is None]
        near = [o for o in group if o.near_miss is not None]
        return {
            "cases": len(group),
            "equivalent": len(equivalent),
            "equivalent_rewritten": sum(o.error is None for o in equivalent),
            "near_misses": len(near),
            "near_misses_left_alone_with_reason": sum(o.error is None for o in near),
            "wrong_or_crashed": sum(bool(o.error) and not o.error.startswith(("not rewritten", "near miss")) for o in group),
        }

    styles = sorted({o.style for o in outcomes})
    return counts(outcomes) | {
        "failing_seeds": [o.seed for o in outcomes if o.error],
        "by_style": {style: counts([o for o in outcomes if o.style == style]) for style in styles},
    }


def _setup(threads: int | None = None) -> None:
    """What a campaign's process needs: the tests' imports, Triton's interpreter flag before Triton
    decorates anything (conftest), quiet fake-tensor logs (a crash is reported once)."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    import conftest  # noqa: F401

    if threads:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the first seed; cases take seeds from it on")
    parser.add_argument("--near-misses", type=float, default=0.2, help="the share of near misses")
    parser.add_argument("--compiled-every", type=int, default=0, help="every n-th case through Inductor too")
    parser.add_argument("--show", type=int, help="print the case of this seed and check it")
    parser.add_argument("--near-miss", choices=sorted(NEAR_MISSES), help="with --show: this near miss of the seed")
    parser.add_argument("--jobs", type=int, default=1, help="processes (of one thread each when more than one)")
    parser.add_argument("--json")
    args = parser.parse_args()
    _setup()

    if args.show is not None:
        case = draw(args.show, args.near_misses, args.near_miss)
        print(case.source, "\n", case.spec, "\n", case.near_miss, "\n", case.spellings)
        print(check(case))
        return
    start = time.time()
    cases = (draw(seed, args.near_misses) for seed in range(args.seed, args.seed + args.cases))
    outcomes = campaign(cases, args.compiled_every, jobs=args.jobs)
    result = summary(outcomes) | {"first_seed": args.seed, "near_miss_rate": args.near_misses,
                                  "compiled_every": args.compiled_every, "seconds": round(time.time() - start),
                                  "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""``inductor_moe.explain``: what torch.compile with the plugin makes of a model, and why.

    print(inductor_moe.explain(model, x))

Runs dynamo over the model once (``torch._dynamo.explain``, which resets dynamo's caches), then
the plugin's rewrite over each captured graph, and reports every MoE-like region the matchers
looked at: rewritten into which canonical op, or left alone with the node and the reason, plus
the graph breaks that kept code out of the graphs, and transformers experts running ``eager``.
"""

import dataclasses
import os

import torch

from . import config, transformers_experts
from .patterns.graph_pass import Decision, recording, rewrite_moe


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    reason: str
    where: str  # the user's frame that broke the graph
    hint: str = ""  # what would keep an MoE block in one graph, where the break is a known one


@dataclasses.dataclass(frozen=True)
class Report:
    graph_count: int
    decisions: tuple[Decision, ...]
    graph_breaks: tuple[GraphBreak, ...]
    eager_experts: tuple[tuple[str, str], ...]  # (module name, class) of transformers experts on "eager"
    eager_experts_traced_as: str | None  # the implementation dynamo traced them as, if any
    enabled: bool  # inductor_moe.config.enabled when explained

    @property
    def rewritten(self) -> list[Decision]:
        return [d for d in self.decisions if d.rewritten]

    @property
    def left_alone(self) -> list[Decision]:
        return [d for d in self.decisions if not d.rewritten]

    def __str__(self) -> str:
        lines = [f"inductor_moe.explain: {self.graph_count} graph(s), {len(self.graph_breaks)} graph break(s)"]
        if not self.enabled:
            lines.append("inductor_moe is disabled (inductor_moe.config.enabled = False): nothing is rewritten")
        for title, decisions, verb in (("rewritten", self.rewritten, "->"), ("left alone", self.left_alone, "because")):
            lines.append(f"{title} ({len(decisions)}):")
            lines += [f"  {d.pattern}: {d.where}\n      {verb} {d.detail}" for d in decisions]
        lines.append(f"graph breaks ({len(self.graph_breaks)}):")
        lines += [f"  {b.where}\n      {b.reason}" + (f"\n      hint: {b.hint}" if b.hint else "") for b in self.graph_breaks]
        if self.eager_experts:
            traced = self.eager_experts_traced_as
            lines.append(f"transformers experts on experts_implementation='eager' ({len(self.eager_experts)}):")
            lines += [f"  {name} ({cls})" for name, cls in self.eager_experts]
            lines.append(
                f"      traced as {traced!r} (inductor_moe.config.transformers_eager_experts)" if traced else
                "      eager loops over nonzero() and breaks the graph: set inductor_moe.config."
                "transformers_eager_experts = 'grouped_mm', or load the model with experts_implementation='grouped_mm'"
            )
        if not self.decisions:
            lines.append("no MoE-like region found in the captured graphs")
        return "\n".join(lines)


def _summary(reason: str) -> str:
    """Dynamo's reason without its hints and links: the title and the explanation."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    explanation = [line.removeprefix("Explanation: ") for line in lines[1:] if line.startswith("Explanation:")]
    return ": ".join(lines[:1] + explanation)


def _hint(reason: str, where: str) -> str:
    """What keeps the code of a known MoE graph break in one graph."""
    code = where.split(": ", 1)[-1]
    if code.startswith("for ") and "data-dependent" in reason:
        return ("a loop over the experts that got tokens (nonzero()) runs a data-dependent number of times and "
                "cannot be captured: loop over range(num_experts) with torch.where(ids == e) (masked_loop_experts)")
    if ".tolist()" in code or ".item()" in code:
        return "torch._dynamo.config.capture_scalar_outputs = True keeps the counts in the graph"
    if "nonzero" in code or "torch.where" in code:
        return "torch._dynamo.config.capture_dynamic_output_shape_ops = True keeps it in the graph"
    return ""


def _frame(reason) -> str:
    if not reason.user_stack:
        return "(no user frame)"
    frame = reason.user_stack[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"


def explain(model, *example_inputs, **example_kwargs) -> Report:
    """Report what torch.compile + inductor_moe rewrites in ``model`` called on the example inputs."""
    dynamo = torch._dynamo.explain(model)(*example_inputs, **example_kwargs)
    with recording() as decisions:
        if config.enabled:
            for gm in dynamo.graphs:  # explain's own copies: rewriting them changes nothing else
                rewrite_moe(gm.graph)
    breaks = tuple(dict.fromkeys(GraphBreak(_summary(r.reason), _frame(r), _hint(r.reason, _frame(r)))
                                 for r in dynamo.break_reasons))
    eager = tuple(transformers_experts.eager_experts(model)) if isinstance(model, torch.nn.Module) else ()
    traced_as = config.transformers_eager_experts if config.enabled else None
    return Report(dynamo.graph_count, tuple(decisions), breaks, eager, traced_as, config.enabled)

"""Turning a matched block into canonical ops: safety checks, new nodes, removal of the old ones.

The pre-grad graph has mutation and aliasing, so a block is rewritten only when it is closed:
its intermediates are used by nothing outside it (except cheap routing metadata, which stays),
whatever it updates in place it also created, and its result is read only after it is complete.
Every check runs before the graph changes; a refusal leaves the graph exactly as it was.
"""

import contextlib
import dataclasses
import operator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Graph, Node
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves

from .. import config, expert_parallel
from .dispatch import Block
from .experts import Weight
from .fx import NoMatch, call, dtype, is_call, require, shape, value, view_source
from .router import Router


class Emitter:
    """Inserts nodes before ``point``, giving each the fake value dynamo would have recorded."""

    def __init__(self, graph: Graph, point: Node, like: Node):
        self.graph, self.point = graph, point
        self.meta = {key: like.meta[key] for key in ("stack_trace", "nn_module_stack") if key in like.meta}
        self.created: list[Node] = []

    def _add(self, op: str, target, args: tuple, kwargs: dict, example_value=None) -> Node:
        with self.graph.inserting_before(self.point):
            node = self.graph.create_node(op, target, args, kwargs)
        self.created.append(node)
        node.meta.update(self.meta)
        if example_value is None:
            fake_args, fake_kwargs = map_arg((args, kwargs), value)
            # the mode of dynamo's example values, not the TracingContext's (AOT's, in late pre-grad passes)
            mode = next((v.fake_mode for v in tree_leaves((fake_args, fake_kwargs)) if isinstance(v, FakeTensor)), None)
            with mode or contextlib.nullcontext():
                fn = target if op == "call_function" else getattr(type(fake_args[0]), target)
                example_value = fn(*fake_args, **fake_kwargs)
        node.meta["example_value"] = example_value
        return node

    def function(self, target, *args, **kwargs) -> Node:
        return self._add("call_function", target, args, kwargs)

    def opaque(self, example_value, target, *args, **kwargs) -> Node:
        """A call whose fake value is given: one that cannot run on fake tensors here (collectives
        with data-dependent splits, traced later by AOTAutograd)."""
        return self._add("call_function", target, args, kwargs, example_value)

    def method(self, name: str, *args, **kwargs) -> Node:
        return self._add("call_method", name, args, kwargs)

    def undo(self) -> None:
        for node in reversed(self.created):
            self.graph.erase_node(node)


def _position(graph: Graph) -> dict:
    return {node: i for i, node in enumerate(graph.nodes)}


def _check_closed(nodes: set, outputs: set, shareable: set) -> None:
    for node in nodes - outputs - shareable:
        for user in node.users:
            if user not in nodes:
                raise NoMatch(f"{node} is also used outside the block, by {user}: rewriting would compute it twice")
    for node in nodes:
        c = call(node)
        if c is not None and c.inplace:
            base = node.args[0]
            while (source := view_source(base)) is not None and base in nodes:
                base = source
            require(base in nodes, f"{node} updates {base} in place, which the block did not create")


def _insertion_point(nodes: set, outputs: tuple, inputs: list, position: dict) -> Node | None:
    """The first node outside the block that reads a result; every input must come before it."""
    readers = [user for out in outputs for user in out.users if user not in nodes]
    if not readers:
        return None
    point = min(readers, key=position.__getitem__)
    last_write = max((n for n in nodes if (c := call(n)) is not None and c.inplace), key=position.__getitem__, default=None)
    require(last_write is None or position[last_write] < position[point], f"{point} reads the block's result before it is complete")
    for node in inputs:
        require(position[node] < position[point], f"{node} is computed only after the block's result is first read")
    return point


def _replace(graph: Graph, nodes: set, replacements: dict) -> None:
    """Redirect readers of the old results, then erase the block and whatever only it used."""
    new_nodes = set(replacements.values())
    for old, new in replacements.items():
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in nodes and user not in new_nodes)
    doomed = set(nodes)
    for node in reversed(list(graph.nodes)):  # reverse order: users go before what they use
        if node in doomed and not node.users:
            doomed |= {n for n in node.all_input_nodes if is_pure(n)}
            graph.erase_node(node)


def drop_dead_code(graph: Graph) -> None:
    """Erase the values nothing reads and their producers (dynamo keeps a no-op ``.to`` whose
    result the model never uses), so that they never hold a block open."""
    for node in reversed(list(graph.nodes)):
        if not node.users and node.op in ("call_function", "call_method") and is_pure(node):
            graph.erase_node(node)


def erase_unused(graph: Graph, node: Node) -> None:
    """Erase ``node`` (which nothing reads), then whatever only it used and has no side effect."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for source in inputs:
        if not source._erased and not source.users and source.op != "placeholder" and is_pure(source):
            erase_unused(graph, source)


def is_pure(node: Node) -> bool:
    """Safe to drop once unused: no side effect, no in-place update (FX deems methods pure)."""
    in_place = node.op == "call_method" and node.target.endswith("_") or getattr(call(node), "inplace", False)
    return not node.is_impure() and not in_place


def _weight_nodes(weight: Weight | None) -> list:
    if weight is None:
        return []
    return [n for part in weight.parts for n in (part if isinstance(part, tuple) else (part,))]


def _assemble(emit: Emitter, weight: Weight | None) -> Node | None:
    """The stacked ``[E, in, out]`` (or ``[E, out]``) value a Weight describes."""
    if weight is None:
        return None
    parts = weight.parts
    if weight.out_in and len(parts) > 1 and all(isinstance(p, tuple) for p in parts):
        # per-expert [out, in] parts (gate and up nn.Linear): one cat in [E, out, in] order copies
        # each weight once; stacking each part, then concatenating, would copy them twice
        num_experts = len(parts[0])
        flat = emit.function(torch.cat, [part[e] for e in range(num_experts) for part in parts])
        node = emit.method("view", flat, num_experts, -1, shape(parts[0][0])[-1])
    else:
        parts = [emit.function(torch.stack, list(p)) if isinstance(p, tuple) else p for p in parts]
        node = parts[0] if len(parts) == 1 else emit.function(torch.cat, parts, dim=1 if weight.out_in else -1)
    return emit.method("transpose", node, 1, 2) if weight.out_in else node


def _absorb_final_cast(block: Block) -> None:
    """Take a trailing cast back to the tokens' dtype into the block: the op returns that dtype."""
    users = list(block.result.users)
    if len(users) != 1 or not is_call(users[0], "to") or dtype(users[0]) != dtype(block.x):
        return
    if any(user not in block.nodes for acc in block.accumulators for user in acc.users):
        return  # the accumulator is also read: it must keep the uncast result
    block.nodes.add(users[0])
    block.result = users[0]


def _rewrite(graph: Graph, nodes: set, outputs: tuple, shareable: set, inputs: list, build) -> bool:
    """Check the region, then replace its outputs by what ``build(emit)`` returns ({old: new})."""
    _check_closed(nodes, set(outputs), shareable)
    point = _insertion_point(nodes, outputs, inputs, _position(graph))
    if point is None:
        return False  # nothing reads the result
    emit = Emitter(graph, point, outputs[0])
    try:
        replacements = build(emit)
    except RuntimeError as error:  # the op's own checks (torch._check) refuse these operands
        emit.undo()
        raise NoMatch(f"the canonical op refuses the operands: {error}") from error
    _replace(graph, nodes, replacements)
    return True


def rewrite_experts(graph: Graph, block: Block) -> bool:
    """Replace the block by ``inductor_moe::experts``."""
    _absorb_final_cast(block)
    outputs = (block.result, *block.accumulators)
    mlp = block.mlp
    weights = [n for w in (mlp.w1, mlp.b1, mlp.w2, mlp.b2) for n in _weight_nodes(w)]
    act = mlp.activation
    options = {f.name: getattr(act, f.name) for f in dataclasses.fields(act)[1:] if getattr(act, f.name) != f.default}
    options.update(_precision())

    def build(emit: Emitter) -> dict:
        x, ids, weights = block.x, block.ids, block.weights
        if block.received is not None:  # one slot per row, its local expert, weight 1
            ids = emit.function(expert_parallel.received_expert_ids, block.received, emit.method("size", x, 0))
            weights = emit.function(torch.ones_like, ids, dtype=torch.float32)
        if block.scaled_input:  # sum_j expert_j(w_j x): each (token, slot) pair a row of its own, weight 1
            k = shape(ids)[1]
            column = emit.method("to", emit.method("unsqueeze", weights, -1), dtype(x))
            x = emit.method("flatten", emit.function(operator.mul, emit.method("unsqueeze", x, 1), column), 0, 1)
            ids = emit.method("reshape", ids, -1, 1)
            weights = emit.function(torch.ones_like, ids, dtype=torch.float32)
        stacked = [_assemble(emit, w) for w in (mlp.w1, mlp.w2, mlp.b1, mlp.b2)]
        if config.expert_parallel is not None and block.received is None:  # expert_parallel.parallelize
            out = emit.opaque(value(x).new_empty(shape(x)), expert_parallel.experts_of_group, x, ids, weights,
                              *stacked, act.name, config.expert_parallel, **options)
        else:
            out = emit.function(operator.getitem, emit.function(
                torch.ops.inductor_moe.experts.default, x, ids, weights, *stacked, act.name, **options), 0)
        if block.scaled_input and k > 1:
            out = emit.method("sum", emit.method("unflatten", out, 0, (-1, k)), 1)
        if dtype(out) != dtype(block.result):
            out = emit.method("to", out, dtype(block.result))
        return {old: out for old in outputs}

    inputs = [n for n in (block.x, block.ids, block.weights, block.received) if n is not None] + weights
    return _rewrite(graph, block.nodes, outputs, block.shareable, inputs, build)


def _precision() -> dict:
    """The experts op's FP8 arguments from ``config`` (none when it is off)."""
    if config.fp8 is None:
        return {}
    return {"fp8_recipe": config.fp8, "fp8_weight_grad": config.fp8_weight_grad}


def rewrite_router(graph: Graph, router: Router) -> bool:
    """Replace the router's scores, top-k and weight post-processing by ``inductor_moe::route``."""

    def build(emit: Emitter) -> dict:
        logits, lead = router.logits, None
        if len(shape(logits)) > 2:  # route takes [T, E]: flatten the leading dims, then restore them
            lead = emit.function(operator.getitem, emit.method("size", logits), slice(None, -1))
            logits = emit.method("flatten", logits, 0, -2)
        route = emit.function(torch.ops.inductor_moe.route.default, logits, router.k, **router.options)

        def output(index: int, like: Node) -> Node:
            out = emit.function(operator.getitem, route, index)
            if lead is not None:
                out = emit.method("unflatten", out, 0, lead)
            return out if dtype(like) == dtype(out) else emit.method("to", out, dtype(like))

        replacements = {router.ids: output(1, router.ids)}
        if router.weights is not None:
            replacements[router.weights] = output(0, router.weights)
        return replacements

    outputs = tuple(n for n in (router.ids, router.weights) if n is not None)
    inputs = [router.logits, *(n for n in router.options.values() if isinstance(n, Node))]
    return _rewrite(graph, router.nodes, outputs, router.shareable, inputs, build)

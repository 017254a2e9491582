"""The canonical ops in plain torch calls, chosen for speed on CPU (and a reference elsewhere).

Functional (no in-place updates) and free of data-dependent shapes on the ``_grouped_mm`` path,
so the same code serves as the eager implementation and as what the CPU lowering traces into
compiled graphs (``lowerings/cpu.py``).

Rows of an expert computation are (token, slot) pairs, ``pair = token * k + slot``. ``order`` lists
the pairs grouped by expert (stable, so deterministic) and ``offsets[e]`` is the end of expert
``e``'s rows in that order, the layout ``torch._grouped_mm`` takes.
"""

import torch
import torch.nn.functional as F

from . import fp8
from .activations import Activation

_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 data: the precision of every reduction here."""
    return torch.promote_types(dtype, torch.float32)


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of the flat expert ids: (order, int32 offsets). No data-dependent shapes."""
    counts = ids.new_zeros(num_experts).scatter_add(0, ids, torch.ones_like(ids))
    # A stable sort of small integer keys is the counting sort's permutation; on CPU it is faster
    # than materialising the per-expert ranks.
    order = torch.argsort(ids, stable=True)
    return order, counts.cumsum(0, dtype=torch.int32)


def _grouped_mm_accepts(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm's CPU kernel takes these operands (dtype, 16-byte strides)."""
    for t in tensors:
        size = t.element_size()
        if t.dtype not in _GROUPED_MM_DTYPES:
            return False
        inner, outer = sorted(t.stride()[-2:])
        if inner != 1 or (outer * size) % 16 or (t.dim() == 3 and (t.stride(0) * size) % 16):
            return False
    return True


def _segments(offsets: torch.Tensor):
    # Only reached for operands _grouped_mm refuses (float64, unaligned strides). CPU tensors:
    # reading the offsets is a memory read, not a device synchronisation.
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        yield expert, start, end
        start = end


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None = None,
               act: Activation | None = None) -> torch.Tensor:
    """``act(a'[rows of e] @ b[e])`` for every expert e: a' ``[M, K]`` (``a[rows]``, or a) grouped
    by offsets, b ``[E, K, N]``; no activation when ``act`` is None."""
    if rows is not None:
        a = gather_rows(a, rows)
    if _grouped_mm_accepts(a, b):
        out = torch._grouped_mm(a, b, offs=offsets)
    else:
        out = a.new_empty(a.shape[0], b.shape[-1])
        for expert, start, end in _segments(offsets):
            torch.mm(a[start:end], b[expert], out=out[start:end])
    return out if act is None else act.forward(out)


def fp8_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, recipe: str | None) -> torch.Tensor:
    """``grouped_mm`` in a's dtype; with an FP8 ``recipe`` (ops/fp8.py) on operands rounded by it
    (a's rows and b's columns blocked along the reduced dim), accumulated in float32 as an FP8
    tensor-core GEMM does."""
    if recipe is None:
        return grouped_mm(a, b, offsets)
    a_q = fp8.fake_quantize(a, recipe, "a")
    b_q = fp8.fake_quantize(b.transpose(-1, -2), recipe, "w").transpose(-1, -2)
    return grouped_mm(a_q, b_q, offsets).to(a.dtype)


def stored_out_in(weight: torch.Tensor) -> bool:
    """Whether a ``[E, in, out]`` weight is a transposed view of ``[E, out, in]`` storage."""
    return weight.stride(1) == 1 and weight.stride(2) != 1


def grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, out_in: bool) -> torch.Tensor:
    """``a[rows of e].T @ grad[rows of e]`` for every expert e: ``[E, K, N]``, zero for empty
    experts; computed in ``[E, N, K]`` storage (a transposed view) when ``out_in``, so that the
    gradient has its weight's layout and autograd need not copy it."""
    if out_in:
        return grouped_mm_weight_grad(grad, a, offsets, out_in=False).transpose(1, 2)
    rows, align = a.shape[0], 16 // a.element_size()
    if isinstance(rows, torch.SymInt) or rows % align:
        # The rows become the inner dimension of a.t(): pad them (with zeros, which add nothing)
        # to a 16-byte multiple, whatever layout a compiled graph gives that transposed operand.
        pad = (-rows) % align
        a, grad = F.pad(a, (0, 0, 0, pad)), F.pad(grad, (0, 0, 0, pad))
    a_t = a.t()
    if _grouped_mm_accepts(a_t, grad):
        return torch._grouped_mm(a_t, grad, offs=offsets)
    out = a.new_zeros(offsets.shape[0], a.shape[1], grad.shape[1])
    for expert, start, end in _segments(offsets):
        torch.mm(a_t[:, start:end], grad[start:end], out=out[expert])
    return out


def fp8_grouped_mm_weight_grad(a, grad, offsets, out_in: bool, recipe: str | None) -> torch.Tensor:
    """``grouped_mm_weight_grad``; with an FP8 ``recipe``, on operands rounded in blocks along each
    expert's rows (``fp8.fake_quantize_segments``), accumulated in float32, in a's dtype."""
    if recipe is None:
        return grouped_mm_weight_grad(a, grad, offsets, out_in)
    a_q, grad_q = (fp8.fake_quantize_segments(t, offsets, recipe) for t in (a, grad))
    return grouped_mm_weight_grad(a_q, grad_q, offsets, out_in).to(a.dtype)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # index_select is several times faster than advanced indexing on CPU.
    return x.index_select(0, index)


def unpermute_reduce(
    rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, num_tokens: int, k: int
) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * rows[position of pair (t, k)]``, accumulated in float32.

    ``rows`` are in expert order; ``weights`` is ``[T, k]`` or None for an unweighted sum.
    """
    inverse = torch.empty_like(order).index_put((order,), torch.arange(order.shape[0], device=order.device))
    acc = accumulation_dtype(rows.dtype)
    per_token = gather_rows(rows, inverse).view(num_tokens, k, rows.shape[-1]).to(acc)  # k given: T may be 0
    if weights is None:
        return per_token.sum(dim=1)
    return torch.bmm(weights.to(acc).unsqueeze(1), per_token).squeeze(1)


def segment_sum(rows: torch.Tensor, sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-expert sum of rows (rows sorted by expert): the gradient of a per-expert bias."""
    acc = accumulation_dtype(rows.dtype)
    out = rows.new_zeros(num_experts, rows.shape[-1], dtype=acc)
    return out.index_add(0, sorted_ids, rows.to(acc))


def compilable(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the experts computation can be traced into a compiled graph: every grouped GEMM,
    forward and backward, is a torch._grouped_mm (bfloat16 only under compile)."""
    width, inner = w1.shape[-1], w2.shape[1]
    rows_aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], width, inner))
    return x.dtype == torch.bfloat16 and rows_aligned and _grouped_mm_accepts(w1, w2)


def route_forward(logits, k: int, renormalize: bool, scoring: str, bias, n_group: int, topk_group: int,
                  scale: float, group_fill: float, eps: float, group_top: int):
    """The ``route`` op's computation: (float32 weights, int32 ids); see ops/route.py."""
    sigmoid = scoring.startswith("sigmoid")
    if scoring.endswith("_of_topk"):
        values, ids = torch.topk(logits, k, dim=-1)  # in the logits' dtype: eager's own selection
        weights = torch.sigmoid(values.float()) if sigmoid else torch.softmax(values.float(), dim=-1)
    else:
        x = logits.float()
        scores = torch.sigmoid(x) if sigmoid else torch.softmax(x, dim=-1)
        choice = scores if bias is None else scores + bias.float()
        if n_group > 1:
            num_tokens, num_experts = choice.shape
            group_scores = choice.view(num_tokens, n_group, -1).topk(group_top, dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept, True)
            choice = choice.masked_fill(~keep.repeat_interleave(num_experts // n_group, dim=1), group_fill)
        ids = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights * scale, ids.to(torch.int32)


def route_backward(grad_weights, logits, ids, renormalize: bool, scoring: str, scale: float, eps: float):
    """Gradient of the logits from the routing weights' gradient."""
    x = logits.float()
    ids = ids.long()
    sigmoid = scoring.startswith("sigmoid")
    of_topk = scoring.endswith("_of_topk")
    if of_topk:  # only the k chosen logits were scored: the others get no gradient at all
        chosen = x.gather(-1, ids)
        picked = torch.sigmoid(chosen) if sigmoid else torch.softmax(chosen, dim=-1)
    else:
        scores = torch.sigmoid(x) if sigmoid else torch.softmax(x, dim=-1)
        picked = scores.gather(-1, ids)
    grad = grad_weights.float() * scale
    if renormalize:
        # weights = p / s with s = sum(p) + eps: dL/dp_j = (g_j - <g, p> / s) / s
        total = picked.sum(dim=-1, keepdim=True) + eps
        grad = (grad - (grad * picked).sum(dim=-1, keepdim=True) / total) / total
    if of_topk:
        if sigmoid:
            grad_chosen = grad * picked * (1 - picked)
        else:
            grad_chosen = picked * (grad - (grad * picked).sum(dim=-1, keepdim=True))
        return torch.zeros_like(x).scatter(-1, ids, grad_chosen).to(logits.dtype)
    grad_scores = torch.zeros_like(scores).scatter(-1, ids, grad)
    if sigmoid:
        grad_logits = grad_scores * scores * (1 - scores)
    else:
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    return grad_logits.to(logits.dtype)


def experts_forward(x, ids, weights, w1, w2, b1, b2, act: Activation, fp8_recipe: str | None = None,
                    store_h: bool = True):
    """The ``experts`` op's computation: (out, h, order, offsets); see ops/experts.py (h empty
    without ``store_h``). With an ``fp8_recipe`` (ops/fp8.py) both GEMMs take e4m3-rounded
    operands and accumulate in float32."""
    num_tokens, k = ids.shape
    flat_ids = ids.reshape(-1)
    order, offsets = sort_by_expert(flat_ids, w1.shape[0])
    tokens = order // k
    h = fp8_grouped_mm(gather_rows(x, tokens), w1, offsets, fp8_recipe)
    if b1 is not None:
        h = h + gather_rows(b1, flat_ids[order])
    y = fp8_grouped_mm(act.forward(h), w2, offsets, fp8_recipe)
    if b2 is not None:
        y = y + gather_rows(b2, flat_ids[order])
    out = unpermute_reduce(y, order, weights, num_tokens, k).to(x.dtype)
    return out, h if store_h else h.new_empty(0, h.shape[1]), order, offsets


def experts_backward(grad_out, x, ids, weights, w1, w2, b1, b2, h, order, offsets, act: Activation,
                     fp8_recipe: str | None = None, fp8_weight_grad: bool = True):
    """Gradients of ``experts`` for (x, weights, w1, w2, b1, b2); empty for an absent bias. With an
    ``fp8_recipe`` the activation-gradient GEMMs take e4m3 operands, and the weight-gradient GEMMs
    too if ``fp8_weight_grad``."""
    weight_grad_recipe = fp8_recipe if fp8_weight_grad else None
    num_tokens, k = ids.shape
    num_experts = w1.shape[0]
    sorted_ids = ids.reshape(-1)[order]
    acc = accumulation_dtype(x.dtype)
    scale = weights.reshape(-1)[order].to(acc).unsqueeze(1)
    grad_rows = gather_rows(grad_out, order // k)
    a = act.forward(h)

    # d out / d expert output, unscaled, pulled back through w2: (grad @ w2[e]^T).
    grad_a = fp8_grouped_mm(grad_rows, w2.transpose(1, 2), offsets, fp8_recipe)
    # Routing-weight gradient <grad_t, y_pair>, with y = a @ w2[e] + b2[e] never materialised.
    grad_scale = (grad_a.to(acc) * a.to(acc)).sum(-1)
    if b2 is not None:
        grad_scale = grad_scale + (grad_rows.to(acc) * gather_rows(b2, sorted_ids).to(acc)).sum(-1)
    grad_weights = torch.empty_like(grad_scale).index_put((order,), grad_scale)

    grad_y = (grad_rows * scale).to(x.dtype)
    grad_w2 = fp8_grouped_mm_weight_grad(a, grad_y, offsets, stored_out_in(w2), weight_grad_recipe)
    grad_h = act.backward(h, (grad_a * scale).to(h.dtype))
    grad_w1 = fp8_grouped_mm_weight_grad(gather_rows(x, order // k), grad_h, offsets, stored_out_in(w1), weight_grad_recipe)
    grad_x = unpermute_reduce(fp8_grouped_mm(grad_h, w1.transpose(1, 2), offsets, fp8_recipe), order, None, num_tokens,
                              k)

    def bias_grad(bias, rows):
        return x.new_empty(0) if bias is None else segment_sum(rows, sorted_ids, num_experts).to(bias.dtype)

    return (
        grad_x.to(x.dtype),
        grad_weights.view(num_tokens, k).to(weights.dtype),
        grad_w1,
        grad_w2,
        bias_grad(b1, grad_h),
        bias_grad(b2, grad_y),
    )

"""Float64 references of the canonical ops, written the slow obvious way, and their random inputs."""

import torch

from inductor_moe.ops.activations import Activation


def reference_experts(x, ids, weights, w1, w2, b1, b2, act: Activation):
    """out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), one pair at a time in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = x[t].double() @ w1[e].double() + (0 if b1 is None else b1[e].double())
            y = act.forward(h) @ w2[e].double() + (0 if b2 is None else b2[e].double())
            out[t] += weights[t, j].double() * y
    return out


# make_experts' tensors: the experts op's first operands, by name
OPERANDS = ("x", "ids", "weights", "w1", "w2", "b1", "b2")


def make_experts(tokens, hidden, inner, num_experts, k, act: Activation, dtype, bias=True, out_in=True, device="cpu"):
    """Random operands of the experts op; ``out_in`` stores w1 and w2 as [E, out, in] (passed as
    transposed views), else as [E, in, out]."""
    width = 2 * inner if act.gated else inner
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)]).reshape(tokens, k).to(device)
    weights = torch.rand(tokens, k, dtype=torch.float32, device=device)

    def weight(fan_in, fan_out):
        if out_in:
            w = torch.randn(num_experts, fan_out, fan_in, dtype=dtype, device=device) * fan_in**-0.5
            return w.transpose(1, 2)
        return torch.randn(num_experts, fan_in, fan_out, dtype=dtype, device=device) * fan_in**-0.5

    w1, w2 = weight(hidden, width), weight(inner, hidden)
    b1 = 0.1 * torch.randn(num_experts, width, dtype=dtype, device=device) if bias else None
    b2 = 0.1 * torch.randn(num_experts, hidden, dtype=dtype, device=device) if bias else None
    return x, ids, weights, w1, w2, b1, b2


def reference_route(logits, k, renormalize, scoring="softmax", bias=None, n_group=1, topk_group=1, scale=1.0,
                    group_fill=float("-inf"), eps=0.0, group_top=2):
    """(weights float64 [T, k], ids [T, k]) token by token, best first; see ops/route.py."""
    weights, ids = [], []
    for row in logits.double():
        scores = row.sigmoid() if scoring.startswith("sigmoid") else row.softmax(-1)
        choice = (row if scoring.endswith("_of_topk") else scores) + (0 if bias is None else bias.double())
        if n_group > 1:
            size = row.numel() // n_group
            groups = [sorted(choice[g * size:(g + 1) * size].tolist())[-group_top:] for g in range(n_group)]
            kept = sorted(range(n_group), key=lambda g: -sum(groups[g]))[:topk_group]
            choice = torch.tensor([c if i // size in kept else group_fill for i, c in enumerate(choice.tolist())],
                                  dtype=torch.float64)
        chosen = sorted(range(row.numel()), key=lambda i: -choice[i].item())[:k]
        w = scores[chosen]
        if scoring == "softmax_of_topk":  # the softmax of the chosen logits
            w = w / w.sum()
        if renormalize:
            w = w / (w.sum() + eps)
        weights.append(w * scale)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids)

"""The spelling fuzzer (tests/spellings.py) in CI: a fixed set of seeded cases, each a random but
equivalent way to write one MoE block (it must be rewritten and match eager) or a near miss (it
must be left alone with a reason, and match eager). ``python tests/spellings.py --cases 3000``
runs a longer campaign on demand."""

import spellings
import torch

# seeds 0..159 (a quarter of them near misses), then two cases of each near miss
CASES = [spellings.draw(seed, 0.25) for seed in range(160)] + [
    spellings.draw(seed, near_miss=name) for name in sorted(spellings.NEAR_MISSES) for seed in (1, 2)
]


def test_the_cases_cover_every_style_router_and_dtype():
    assert {c.spec.style for c in CASES} == set(spellings.STYLES)
    assert {c.spec.scoring for c in CASES} == {"softmax", "sigmoid", "softmax_of_topk", "sigmoid_of_topk"}
    assert {c.spec.groups[2] for c in CASES if c.spec.groups} == {1, 2}  # groups ranked by their best, or best two
    assert {c.spec.dtype for c in CASES} == {torch.float32, torch.bfloat16}
    assert {c.spec.weights_at for c in CASES} == {"after", "before", "sum", "input"}


def test_equivalent_spellings_are_rewritten_and_near_misses_left_alone():
    failures = []
    # every 40th case also through Inductor's codegen, not only the rewritten graph run eagerly
    outcomes = spellings.campaign(CASES, compiled_every=40, log=failures.append)
    summary = spellings.summary(outcomes)
    assert not failures, f"{len(failures)} of {len(outcomes)} cases failed:\n" + "\n".join(failures)
    assert summary["equivalent_rewritten"] == summary["equivalent"] > 0
    assert summary["near_misses_left_alone_with_reason"] == summary["near_misses"] == len(
        [c for c in CASES if c.near_miss])

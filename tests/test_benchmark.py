"""The main job's choices (``python -m inductor_moe``)."""

import pytest
import torch

from inductor_moe.benchmark import bf16_matmul_emulated, main_defaults


def test_main_job_runs_float32_where_bfloat16_is_emulated():
    assert main_defaults(None, None, lambda: False) == ("bfloat16", "sorted_grouped_mm")
    assert main_defaults(None, None, lambda: True) == ("float32", "dense_loop")
    assert main_defaults("bfloat16", None, lambda: True) == ("bfloat16", "sorted_grouped_mm")
    assert main_defaults(None, "masked_loop", lambda: True) == ("float32", "masked_loop")
    with pytest.raises(ValueError, match="needs --dtype bfloat16"):  # stock torch.compile would fail on it
        main_defaults("float32", "sorted_grouped_mm")


def test_native_bfloat16_is_not_taken_for_emulated():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert not (native and bf16_matmul_emulated())

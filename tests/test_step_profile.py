"""bench/step_profile.py: where a torch step's time goes. Its categories, and a smoke run whose parts add up."""

from __future__ import annotations

import pytest
from builders import bench_module


@pytest.fixture
def step_profile():
    yield from bench_module("step_profile")


@pytest.mark.parametrize(("op", "part"), [
    ("aten::mm", "matrix products"), ("aten::addmm", "matrix products"), ("aten::bmm", "matrix products"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_log_softmax", "loss"), ("aten::nll_loss_forward", "loss"), ("aten::_log_softmax_backward_data", "loss"),
    ("aten::copy_", "copies"), ("aten::_to_copy", "copies"), ("aten::cat", "copies"), ("aten::embedding_dense_backward", "copies"),
    ("aten::mul", "elementwise"), ("aten::_foreach_addcdiv_", "elementwise"), ("aten::silu_backward", "elementwise"),
])
def test_operators_fall_into_the_documented_parts(step_profile, op, part):
    assert step_profile.category(op) == part
    assert part in step_profile.CATEGORIES


def test_smoke_run_accounts_for_the_whole_step(step_profile, tmp_path, tiny_model_dir, capsys):
    import json

    assert step_profile.main(["--smoke", "--json", "--model", str(tiny_model_dir), "--work", str(tmp_path)]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    rows = {r["part"]: r for r in report["rows"]}
    assert list(rows) == list(step_profile.CATEGORIES)
    # the parts are the profiled step: operators' self time plus what no operator accounts for
    assert sum(r["ms_per_step"] for r in rows.values()) == pytest.approx(1e3 * report["step_s_profiled"], rel=0.02)
    assert rows["matrix products"]["ms_per_step"] > 0 and rows["matrix products"]["gflops"] > 0
    assert report["profiler_gemm_flops_per_step"] > 0 and report["gemm_peak"]["flops"] > 0
    assert 0 < report["mfu_unprofiled"] and report["step_s_unprofiled"] > 0
    assert "| part of the step |" in out.err and "GEMM peak" in out.err


def test_matmul_flops_come_from_the_recorded_shapes(step_profile):
    assert step_profile.matmul_flops("aten::mm", [[392, 576], [576, 1536]]) == 2 * 392 * 576 * 1536
    assert step_profile.matmul_flops("aten::addmm", [[1536], [392, 576], [576, 1536]]) == 2 * 392 * 576 * 1536
    assert step_profile.matmul_flops("aten::bmm", [[4, 98, 64], [4, 64, 98]]) == 2 * 4 * 98 * 64 * 98

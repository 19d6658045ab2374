"""The benchmark harness runs end to end on a tiny case (no timing is asserted: only that it measures)."""
import pytest
import torch

from bench import __main__ as harness


def test_bench_case_and_goals_on_a_tiny_model():
    rows = harness.bench_case("resnet18@10", 1, 32, ["gradient", "gradcam"], ["logit", "weighted"], torch.device("cpu"), 1, False, True, True)
    keys = {(r["method"], r["target"], r["impl"]) for r in rows}
    assert {("fwd", "", "backprop_hooks"), ("gradient", "weighted", "backprop_hooks"), ("gradient", "weighted", "per-class passes")} <= keys
    assert all(r["seconds"] > 0 and r["x_fwd_bwd"] > 0 for r in rows)
    assert not any("peak_mib" in r for r in rows)  # CPU: not measured (bench/memory.py)
    goals = harness.check_goals(rows)
    assert any(g["goal"].startswith("gradcam <= 1.1x fwd") for g in goals)


@pytest.mark.slow
def test_peers_run_side_by_side():
    rows = harness.bench_case("resnet18@10", 1, 32, ["gradient", "gradcam", "fullgrad"], ["logit"], torch.device("cpu"), 1, True, False, False)
    impls = {(r["method"], r["impl"]) for r in rows}
    assert {("gradient", "captum"), ("gradcam", "captum"), ("gradcam", "pytorch-grad-cam"), ("fullgrad", "pytorch-grad-cam")} <= impls

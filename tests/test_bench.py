"""The benchmark harness runs end to end on a tiny case (no timing is asserted: only that it measures)."""

import pytest
import torch

from bench import __main__ as harness
from bench import memory


def test_bench_case_and_goals_on_a_tiny_model():
    rows = harness.bench_case(
        "resnet18@10", 1, 32, ["gradient", "gradcam"], ["logit", "weighted"], torch.device("cpu"), 1, False, True, True
    )
    keys = {(r["method"], r["target"], r["impl"]) for r in rows}
    assert {
        ("fwd", "", "backprop_hooks"),
        ("gradient", "weighted", "backprop_hooks"),
        ("gradient", "weighted", "per-class passes"),
    } <= keys
    assert all(r["seconds"] > 0 and r["x_fwd_bwd"] > 0 for r in rows)
    assert all(r["peak_mib"] > 0 for r in rows)  # CPU: from the allocator's events (bench/memory.py)
    goals = harness.check_goals(rows)
    assert any(g["goal"].startswith("gradcam <= 1.1x fwd") for g in goals)
    assert any(g["goal"] == "gradient peak memory <= 1.2x fwd+bwd" for g in goals)


def test_bench_case_on_a_compiled_model():
    """The compiled-model row: floors and methods measured on torch.compile(model), labelled as such."""
    rows = harness.bench_case(
        "resnet18@10",
        1,
        32,
        ["gradient", "lrp"],
        ["logit", "weighted"],
        torch.device("cpu"),
        1,
        True,
        True,
        True,
        compile_backend="eager",
    )
    assert {r["model"] for r in rows} == {"resnet18@10+compile:eager"}
    keys = {(r["method"], r["target"], r["impl"]) for r in rows}
    assert {
        ("fwd+bwd", "", "backprop_hooks"),
        ("gradient", "weighted", "backprop_hooks"),
        ("lrp", "logit", "backprop_hooks"),
    } <= keys
    assert all(r["seconds"] > 0 and r["x_fwd_bwd"] > 0 and "peak_mib" not in r for r in rows)


def test_cpu_peak_memory_of_known_allocations():
    """Oracle: 4 MiB + 8 MiB live, the 4 freed, 4 MiB more, both freed, 12 MiB returned: the peak is 12 MiB.
    Blocks allocated before the call, even under an earlier measurement, do not count when freed in it."""
    cpu = torch.device("cpu")
    kept = []

    def fn():
        a, b = torch.empty(2**20), torch.empty(2**21)
        del a
        c = torch.empty(2**20)
        del b, c
        return torch.empty(3 * 2**20)

    assert memory.peak_mib(fn, cpu) == 12.0
    assert memory.peak_mib(lambda: kept.append(torch.empty(2**22)), cpu) == 16.0
    assert memory.peak_mib(lambda: (kept.clear(), torch.empty(2**20))[1], cpu) == 4.0  # not 4 - 16
    events = [(0, "a", 10), (1, "b", 3), (2, "a", -10), (3, "older", -50), (4, "d", 7)]
    assert memory.peak_of_events(events) == 13


@pytest.mark.slow
def test_peers_run_side_by_side():
    rows = harness.bench_case(
        "resnet18@10",
        1,
        32,
        ["gradient", "gradcam", "fullgrad", "lrp"],
        ["logit"],
        torch.device("cpu"),
        1,
        True,
        False,
        False,
    )
    impls = {(r["method"], r["impl"]) for r in rows}
    assert {
        ("gradient", "captum"),
        ("gradcam", "captum"),
        ("gradcam", "pytorch-grad-cam"),
        ("fullgrad", "pytorch-grad-cam"),
        ("lrp", "zennit"),
    } <= impls
    skipped = harness.bench_case(
        "resnet18@10",
        1,
        32,
        ["fullgrad"],
        ["logit"],
        torch.device("cpu"),
        1,
        True,
        False,
        False,
        ["fullgrad:pytorch-grad-cam"],
    )
    assert not any(r["impl"] == "pytorch-grad-cam" for r in skipped)

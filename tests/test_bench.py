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


@pytest.mark.parametrize("name", ["hf_vit@5", pytest.param("bert_small@3", marks=pytest.mark.slow)])
def test_bench_case_on_hugging_face_models(name, monkeypatch):
    """The harness runs the attention methods on a Hugging Face ViT (sdpa) and a small BERT on its input
    embeddings (shrunk here to 2 layers: only that it measures is checked)."""
    import transformers

    from bench import zoo

    monkeypatch.setitem(
        zoo.HF_TEXT, "bert_small", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    )
    monkeypatch.setattr(
        transformers, "ViTConfig", lambda **kw: transformers.models.vit.ViTConfig(**dict(kw, num_hidden_layers=1))
    )
    rows = harness.bench_case(
        name, 2, 32, ["grad_rollout", "vit_gradcam"], ["logit", "weighted"], torch.device("cpu"), 1, False, False, False
    )
    keys = {(r["method"], r["target"]) for r in rows}
    assert {("fwd+bwd", ""), ("grad_rollout", "logit"), ("grad_rollout", "weighted"), ("vit_gradcam", "logit")} <= keys
    assert all(r["seconds"] > 0 for r in rows)

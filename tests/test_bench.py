"""The benchmark harness runs end to end on a tiny case (no timing is asserted: only that it measures)."""

import json
import resource

import pytest
import torch

from bench import __main__ as harness
from bench import memory
from bench.timing import steady_allocator


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


def test_transformer_rows_and_the_scaling_figure(tmp_path):
    """A transformer case has the capture row (the attention methods' forward) and its goal; the scaling figure
    is drawn from sweep rows (no timing is asserted)."""
    from bench.plot import scaling_figure

    rows = harness.bench_case(
        "vit_tiny_d3@10", 1, 32, ["grad_rollout"], ["logit"], torch.device("cpu"), 1, False, False, False
    )
    assert {r["method"] for r in rows} == {"fwd", "fwd+bwd", "capture", "grad_rollout"}
    goals = {g["goal"] for g in harness.check_goals(rows)}
    assert {"capture <= 1.1x fwd", "grad_rollout <= 1.3x fwd+bwd"} <= goals
    sweep = [dict(r, sweep="depth", depth=3) for r in rows] + [dict(r, sweep="batch") for r in rows]
    assert scaling_figure(sweep, tmp_path / "scaling.png").stat().st_size > 0


def test_profile_splits_each_call_into_its_phases():
    """bench.profile: the phases of a call add up to it (every event's self time lands in one phase), the rules'
    work is found where it runs (LRP in the backward; the deferred attention capture in the backward, where it
    computes the attention maps, also inside its own autograd call; rollout's capture in the forward), and the
    library is left unmarked afterwards."""
    from bench import profile
    from backprop_hooks.methods.base import Method

    cpu = torch.device("cpu")
    rows = profile.rows_for("resnet18@10", 1, 32, ["lrp"], cpu, repeats=1)
    rows += profile.rows_for("vit_tiny_d3@10", 1, 32, ["grad_rollout", "rollout"], cpu, repeats=1)
    by = {(r["model"], r["method"]): r for r in rows}
    for r in rows:
        assert 95 <= sum(r[p] for p in profile.PHASES) <= 100.5, r
        assert 95 <= sum(r[c] for c in profile.CLASSES) <= 100.5, r
    assert by[("resnet18@10", "fwd")]["forward"] > 99
    assert by[("resnet18@10", "lrp")]["rules bwd"] > 10
    deferred = by[("vit_tiny_d3@10", "grad_rollout")]["phases_ms"]  # A's softmax: in the capture's backward
    assert deferred["rules bwd"]["softmax"] > 0 and "softmax" not in deferred["backward"], deferred
    assert by[("vit_tiny_d3@10", "rollout")]["capture"] > 0.5
    assert "forward" in vars(Method) and not hasattr(vars(Method)["forward"], "__wrapped__")


def test_bench_case_on_a_compiled_model():
    """The compiled-model row: floors and methods measured on torch.compile(model), labelled as such."""
    cpu = torch.device("cpu")
    rows = harness.bench_case(
        "resnet18@10",
        1,
        32,
        ["gradient", "lrp"],
        ["logit", "weighted"],
        cpu,
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


@pytest.mark.skipif(not steady_allocator(), reason="glibc's malloc only (Linux)")
def test_freed_memory_stays_mapped_whatever_ran_before():
    """The cause of timings that changed with the memory measurement beside them: glibc handed freed memory
    back to the system depending on what earlier calls freed, so a call's page faults (the kernel zeroing
    fresh pages) depended on the order of measurements. On the steady allocator a call that holds and frees
    200 MiB in 4 MiB blocks takes no page faults once warm, also right after a peak-memory measurement of a
    larger call (51 000 faults per call without it)."""

    def work():
        blocks = [torch.ones(2**20) for _ in range(50)]
        return sum(b[0] for b in blocks)

    def faults(fn) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    work()
    memory.peak_mib(lambda: [torch.ones(2**21) for _ in range(40)], torch.device("cpu"))
    assert faults(work) < 2000


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


# ---- bench.targets: what is timed computes what the table says it does; the ratios are the times' ----
def test_bench_targets_times_the_right_computations(monkeypatch):
    """`python -m bench.targets` on a tiny 1000-class net: the plain-autograd floor is the logit gradient,
    every target candidate is that target's explanation, the C per-class passes compose to the seed's
    explanation, and each row's ratio / speed-up is its own times' quotient."""
    import torchvision
    from torch import nn

    from bench import targets as bench_targets

    def tiny(weights=None):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 1000)
        )

    monkeypatch.setattr(torchvision.models, "tiny_for_tests", tiny, raising=False)
    outputs, real_compare = {}, bench_targets.compare

    def recorded(name, fn):
        def run():
            out = fn()
            outputs[name] = out.attributions if hasattr(out, "attributions") else out
            return out

        return run

    def recording_compare(candidates, device, **kw):
        return real_compare({name: recorded(name, fn) for name, fn in candidates.items()}, device, **kw)

    monkeypatch.setattr(bench_targets, "compare", recording_compare)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2,000 tiny backward passes: one thread, no OpenMP spinning on a busy machine
    try:
        rows = bench_targets.run(quick=True, model_name="tiny_for_tests", batch=2, size=8)
    finally:
        torch.set_num_threads(threads)

    overhead = [r for r in rows if r["bench"] == "target overhead"]
    assert [r["target"] for r in overhead] == ["plain autograd (logit)", *bench_targets.TARGETS]
    base = overhead[0]["seconds"]
    assert all(r["ratio"] == r["seconds"] / base for r in overhead) and overhead[0]["ratio"] == 1.0
    per_class = [r for r in rows if r["bench"] == "seed vs C=1000 per-class passes"]
    assert [r["target"] for r in per_class] == ["weighted", "mean"]
    assert all(r["speedup"] == r["per_class_seconds"] / r["seconds"] for r in per_class)

    # the floor is the logit explanation, and each target row explains that target
    torch.testing.assert_close(outputs["plain autograd (logit)"], outputs["logit"])
    assert not torch.allclose(outputs["weighted"], outputs["logit"])
    # the per-class composition (the earlier code's way) equals the one seeded pass (last recorded: "mean")
    torch.testing.assert_close(outputs["per-class"], outputs["seed"], rtol=1e-4, atol=1e-6)
    assert outputs["seed"].abs().amax() > 0


def test_scaling_sweeps_and_report(monkeypatch, tmp_path):
    """`python -m bench --scaling`: batch, resolution, depth and class-count sweeps tagged as such, kept out of the
    goals, reported in their own table (bench_case stubbed: no timing here)."""
    calls = []

    def fake_case(model_name, batch, size, methods, targets, device, repeats, peers, memory, per_class, skip=()):
        calls.append((model_name, batch, size, tuple(methods), tuple(targets)))
        return [
            dict(model=model_name, batch=batch, size=size, method=m, target=t, impl="backprop_hooks", seconds=1.0)
            | dict(x_fwd=1.0, x_fwd_bwd=1.0, x_logit=1.0)
            for m in ["fwd", "fwd+bwd", *methods]
            for t in ([""] if m.startswith("fwd") else targets)
        ]

    monkeypatch.setattr(harness, "bench_case", fake_case)
    rows = harness.scaling(torch.device("cpu"), quick=True, repeats=1)
    sweeps = {(r["sweep"], r["model"], r["batch"], r["size"]) for r in rows}
    for model in ("resnet18", "vit_tiny"):
        assert {("batch", model, b, 224) for b in (1, 4, 16)} <= sweeps
        assert {("size", model, 4, s) for s in (112, 224)} <= sweeps
    depths = {(r["model"], r["depth"]) for r in rows if r["sweep"] == "depth"}
    assert depths == {("resnet18", 18), ("resnet34", 34), ("resnet50", 50)} | {
        ("vit_tiny_d3", 3),
        ("vit_tiny_d6", 6),
        ("vit_tiny", 12),
    }
    classes = [r for r in rows if r["sweep"] == "classes"]
    assert {(r["model"], r["classes"]) for r in classes} == {(f"resnet18@{c}", c) for c in (10, 100, 1000)}
    assert {r["target"] for r in classes if r["method"] == "gradient"} == {"logit", "weighted", "mean", "max"}
    assert all("sweep" in r for r in rows)

    calls.clear()
    out = tmp_path / "bench"
    argv = ["--quick", "--models", "resnet18@10", "--methods", "gradient", "--batch", "2"]
    assert harness.main([*argv, "--no-peers", "--no-memory", "--scaling", "--out", str(out)]) == 0
    assert calls[0][:2] == ("resnet18@10", 2)  # the main case first, then the sweeps
    report = json.loads((out / "results.json").read_text())
    assert sum("sweep" in r for r in report["rows"]) == len(rows)
    assert all(g["model"] == "resnet18@10" for g in report["goals"])  # sweeps never enter the goals
    text = (out / "results.md").read_text()
    assert "Scaling:" in text and text.index("Goals:") < text.index("Scaling:")
    assert text.count("| classes | resnet18@1000 |") >= 1


def test_the_harness_prints_progress_and_the_table_without_noise(tmp_path, capfd):
    """``python -m bench``: a line per case, then the table; not the profiler's ``USDT`` lines or the CPU
    allocator's warning (the memory measurement), nor pytorch-grad-cam's "target_layers is ignored" (FullGrad)."""
    from bench import peers, zoo

    argv = ["--models", "resnet18@10", "--batch", "1", "--size", "32", "--methods", "gradient", "--no-peers"]
    assert harness.main(argv + ["--targets", "logit", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "[1/1] resnet18@10 batch 1: " in err and "| resnet18@10 | 1 | gradient | logit | backprop_hooks |" in out
    assert len((out + err).splitlines()) < 30
    cpu = torch.device("cpu")
    model, layer, _, _ = zoo.build("resnet18@10", cpu)
    x, t = zoo.make_input("resnet18@10", model, 1, 32, cpu), torch.tensor([3])
    assert memory.peak_mib(lambda: model(x), cpu) > 0
    peers.peers("fullgrad", model, x, t, bh_layer(model, layer), ["fullgrad:captum"])["pytorch-grad-cam"]()
    noise = "".join(capfd.readouterr())
    for line in ("USDT", "profiler_start", "CPUAllocator", "target_layers is ignored"):
        assert line not in out + err + noise, line


def bh_layer(model, name):
    import backprop_hooks as bh

    return bh.methods.get_module(model, name)

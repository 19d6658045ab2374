"""The shared runner: chunks, per-sample averaging over an unequal last batch, interruption and resume,
refusal to resume another configuration, and a 2-process gloo run equal to a 1-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from backprop_hooks import cli
from backprop_hooks.eval import perturb, runner

ROOT = Path(__file__).resolve().parents[1]


def test_chunk_ranges():
    assert runner.chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert runner.chunk_ranges(0, 3) == []
    with pytest.raises(ValueError):
        runner.chunk_ranges(5, 0)


def test_unequal_last_batch_gives_the_per_sample_mean(tmp_path):
    values = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0])  # batches of 3: means 1, 1, 10
    data = TensorDataset(torch.zeros(7, 1), torch.zeros(7, dtype=torch.long))

    def process(x, labels, positions):
        after = values[positions]
        return {
            "base_acc": torch.zeros_like(after),
            "base_p": torch.zeros_like(after),
            "base_y": torch.zeros_like(after),
            "acc": after.view(1, 1, 1, -1),
            "p": after.view(1, 1, 1, -1),
            "y": after.view(1, 1, 1, -1),
        }

    store = runner.ChunkStore(tmp_path / "chunks", {"test": 1})
    results = runner.run_chunks(data, list(range(7)), process, store, 3, torch.device("cpu"), progress=False)
    assert results["position"].tolist() == list(range(7))
    (row,) = perturb.summarize(results, ["logit"], [1e-3], [1])
    assert row["n"] == 7 and row["delta_y"] == pytest.approx(16 / 7)  # not (1 + 1 + 10) / 3 = 4
    assert sorted(p.name for p in (tmp_path / "chunks").glob("*.pt")) == [
        "00000000-00000003.pt",
        "00000003-00000006.pt",
        "00000006-00000007.pt",
    ]


def test_shards_are_disjoint_and_cover_everything(tmp_path):
    data = TensorDataset(torch.arange(10.0)[:, None], torch.zeros(10, dtype=torch.long))
    seen = {}
    for rank in range(3):
        store = runner.ChunkStore(tmp_path / f"r{rank}", {"x": 1})

        def process(x, labels, positions, rank=rank):
            seen.setdefault(rank, []).extend(positions.tolist())
            return {"x": x[:, 0]}

        processes = runner.Processes(rank, 3)
        processes.gather = lambda obj: None  # no process group here: only look at what each rank computes
        processes.barrier = lambda: None
        runner.run_chunks(data, list(range(10)), process, store, 2, torch.device("cpu"), processes, progress=False)
    assert sorted(sum(seen.values(), [])) == list(range(10))
    assert seen[0] == [0, 1, 6, 7] and seen[1] == [2, 3, 8, 9] and seen[2] == [4, 5]


ARGS = [
    "--model",
    "digits_cnn",
    "--data",
    "digits",
    "--limit",
    "3",
    "--batch-size",
    "2",
    "--eps",
    "3e-3",
    "--steps",
    "2",
    "--targets",
    "weighted",
    "logit",
    "--examples",
    "0",
    "--quiet",
]


def _run(out: Path, *extra: str) -> int:
    return cli.main(["perturb", *ARGS, "--out", str(out), *extra])


def _report(out: Path):
    return json.loads((out / "results.json").read_text())["rows"], (out / "samples.csv").read_text()


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    assert _run(tmp_path / "whole") == 0
    calls = []
    original = perturb.perturbation_process

    def failing(*args, **kwargs):
        process = original(*args, **kwargs)

        def wrapped(x, labels, positions):
            if calls:
                raise KeyboardInterrupt  # the interruption, after the first chunk was saved
            calls.append(positions.tolist())
            return process(x, labels, positions)

        return wrapped

    monkeypatch.setattr(perturb, "perturbation_process", failing)
    assert _run(tmp_path / "resumed") == 130
    assert calls == [[0, 1]] and not (tmp_path / "resumed" / "results.json").exists()
    assert [p.name for p in (tmp_path / "resumed" / "chunks").glob("*.pt")] == ["00000000-00000002.pt"]
    monkeypatch.setattr(perturb, "perturbation_process", original)
    assert _run(tmp_path / "resumed") == 0
    assert _report(tmp_path / "resumed") == _report(tmp_path / "whole")


def test_resuming_with_other_arguments_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    store = runner.ChunkStore(out / "chunks", {"experiment": "perturb", "eps": [0.1]})
    store.open()
    with pytest.raises(runner.ResumeError, match="differs in: eps"):
        runner.ChunkStore(out / "chunks", {"experiment": "perturb", "eps": [0.2]}).open()
    runner.ChunkStore(out / "chunks", {"experiment": "perturb", "eps": [0.2]}).open(fresh=True)  # --fresh
    assert _run(out) == 2 and "another configuration" in capsys.readouterr().err


@pytest.mark.slow  # about a minute on a loaded 2-core machine: two fresh interpreters import torch
def test_two_gloo_processes_equal_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: the same arithmetic, bit for bit
    try:
        assert _run(tmp_path / "single") == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "backprop_hooks",
        "perturb",
        *ARGS,
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _report(tmp_path / "two") == _report(tmp_path / "single")

"""The notebooks under examples/ run from the first cell to the last (nbclient, a fresh kernel of this Python,
from an empty folder) and are committed without outputs.

The documentation build (``bash .ci/docs``) executes the tour too, in the same way (MyST-NB, a fresh kernel of
this Python, an empty folder), and writes the executed copy to ``docs/_build/jupyter_execute/tour.ipynb``. CI
runs the build first and sets ``BACKPROP_HOOKS_EXECUTED_TOUR`` to that copy, so the tour runs once: the test
reads the copy instead of running the notebook again, where the copy has the committed notebook's code and is
newer than every source file of the package and the notebook; otherwise it runs the notebook itself."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SOURCES = ("backprop_hooks", "rules", "models", "eval")  # what the tour runs: the package's folders,
CODE = (".py", ".pt", ".safetensors", ".json")  # their code and the bundled weights (not __pycache__)
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
PICTURES = ("image/png", "text/html")


def test_there_is_a_notebook():
    assert [p.name for p in NOTEBOOKS] == ["tour.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def kernel(folder: Path):
    """A kernel manager whose kernel runs this interpreter (not whatever ``python3`` a Jupyter install finds)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = folder / "kernels" / "backprop-hooks-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    return KernelManager(kernel_name="backprop-hooks-test", kernel_spec_manager=specs)


def outputs(cell) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)


def code_of(nb) -> list:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def executed_copy(committed: Path):
    """The documentation build's executed copy of ``committed`` (``BACKPROP_HOOKS_EXECUTED_TOUR``), or None where
    it is not given, not there, holds other code, or is older than a source file it would have run."""
    given = os.environ.get("BACKPROP_HOOKS_EXECUTED_TOUR")
    if not given or not Path(given).is_file():
        return None
    copy = nbformat.read(given, as_version=4)
    sources = [committed] + [p for folder in SOURCES for p in (ROOT / folder).rglob("*") if p.suffix in CODE]
    newest = max(p.stat().st_mtime for p in sources)
    if code_of(copy) != code_of(nbformat.read(committed, as_version=4)) or Path(given).stat().st_mtime < newest:
        return None
    return copy


def test_an_executed_copy_is_used_only_when_it_is_the_committed_code(tmp_path, monkeypatch):
    """A copy with other code, an older copy and a missing copy are not used (the notebook then runs)."""
    committed = EXAMPLES / "tour.ipynb"
    nb = nbformat.read(committed, as_version=4)
    copy = tmp_path / "tour.ipynb"
    nbformat.write(nb, copy)
    monkeypatch.setenv("BACKPROP_HOOKS_EXECUTED_TOUR", str(copy))
    assert executed_copy(committed) is not None
    os.utime(copy, (0, 0))  # older than the sources
    assert executed_copy(committed) is None
    nb.cells[-1].source += "\n1"
    nbformat.write(nb, copy)
    assert executed_copy(committed) is None
    monkeypatch.setenv("BACKPROP_HOOKS_EXECUTED_TOUR", str(tmp_path / "missing.ipynb"))
    assert executed_copy(committed) is None


def test_the_tour_runs_and_shows_each_picture_once(tmp_path):
    """Every cell runs without error, in a folder of its own; each cell that draws shows one picture (a figure
    returned by plot() is not drawn a second time by pyplot), the text explanation shows as HTML tokens, the
    property test passes for the linear rule and fails for the clamped one."""
    nb = executed_copy(EXAMPLES / "tour.ipynb")
    if nb is None:
        nb = nbformat.read(EXAMPLES / "tour.ipynb", as_version=4)
        work = tmp_path / "work"
        work.mkdir()
        resources = {"metadata": {"path": str(work)}}
        client = nbclient.NotebookClient(nb, km=kernel(tmp_path), timeout=300, resources=resources)
        client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    pictures = [sum(any(k in o.get("data", {}) for k in PICTURES) for o in c.outputs) for c in code]
    drawing = [c for c, n in zip(code, pictures) if n]
    assert set(pictures) == {0, 1} and len(drawing) == 8, (
        pictures
    )  # plot, inline, compare, versus, ViT, text, LM, answer
    assert all("<Figure" in outputs(c) or "Explanation(" in outputs(c) for c in drawing)
    (answer,) = [c for c in code if "explain_generation" in c.source]
    assert "AnswerExplanation(" in outputs(answer) and "most for the answer: ' loop'" in outputs(answer)
    (text,) = [c for c in code if "text_topics.load()" in c.source]
    (html,) = [o["data"]["text/html"] for o in text.outputs if "text/html" in o.get("data", {})]
    assert html.count("<span") > 10 and "strings" in html
    (lm,) = [c for c in code if "explain_text(lm" in c.source]
    (html,) = [o["data"]["text/html"] for o in lm.outputs if "text/html" in o.get("data", {})]
    assert "clause (736), weighted contrast · p = " in html and html.count("<span") >= 15  # the next word, as said
    similarity = ast.literal_eval(outputs(next(c for c in code if "similarity(c.maps" in c.source)))
    assert similarity["logit"] > 0.9 and similarity["weighted"] < similarity["logit"] - 0.5  # what the text says
    assert "the identities hold" in outputs(next(c for c in code if "check(LeakyGradient)" in c.source))
    assert "the property test fails" in outputs(code[-1])

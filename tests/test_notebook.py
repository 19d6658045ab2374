"""The notebooks under examples/ run from the first cell to the last (nbclient, a fresh kernel of this Python,
from an empty folder) and are committed without outputs."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
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


def test_the_tour_runs_and_shows_each_picture_once(tmp_path):
    """Every cell runs without error, in a folder of its own; each cell that draws shows one picture (a figure
    returned by plot() is not drawn a second time by pyplot), the text explanation shows as HTML tokens, the
    property test passes for the linear rule and fails for the clamped one."""
    nb = nbformat.read(EXAMPLES / "tour.ipynb", as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, km=kernel(tmp_path), timeout=300, resources={"metadata": {"path": str(work)}})
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

"""The README's Python blocks run as written, each in its own namespace, from an empty folder. (The guides'
blocks, which the README links to, run in tests/test_docs.py.)"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_block(index: int) -> dict:
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here


def test_the_api_example():
    namespace = run_block(0)
    assert namespace["e"].maps.shape == (1, 224, 224)
    assert namespace["e"].target == "weighted" and namespace["e"].linear
    assert namespace["why_not"].target == "versus"


def test_the_answer_example():
    """The language model's answer block: the shapes, probabilities and the token the caption names."""
    g = run_block(1)["g"]
    assert g.total.shape == (1, 25) and g.matrix.shape == (1, 4, 25)
    p_answer, p_foil = g.probabilities.prod().item(), g.foil_probabilities.prod().item()
    assert round(p_answer, 3) == 0.139 and round(p_foil, 4) == 0.0137
    tokens = g.tokens()[0][: g.prompt_length]
    prompt = g.total[0, : g.prompt_length]
    assert tokens[int(prompt.argmax())] == " loop" and round(prompt.max().item(), 2) == 1.67


def test_every_other_block_runs():
    for index in range(1, len(BLOCKS)):
        run_block(index)


def test_the_readme_links_into_the_documentation():
    """Every relative link of the README points at a file of the repository (the pages it moved to)."""
    root = README.parent
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert any(link.startswith("docs/") for link in links)
    assert [link for link in links if "://" not in link and not (root / link).exists()] == []

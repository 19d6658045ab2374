"""The README's python blocks run as written, each in its own namespace."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_block(index: int) -> dict:
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"{README}#python-block-{index}", "exec"), namespace)
    return namespace


def test_readme_python_block_runs():
    namespace = run_block(0)
    assert namespace["e"].maps.shape == (1, 224, 224)
    assert tuple(namespace["capture"].output.shape) == (1, 1280, 7, 7)
    assert namespace["why_not"].target == "versus"


@pytest.mark.parametrize("index", range(1, len(BLOCKS)))
def test_readme_other_python_blocks_run(index):
    run_block(index)

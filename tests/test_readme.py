"""The README's API walkthrough runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["e"].maps.shape == (1, 224, 224)
    assert tuple(namespace["capture"].output.shape) == (1, 1280, 7, 7)
    assert namespace["why_not"].target == "versus"

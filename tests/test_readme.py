"""The README's Python blocks run as written, each in its own namespace."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_block(index: int) -> dict:
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), namespace)
    return namespace


def test_the_api_walkthrough():
    namespace = run_block(0)
    assert namespace["e"].maps.shape == (1, 224, 224)
    assert tuple(namespace["capture"].output.shape) == (1, 1280, 7, 7)
    assert namespace["why_not"].target == "versus"


@pytest.mark.parametrize("index", range(1, len(BLOCKS)))
def test_every_other_block_runs(index):
    run_block(index)


def test_the_own_rule_example_can_fail():
    """The rule example's property test is real: a rule whose backward is not linear in the gradient fails it."""
    namespace = run_block(1)
    rule = namespace["LeakyReLUGradient"]
    rule.backward = lambda self, module, grad_input, grad_output: (grad_output[0].clamp(min=0),)  # guided-style
    with pytest.raises(AssertionError):
        namespace["test_leaky_gradient_is_contrastive"]()

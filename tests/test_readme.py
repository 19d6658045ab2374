"""The README's Python blocks run as written, each in its own namespace, from an empty folder."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_block(index: int) -> dict:
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), namespace)
    return namespace


def block_with(text: str) -> int:
    (index,) = [i for i, block in enumerate(BLOCKS) if text in block]
    return index


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here


def test_the_api_walkthrough():
    namespace = run_block(0)
    assert namespace["e"].maps.shape == (1, 224, 224)
    assert tuple(namespace["capture"].output.shape) == (1, 1280, 7, 7)
    assert namespace["why_not"].target == "versus"


def test_the_text_and_hugging_face_section(tmp_path):
    namespace = run_block(block_with("text_topics.load()"))
    assert namespace["e"].attributions.shape == namespace["ids"].shape
    assert namespace["why"].attributions.shape == (1, 8)
    assert namespace["batch"].extras["positions"].tolist() == [3, 1]  # each row's next token, padding not read
    assert namespace["r"].attributions.shape == (1, 4, 4)
    assert (tmp_path / "out" / "tokens.html").is_file()


def test_the_attnlrp_section(tmp_path):
    namespace = run_block(block_with("python_docs_lm.load()"))
    assert [row[2].split("(")[-1] for row in namespace["rows"]] == ["logit)", "weighted)", "versus)"]
    assert namespace["tokenizer"].decode(namespace["correct"]) == " clause"
    assert namespace["words"][:3] == ["<|endoftext|>", "A", '"']  # BOS from the tokenizer, tokens as words
    assert (tmp_path / "out" / "next_token.png").is_file() and (tmp_path / "out" / "next_token.html").is_file()


@pytest.mark.parametrize("index", [i for i in range(1, len(BLOCKS)) if "bh.explain_text" not in BLOCKS[i]])
def test_every_other_block_runs(index):
    run_block(index)


def test_the_own_rule_example_can_fail():
    """The rule example's property test is real: a rule whose backward is not linear in the gradient fails it."""
    namespace = run_block(block_with("class LeakyReLUGradient"))
    rule = namespace["LeakyReLUGradient"]
    rule.backward = lambda self, module, grad_input, grad_output: (grad_output[0].clamp(min=0),)  # guided-style
    with pytest.raises(AssertionError):
        namespace["test_leaky_gradient_is_contrastive"]()


def test_the_language_models_at_scale_section():
    import torch

    namespace = run_block(block_with("llama.gradient_checkpointing_enable()"))
    assert namespace["e"].attributions.dtype == torch.float32 and namespace["e"].attributions.shape == (1, 64)
    assert namespace["llama"].training

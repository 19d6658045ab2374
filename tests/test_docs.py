"""The documentation site's sources (docs/): every public name has a docstring and an entry in the API
reference's sources, and every Python block of the guides runs as written. The built site is checked by
``bash .ci/docs`` (warnings as errors, every public name's entry) and, in a browser, by test_docs_site.py."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))
from _ext import public_api  # noqa: E402

NAMES = list(public_api.public_names())
GUIDES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
DIRECTIVE = re.compile(r"^(\s*)\.\. (auto\w+|py:\w+|currentmodule)::\s*(\S+)\s*$")


def blocks(page: Path) -> list:
    return BLOCK.findall(page.read_text())


def reference_entries(sources: dict) -> tuple:
    """From the reST sources of the reference: the names its directives document, and the modules documented
    with their members (an ``automodule`` without ``:no-members:``)."""
    named, with_members = set(), set()
    for text in sources.values():
        lines = text.splitlines()
        module = None
        for i, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if not match:
                continue
            kind, target = match.group(2), match.group(3)
            options = []
            for following in lines[i + 1 :]:
                if not following.strip().startswith(":"):
                    break
                options.append(following.strip())
            if kind in ("automodule", "currentmodule", "py:module"):
                module = target
                named.add(target)
                if kind == "automodule" and ":no-members:" not in options:
                    with_members.add(target)
            elif kind.startswith("auto"):
                named.add(target)
            elif kind.startswith("py:") and module:
                named.add(target if "." in target else f"{module}.{target}")
    return named, with_members


REFERENCE = {p.name: p.read_text() for p in (DOCS / "api").glob("*.rst")}


def documented(module: str, name: str, value: object, entries: tuple) -> bool:
    named, with_members = entries
    candidates = public_api.entries(module, name, value)
    homes = {c.rsplit(".", 1)[0] for c in candidates}
    return any(c in named for c in candidates) or bool(homes & with_members)


def has_docstring(module: str, name: str, value: object) -> bool:
    if inspect.ismodule(value):
        return bool((value.__doc__ or "").strip())
    if inspect.isclass(value):
        return bool((value.__dict__.get("__doc__") or "").strip())
    if callable(value) and not hasattr(value, "__origin__"):
        return bool((getattr(value, "__doc__", None) or "").strip())
    # data (constants, type aliases): a ``#:`` comment above its assignment where it is defined, or a
    # py:data entry in the reference
    sources = [module] + ([public_api.SHIMS[module]] if module in public_api.SHIMS else [])
    comment = re.compile(rf"^#:.*\n{re.escape(name)}\b\s*[:=]", re.M)
    if any(comment.search(inspect.getsource(importlib.import_module(m))) for m in sources):
        return True
    return any(f"py:data:: {name}" in text for text in REFERENCE.values())


@pytest.mark.parametrize("module", sorted({m for m, _, _ in NAMES}))
def test_every_public_name_has_a_docstring(module):
    assert (importlib.import_module(module).__doc__ or "").strip(), f"{module} has no module docstring"
    missing = [name for m, name, value in NAMES if m == module and not has_docstring(m, name, value)]
    assert not missing, f"{module}: no docstring for {missing}"


def test_every_public_name_has_an_entry_in_the_reference_sources():
    entries = reference_entries(REFERENCE)
    missing = [f"{m}.{name}" for m, name, value in NAMES if not documented(m, name, value, entries)]
    assert not missing, f"add these to docs/api/*.rst: {missing}"


def test_the_reference_check_sees_a_missing_entry():
    """The check itself can fail: without the targets page, the targets have no entry."""
    entries = reference_entries({k: v for k, v in REFERENCE.items() if k != "targets.rst"})
    assert not documented("backprop_hooks.targets", "Weighted", object(), entries)
    assert documented("backprop_hooks.targets", "Weighted", object(), reference_entries(REFERENCE))


def test_the_public_names_cover_every_subpackage_of_the_issue():
    modules = {m for m, _, _ in NAMES}
    for package in ("rules", "models", "methods", "targets", "testing", "interop", "errors"):
        assert f"backprop_hooks.{package}" in modules
    assert any(m.startswith("backprop_hooks.eval.") for m in modules)
    top = {name for m, name, _ in NAMES if m == "backprop_hooks"}
    assert {"explain", "explain_text", "compare", "attach", "Rule", "Explanation"} <= top


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here


def run_page(page: str) -> list:
    """Every Python block of a guide, in order, in one namespace (later blocks may use earlier names); the
    namespace as each block left it."""
    path = DOCS / page
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    after = []
    for index, block in enumerate(blocks(path)):
        exec(compile(block, f"{path}:block{index}", "exec"), namespace)
        after.append(dict(namespace))
    return after


def test_the_guides_have_code():
    with_code = {str(p.relative_to(DOCS)) for p in GUIDES if blocks(p)}
    assert {"getting-started.md", "own-rules.md", "transformers.md", "interop.md", "plots.md"} <= with_code


@pytest.mark.parametrize(
    "page",
    sorted(
        str(p.relative_to(DOCS))
        for p in GUIDES
        if blocks(p) and p.name not in ("getting-started.md", "transformers.md", "own-rules.md")
    ),
)
def test_every_python_block_of_the_guides_runs(page):
    run_page(page)


def test_getting_started(tmp_path):
    (namespace,) = run_page("getting-started.md")
    assert namespace["e"].maps.shape == (1, 224, 224)
    assert tuple(namespace["capture"].output.shape) == (1, 1280, 7, 7)
    assert namespace["why_not"].target == "versus"


def block_after(after: list, page: str, marker: str) -> dict:
    """The namespace as the block of ``page`` that contains ``marker`` left it."""
    (index,) = [i for i, block in enumerate(blocks(DOCS / page)) if marker in block]
    return after[index]


@pytest.fixture(scope="module")
def transformers_page(tmp_path_factory) -> tuple:
    """The transformers page run once, in a folder of its own: (the namespaces after each block, the folder)."""
    folder, here = tmp_path_factory.mktemp("transformers"), os.getcwd()
    os.chdir(folder)
    try:
        return run_page("transformers.md"), folder
    finally:
        os.chdir(here)


def test_transformers_and_text(transformers_page):
    after, tmp_path = transformers_page
    text = block_after(after, "transformers.md", "text_topics.load()")
    assert text["e"].attributions.shape == text["ids"].shape
    assert text["why"].attributions.shape == (1, 8)
    assert text["batch"].extras["positions"].tolist() == [3, 1]  # each row's next token, padding not read
    assert text["r"].attributions.shape == (1, 4, 4)
    assert (tmp_path / "out" / "tokens.html").is_file()
    lm = block_after(after, "transformers.md", "tokens.readable(tokenizer)")
    assert [row[2].split("(")[-1] for row in lm["rows"]] == ["logit)", "weighted)", "versus)"]
    assert lm["tokenizer"].decode(lm["correct"]) == " clause"
    assert lm["words"][:3] == ["<|endoftext|>", "A", '"']  # BOS from the tokenizer, tokens as words
    assert (tmp_path / "out" / "next_token.png").is_file() and (tmp_path / "out" / "next_token.html").is_file()
    scale = block_after(after, "transformers.md", "llama.gradient_checkpointing_enable()")
    assert scale["e"].attributions.dtype == torch.float32 and scale["e"].attributions.shape == (1, 64)
    assert scale["llama"].training  # explained as it is: checkpointing runs in training mode


def test_the_own_rule_example_can_fail():
    """The rule example's property test is real: a rule whose backward is not linear in the gradient fails it."""
    namespace = run_page("own-rules.md")[-1]
    rule = namespace["LeakyReLUGradient"]
    rule.backward = lambda self, module, grad_input, grad_output: (grad_output[0].clamp(min=0),)  # guided-style
    with pytest.raises(AssertionError):
        namespace["test_leaky_gradient_is_contrastive"]()


def test_language_models_answers(transformers_page):
    """The answers section: what its comments say is what the bundled model gives."""
    after, tmp_path = transformers_page
    g = block_after(after, "transformers.md", "foil_ids=' \"finally\" clause'")["g"]
    assert g.tokens()[0][g.prompt_length :] == [' "', "else", '"', " clause"]
    assert g.tokens()[0][0] == "<|endoftext|>" and g.prompt_length == 21 and g.linear
    torch.testing.assert_close(g.probabilities, torch.tensor([[0.27, 0.57, 1.00, 0.90]]), atol=0.005, rtol=0)
    assert round(float(g.probabilities.prod()), 3) == 0.139 and round(float(g.foil_probabilities.prod()), 4) == 0.0137
    assert round(float(g.potential), 2) == 2.32 and g.total.shape == (1, 25) and g.matrix.shape == (1, 4, 25)
    assert (tmp_path / "answer.png").is_file()
    prompt_scores = dict(zip(g.tokens()[0][: g.prompt_length], g.total[0, : g.prompt_length].tolist()))
    assert max(prompt_scores, key=prompt_scores.get) == " loop" and round(prompt_scores[" loop"], 2) == 1.67
    assert min(prompt_scores, key=prompt_scores.get) == " exec"
    batch = block_after(after, "transformers.md", "prompts = [prompt,")["batch"]
    assert batch.attention_mask.sum(1).tolist() == [25, 23]
    assert batch.answer_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    per_step = block_after(after, "transformers.md", "target=bh.targets.Versus(g.foil_ids)")["per_step"]
    assert [round(v, 2) for v in per_step.step_potentials[0].tolist()] == [0, 2.37, 0, 0]
    own = block_after(after, "transformers.md", "max_new_tokens=8")["own"]
    assert "".join(own.tokens()[0][own.prompt_length :]) == ' "else" clause is executed.<|endoftext|>'

"""Installed, everything lives under the one name ``backprop_hooks``: a user's own ``models``/``rules``/``eval``
package can never collide with ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DOCS_LM = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def test_the_wheel_holds_only_backprop_hooks(tmp_path):
    """Every file of a regular (non-editable) wheel lies under backprop_hooks/ or its dist-info."""
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "_build", "__pycache__", "out")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("backprop_hooks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"backprop_hooks", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for required in (
        "backprop_hooks/rules/__init__.py",
        "backprop_hooks/models/zoo.py",
        "backprop_hooks/models/weights/digits_cnn.pt",
        "backprop_hooks/models/weights/digits_vit.pt",
        *(f"backprop_hooks/models/weights/python_docs_lm/{name}" for name in PYTHON_DOCS_LM),
        "backprop_hooks/eval/explain.py",
        "backprop_hooks/plotting/explanations.py",
        "backprop_hooks/methods/base.py",
    ):
        assert required in names, required
    assert not any(name.startswith(("backprop_hooks/tests", "backprop_hooks/bench")) for name in names)


def test_no_top_level_models_rules_or_eval():
    """The installed names are backprop_hooks.*; importing bare ``models`` from elsewhere finds nothing."""
    code = "import importlib.util as u; print([u.find_spec(n) is None for n in ('models', 'rules', 'eval')])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[True, True, True]"


@pytest.mark.parametrize("how", ["module", "script"])
def test_the_command_line_ignores_a_users_own_packages(tmp_path, how):
    """Run from a folder holding its own ``models``, ``rules`` and ``eval`` packages that raise on import."""
    for name in ("models", "rules", "eval"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    script = shutil.which("backprop-hooks")
    if how == "script" and script is None:
        pytest.skip("the backprop-hooks console script is not on PATH (package not installed)")
    command = [sys.executable, "-m", "backprop_hooks"] if how == "module" else [script]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [*command, "explain", "--model", "digits_cnn", "--method", "gradient", "--topk", "1", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "chelsea.png").is_file() and (tmp_path / "out" / "chelsea.json").is_file()

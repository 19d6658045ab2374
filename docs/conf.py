"""Sphinx configuration of the backprop_hooks documentation (built by ``bash .ci/docs``).

Sphinx rather than MkDocs because the docstrings are reStructuredText (``literal``, ``:class:`` roles, reST
tables), which autodoc renders as written and nitpicky mode checks reference by reference; the guides are
Markdown through MyST, the notebook is executed by MyST-NB, and the command line's options come from its
argparse parser through sphinx-argparse.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))  # docs/_ext

project = "backprop_hooks"
author = "the backprop_hooks authors"
copyright = "the backprop_hooks authors, Apache-2.0"
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages (MyST) and the executed notebook
    "sphinxarg.ext",  # the command line's options, from its parser
    "_ext.public_api",  # checks that every public name has its entry in the reference
]

html_theme = "furo"
html_title = "backprop_hooks"
html_static_path = ["_static"]
html_css_files = ["extra.css"]
html_show_sourcelink = False
templates_path: list = []

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "_ext"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# Every reference must resolve (``-n``); outside references (torch, typing, the peers) cannot be checked
# offline (no inventories), so they are let through by name.
nitpicky = True
_OUTSIDE = r"(torch|nn|typing|numpy|np|matplotlib|PIL|transformers|timm|captum|quantus|pytorch_grad_cam|hypothesis"
_OUTSIDE += r"|argparse|collections|dataclasses|pathlib|concurrent|functools|types|enum|abc|os|io|threading"
_OUTSIDE += r"|contextlib|weakref|tqdm|torchvision|sklearn|skimage|zennit|lxt|lazy)\b.*"
# numpy's ArrayLike, matplotlib's AxesImage and the token views' Tokens appear in signatures by their short names.
_SHORT = r"(Tensor|Module|Path|Figure|Axes|AxesImage|ArrayLike|Callable|Any|token_views\.Tokens|Row)"
# Internal types that appear in signatures of public names, with no entry of their own.
_INTERNAL = r"backprop_hooks\.(attach\._ModuleHook|eval\.explain\.Outcome|rules\.(lrp_terms|canonizers|intercept)\b.*)"
nitpick_ignore_regex = [(r"py:.*", _OUTSIDE), (r"py:.*", _SHORT), (r"py:.*", _INTERNAL)]

# autodoc: members in source order, signatures with their type hints, short names
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports: list = []
python_use_unqualified_type_names = True
add_module_names = False

# MyST: Markdown with definition lists, heading anchors for [text](page.md#anchor) links; no math extension, so
# the site loads nothing from outside (MathJax would come from a CDN)
myst_enable_extensions = ["deflist", "colon_fence", "attrs_inline"]
myst_heading_anchors = 3

# MyST-NB: the notebook runs at build time on the bundled models, in a fresh kernel of this Python, in a
# temporary folder; the committed notebook keeps no outputs.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_in_temp = True
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_kernel_rgx_aliases = {".*": "backprop-hooks-docs"}


def _kernel() -> None:
    """A kernel that runs this interpreter (not whatever ``python`` a Jupyter install finds first)."""
    folder = DOCS / "_build" / "jupyter" / "kernels" / "backprop-hooks-docs"
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "backprop_hooks docs", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder.parents[1]), os.environ.get("JUPYTER_PATH", "")])


_kernel()

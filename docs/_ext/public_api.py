"""The public names of backprop_hooks, and the check that each has its entry in the API reference.

A module's public names are its ``__all__``, or, without one, the classes and functions it defines whose
names do not start with an underscore. The Sphinx build (``bash .ci/docs``, warnings as errors) fails when
one of them has no entry in the reference; ``tests/test_docs.py`` checks, in the default suite, that each
has a docstring and is named in the reference's sources.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Tuple

REFERENCE = Path(__file__).resolve().parents[1] / "api"

PACKAGES = [
    "backprop_hooks",
    "backprop_hooks.targets",
    "backprop_hooks.rules",
    "backprop_hooks.methods",
    "backprop_hooks.testing",
    "backprop_hooks.interop",
    "backprop_hooks.errors",
    "backprop_hooks.models",
    "backprop_hooks.models.text_topics",
    "backprop_hooks.models.python_docs_lm",
    "backprop_hooks.plotting.maps",
    "backprop_hooks.plotting.labels",
    "backprop_hooks.plotting.tokens",
    "backprop_hooks.plotting.explanations",
    "backprop_hooks.plotting.pictures",
    "backprop_hooks.plotting.comparison",
    "backprop_hooks.plotting.answers",
    "backprop_hooks.options",
    "backprop_hooks.causal",
    "backprop_hooks.token_checks",
    "backprop_hooks.checkpointing",
    "backprop_hooks.module_weights",
    "backprop_hooks.precision",
]


def modules() -> List[str]:
    """The modules whose public names the reference documents: ``PACKAGES`` and every module of ``eval``."""
    import backprop_hooks.eval as experiments

    return PACKAGES + [f"backprop_hooks.eval.{m.name}" for m in pkgutil.iter_modules(experiments.__path__)]


def names_of(module: ModuleType) -> List[str]:
    """``module.__all__``, or the public classes and functions defined in ``module`` itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    own = (inspect.isclass, inspect.isfunction)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and any(is_(value) for is_ in own) and value.__module__ == module.__name__
    ]


def public_names() -> Iterator[Tuple[str, str, object]]:
    """``(module, name, object)`` for every public name of every documented module."""
    for module_name in modules():
        module = importlib.import_module(module_name)
        for name in names_of(module):
            yield module_name, name, getattr(module, name)


# Modules kept so that old imports work, whose names are documented where they are defined.
SHIMS = {
    "backprop_hooks.eval.tokens": "backprop_hooks.plotting.tokens",
    "backprop_hooks.eval.plots": "backprop_hooks.plotting.maps",
}


def entries(module: str, name: str, value: object) -> Tuple[str, ...]:
    """The reference entries that may document ``module.name``: its own (a module: the module's page), or,
    for a name of a shim module, the entry where it is defined."""
    if inspect.ismodule(value):
        return (value.__name__,)
    if module in SHIMS:
        return (f"{module}.{name}", f"{SHIMS[module]}.{name}")
    return (f"{module}.{name}",)


def _check_reference(app, env) -> None:
    """After reading every page: warn (an error under ``-W``) for each public name without its entry."""
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    domain = env.get_domain("py")
    known = set(domain.objects) | set(domain.modules)
    for module, name, value in public_names():
        if not any(entry in known for entry in entries(module, name, value)):
            logger.warning(f"public name {module}.{name} has no entry in the API reference (docs/api/)")


def _public_objects() -> set:
    return {id(value) for _, _, value in public_names()}


def _documented_bases(app, name, obj, options, bases: list) -> None:
    """Show a class's bases as the public classes they are or derive from: a private or internal base
    (``_Net``, ``lrp_terms.Term``) is replaced by its own bases, which have entries in the reference."""
    public = app.env.temp_data.setdefault("backprop_hooks_public", _public_objects())
    resolved = []
    pending = list(bases)
    while pending:
        base = pending.pop(0)
        internal = getattr(base, "__module__", "").startswith("backprop_hooks") and id(base) not in public
        if internal:
            pending[:0] = [b for b in base.__bases__ if b is not object]
        elif base not in resolved:
            resolved.append(base)
    bases[:] = resolved or [object]


def setup(app):
    app.connect("env-check-consistency", _check_reference)
    app.connect("autodoc-process-bases", _documented_bases)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]


class _ThisCheckout(importlib.abc.MetaPathFinder):
    """Import ``backprop_hooks.{rules,models,eval}`` from this checkout's top-level folders.

    An installation maps them there too (setup.cfg's ``package_dir``); this finder makes the tests of a
    second clone or worktree test that clone's code, not the one installed in editable mode elsewhere.
    """

    def find_spec(self, name, path=None, target=None):
        top, _, sub = name.partition(".")
        folder = ROOT / sub
        if top != "backprop_hooks" or sub not in ("rules", "models", "eval") or not (folder / "__init__.py").exists():
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if "backprop_hooks" not in sys.modules:
    sys.meta_path.insert(0, _ThisCheckout())

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Examples are small networks: no deadline (CI machines are noisy), a modest count by default.
settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

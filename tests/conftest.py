import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Examples are small networks: no deadline (CI machines are noisy), a modest count by default.
settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# A slower run outside CI: HYPOTHESIS_PROFILE=thorough pytest (or .ci/thorough); 12x the examples, and the
# budgets pinned with testing.examples(n) scale alike.
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def lms():
    """Small random-init causal language models, float64, eval mode: ``{"gpt2": ..., "llama": ...}`` (tests/_hf.py)."""
    from _hf import build

    return {name: build(name) for name in ("gpt2", "llama")}

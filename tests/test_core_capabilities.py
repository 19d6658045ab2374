"""Method capabilities are declared, and a method object keeps no tensor of a finished call."""

import gc
import inspect
import weakref

import pytest
import torch

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.methods import base


def _tensors(obj, seen=None, depth=0):
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples (depth-limited)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6 or isinstance(obj, torch.nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _tensors(vars(obj), seen, depth + 1)


CNN_METHODS = [m for m in bh.methods.available() if bh.methods.get(m).space != "tokens"]


@pytest.mark.parametrize("name", CNN_METHODS)
def test_no_call_state_left_on_the_method(name):
    model = testing.randomize(testing.CNN(3, 8, 6, 2, 4), seed=0)
    method = bh.methods.get(name)(model)
    e = method(torch.rand(2, 3, 8, 8, dtype=torch.float64), target="weighted")
    left = list(_tensors(method))
    assert left == [], f"{name} keeps {len(left)} tensors of its last call"
    graph = weakref.ref(e.logits)  # the explanation itself is detached: nothing holds the graph
    del e
    gc.collect()
    assert graph() is None


def test_capabilities_are_declared():
    for name in bh.methods.available():
        cls = bh.methods.get(name)
        assert cls.space in ("input", "layer", "tokens")
        assert cls.takes_layer == ("layer" in inspect.signature(cls).parameters), name
    assert bh.methods.get("gradcam").takes_layer and bh.methods.get("gradcam").space == "layer"
    assert not bh.methods.get("rollout").takes_layer and bh.methods.get("vit_gradcam").takes_layer
    assert base.Method.space == "input"

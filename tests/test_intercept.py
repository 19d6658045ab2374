"""Intercept: only the functions in its table reach their handlers, the handlers' own calls are not
intercepted, paused() lets calls through, other threads see nothing, and it ends with its block."""

import threading

import torch
import torch.nn.functional as F

from backprop_hooks.rules.intercept import Intercept


def test_only_the_chosen_functions_reach_their_handlers():
    seen = []

    def on_softmax(func, args, kwargs):
        seen.append(func)
        return func(*args, **kwargs) * 2  # its own torch calls (softmax, mul) are not intercepted

    x = torch.randn(3, 4)
    with Intercept({F.softmax: on_softmax, torch.Tensor.softmax: on_softmax}) as mode:
        y = F.softmax(x, dim=-1) + x.softmax(-1) + torch.relu(x)
        with mode.paused():
            z = F.softmax(x, dim=-1)
        other = []
        thread = threading.Thread(target=lambda: other.append(F.softmax(x, dim=-1)))
        thread.start()
        thread.join()
    assert seen == [F.softmax, torch.Tensor.softmax]
    torch.testing.assert_close(y, 4 * x.softmax(-1) + x.relu())
    assert torch.equal(z, x.softmax(-1)) and torch.equal(other[0], x.softmax(-1))  # paused; another thread
    assert torch.equal(F.softmax(x, dim=-1), x.softmax(-1)) and len(seen) == 2  # after the block: nothing


def test_current_is_the_innermost_intercept_of_the_thread_and_pauses_nest():
    from backprop_hooks.rules.intercept import current

    calls = []

    def count(func, args, kwargs):
        calls.append(func)
        return func(*args, **kwargs)

    x = torch.randn(2, 3)
    outer, inner = Intercept({torch.relu: count}), Intercept({torch.tanh: count})
    assert current() is None
    with outer:
        with inner:
            assert current() is inner
            seen_elsewhere = []
            thread = threading.Thread(target=lambda: seen_elsewhere.append(current()))
            thread.start()
            thread.join()
            assert seen_elsewhere == [None]
        assert current() is outer
        outer.pause(+1)
        with outer.paused():
            torch.relu(x)
        torch.relu(x)  # still paused: one pause left
        outer.pause(-1)
        torch.relu(x)
    assert current() is None and calls == [torch.relu]

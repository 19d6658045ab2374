"""Forward captures: keep a module's output so that a method can differentiate with respect to it."""

from __future__ import annotations

from typing import List

import torch

from backprop_hooks.rule import Rule


class Capture(Rule):
    """Records the output of every call of the module it sits on (``outputs``, in call order).

    With ``clone=True`` (default) the module's downstream consumers receive a copy, so in-place ops later in
    the network (``nn.ReLU(inplace=True)`` after a conv) cannot overwrite the recorded activation.
    """

    linear = True
    needs_backward = False

    def __init__(self, clone: bool = True):
        self.clone = clone
        self.outputs: List[torch.Tensor] = []

    def forward(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            from backprop_hooks.errors import RuleError

            raise RuleError(
                f"Capture needs a module with a tensor output; {type(module).__name__} returned {type(output).__name__}"
            )
        self.outputs.append(output)
        return output.clone() if self.clone else None

    @property
    def output(self) -> torch.Tensor:
        """The output of the last call."""
        return self.outputs[-1]

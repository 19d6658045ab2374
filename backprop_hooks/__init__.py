"""backprop_hooks: class-contrastive back-propagation explanations for PyTorch.

import backprop_hooks as bh
e = bh.explain(model, x, method="gradcam", target="weighted")
"""

from __future__ import annotations

from . import errors, targets
from .attach import Handle, attach
from .errors import BackpropHooksError
from .explanation import Explanation
from .rule import Rule

# Layers, lowest first: the core above, then the rules, the methods built from them, the test helpers.
from . import rules
from . import methods, testing
from .api import Comparison, compare, explain
from .text import explain_text
from .generation import explain_generation
from .answer import AnswerExplanation
from . import interop  # Captum, pytorch-grad-cam and Quantus adapters: imported only when used

__version__ = "0.1.0"


__all__ = [
    "Rule",
    "attach",
    "Handle",
    "explain",
    "explain_text",
    "explain_generation",
    "AnswerExplanation",
    "compare",
    "Comparison",
    "Explanation",
    "targets",
    "errors",
    "BackpropHooksError",
    "methods",
    "rules",
    "testing",
    "interop",
]

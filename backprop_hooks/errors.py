"""Every error and warning of backprop_hooks, in one place. Each message says what was wrong and what would be right.

All errors derive from :class:`BackpropHooksError`, and each also derives from the built-in exception a
user would expect (``ValueError``, ``TypeError``, ``RuntimeError``; lookups of unknown names are
``ValueError``), so ``except ValueError`` keeps working. All warnings derive from
:class:`BackpropHooksWarning`, so one filter silences them.
"""

from __future__ import annotations

from typing import Iterable


class BackpropHooksError(Exception):
    """Base class of every error raised by backprop_hooks."""


# ---------------------------------------------------------------------------------- the framework
class InputError(BackpropHooksError, ValueError):
    """The input tensor is unusable: wrong type, dtype, rank, or non-finite values."""


class ModelError(BackpropHooksError, TypeError):
    """The model is not something a method can explain (not an ``nn.Module``)."""


class ClassIndexError(BackpropHooksError, ValueError):
    """Class indices out of range, of the wrong dtype, or of the wrong shape."""


class ModelOutputError(BackpropHooksError, ValueError):
    """The model's output is not a (B, C) tensor of logits matching the input's batch, or holds NaN or Inf."""


class NonFiniteLogitsError(ModelOutputError):
    """The model's logits hold NaN or Inf (a NaN weight, a float16 overflow, a model that computes NaN for padding);
    the message names the samples (or sequences and steps)."""


class ForwardError(BackpropHooksError, RuntimeError):
    """The model's forward pass raised on the given input (most often: a shape, dtype or device the model does
    not take). The original exception is the ``__cause__``."""


class UnknownNameError(BackpropHooksError, ValueError):
    """A method, target, layer, rule, composite or architecture name that does not exist."""


class OptionError(BackpropHooksError, ValueError):
    """A method or rule option outside its accepted values (``n_steps=0``, ``post="max"``, ...)."""


class LayerError(BackpropHooksError, ValueError):
    """A layer that exists but cannot serve: it did not run in the forward pass, or its output has no grid."""


class SelectorError(BackpropHooksError, ValueError):
    """A module selector of ``attach`` that is malformed or matches no module."""


class RuleError(BackpropHooksError, RuntimeError):
    """A rule misbehaved (wrong return value) or was put on a module it cannot handle."""


class TokenLayoutError(BackpropHooksError, ValueError):
    """The token layout (class/distillation/register tokens, patch grid) cannot be read from the model."""


# ------------------------------------------------------------------------------ models and data
class UnknownArchitectureError(UnknownNameError):
    """An architecture name that ``backprop_hooks.models.available()`` does not list."""


class WeightsUnavailableError(BackpropHooksError, RuntimeError):
    """Pretrained weights could not be obtained (offline, missing package, failed download)."""


class WeightsMismatchError(BackpropHooksError, ValueError):
    """A checkpoint does not fit the architecture it is loaded into, or is no checkpoint at all."""


class DataSpecError(BackpropHooksError, ValueError):
    """A data-set spec (``digits``, ``folder:PATH``, ``cub:PATH``, ...) that cannot be read."""


class ResumeError(BackpropHooksError, ValueError):
    """An output folder holds a run written with other settings: it cannot be continued."""


class UsageError(BackpropHooksError):
    """A command-line mistake found by a subcommand (one line on stderr, exit code 2)."""


class MissingExtraError(BackpropHooksError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


# ------------------------------------------------------------------------------------- warnings
class BackpropHooksWarning(UserWarning):
    """Base class of every warning emitted by backprop_hooks."""


class NonLinearContrastWarning(BackpropHooksWarning):
    """A contrast target on a method whose backward is not linear in the seed: no per-class identity holds."""


class TrainingModeWarning(BackpropHooksWarning):
    """The model is in training mode (dropout, batch statistics): explanations are not reproducible."""


class CompiledModelWarning(BackpropHooksWarning):
    """A method whose rules live in module hooks explains a compiled model by running its eager module."""


class ImageUpsampledWarning(BackpropHooksWarning):
    """An image smaller than the model's input is upsampled: its maps show interpolated, not real, detail."""


class PaddingWarning(BackpropHooksWarning):
    """A padded text batch that the model may read differently from each sequence alone (left padding on a model
    whose positions count from column 0)."""


class ImageRangeWarning(BackpropHooksWarning):
    """An image to draw is neither in [0, 1] nor on the 0-255 scale (it looks normalised): drawn stretched."""


class FunctionalReLUWarning(BackpropHooksWarning):
    """Some ReLUs are functional (``F.relu``): module rules cannot reach them, so they keep their gradient."""


class UncoveredModuleWarning(BackpropHooksWarning):
    """A module a method's rules are meant for (a transformer's norm) that no rule recognises: it keeps its
    plain gradient, so the method's rule does not hold there; the warning names the modules."""


def mark_from_rule(exc: BaseException) -> None:
    """Mark an exception raised by a rule, so that it reaches the user unchanged (not as a ForwardError)."""
    try:
        exc.__backprop_hooks_rule__ = True
    except AttributeError:  # an exception type with __slots__
        pass


def raised_by_rule(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by a rule (see :func:`mark_from_rule`)."""
    return getattr(exc, "__backprop_hooks_rule__", False)


def choices(values: Iterable[object], limit: int = 12) -> str:
    """Format accepted values for an error message: ``'a', 'b', ... (N in all)``."""
    values = [repr(v) if isinstance(v, str) else str(v) for v in values]
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingExtraError` saying ``pip install "backprop_hooks[extra]"``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f'{module} is not installed; install it with: pip install "backprop_hooks[{extra}]"'
        ) from exc

"""Keyword options of a constructor (a method, a composite) and a typed error, with close matches, for others.

``constructor_options(cls)``: the keywords of ``cls.__init__``, followed up the class hierarchy while a
constructor passes ``**kwargs`` on to its base class. ``check_options(options, accepted, what)``: an
:class:`~backprop_hooks.errors.OptionError` naming the first unknown option, its close matches and the
accepted ones, before anything is built or run.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import OptionError, choices

_KEYWORDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def constructor_options(cls: type, skip: Iterable[str] = ("self", "model")) -> List[str]:
    """The keyword options ``cls(...)`` takes: each constructor's named parameters, from ``cls`` up its MRO while
    the constructor has ``**kwargs`` (passed on to ``super().__init__``), without ``skip``."""
    return list(_constructor_options(cls, tuple(skip)))


@functools.lru_cache(maxsize=512)
def _constructor_options(cls: type, skip: Tuple[str, ...]) -> Tuple[str, ...]:
    """:func:`constructor_options`, read once per class (``inspect.signature`` is slow; every call checks them)."""
    names: List[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        parameters = inspect.signature(init).parameters.values()
        names += [p.name for p in parameters if p.kind in _KEYWORDS]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    skipped = set(skip)
    return tuple(name for name in dict.fromkeys(names) if name not in skipped)


def check_options(
    options: Mapping[str, object],
    accepted: Sequence[str],
    what: str,
    elsewhere: Optional[Callable[[str], str]] = None,
) -> None:
    """Raise :class:`~backprop_hooks.errors.OptionError` when ``options`` holds a name that ``accepted`` does not:
    ``"{what} has no option 'n_step' (did you mean 'n_steps'?); its options: ..."``. ``elsewhere(name)``: a clause
    that says who takes the option instead (``", an option of 'gradcam', ..."``)."""
    unknown = [name for name in options if name not in accepted]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(str(name), list(accepted), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    taken = f"its options: {choices(accepted, 20)}" if accepted else "it takes no options"
    where = elsewhere(name) if elsewhere is not None and not close else ""
    raise OptionError(f"{what} has no option {name!r}{hint}{where}; {taken}")

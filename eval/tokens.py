"""Token heat-maps (HTML, terminal, PNG): :mod:`backprop_hooks.plotting.tokens`, importable from here as before."""

from backprop_hooks.plotting.tokens import (
    Row,
    figure,
    fragment,
    html,
    readable,
    rows,
    save_html,
    terminal,
    token_strings,
)

__all__ = ["Row", "figure", "fragment", "html", "readable", "rows", "save_html", "terminal", "token_strings"]

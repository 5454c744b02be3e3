"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A bad argument, file or data set: the message says what is wrong and what to do."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """A UserError for an unknown registry name that suggests the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {kind} '{name}'.{hint} Known: {', '.join(known)} (see `miarobust list`).")

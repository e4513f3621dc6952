"""Names that requests carry (ops, models, libraries, kernels, buffer keys): one strict rule.

A name is looked up in a table, never joined to a path, but it is checked anyway, at the edge, so
that no request can name a path (``/``, ``\\``, ``..``), a hidden file, a control character or a
name of unbounded length, whatever a layer below does with it.
"""
from __future__ import annotations

import re

from accel.errors import InvalidInput

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is a valid name, else InvalidInput (400) naming ``what``."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        shown = value[:80] if isinstance(value, str) else value
        raise InvalidInput(f"invalid {what} {shown!r}: use 1 to 128 of A-Z a-z 0-9 _ . - (starting with a "
                           "letter or digit, no '..')")
    return value

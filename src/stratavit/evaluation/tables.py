"""Markdown text helpers shared by the report and compare: number formatting, tables, lookups."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dig", "fmt", "md_escape", "md_table", "to_float"]


def to_float(cell: str | None) -> float | None:
    """A finite float from a text cell, else ``None`` (empty, junk, inf and NaN included)."""
    if cell is None or cell.strip() == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def fmt(value: Any) -> str:
    """A table cell: ``–`` for None, two decimals for floats."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table; cells through :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def md_escape(text: Any) -> str:
    """``text`` with its pipes escaped, safe inside a table cell."""
    return str(text).replace("|", "\\|")


def dig(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or ``None`` where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d

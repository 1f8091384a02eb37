"""Markdown text helpers shared by the report and compare: number formatting, tables, lookups."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["block_section", "dig", "fmt", "integer", "md_escape", "md_table", "number", "to_float"]


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


def number(value: Any) -> float | None:
    """A finite float from a JSON/YAML value, else ``None`` (bools and strings of junk included)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return to_float(value)
    return None


def integer(value: Any) -> int | None:
    """An integral :func:`number` as an int, else ``None``."""
    v = number(value)
    return int(v) if v is not None and v == int(v) else None


def block_section(
    results: Mapping[str, Any], part: str, columns: Sequence[tuple[str, str]], intro: str
) -> str | None:
    """``intro`` and a Markdown table of ``results[part]["layers"]`` (and the random-init baseline's, if any)."""
    rows_by_block = {int(r["block"]): r for r in dig(results, part, "layers") or [] if "block" in r}
    if not rows_by_block:
        return None
    base = {int(r["block"]): r for r in dig(results, "baselines", "random_init", part, "layers") or []}
    header = ["block", *(label for _, label in columns)]
    if base:
        header += [f"random init {label}" for _, label in columns]
    rows = []
    for block, row in sorted(rows_by_block.items()):
        cells: list[Any] = [block, *(row.get(key) for key, _ in columns)]
        if base:
            cells += [base.get(block, {}).get(key) for key, _ in columns]
        rows.append(cells)
    return intro + "\n\n" + md_table(header, rows)


def images_used(entry: Mapping[str, Any], split: str, section: str) -> str:
    """``"200 train"``, or ``"1000 train (of 5000, dense.max_images=1000)"`` when a cap left images out:
    the ``{split}_images`` / ``{split}_total`` / ``max_images`` entries of an evaluation's results."""
    used, total = entry.get(f"{split}_images"), entry.get(f"{split}_total")
    capped = total is not None and total != used
    return f"{used} {split}" + (f" (of {total}, {section}.max_images={entry.get('max_images')})" if capped else "")

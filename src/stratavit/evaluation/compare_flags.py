"""``compare``'s flags on numbers that are not comparable across runs (different data, size, protocol).

For every column with a :attr:`~stratavit.evaluation.protocol.Column.basis`, the runs that have a
value are compared setting by setting; where a setting differs (both known, not equal), every
value of the column is flagged. Columns that differ in the same way share one footnote: a marker
(``†1``, ``†2`` ...) on each flagged cell of ``compare.md``, the footnote under the table, the
``not_comparable`` column of ``compare.csv`` (the numbers there stay plain numbers), one warning
line on the console, and the marker in the plots' titles and captions. Nothing is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stratavit.evaluation.protocol import Column
from stratavit.evaluation.tables import fmt, md_escape

__all__ = ["Flags", "Footnote", "flag_columns", "run_warnings"]


@dataclass
class Footnote:
    """One reason for flagging: the marker, the columns it covers and what differs between which runs."""

    marker: str
    columns: list[Column]
    differences: list[tuple[str, list[tuple[str, Any]]]]  # (setting, [(run label, value), ...])

    @property
    def settings(self) -> str:
        """The differing settings, e.g. ``"test set, evaluation size (px)"``."""
        return ", ".join(setting for setting, _ in self.differences)

    def _what(self) -> str:
        return ", ".join(c.header or c.name for c in self.columns)

    def markdown(self) -> str:
        parts = []
        for setting, values in self.differences:
            shown = "; ".join(f"{md_escape(label)}: {md_escape(_show(v))}" for label, v in values)
            parts.append(f"{setting} differs ({shown})")
        return f"**{self.marker}** {md_escape(self._what())}: not comparable across these runs: " + "; ".join(parts) + "."

    def line(self) -> str:
        """One console line."""
        parts = []
        for setting, values in self.differences:
            parts.append(f"{setting} differs (" + ", ".join(f"{label}: {_show(v, code=False)}" for label, v in values) + ")")
        return f"{self._what()} {self.marker}: not comparable across runs: " + "; ".join(parts)


@dataclass
class Flags:
    """The footnotes, and per column name its marker."""

    footnotes: list[Footnote] = field(default_factory=list)
    markers: dict[str, str] = field(default_factory=dict)

    def cell(self, column: str, value: Any, text: str | None = None) -> Any:
        """A Markdown cell: ``text`` (default the formatted value) with the column's marker when it has a value."""
        marker = self.markers.get(column)
        if marker is None or value is None:
            return value if text is None else text
        return f"{fmt(value) if text is None else text} {marker}"

    def csv_note(self, row: Mapping[str, Any]) -> str | None:
        """The ``not_comparable`` cell of a row: its flagged columns and what differs."""
        parts = []
        for note in self.footnotes:
            names = [c.name for c in note.columns if row.get(c.name) is not None]
            if names:
                verb = "differ" if len(note.differences) > 1 else "differs"
                parts.append(f"{note.marker} {', '.join(names)}: {note.settings} {verb}")
        return "; ".join(parts) or None


def _show(value: Any, code: bool = True) -> str:
    if value is None:
        return "?"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value) if code else str(value).replace("`", "")


def _differences(bases: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Settings on which two runs' known values differ, with every run's value."""
    keys: list[str] = []
    for _, basis in bases:
        keys += [k for k in basis if k not in keys]
    out = []
    for key in keys:
        known = [(label, basis.get(key)) for label, basis in bases if basis.get(key) is not None]
        if any(not (a == b) for i, (_, a) in enumerate(known) for _, b in known[i + 1 :]):
            out.append((key, [(label, basis.get(key)) for label, basis in bases]))
    return out


def flag_columns(
    labelled_results: Sequence[tuple[str, Mapping[str, Any]]], rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]
) -> Flags:
    """Flags of ``columns`` over the runs (``(label, results)`` in the order of ``rows``)."""
    flags = Flags()
    by_text: dict[str, Footnote] = {}
    for col in columns:
        if col.basis is None:
            continue
        bases = [(label, col.basis(results)) for (label, results), row in zip(labelled_results, rows)
                 if row.get(col.name) is not None]
        if len(bases) < 2:
            continue
        differences = _differences(bases)
        if not differences:
            continue
        key = repr([(k, [(lab, str(v)) for lab, v in vals]) for k, vals in differences])
        if key not in by_text:
            by_text[key] = Footnote(f"†{len(by_text) + 1}", [], differences)
            flags.footnotes.append(by_text[key])
        by_text[key].columns.append(col)
        flags.markers[col.name] = by_text[key].marker
    return flags


def run_warnings(labelled_results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """``(run label, warning)`` for every warning a run's evaluation recorded (``meta.warnings``:
    another size than the training resolution, meaningless classes, an unmoved teacher ...)."""
    out = []
    for label, results in labelled_results:
        meta = results.get("meta")
        warnings = meta.get("warnings") if isinstance(meta, Mapping) else None
        if isinstance(warnings, list):
            out += [(label, str(w)) for w in warnings]
    return out

"""Options of ``stratavit evaluate``: general settings plus one section per evaluation.

Set like the training config, as dotted overrides validated by :func:`stratavit.config.build_dataclass`::

    stratavit evaluate RUN --train A --test B knn.k=10 linear.epochs=50 dense.blocks=[2,4] batch_size=128

General settings are top-level keys (:class:`GeneralOptions`); every other key is ``section.field``
of a section an evaluation declares (``Evaluation.sections``). An unknown key is refused with one
line naming the allowed ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from stratavit.config import ConfigError, build_dataclass, parse_override, to_dict

__all__ = ["GeneralOptions", "Options", "build_options", "parse_overrides"]


@dataclass
class GeneralOptions:
    """Settings every evaluation shares (CLI flags of the same names)."""

    train_limit: int | None = field(default=None, metadata={"min": 1})
    test_limit: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=256, metadata={"min": 1})
    img_size: int | None = field(default=None, metadata={"min": 1})
    resize: Literal["center_crop", "stretch"] = "center_crop"
    which: Literal["teacher", "student"] = "teacher"
    baselines: bool = False
    num_workers: int = field(default=0, metadata={"min": 0})
    visuals: bool = True
    seed: int = 0


class Options:
    """General settings (``options.batch_size``) and the evaluations' sections (``options.dense.blocks``)."""

    def __init__(self, general: GeneralOptions, sections: Mapping[str, Any]) -> None:
        self.general = general
        self.sections = dict(sections)

    def __getattr__(self, name: str) -> Any:
        if name in ("general", "sections"):
            raise AttributeError(name)
        if name in self.sections:
            return self.sections[name]
        return getattr(self.general, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every setting (general keys first, then the sections)."""
        return {**to_dict(self.general), **{k: to_dict(v) for k, v in self.sections.items()}}


def build_options(section_types: Mapping[str, type], values: Mapping[str, Any] | None = None) -> Options:
    """Validated :class:`Options` from a nested mapping (missing keys take their defaults).

    Raises:
        ConfigError: an unknown key (naming the allowed ones) or a value of the wrong type.
    """
    values = dict(values or {})
    general_names = {f.name for f in fields(GeneralOptions)}
    unknown = [k for k in values if k not in general_names and k not in section_types]
    if unknown:
        allowed = sorted(general_names) + [f"{s}.*" for s in section_types]
        raise ConfigError(f"unknown evaluation option '{unknown[0]}'. Allowed: {', '.join(allowed)}")
    general = build_dataclass(GeneralOptions, {k: v for k, v in values.items() if k in general_names})
    sections = {}
    for name, cls in section_types.items():
        given = values.get(name) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"'{name}' is a section: set its fields, e.g. {name}.<field>=value")
        sections[name] = build_dataclass(cls, dict(given), name)
    for prefix, built in [("", general), *((f"{n}.", s) for n, s in sections.items())]:
        check_minimums(built, prefix)
    return Options(general, sections)


def check_minimums(options: Any, prefix: str = "") -> None:
    """ConfigError for a field below the ``min`` its dataclass field's metadata gives (``None`` passes)."""
    for f in fields(options):
        low, value = f.metadata.get("min"), getattr(options, f.name)
        if low is None or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < low for v in values):
            raise ConfigError(f"{prefix}{f.name}={value} must be >= {low}")


def parse_overrides(overrides: Sequence[str], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``["knn.k=10", "batch_size=64"]`` -> ``{"knn": {"k": 10}, "batch_size": 64}``, merged over ``base``."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (base or {}).items()}
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) > 2:
            raise ConfigError(f"override {text!r}: evaluation options are 'key=value' or 'section.key=value'")
        if len(parts) == 1:
            out[parts[0]] = value
        else:
            section = out.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"override {text!r}: '{parts[0]}' is a value, not a section")
            section[parts[1]] = value
    return out

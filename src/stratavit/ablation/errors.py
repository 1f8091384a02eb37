"""The error of ``stratavit ablate``'s bad input; the CLI prints it as one line (exit code 2)."""

from __future__ import annotations

from stratavit.config import ConfigError

__all__ = ["AblationError"]


class AblationError(ConfigError):
    """An ablation that cannot run as asked (a changed plan in the same folder, a missing setting);
    the message says what is wrong and what to do."""

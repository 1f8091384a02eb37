"""The error of exporting or loading a backbone (its own module, so every loader can raise it)."""


class ExportError(ValueError):
    """A run or file cannot be exported or loaded; the message says why."""

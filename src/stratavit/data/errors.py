"""The data layer's one error type (its own module, so every data module can raise it)."""


class DataError(ValueError):
    """The data cannot be used; the message says why and what to do."""

"""The error every evaluation step raises for bad input (the CLI prints it as one line, exit 2)."""


class EvaluationError(ValueError):
    """Evaluation cannot run on this input; the message says what is wrong and what to do."""

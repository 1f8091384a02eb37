"""stratavit: multi-level self-supervised pre-training of Vision Transformers."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any


def pretrain(*args: Any, **kwargs: Any) -> Any:
    """See :func:`stratavit.engine.train.pretrain`."""
    from stratavit.engine.train import pretrain as _pretrain

    return _pretrain(*args, **kwargs)


def evaluate(*args: Any, **kwargs: Any) -> Any:
    """See :func:`stratavit.evaluation.run.evaluate_run`."""
    from stratavit.evaluation.run import evaluate_run

    return evaluate_run(*args, **kwargs)


def load_backbone(*args: Any, **kwargs: Any) -> Any:
    """See :func:`stratavit.backbones.export.load_backbone`."""
    from stratavit.backbones.export import load_backbone as _load

    return _load(*args, **kwargs)


def load_weights(*args: Any, **kwargs: Any) -> Any:
    """See :func:`stratavit.backbones.export.load_weights`."""
    from stratavit.backbones.export import load_weights as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "evaluate", "load_backbone", "load_weights", "pretrain"]

"""The evaluation's input size: the run's training resolution unless asked otherwise.

A run trained at 64 px (``views.global_size: 64``) on a backbone built for 224 px (``backbone.img_size``
left at the architecture's default) saw 64 px inputs only: the ViT is built with
``dynamic_img_size``, so during training its 14 x 14 position table was resampled (bicubic,
antialiased) to the 4 x 4 grid of every 64 px crop. Evaluating it at 224 px would upsample the
images 3.5x at ~15x the cost and measure a resolution the network never saw. So the default
evaluation size is the **training resolution**, :func:`training_size`: ``views.global_size``, the
global crop size the teacher saw (the only input the teacher ever took). ``--img-size`` (and
``--dense-size``) still pick another size; :func:`size_note` is the one line that says so.

At any size :func:`sized` gives the same weights with the position table resampled by timm's
``set_input_size`` -- the same resampling the training forward applied on the fly, so the tokens
at the training resolution are exactly the training forward's (``tests/test_eval_honesty.py``).
"""

from __future__ import annotations

from torch import nn

from stratavit.config import Config
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.tokens import model_at_size

__all__ = ["size_note", "sized", "training_size"]


def training_size(cfg: Config) -> int:
    """The side of the images the run's teacher saw: ``views.global_size``."""
    return int(cfg.views.global_size)


def size_note(what: str, size: int, train_size: int, flag: str) -> str | None:
    """``"evaluating at 224 px; the run trained at 64 px (--img-size)"``, or None when the sizes agree.

    ``what``: the verb phrase (``"evaluating"``, ``"the dense probe runs"``); ``flag``: the option
    that chose the size.
    """
    if size == train_size:
        return None
    return f"{what} at {size} px; the run trained at {train_size} px ({flag})"


def sized(model: nn.Module, size: int, flag: str) -> nn.Module:
    """``model`` at ``size`` px (position embeddings resampled), or a one-line :class:`EvaluationError`
    naming ``flag`` and a size that works when the patch size (a CNN's coarsest stride) does not divide it."""
    try:
        return model_at_size(model, size)
    except ValueError as e:
        raise EvaluationError(f"{flag} {size}: {e}") from None

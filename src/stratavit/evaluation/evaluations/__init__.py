"""The evaluations ``stratavit evaluate`` runs, in order (the order of ``results.json`` and the report).

A new evaluation is one file here (a :class:`~stratavit.evaluation.protocol.Evaluation` subclass)
and one entry of :data:`EVALUATIONS` (or a call of :func:`register` from your own code); see
``docs/adding-an-evaluation.md``.
"""

from __future__ import annotations

from stratavit.evaluation.evaluations.classification import Classification
from stratavit.evaluation.evaluations.correspondence import Correspondence
from stratavit.evaluation.evaluations.dense import Dense
from stratavit.evaluation.evaluations.retrieval import Retrieval
from stratavit.evaluation.evaluations.detection import Detection
from stratavit.evaluation.protocol import Evaluation

__all__ = ["EVALUATIONS", "option_sections", "register"]

EVALUATIONS: list[Evaluation] = [Classification(), Dense(), Retrieval(), Correspondence(), Detection()]
"""Every evaluation, in order; each runs when its options enable it."""


def register(evaluation: Evaluation) -> Evaluation:
    """Append ``evaluation`` to :data:`EVALUATIONS` (replacing one of the same name); returns it."""
    EVALUATIONS[:] = [e for e in EVALUATIONS if e.name != evaluation.name] + [evaluation]
    return evaluation


def option_sections() -> dict[str, type]:
    """Option section name -> its dataclass, over every registered evaluation."""
    sections: dict[str, type] = {}
    for evaluation in EVALUATIONS:
        sections.update(evaluation.sections)
    return sections

"""Moved to :mod:`stratavit.evaluation.run` (and the probes to
:mod:`stratavit.evaluation.evaluations.classification`); these names stay importable from here
until every caller imports the new modules."""

from stratavit.evaluation.evaluations.classification import classification_probes
from stratavit.evaluation.run import evaluate, evaluate_run, load_run_backbone

__all__ = ["classification_probes", "evaluate", "evaluate_run", "load_run_backbone"]

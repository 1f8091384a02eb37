"""The run's metric loggers (``train.loggers``): ``metrics.csv`` always, TensorBoard, W&B, MLflow on request.

``csv`` is :class:`~stratavit.engine.metrics_log.RunCSVLogger`, the run folder's own record
(``RUN_DIR/metrics.csv``, kept across resumes); it is written whether or not ``train.loggers``
names it. The others are Lightning's loggers, each needing its package:

==============  ===============================  =========================================
name            package (``pip install ...``)    where it writes
==============  ===============================  =========================================
``tensorboard`` ``tensorboard``                  ``RUN_DIR/tensorboard/`` (event files)
``wandb``       ``wandb``                        W&B project ``$WANDB_PROJECT`` or ``stratavit``,
                                                 run named after the run folder; files under ``RUN_DIR/wandb/``
``mlflow``      ``mlflow``                       ``$MLFLOW_TRACKING_URI``, else ``RUN_DIR/mlruns``;
                                                 experiment ``stratavit``, run named after the folder
==============  ===============================  =========================================

Each start or resume of a run is a new W&B / MLflow run; TensorBoard appends to the same folder.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

from stratavit.config import ConfigError
from stratavit.engine.metrics_log import RunCSVLogger
from stratavit.run_folder import RunFolder

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
"""Logger name -> the packages, any one of which it can run on (the first is the one to install)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_loggers(names: Sequence[str]) -> None:
    """ConfigError naming the ``pip install`` for every logger in ``names`` whose package is missing
    (unknown names are refused when the config is read)."""
    missing = [name for name in names if name in PACKAGES and not any(_installed(m) for m in PACKAGES[name])]
    if missing:
        pips = " ".join(PACKAGES[name][0] for name in missing)
        raise ConfigError(
            f"train.loggers lists {', '.join(missing)}, but the package is not installed: pip install {pips} "
            f"(or drop {'it' if len(missing) == 1 else 'them'} from train.loggers)"
        )


def build_loggers(names: Sequence[str], run: RunFolder) -> list[Any]:
    """The Lightning loggers of a run: ``metrics.csv`` first, then the others ``names`` lists."""
    loggers: list[Any] = [RunCSVLogger(str(run.root))]
    label = run.root.resolve().name
    for name in dict.fromkeys(names):  # in order, once each
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run.root), name="tensorboard", version="", default_hp_metric=False))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(name=label, save_dir=str(run.root), project=os.environ.get("WANDB_PROJECT", "stratavit")))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.root / "mlruns").resolve().as_uri()
            loggers.append(MLFlowLogger(experiment_name="stratavit", run_name=label, tracking_uri=uri))
    return loggers


__all__ = ["PACKAGES", "build_loggers", "check_loggers"]

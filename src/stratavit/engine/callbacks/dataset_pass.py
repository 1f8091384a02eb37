"""The per-epoch pass over the whole training set that some objectives need (ProtoNCE's E-step).

Before an epoch in which an objective with :class:`~stratavit.objectives.base.NeedsDatasetPass`
asks for it, :class:`DatasetPass` embeds every training image (eval transform, no augmentation)
with the teacher, each process its share (index ``i`` on process ``i mod world``), hands every
such objective its embeddings (:meth:`~stratavit.objectives.base.NeedsDatasetPass.on_dataset_embeddings`,
where e.g. k-means gathers them) and logs what they return, with ``estep/seconds``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from stratavit.distributed import rank, world_size
from stratavit.engine.module import PretrainModule
from stratavit.objectives.base import NeedsDatasetPass


def dataset_pass_objectives(module: PretrainModule) -> dict[str, NeedsDatasetPass]:
    """The objectives of ``module`` that need a pass over the training set, by name."""
    return {name: o for name, o in module.objectives.items() if isinstance(o, NeedsDatasetPass)}


@torch.no_grad()
def embed_dataset(
    module: PretrainModule, objectives: dict[str, NeedsDatasetPass], loader: DataLoader, progress: str | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Teacher embeddings of the images ``loader`` yields, ``(image, label, index)``, for each objective
    (``progress``: the description of a progress bar, None for none).

    Returns:
        name -> (embeddings (n, D) float32, their data-set indices (n,)), on the module's device.
    """
    levels = sorted({lv for o in objectives.values() for lv in o.teacher_levels()})  # type: ignore[attr-defined]
    teacher = module.teacher
    was_training = teacher.training
    teacher.eval()
    out: dict[str, list[Tensor]] = {name: [] for name in objectives}
    idx: list[Tensor] = []
    iterator: Any = loader
    if progress is not None:
        iterator = tqdm(loader, desc=progress, leave=False)
    try:
        for images, _, index in iterator:
            images = images.to(module.device)
            with module.trainer.precision_plugin.forward_context():
                feats = teacher.backbone(images, levels)
                for name, obj in objectives.items():
                    head = teacher.heads[name] if name in teacher.heads else None
                    out[name].append(obj.embed(feats, head).float())
            idx.append(index.to(module.device))
    finally:
        teacher.train(was_training)
    index_all = torch.cat(idx)
    return {name: (torch.cat(chunks), index_all) for name, chunks in out.items()}


class DatasetPass(L.Callback):
    """Runs the dataset pass at the start of every epoch some objective asks for it.

    :class:`~stratavit.engine.module.PretrainModule` refuses to train objectives that need the pass
    without a callback that declares ``provides_dataset_pass``.

    Args:
        dataset: the training images with the evaluation transform, yielding ``(image, label, index)``.
        batch_size, num_workers: of the pass's loader.
        progress: show a progress bar (on rank 0).
    """

    provides_dataset_pass = True

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, progress: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.seconds = 0.0
        """Seconds this process spent in passes (the budget's pace measurement takes them out)."""

    def _loader(self) -> DataLoader:
        """This process's share of the images: index ``i`` on process ``i mod world``, in order."""
        shard = list(range(rank(), len(self.dataset), world_size()))  # type: ignore[arg-type]
        return DataLoader(Subset(self.dataset, shard), batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, PretrainModule)
        epoch, epochs = int(trainer.current_epoch), pl_module.cfg.train.epochs
        due = {n: o for n, o in dataset_pass_objectives(pl_module).items() if o.needs_dataset_pass(epoch, epochs)}
        if not due:
            return
        n_total = len(self.dataset)  # type: ignore[arg-type]
        started = time.time()
        progress = f"E-step: embedding {n_total} images" if self.progress and rank() == 0 else None
        embeddings = embed_dataset(pl_module, due, self._loader(), progress)
        metrics: dict[str, float] = {}
        for name, obj in due.items():
            emb, index = embeddings[name]
            metrics.update(obj.on_dataset_embeddings(emb, index, n_total, epoch))
        metrics["estep/seconds"] = time.time() - started
        self.seconds += metrics["estep/seconds"]
        for lg in trainer.loggers:
            lg.log_metrics({**metrics, "epoch": epoch}, step=int(trainer.global_step))

"""The training engine: what ``stratavit pretrain`` runs.

- :mod:`~stratavit.engine.train`: ``pretrain``, in small steps (module, data, resume, callbacks,
  trainer, fit, finish); :mod:`~stratavit.engine.data`: the training loader and the dataset-pass
  images; :mod:`~stratavit.engine.resume`: a run folder's config and resume point.
- :mod:`~stratavit.engine.module`: ``PretrainModule``, whose ``training_step`` is the step, top to
  bottom; :mod:`~stratavit.engine.nonfinite`: skipping non-finite steps on every process alike;
  :mod:`~stratavit.engine.optim`, :mod:`~stratavit.engine.lars`, :mod:`~stratavit.engine.schedules`,
  :mod:`~stratavit.engine.teacher`, :mod:`~stratavit.engine.sync_batchnorm`.
- :mod:`~stratavit.engine.callbacks`: checkpoints and RNG seeding, the collapse monitor, the
  per-epoch dataset pass (E-step); :mod:`~stratavit.engine.metrics_log`: ``metrics.csv``.

Nothing is imported here, so that the light modules (schedules, the CPU SyncBatchNorm) load without
Lightning; import from the modules themselves (``from stratavit.engine.train import pretrain``).
"""

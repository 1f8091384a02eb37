"""The training engine: what ``stratavit pretrain`` runs.

Nothing is imported here, so that the light modules (schedules, the CPU SyncBatchNorm) load without
Lightning; import from the modules themselves (``from stratavit.engine.train import pretrain``).
"""

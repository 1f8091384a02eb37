"""Lightning callbacks of a pre-training run (checkpoints, RNG seeding, monitors, dataset passes)."""

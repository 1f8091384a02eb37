"""Steps with a non-finite loss are skipped, by every process together (engine/nonfinite.py)."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY

from stratavit.engine.nonfinite import (
    NonFiniteGuard,
    NonFiniteLossError,
    finite_on_every_process,
)

MOCO_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64", "objectives.infonce.proj_dim=32"]
WORLD = 2
NAN_STEP = 1  # the step whose loss is NaN on rank 1 only


def test_guard_counts_skipped_steps_and_stops_after_a_streak():
    guard = NonFiniteGuard(max_streak=3)
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    assert finite_on_every_process(ok) and not finite_on_every_process(torch.tensor(float("inf")))
    assert guard.step_ok(ok, 0)
    assert not guard.step_ok(nan, 1) and not guard.step_ok(nan, 2)
    assert guard.step_ok(ok, 3)  # a good step ends the streak, not the count
    assert (guard.streak, guard.skipped) == (0, 2)
    assert not guard.step_ok(nan, 4) and not guard.step_ok(nan, 5)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        guard.step_ok(nan, 6)
    assert guard.skipped == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, data: str, out_dir: str) -> None:
    """One of two processes of a real Lightning DDP run (launched as torchrun would: LOCAL_RANK set)."""
    import lightning as L

    from stratavit.engine.train import pretrain
    from stratavit.objectives.base import ObjectiveOutput
    from stratavit.objectives.infonce import InfoNCE

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    real = InfoNCE.forward

    def forward(self, student, teacher, head, state):  # NaN on rank 1 at NAN_STEP, finite on rank 0
        out = real(self, student, teacher, head, state)
        if dist.get_rank() == 1 and state.step == NAN_STEP:
            return ObjectiveOutput(out.loss * float("nan"), out.metrics)
        return out

    InfoNCE.forward = forward  # this process only

    def params_and_moments(trainer, module) -> dict[str, torch.Tensor]:
        """Every parameter, and the optimiser's state (AdamW moments and step counts)."""
        out = {k: v.detach().clone() for k, v in module.named_parameters()}
        for i, st in enumerate(trainer.optimizers[0].state.values()):
            out.update({f"opt{i}.{k}": v.detach().clone() for k, v in st.items()})
        return out

    class Record(L.Callback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}
            self.before: dict[str, torch.Tensor] = {}
            self.changed: list[str] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == NAN_STEP:
                self.before = params_and_moments(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step - 1  # the step that just ran
            if outputs and not outputs.get("skipped"):
                self.losses[step] = float(outputs["loss"])
            if step == NAN_STEP:
                after = params_and_moments(trainer, pl_module)
                self.changed = [k for k, v in self.before.items() if not torch.equal(after[k], v)]

        def on_train_end(self, trainer, pl_module) -> None:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}
            torch.save({"state": state, "nonfinite_steps": pl_module.nonfinite_steps, "losses": self.losses,
                        "global_step": trainer.global_step, "changed": self.changed, "checked": len(self.before)},
                       os.path.join(out_dir, f"rank{rank}.pt"))

    over = [*TINY, *MOCO_SMALL, "train.devices=2", "train.accelerator=cpu", "data.limit=96", "train.max_steps=3",
            "train.max_nonfinite_steps=2"]
    pretrain("mocov3", data, Path(out_dir) / "run", over, callbacks=[Record()])


@pytest.mark.slow
@pytest.mark.timeout(300)  # without the agreement the processes deadlock
def test_a_nan_on_one_process_skips_the_step_on_both(tmp_path: Path, cifar_train: Path):
    """Rank 1 alone has a NaN loss at step 1: both processes skip it (no gradient, no optimiser
    update, no EMA) and stay in step; the weights are the same on both afterwards."""
    mp.spawn(_worker, args=(_free_port(), str(cifar_train), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in ranks:
        assert r["global_step"] == 3 and r["nonfinite_steps"] == 1
        assert sorted(r["losses"]) == [0, 2]  # step 1 returned no loss on either process
        assert r["checked"] > 10 and r["changed"] == []  # the skipped step moved no weight, no optimiser state
    for key, value in ranks[0]["state"].items():  # student, teacher, heads, batch-norm statistics
        assert torch.equal(ranks[1]["state"][key], value), key
    run = tmp_path / "run"
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == 3 and summary["nonfinite_steps"] == 1
    with (run / "metrics.csv").open() as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("loss")]
    # the skipped step logs nothing new: Lightning writes the last logged values again (as on one process)
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert rows[1]["loss"] == rows[0]["loss"] and float(rows[2]["loss"]) == pytest.approx(ranks[0]["losses"][2], rel=1e-6)

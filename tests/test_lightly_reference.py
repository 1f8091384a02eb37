"""Second reference: LightlySSL's loss classes on the same random inputs.

LightlySSL is never a dependency of stratavit (not even of its test extra): these tests run in the
benchmark environment that ``bench/lightly_env.sh`` builds, and are skipped where it is absent::

    bash bench/lightly_env.sh /work/bench-venv
    /work/bench-venv/bin/python -m pytest -q tests/test_lightly_reference.py

The first references are the hand-written ones in test_fidelity.py, test_losses.py and test_ibot.py.
"""

from __future__ import annotations

import pytest
import torch

lightly_loss = pytest.importorskip("lightly.loss")

from stratavit.objectives.dino import (  # noqa: E402
    DINOConfig,
    dino_loss,
    teacher_temperature,
    updated_center,
)
from stratavit.objectives.ibot_mim.objective import mim_loss  # noqa: E402

K, B = 64, 6


@pytest.mark.parametrize("n_global,n_local", [(2, 0), (2, 4), (3, 2)])
def test_dino_loss_and_centre_equal_lightly(n_global, n_local):
    g = torch.Generator().manual_seed(n_global * 10 + n_local)
    teacher = [torch.randn(B, K, generator=g) for _ in range(n_global)]
    student = [torch.randn(B, K, generator=g) for _ in range(n_global + n_local)]
    center = torch.randn(1, K, generator=g) * 0.1
    ref = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04, student_temp=0.1,
                                center_momentum=0.9)
    ref.center.copy_(center.reshape(1, 1, K))
    want = ref(teacher, student, teacher_temp=0.04)
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    new_center = updated_center(center, torch.cat(teacher), 0.9)
    torch.testing.assert_close(new_center.reshape(-1), ref.center.reshape(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warm", [1, 2, 10, 30])
def test_dino_teacher_temperature_equals_lightly_schedule(warm):
    ref = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warm)
    cfg = DINOConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=warm)
    for epoch in range(warm + 3):
        want = float(ref.teacher_temp_schedule[epoch]) if epoch < warm else 0.07
        assert teacher_temperature(cfg, epoch) == pytest.approx(want, rel=1e-6), epoch


def test_ibot_patch_loss_equals_lightly():
    g = torch.Generator().manual_seed(3)
    h = w = 4
    masks = torch.rand(B, h * w, generator=g) < 0.4
    masks[0] = False  # an image with nothing masked contributes 0 in both
    masks[1, :3] = True
    teacher = torch.randn(B, h * w, K, generator=g)
    student = torch.randn(B, h * w, K, generator=g)
    center = torch.randn(1, K, generator=g) * 0.1
    ref = lightly_loss.IBOTPatchLoss(output_dim=K, teacher_temp=0.07, student_temp=0.1, center_momentum=0.9)
    ref.center.value.copy_(center)
    want = ref(teacher[masks], student[masks], masks.reshape(B, h, w), teacher_temp=0.07)
    got = mim_loss(student[masks], teacher, masks, center, 0.1, 0.07)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

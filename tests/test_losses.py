"""Loss math against hand-computed values and independently written (numpy loop) references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stratavit.objectives.dino import (
    DINOConfig,
    dino_loss,
    teacher_temperature,
    updated_center,
)
from stratavit.objectives.infonce import infonce_loss


def _np_ctr(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    """Reference MoCo v3 ctr: per-row softmax cross-entropy against the own key, times 2τ."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / tau for j in range(len(k))]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += lse - logits[i]
    return 2 * tau * total / len(q)


def test_infonce_hand_computed():
    # q1 = e1, q2 = e2; k1 = e1, k2 = e2 (already unit). τ = 0.5:
    # row 1 logits [2, 0] -> CE = log(1 + e^-2); same for row 2; ×2τ = 1.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # scaled keys: normalisation must remove the scale
    loss = infonce_loss(q, k, 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_infonce_matches_reference(tau):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    assert infonce_loss(q, k, tau).item() == pytest.approx(_np_ctr(q.numpy(), k.numpy(), tau), rel=1e-5)


def test_infonce_gradient_matches_finite_difference():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: infonce_loss(x, k, 0.2), (q,))


def _np_dino(student: list[np.ndarray], teacher: list[np.ndarray], center: np.ndarray, ts: float, tt: float) -> float:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    total, n = 0.0, 0
    for iq, t in enumerate(teacher):
        pt = softmax((t - center) / tt)
        for v, s in enumerate(student):
            if v == iq:
                continue
            ps = softmax(s / ts)
            total += float(np.mean(np.sum(-pt * np.log(ps), axis=1)))
            n += 1
    return total / n


def test_dino_hand_computed_two_classes():
    # One sample, K = 2. Teacher logits [1, 0] with centre [0.5, 0] -> (0.5, 0)/0.5 = (1, 0):
    # P_t = (e/(e+1), 1/(e+1)). Student logits [0, 0] -> P_s = (1/2, 1/2), CE = log 2.
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])]
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    loss = dino_loss(s, t, torch.tensor([[0.5, 0.0]]), student_temp=0.1, teacher_temp=0.5)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    # student sure of class 0 with logits [1, 0] at τ_s = 1: CE = −Σ P_t log P_s
    s2 = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])]
    e = math.e
    pt0, pt1 = e / (e + 1), 1 / (e + 1)
    ps0, ps1 = e / (e + 1), 1 / (e + 1)
    want = -(pt0 * math.log(ps0) + pt1 * math.log(ps1))
    assert dino_loss(s2, t, torch.tensor([[0.5, 0.0]]), 1.0, 0.5).item() == pytest.approx(want, rel=1e-6)


def test_dino_matches_reference_with_local_views():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(6, 16, generator=g) for _ in range(2)]
    student = [torch.randn(6, 16, generator=g) for _ in range(5)]  # 2 global + 3 local: 2·5 − 2 = 8 pairs
    center = torch.randn(1, 16, generator=g) * 0.1
    got = dino_loss(student, teacher, center, 0.1, 0.04).item()
    want = _np_dino([s.numpy() for s in student], [t.numpy() for t in teacher], center.numpy(), 0.1, 0.04)
    assert got == pytest.approx(want, rel=1e-5)


def _loop_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center, ts: float, tt: float) -> torch.Tensor:
    """The Python loop over (teacher view, student view) pairs that dino_loss replaced (torch, with gradient)."""
    log_ps = [torch.log_softmax(s / ts, dim=-1) for s in student]
    pts = [torch.softmax((t - center) / tt, dim=-1).detach() for t in teacher]
    total, pairs = 0.0, 0
    for iq, pt in enumerate(pts):
        for v, lp in enumerate(log_ps):
            if v != iq:
                total = total + torch.sum(-pt * lp, dim=-1).mean()
                pairs += 1
    return total / pairs  # type: ignore[return-value]


@pytest.mark.parametrize("n_global,n_local", [(2, 0), (2, 8), (3, 2), (1, 3)])
def test_dino_loss_batched_over_pairs_equals_the_pair_loop(n_global, n_local):
    """One matrix product over every view pair == the loop over pairs: the value and the gradients."""
    g = torch.Generator().manual_seed(n_global * 10 + n_local)
    teacher = [torch.randn(5, 32, generator=g) * 3 for _ in range(n_global)]
    logits = torch.randn(n_global + n_local, 5, 32, generator=g).requires_grad_()
    center = torch.randn(1, 32, generator=g)
    want = _loop_dino(list(logits), teacher, center, 0.1, 0.04)
    (grad_want,) = torch.autograd.grad(want, logits)
    got = dino_loss(logits, torch.stack(teacher), center, 0.1, 0.04)  # stacked, as the objectives pass them
    (grad_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-7)
    assert float(dino_loss(list(logits), teacher, center, 0.1, 0.04)) == pytest.approx(float(want), rel=1e-5)


def test_dino_center_update_and_temperature_warmup():
    c = torch.zeros(1, 3)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    new = updated_center(c, t, 0.9)
    assert torch.allclose(new, torch.tensor([[0.2, 0.2, 0.2]]))
    cfg = DINOConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30)
    assert teacher_temperature(cfg, 0) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 15) == pytest.approx(0.04 + 0.03 * 15 / 29)  # linspace(0.04, 0.07, 30)[15]
    assert teacher_temperature(cfg, 29) == pytest.approx(0.07)
    assert teacher_temperature(cfg, 30) == pytest.approx(0.07)
    assert teacher_temperature(cfg, 99) == pytest.approx(0.07)


def test_infonce_with_queue_matches_reference():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)

    def ref(qn, kn, qu, tau):
        qn = qn / np.linalg.norm(qn, axis=1, keepdims=True)
        kn = kn / np.linalg.norm(kn, axis=1, keepdims=True)
        keys = np.concatenate([kn, qu])
        total = 0.0
        for i in range(len(qn)):
            logits = keys @ qn[i] / tau
            total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[i]
        return 2 * tau * total / len(qn)

    got = infonce_loss(q, k, 0.2, queue).item()
    assert got == pytest.approx(ref(q.numpy(), k.numpy(), queue.numpy(), 0.2), rel=1e-5)
    assert got > infonce_loss(q, k, 0.2).item()  # more negatives, higher loss


def test_infonce_queue_is_a_fifo():
    from stratavit.backbones.vit import Backbone
    from stratavit.config import BackboneConfig
    from stratavit.objectives.infonce import InfoNCE, InfoNCEConfig

    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2))
    obj = InfoNCE(InfoNCEConfig(queue_size=5, proj_dim=4, proj_hidden_dim=8, pred_hidden_dim=8), bb)
    keys = torch.eye(4)[:3] * 2
    obj.enqueue(1, keys)
    obj.enqueue(1, keys)
    queue = obj.queue(1)
    e = torch.eye(4)
    # first batch -> slots 0, 1, 2; second batch -> slots 3, 4, then wraps to 0
    torch.testing.assert_close(queue, torch.stack([e[2], e[1], e[2], e[0], e[1]]))
    assert int(obj.queue_ptr_1) == 1


def test_fractional_epoch_schedules_of_a_budgeted_run():
    """A budget-compressed warm-up (a fraction of an epoch) ramps linearly over the fractional epoch;
    whole-number schedules read the whole epoch (the authors' per-epoch arrays, unchanged)."""
    from stratavit.objectives.base import StepState

    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=0.5)
    assert teacher_temperature(cfg, 0.0) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 0.25) == pytest.approx(0.055)  # half-way up the ramp
    assert teacher_temperature(cfg, 0.5) == pytest.approx(0.07)
    whole = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    assert teacher_temperature(whole, 15.9) == pytest.approx(0.04 + 0.03 * 15 / 29)  # floor: epoch 15
    state = StepState(step=150, epoch=1, steps_per_epoch=100, total_steps=1000)
    assert state.epoch_for(1) == 1 and state.epoch_for(0.05) == pytest.approx(1.5)
    assert not state.epoch_for(1) < 1  # DINO's `epoch < freeze_last_layer` at epoch 1: not frozen
    early = StepState(step=4, epoch=0, steps_per_epoch=100, total_steps=1000)
    assert early.epoch_for(0.05) < 0.05  # step 4 of 100: inside a 0.05-epoch freeze
    assert not StepState(step=5, epoch=0, steps_per_epoch=100, total_steps=1000).epoch_for(0.05) < 0.05

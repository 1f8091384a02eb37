"""ProtoNCE against an independent reference of PCL's loss (Li et al. 2021).

PCL's loss for a query q of sample i, with its momentum key k and M granularities:

    L = CE_inst + (1/M) Σ_m CE_proto_m,
    CE_inst    = −log softmax_j(q·k_j / τ)[i]                    (keys of the batch as negatives)
    CE_proto_m = −log softmax(q·[c⁺_1..c⁺_B ; c⁻] / [φ⁺ ; φ⁻])[i]   (c⁺_b: prototype of batch sample b,
                                                                   c⁻: prototypes positive for none)

stratavit's instance term is MoCo v3's ``2τ · CE`` over both ordered view pairs = 4τ · mean CE_inst,
so with ``proto_scale: instance`` the whole loss must be 4τ · PCL's loss (the 1:1 ratio), and with
``proto_scale: none`` the former 4τ · CE_inst + mean CE_proto.

The reference is plain Python loops over views, samples and granularities with explicit dot
products. The objective's projector and predictor are replaced by identities and the features
carry an identity norm, so the queries and keys are exactly the CLS rows of the tensors we build:
the test does not depend on the heads' form (BatchNorm or not).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stratavit.backbones.features import LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig
from stratavit.data.views import MultiViewBatch
from stratavit.objectives import ProtoNCE, ProtoNCEConfig, StepState, ViewFeatures
from stratavit.objectives.protonce.clustering import Prototypes

C = 16          # embedding width
B = 6           # batch
N_DATA = 12     # data-set size the prototypes assign
TAU = 0.2


def _backbone() -> Backbone:
    return Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=C, depth=2, num_heads=2))


def _prototypes(k: int, seed: int) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(k, C, generator=g, dtype=torch.float64), dim=1).float()
    assignments = torch.randint(0, k, (N_DATA,), generator=g)
    phi = (0.05 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64)).float()  # a different φ per prototype
    return Prototypes(centroids, assignments, phi, torch.bincount(assignments, minlength=k))


def _objective(proto_scale: str, proto_weight: float = 1.0) -> ProtoNCE:
    cfg = ProtoNCEConfig(
        levels=[-1], feature="cls", norm="backbone", temperature=TAU, num_clusters=[3, 5],
        num_negatives=1000,  # ≥ K: every non-positive prototype is a negative (deterministic)
        proto_weight=proto_weight, proto_scale=proto_scale,  # type: ignore[arg-type]
        proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=8,
    )
    obj = ProtoNCE(cfg, _backbone())
    lv = str(obj.levels[0])
    obj.projectors[lv] = nn.Identity()
    obj.predictors[lv] = nn.Identity()
    obj.prototypes = [_prototypes(3, seed=1), _prototypes(5, seed=2)]
    return obj


def _features(level: int, n_views: int, seed: int, indices: torch.Tensor) -> tuple[ViewFeatures, torch.Tensor]:
    """View-major CLS rows (n_views · B, C) wrapped as features with an identity norm."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_views * B, 5, C, generator=g)
    feats = {level: LevelFeatures(tokens, (2, 2), nn.Identity())}
    mv = MultiViewBatch([], [], torch.zeros(B, dtype=torch.long), indices)
    return ViewFeatures(feats, None, n_views, 0, mv), tokens[:, 0]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(v: torch.Tensor) -> list[float]:
    v = v.double().tolist()
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _ce(logits: list[float], label: int) -> float:
    m = max(logits)
    return -(logits[label] - m) + math.log(sum(math.exp(x - m) for x in logits))


def reference_instance_ce(q: torch.Tensor, k: torch.Tensor, n_views: int) -> float:
    """PCL / MoCo InfoNCE: mean over ordered view pairs (i ≠ j) and samples of −log softmax(q·k/τ)[own]."""
    total, count = 0.0, 0
    for i in range(n_views):
        for j in range(n_views):
            if i == j:
                continue
            keys = [_unit(k[j * B + c]) for c in range(B)]
            for b in range(B):
                qb = _unit(q[i * B + b])
                total += _ce([_dot(qb, kc) / TAU for kc in keys], b)
                count += 1
    return total / count


def reference_proto_ce(q: torch.Tensor, indices: torch.Tensor, protos: list[Prototypes], n_views: int) -> float:
    """PCL's prototype term: mean over views, granularities and samples of
    −log softmax(q·[c⁺_1..c⁺_B ; c⁻] / [φ⁺ ; φ⁻])[own], c⁻ = every prototype positive for no sample."""
    total, count = 0.0, 0
    for v in range(n_views):
        for p in protos:
            pos = [int(p.assignments[int(indices[b])]) for b in range(B)]
            neg = [c for c in range(p.num_clusters) if c not in pos]
            columns = pos + neg
            cents = [p.centroids[c].double().tolist() for c in columns]
            phis = [float(p.phi[c]) for c in columns]
            for b in range(B):
                qb = _unit(q[v * B + b])
                total += _ce([_dot(qb, c) / f for c, f in zip(cents, phis)], b)
                count += 1
    return total / count


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("proto_scale", ["instance", "none"])
def test_protonce_matches_pcl_reference(n_views: int, proto_scale: str) -> None:
    torch.manual_seed(0)
    obj = _objective(proto_scale)
    lv = obj.levels[0]
    indices = torch.tensor([3, 7, 0, 11, 5, 8])
    student, q = _features(lv, n_views, seed=10, indices=indices)
    teacher, k = _features(lv, n_views, seed=20, indices=indices)
    state = StepState(step=0, epoch=1, steps_per_epoch=10, total_steps=100)
    out = obj(student, teacher, obj.teacher_head(), state)

    ce_inst = reference_instance_ce(q, k, n_views)
    ce_proto = reference_proto_ce(q, indices, obj.prototypes, n_views)
    moco = 4 * TAU  # MoCo v3: 2τ · CE over the two ordered view pairs
    reference_instance = moco * ce_inst
    reference_proto = (moco if proto_scale == "instance" else 1.0) * ce_proto
    assert float(out.loss) == pytest.approx(reference_instance + reference_proto, abs=1e-5)
    assert float(out.metrics["protonce/infonce"]) == pytest.approx(reference_instance, abs=1e-5)
    assert float(out.metrics["protonce/proto"]) == pytest.approx(ce_proto, abs=1e-5)  # logged unscaled
    if proto_scale == "instance":  # PCL's L = CE_inst + mean_m CE_proto_m, up to MoCo v3's overall 4τ
        assert float(out.loss) / moco == pytest.approx(ce_inst + ce_proto, abs=1e-5)


def test_proto_weight_multiplies_the_scaled_term() -> None:
    indices = torch.tensor([3, 7, 0, 11, 5, 8])
    losses = {}
    for w in (1.0, 0.5):
        obj = _objective("instance", proto_weight=w)
        lv = obj.levels[0]
        student, q = _features(lv, 2, seed=10, indices=indices)
        teacher, _ = _features(lv, 2, seed=20, indices=indices)
        out = obj(student, teacher, obj.teacher_head(), StepState(0, 1, 10, 100))
        losses[w] = (float(out.loss), float(out.metrics["protonce/infonce"]), float(out.metrics["protonce/proto"]))
    for w, (loss, nce, proto) in losses.items():
        assert loss == pytest.approx(nce + w * 4 * TAU * proto, abs=1e-6)


def test_protonce_defaults_follow_pcl() -> None:
    cfg = ProtoNCEConfig()
    assert cfg.proto_scale == "instance"
    assert cfg.num_clusters is None  # chosen from the data-set size when training starts

"""`stratavit evaluate` on a CNN backbone: stages as blocks, global average pool for CLS, per-stage
grids in the dense probe and the correspondence score, and an end-to-end run of a tiny ResNet-18."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from stratavit.backbones.export import (
    backbone_from_checkpoint,
    load_backbone,
    plain_timm_model,
)
from stratavit.config import BackboneConfig
from stratavit.data.datasets import build_dataset
from stratavit.data.views import eval_transform
from stratavit.evaluation.correspondence import correspondence_score
from stratavit.evaluation.dense import dense_probe
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.evaluations.classification import classification_probes
from stratavit.evaluation.features import BlockFeatures, extract_block_features
from stratavit.evaluation.knn import knn_top1
from stratavit.evaluation.run import evaluate_run, load_run_backbone
from stratavit.evaluation.tokens import (
    block_dims,
    block_tokens,
    cls_attention_maps,
    cnn_stages,
    depth_of,
    figure_block,
    grid_of,
    is_cnn,
    model_at_size,
    native_size,
    resolve_blocks,
)

STRIDES = [4, 8, 16, 32]
WIDTHS = [64, 128, 256, 512]  # resnet18's layer1..layer4


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


# --------------------------------------------------------------------------- #
# tokens
# --------------------------------------------------------------------------- #
def test_stages_are_the_blocks_of_a_resnet(resnet):
    assert is_cnn(resnet)
    stages = cnn_stages(resnet)
    assert [(s.index, s.stride, s.channels, s.module) for s in stages] == [
        (i + 1, STRIDES[i], WIDTHS[i], f"layer{i + 1}") for i in range(4)
    ]  # feature_info[0] is the stride-2 stem (act1): skipped
    assert depth_of(resnet) == 4 and block_dims(resnet) == WIDTHS and native_size(resnet) is None
    assert [grid_of(resnet, (64, 96), b) for b in (1, 2, 3, 4)] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert grid_of(resnet, (64, 96)) == (2, 3)  # default: the last stage
    assert resolve_blocks(resnet, [-1, 1]) == [1, 4] and resolve_blocks(resnet, None) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="stages 1..4"):
        resolve_blocks(resnet, [5])
    # ViTs are not CNNs
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, num_classes=0)
    assert not is_cnn(vit) and depth_of(vit) == 2 and native_size(vit) == 32 and grid_of(vit, (32, 32), 1) == (8, 8)


def test_stage_tokens_equal_the_models_own_intermediates(resnet):
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    toks = block_tokens(resnet, x)
    with torch.no_grad():
        ref = resnet.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        pooled = resnet(x)  # num_classes=0: the global average pool of layer4
    assert [t.block for t in toks] == [1, 2, 3, 4]
    for t, r, s, c in zip(toks, ref, STRIDES, WIDTHS):
        assert t.cls is None
        assert t.patches.shape == (2, 64 // s, 96 // s, c)
        torch.testing.assert_close(t.patches, r.permute(0, 2, 3, 1))
    torch.testing.assert_close(toks[-1].mean_patch, pooled, atol=1e-5, rtol=1e-5)
    (only,) = block_tokens(resnet, x, [2])  # stops early, same values
    torch.testing.assert_close(only.patches, toks[1].patches)


def test_any_multiple_of_the_coarsest_stride_is_a_valid_size(resnet):
    assert model_at_size(resnet, 64) is resnet and model_at_size(resnet, (96, 32)) is resnet
    with pytest.raises(ValueError, match="multiple of the CNN's coarsest stride 32"):
        model_at_size(resnet, 48)
    with pytest.raises(ValueError, match="neither a class token nor attention"):
        cls_attention_maps(resnet, torch.zeros(1, 3, 64, 64))
    # pictures: the deepest stage with >= 7 cells a side (224 px: layer4's 7x7; 64 px: layer2's 8x8)
    assert figure_block(resnet, 224) == 4 and figure_block(resnet, 64) == 2 and figure_block(resnet, 16) == 1


def test_checkpoint_body_becomes_the_exported_plain_timm_model():
    from stratavit.backbones.pyramid import PyramidBackbone

    torch.manual_seed(0)
    pyramid = PyramidBackbone(BackboneConfig(type="resnet_fpn", arch="resnet18", fpn_dim=16)).eval()
    plain = plain_timm_model(pyramid)
    assert is_cnn(plain) and not plain.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        body = pyramid.body(x)  # the features_only body the pyramid trains
    for t, m in zip(block_tokens(plain, x), body):
        torch.testing.assert_close(t.patches, m.permute(0, 2, 3, 1))


# --------------------------------------------------------------------------- #
# pooled features and probes
# --------------------------------------------------------------------------- #
def test_features_are_the_global_average_pool_per_stage(resnet, tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.arange(6) % 3
    data = TensorDataset(images, labels)
    mem = extract_block_features(resnet, data, batch_size=4)
    assert isinstance(mem.cls, list) and [tuple(f.shape) for f in mem.cls] == [(6, c) for c in WIDTHS]
    with torch.no_grad():
        maps = resnet.forward_intermediates(images, indices=[1, 2, 3, 4], intermediates_only=True)
        last = resnet(images)
    for i, m in enumerate(maps):
        torch.testing.assert_close(mem.cls[i], m.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
        assert torch.equal(mem.patch[i], mem.cls[i])  # no class token: "CLS" is the mean patch
    torch.testing.assert_close(mem.cls[-1], last, atol=1e-5, rtol=1e-5)
    # the disk store holds the four widths one after the other and reads back the same values
    cached = extract_block_features(resnet, data, batch_size=4, cache_dir=tmp_path / "store")
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta == {"layers": 4, "n": 6, "dims": WIDTHS}
    assert (tmp_path / "store" / "cls.f32").stat().st_size == 4 * 6 * sum(WIDTHS)
    again = extract_block_features(resnet, data, batch_size=4, cache_dir=tmp_path / "store")
    for a, b, c in zip(mem.cls, cached.cls, again.cls):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(again.labels, labels)


def test_probes_of_stages_of_different_widths():
    """Per-stage kNN and linear probes on the global feature only (the mean patch would repeat it)."""
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.arange(40) % 2, torch.arange(20) % 2

    def feats(y: torch.Tensor, dim: int, signal: float) -> torch.Tensor:
        return torch.randn(len(y), dim, generator=g) + signal * (2 * y.float()[:, None] - 1)

    # stage 1 carries no signal, stage 2 (twice as wide) separates the classes perfectly
    tr = [feats(y_tr, 8, 0.0), feats(y_tr, 16, 5.0)]
    te = [feats(y_te, 8, 0.0), feats(y_te, 16, 5.0)]
    layers, last = classification_probes(
        BlockFeatures(tr, tr, y_tr), BlockFeatures(te, te, y_te), num_classes=2, k=5, temperature=0.07,
        linear_epochs=10, poolings=("cls",),
    )
    assert [set(r) for r in layers] == [{"block", "knn_top1", "linear_top1"}] * 2
    assert layers[1]["knn_top1"] == 100.0 and layers[1]["linear_top1"] == 100.0
    assert last["top1"] == 100.0 and len(last["predictions"]) == 20


# --------------------------------------------------------------------------- #
# correspondence: every stage on its own grid
# --------------------------------------------------------------------------- #
def _coordinate_image(w: int, h: int) -> Image.Image:
    """Red encodes the source x, green the source y (0..255 across the image)."""
    xs = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
    ys = np.tile(np.linspace(0, 255, h, dtype=np.float32)[:, None], (1, w))
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8))


class _PositionCNN(nn.Module):
    """A stand-in timm CNN (stem at stride 2, stages at strides 4..32) whose stage features encode the
    source position of each cell exactly: the cell's mean (x, y) code of a coordinate image, as
    Gaussian bumps on a 1-pixel anchor grid (cosine similarity falls with the distance)."""

    def __init__(self, source: int, sigma: float = 2.0) -> None:
        super().__init__()
        axis = torch.arange(0.0, source + 1.0)
        ax, ay = torch.meshgrid(axis, axis, indexing="xy")
        self.register_buffer("anchors", torch.stack((ax.reshape(-1), ay.reshape(-1)), -1))
        self.source, self.sigma = source, sigma
        a = self.anchors.shape[0]
        self.feature_info = [{"num_chs": a, "reduction": 2, "module": "stem"}] + [
            {"num_chs": a, "reduction": s, "module": f"layer{i + 1}"} for i, s in enumerate(STRIDES)
        ]

    def forward_intermediates(self, x, indices, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        out = []
        for i in indices:
            code = F.avg_pool2d(x[:, :2], self.feature_info[i]["reduction"])  # (B, 2, gh, gw) in [0, 1]
            pos = code * (self.source - 1) + 0.5  # pixel i's code is i / (W - 1); its centre is i + 0.5
            d2 = ((pos.permute(0, 2, 3, 1)[..., None, :] - self.anchors) ** 2).sum(-1)  # (B, gh, gw, A)
            out.append(torch.exp(-d2 / (2 * self.sigma**2)).permute(0, 3, 1, 2))
        return out


def test_position_exact_stage_features_score_100_on_every_stage_grid():
    model = _PositionCNN(source=64)
    assert is_cnn(model) and [s.stride for s in cnn_stages(model)] == STRIDES
    images = [_coordinate_image(64, 64) for _ in range(12)]
    out = correspondence_score(model, images, size=64, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=5,
                               example_block=1)
    assert [r["block"] for r in out["layers"]] == [1, 2, 3, 4]
    for r in out["layers"]:
        assert r["top1"] == 100.0, r  # the truth is taken on the stage's own grid
    # chance: the 3x3 neighbourhood over the grid; a 2x2 grid (stride 32 at 64 px) is covered whole
    chances = [r["chance"] for r in out["layers"]]
    assert chances[3] == 100.0 and chances[0] < chances[1] < chances[2] < 100.0
    assert chances[0] < 9 / 256 * 100 + 1e-6  # 16x16 grid: at most 9 of 256 cells
    # the example is drawn at stage 1: query points are centres of 4-pixel cells
    ex = out["example"]
    assert ex["block"] == 1 and 0 < len(ex["points_a"]) <= 256
    assert torch.equal((ex["points_a"] - 2) % 4, torch.zeros_like(ex["points_a"]))
    assert bool(ex["correct"].all())


def test_a_real_resnet_scores_per_stage_within_bounds(resnet):
    images = [_coordinate_image(40 + i, 36) for i in range(4)]
    out = correspondence_score(resnet, images, size=64, mean=(0.5,) * 3, std=(0.25,) * 3, blocks=[1, -1])
    assert [r["block"] for r in out["layers"]] == [1, 4] and out["example"]["block"] == 4
    assert out["layers"][1]["top1"] == out["layers"][1]["chance"] == 100.0  # 2x2 grid: every cell is a neighbour
    assert 0 <= out["layers"][0]["top1"] <= 100 and out["layers"][0]["chance"] < 10


# --------------------------------------------------------------------------- #
# dense probe: a token store per stage grid
# --------------------------------------------------------------------------- #
def _two_colour_folder(root: Path, n: int, seed: int) -> Path:
    """Left part red (class 0), right part blue (class 1), split at a random column."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        ids = np.zeros((40, 48), np.uint8)
        ids[:, int(rng.integers(12, 36)):] = 1
        rgb = np.array([[220, 30, 30], [30, 30, 220]], np.float64)[ids] + rng.normal(0, 10, (40, 48, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(ids).save(root / "masks" / f"im{i}.png")
    return root


def test_dense_probe_reads_each_stage_on_its_own_grid(resnet, tmp_path):
    train, val = _two_colour_folder(tmp_path / "train", 8, 0), _two_colour_folder(tmp_path / "val", 4, 1)
    res = dense_probe(resnet, train, val, blocks=(1, -1), size=32, epochs=20, cache_dir=tmp_path / "cache")
    assert res["blocks"] == [1, 4] and [r["block"] for r in res["layers"]] == [1, 4]
    meta = json.loads((tmp_path / "cache" / "train" / "meta.json").read_text())
    assert meta["shapes"] == [[8, 8, 8, 64], [8, 1, 1, 512]]  # 32 px: layer1 8x8 (stride 4), layer4 1x1
    assert (tmp_path / "cache" / "train" / "feats.f16").stat().st_size == 2 * 8 * (8 * 8 * 64 + 512)
    assert res["layers"][0]["miou"] > 80.0  # stride-4 cells see the colour boundary
    assert res["layers"][1]["miou"] < res["layers"][0]["miou"]  # one 32-pixel cell cannot
    again = dense_probe(resnet, train, val, blocks=(1, -1), size=32, epochs=20, cache_dir=tmp_path / "cache")
    assert again["layers"] == res["layers"]  # served from the per-stage stores
    with pytest.raises(EvaluationError, match="no native input size"):
        dense_probe(resnet, train, val)


# --------------------------------------------------------------------------- #
# end to end: pretrain a tiny ResNet-18 + FPN, evaluate it
# --------------------------------------------------------------------------- #
CNN_TINY = [
    "backbone.type=resnet_fpn", "backbone.arch=resnet18", "backbone.fpn_dim=32",
    # mocov3 sets ViT-only backbone fields; a CNN pyramid takes none of them
    "backbone.num_heads=null", "backbone.pos_embed=learned", "backbone.freeze_patch_embed=false",
    "views.global_size=32", "data.batch_size=16", "data.num_workers=0", "data.limit=32",
    "train.log_every_n_steps=1", "train.progress_bar=false", "optim.warmup_epochs=0.5", "train.max_steps=1",
    "objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64",
    "objectives.infonce.proj_dim=32",
]


@pytest.mark.slow
def test_evaluate_a_tiny_resnet_run(tmp_path, cifar_train, cifar_test):
    from stratavit.engine.train import pretrain
    from stratavit.run_folder import last_checkpoint

    run = pretrain("mocov3", str(cifar_train), tmp_path / "run", overrides=CNN_TINY)
    dense_train = _two_colour_folder(tmp_path / "dense" / "train", 8, 0)
    dense_val = _two_colour_folder(tmp_path / "dense" / "val", 4, 1)
    res = evaluate_run(
        run, str(cifar_train), str(cifar_test), train_limit=100, test_limit=50, baselines=True, linear_epochs=10,
        dense_train=dense_train, dense_val=dense_val, correspondence_images=10,
    )
    out = run / "eval"
    assert json.loads((out / "results.json").read_text())["layers"] == res["layers"]
    assert res["meta"]["img_size"] == 32  # a CNN has no native size: the run's views.global_size
    assert "layer1 at stride 4" in res["meta"]["blocks"] and "global average pool" in res["meta"]["global_feature"]

    # per stage: kNN and linear on the global average pool, no duplicate mean-patch columns
    assert [set(r) for r in res["layers"]] == [{"block", "knn_top1", "linear_top1"}] * 4
    assert [r["block"] for r in res["layers"]] == [1, 2, 3, 4]
    assert res["knn"]["top1"] == res["layers"][-1]["knn_top1"]
    assert res["linear"]["top1"] == res["layers"][-1]["linear_top1"]
    # the headline kNN is the exported body's global average pool, recomputed here by hand
    body = load_backbone(run)
    # the checkpoint's teacher, read as evaluate reads a run without backbone.safetensors, is that body
    teacher = plain_timm_model(backbone_from_checkpoint(last_checkpoint(run), "teacher")).state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in body.state_dict().items())
    assert is_cnn(load_run_backbone(run, "student"))
    tf = eval_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "center_crop")

    def pooled(spec: str, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_dataset(spec, split=split, transform=tf, limit=limit, seed=0)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            return body(x), torch.tensor([ds[i][1] for i in range(len(ds))])

    ftr, ytr = pooled(str(cifar_train), "train", 100)
    fte, yte = pooled(str(cifar_test), "test", 50)
    assert knn_top1(ftr, ytr, fte, yte, k=20, temperature=0.07, num_classes=10) == pytest.approx(res["knn"]["top1"])

    # dense and correspondence per stage (32 px: grids 8, 4, 2, 1)
    assert [r["block"] for r in res["dense"]["layers"]] == [1, 2, 3, 4] and res["dense"]["size"] == 32
    corr = res["correspondence"]["layers"]
    assert [r["block"] for r in corr] == [1, 2, 3, 4]
    assert [r["chance"] for r in corr][2:] == [100.0, 100.0]  # 2x2 and 1x1 grids: every cell is a neighbour
    assert corr[2]["top1"] == corr[3]["top1"] == 100.0 and corr[0]["chance"] < corr[1]["chance"] < 100.0

    rand, raw = res["baselines"]["random_init"], res["baselines"]["raw_pixels"]
    assert [r["block"] for r in rand["layers"]] == [1, 2, 3, 4] and {"dense", "correspondence"} <= set(rand)
    assert 0 <= raw["knn_top1"] <= 100 and 0 <= raw["linear_top1"] <= 100

    report = (out / "report.md").read_text()
    assert "## CNN backbone" in report and "global average pool" in report
    assert "CLS-attention picture is skipped" in report
    assert "attention.png" not in report and not (out / "attention.png").exists()
    for png in ("layer_panels.png", "pca.png", "matches.png", "confusion.png", "embedding.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in report, png
    assert "Feature map of stage 1" in report  # 32 px: only layer1 has >= 7 cells a side

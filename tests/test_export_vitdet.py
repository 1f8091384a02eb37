"""``stratavit export --to detectron2 / mmdet``: ViTDet's ViT key layout, checked key by key.

The layout is stated here independently of the exporter: ``ViTDetViT`` below re-declares the
parameters of ViTDet's ``ViT`` as Detectron2 (``detectron2/modeling/backbone/vit.py``) and
MMDetection (``projects/ViTDet/vitdet/vit.py``, a port of it) build them: ``patch_embed.proj``
(a conv), ``pos_embed`` (1, 1 + (S/p)², C), and per block ``norm1``, ``attn.qkv``, ``attn.proj``,
``attn.rel_pos_h/w`` (with ``use_rel_pos``), ``norm2``, ``mlp.fc1``, ``mlp.fc2``; its forward is
ViTDet's (no class token, global attention, no final norm). In Detectron2 the ViT sits at
``model.backbone.net``.
"""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY
from stratavit.backbones.errors import ExportError
from stratavit.backbones.export import save_backbone
from stratavit.backbones.export_vitdet import save_vitdet, vitdet_state
from stratavit.cli import main

TINY_CFG = dict(s.split("=", 1) for s in TINY if s.startswith("backbone."))
DIM, DEPTH, HEADS, PATCH, SIZE = (int(TINY_CFG[f"backbone.{k}"]) for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size"))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, rel_pos: int | None) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos - 1, dim // heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C), global attention
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).permute(0, 2, 1, 3).reshape(b, h, w, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, rel_pos: int | None) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, rel_pos)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDetViT(nn.Module):
    """ViTDet's ViT (pretrain_use_cls_token=True, use_abs_pos=True, mlp_ratio=4) for the TINY backbone."""

    def __init__(self, use_rel_pos: bool = True) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.pos_embed = nn.Parameter(torch.zeros(1, (SIZE // PATCH) ** 2 + 1, DIM))
        self.blocks = nn.ModuleList(_Block(DIM, HEADS, SIZE // PATCH if use_rel_pos else None) for _ in range(DEPTH))

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C, S/p, S/p)
        x = self.patch_embed.proj(img).permute(0, 2, 3, 1)
        g = x.shape[1]
        x = x + self.pos_embed[:, 1:].reshape(1, g, g, DIM)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)


def _detectron2_model() -> nn.Module:
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.net = ViTDetViT()
    return model


def _teacher_vit(run) -> dict[str, torch.Tensor]:
    """The teacher's timm tensors straight from the run's Lightning checkpoint."""
    sd = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    prefix = "teacher.backbone.vit."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("layout", ["detectron2", "mmdet"])
def test_export_holds_exactly_vitdets_keys_with_the_teachers_tensors(layout, tiny_run, tmp_path, capsys):
    out = tmp_path / f"vitdet-{layout}.pth"
    assert main(["export", str(tiny_run), "--to", layout, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # tensors, strings and numbers only
    assert set(ckpt) == {"model", "stratavit"}
    model = _detectron2_model() if layout == "detectron2" else ViTDetViT()
    declared = model.state_dict()
    prefix = "backbone.net." if layout == "detectron2" else ""
    rel_pos = {k for k in declared if ".rel_pos_" in k}
    assert len(rel_pos) == 2 * DEPTH
    assert set(ckpt["model"]) == set(declared) - rel_pos  # every ViTDet key but rel_pos, nothing else
    timm_sd = _teacher_vit(tiny_run)
    for key, tensor in ckpt["model"].items():
        assert tensor.shape == declared[key].shape, key
        assert torch.equal(tensor, timm_sd[key[len(prefix):]]), key  # timm's own name and tensor
    dropped = set(timm_sd) - {k[len(prefix):] for k in ckpt["model"]}
    assert dropped == {"cls_token", "norm.weight", "norm.bias"}

    # loads as the frameworks load it (non-strict): only rel_pos stays at its (zero) init
    result = model.load_state_dict(ckpt["model"], strict=False)
    assert set(result.missing_keys) == rel_pos and result.unexpected_keys == []

    # the config lines name this file and the fields the ViT must have
    path = str(out.resolve())
    if layout == "detectron2":
        assert f'train.init_checkpoint = "{path}"' in printed
        for line in (f"model.backbone.net.embed_dim = {DIM}", f"model.backbone.net.depth = {DEPTH}",
                     f"model.backbone.net.num_heads = {HEADS}", f"model.backbone.net.patch_size = {PATCH}",
                     f"model.backbone.net.pretrain_img_size = {SIZE}", "model.backbone.net.use_abs_pos = True",
                     "model.backbone.net.pretrain_use_cls_token = True"):
            assert line in printed, line
    else:
        assert f"init_cfg=dict(type='Pretrained', checkpoint='{path}')" in printed
        for part in (f"embed_dim={DIM}", f"depth={DEPTH}", f"num_heads={HEADS}", f"patch_size={PATCH}",
                     f"pretrain_img_size={SIZE}", "norm_cfg=dict(type='LN', eps=1e-06)", f"backbone_channel={DIM}"):
            assert part in printed, part
    assert ckpt["stratavit"]["layout"] == layout and ckpt["stratavit"]["weights"] == "teacher"


def test_vitdet_forward_of_the_export_is_the_timm_blocks_without_the_class_token(tiny_run, tmp_path):
    """The weights mean the same thing in ViTDet's ViT: its forward (no class token, no final norm)
    equals timm's patch embedding + patch positions + blocks on the patch tokens alone."""
    out = tmp_path / "d2.pth"
    assert main(["export", str(tiny_run), "--to", "detectron2", "--out", str(out)]) == 0
    det = _detectron2_model()
    det.load_state_dict(torch.load(out, weights_only=True)["model"], strict=False)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=SIZE, patch_size=PATCH,
                            embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    vit.load_state_dict(_teacher_vit(tiny_run))
    img = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = vit.patch_embed(img) + vit.pos_embed[:, 1:]
        for blk in vit.blocks:
            tokens = blk(tokens)
        expected = tokens.transpose(1, 2).reshape(2, DIM, SIZE // PATCH, SIZE // PATCH)
        torch.testing.assert_close(det.backbone.net.eval()(img), expected, atol=1e-5, rtol=1e-5)


def test_default_out_from_a_run_with_only_its_backbone_file(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "backbone.safetensors", run / "backbone.safetensors")
    assert main(["export", str(run), "--to", "mmdet"]) == 0
    assert f"wrote {run / 'backbone_mmdet.pth'}" in capsys.readouterr().out
    keys = set(torch.load(run / "backbone_mmdet.pth", weights_only=True)["model"])
    assert keys == set(ViTDetViT(use_rel_pos=False).state_dict())


def test_student_weights_on_request(tiny_run, tmp_path):
    out = tmp_path / "student.pth"
    assert main(["export", str(tiny_run), "--to", "mmdet", "--which", "student", "--out", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    sd = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert ckpt["stratavit"]["weights"] == "student"
    assert all(torch.equal(v, sd[f"backbone.vit.{k}"]) for k, v in ckpt["model"].items())


def _vit(**kw) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=16,
                             depth=2, num_heads=2, **kw)


@pytest.mark.parametrize("kw,message", [
    ({"init_values": 1e-5}, "blocks.0.ls1.gamma"),
    ({"qk_norm": True}, "blocks.0.attn.q_norm.weight"),
    ({"reg_tokens": 4}, "4 register tokens"),
    ({"pre_norm": True}, "norm_pre.weight"),
    ({"act_layer": "gelu_tanh"}, "not exact GELU"),
])
def test_vit_options_vitdet_lacks_are_refused(kw, message, tmp_path):
    with pytest.raises(ExportError, match="which ViTDet's ViT cannot hold; export it with --to timm") as err:
        save_vitdet(_vit(**kw), tmp_path / "x.pth", "detectron2")
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())


def test_vit_options_vitdet_has_are_kept():
    state, fields = vitdet_state(_vit(qkv_bias=False, no_embed_class=True))
    assert not fields.qkv_bias and "blocks.0.attn.qkv.bias" not in state
    assert not fields.pretrain_use_cls_token and state["pos_embed"].shape == (1, 16, 16)


def _bad(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stratavit export: error: ")
    return lines[0]


def test_cli_refuses_a_cnn_backbone_and_unknown_layouts(tmp_path, capsys):
    from stratavit.backbones.build import build_backbone
    from stratavit.config import BackboneConfig

    run = tmp_path / "resnet-run"
    save_backbone(build_backbone(BackboneConfig(type="resnet_fpn", arch="resnet18")), run / "backbone.safetensors")
    line = _bad(["export", str(run), "--to", "detectron2"], capsys)
    assert "a CNN" in line and "export it with --to timm" in line
    assert not (run / "backbone_detectron2.pth").exists()
    assert "is it a stratavit run folder?" in _bad(["export", str(tmp_path / "none"), "--to", "mmdet"], capsys)
    with pytest.raises(SystemExit) as stop:  # argparse's own check: usage + one error line, exit 2
        main(["export", str(run), "--to", "onnx"])
    assert stop.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err

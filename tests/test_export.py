"""Exports and checkpoints load without unpickling arbitrary objects."""

from __future__ import annotations

import pytest
import torch

from stratavit.backbones.export import (
    ExportError,
    backbone_from_checkpoint,
    load_backbone,
    save_backbone,
)
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_crafted_pickle_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "payload": _Evil()}, path)
    with pytest.raises(ExportError, match="safely"):
        backbone_from_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


def test_safetensors_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2))
    path = save_backbone(bb, tmp_path / "b.safetensors")
    model = load_backbone(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bb.vit.eval()(x))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError):
        load_backbone(tmp_path / "junk.safetensors")
    with pytest.raises(ExportError, match="no file"):
        load_backbone(tmp_path / "missing.safetensors")

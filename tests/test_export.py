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


def test_export_targets_that_cannot_work_fail_in_one_line_and_leave_nothing(tmp_path):
    import os
    import stat

    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2))
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(ExportError, match="is a folder; give a file name"):
        save_backbone(bb, folder)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a file where a folder would have to be: not writable, even as root
    with pytest.raises(ExportError, match="cannot create the folder"):
        save_backbone(bb, blocker / "b.safetensors")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-file", "exports"]  # no .tmp left
    umask = os.umask(0o022)
    try:
        path = save_backbone(bb, folder / "b.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, as any file the user writes


def test_cli_export_onto_a_folder_is_one_line(tmp_path, capsys):
    from stratavit.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2))
    save_backbone(bb, run / "backbone.safetensors")
    target = tmp_path / "out"
    target.mkdir()
    assert main(["export", str(run), "--to", "timm", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder; give a file name" in err and "Traceback" not in err and "\n" not in err
    assert main(["export", str(run), "--to", "timm", "--out", str(target / "b.safetensors")]) == 0
    assert load_backbone(target / "b.safetensors") is not None

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


def _readme_block(title: str) -> str:
    """The first ```python block after the README heading ``title``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index(title):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def test_readme_loading_snippet_runs_and_is_exact(tmp_path, monkeypatch):
    """README § Using the exported backbone, run as written on a depth-2 export of non-standard size."""
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(arch="vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2))
    save_backbone(bb, tmp_path / "moco.safetensors")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_block("### Using the exported backbone"), "README.md", "exec"), scope)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = bb.vit.eval()(x)
        torch.testing.assert_close(scope["backbone"](x), want)
        plain = scope["model"].eval()
        torch.testing.assert_close(plain.forward_head(plain.forward_features(x), pre_logits=True), want)
    assert scope["model"].head.out_features == 10


def test_a_model_of_another_shape_is_refused_in_one_line(tmp_path):
    """A depth-2 export into a 12-block timm ViT: timm's non-strict path would leave 10 blocks random."""
    import timm

    from stratavit.backbones.export import load_weights
    from stratavit.backbones.weights_fit import WeightsMismatchError

    torch.manual_seed(0)
    cfg = BackboneConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=16, depth=2)
    path = save_backbone(Backbone(cfg), tmp_path / "b.safetensors")
    deep = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    with pytest.raises(WeightsMismatchError, match="the file has 2 blocks, the model 12") as e:
        load_weights(deep, path)
    assert "\n" not in str(e.value) and "load_backbone" in str(e.value)
    wide = timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=0)
    with pytest.raises(WeightsMismatchError, match=r"differ in shape \(e\.g\. .*file \(.*192.*model \(.*384"):
        load_weights(wide, path)
    with pytest.raises(WeightsMismatchError, match="blocks"):
        load_backbone(path, depth=4)
    same = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)  # head excepted
    load_weights(same, path)
    torch.testing.assert_close(same.blocks[1].mlp.fc2.weight, load_backbone(path).blocks[1].mlp.fc2.weight)
    bigger = load_backbone(path, img_size=64)  # position embedding resampled to the 4x4 grid
    assert bigger.pos_embed.shape == (1, 1 + 16, 192)


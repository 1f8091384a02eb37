"""Export and load backbones as safetensors that a plain timm model loads.

The file holds the timm state dict (no classifier head) of the teacher (EMA) backbone: the
``VisionTransformer`` of a ViT backbone, or the CNN body of a ``resnet_fpn`` backbone (the FPN is
a pre-training neck and stays in the checkpoint). Metadata ``arch`` + ``timm_kwargs`` (JSON) let
:func:`load_backbone` rebuild it (``timm.create_model(arch, **timm_kwargs)`` then a strict load);
:func:`load_weights` loads the file into a model the user built and refuses a mismatch (timm's own
``pretrained_cfg_overlay`` loading is non-strict whenever ``num_classes`` differs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from stratavit import __version__
from stratavit.backbones.build import build_backbone
from stratavit.backbones.errors import ExportError
from stratavit.backbones.pyramid import PyramidBackbone, pyramid_timm_kwargs
from stratavit.backbones.vit import Backbone, timm_kwargs
from stratavit.backbones.weights_fit import load_weights_into
from stratavit.config import BackboneConfig
from stratavit.recipe import config_from_dict
from stratavit.run_folder import BACKBONE, RunFolder, last_checkpoint


def _vit_state(vit: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in vit.state_dict().items()}


def timm_model(backbone: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The plain timm model inside a backbone and the kwargs that rebuild it."""
    if isinstance(backbone, Backbone):
        return backbone.vit, timm_kwargs(backbone.cfg)
    if isinstance(backbone, PyramidBackbone):
        return backbone.body, pyramid_timm_kwargs(backbone.cfg)
    raise ExportError(f"cannot export a {type(backbone).__name__}")


def plain_timm_model(backbone: nn.Module) -> nn.Module:
    """The plain timm model of a backbone, in eval mode: the ViT itself, or for a CNN feature
    pyramid a ``timm.create_model(arch, num_classes=0)`` holding its body's weights (the body is a
    ``features_only`` wrapper without ``forward_intermediates``; this is the model ``export`` writes)."""
    model, kwargs = timm_model(backbone)
    if hasattr(model, "forward_intermediates"):
        return model.eval()
    plain = timm.create_model(backbone.cfg.arch, pretrained=False, **kwargs)  # type: ignore[union-attr]
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def writable_target(path: Path) -> Path:
    """``path`` if an export can be written there (its folder is made), else :class:`ExportError`."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give a file name, e.g. --out {path / BACKBONE}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder {path.parent} ({e.strerror}); choose another --out") from None
    return path


def replace_atomically(write: Any, path: Path) -> None:
    """``write(tmp)`` then rename onto ``path``; the file gets the user's usual permissions (umask),
    and a failed write leaves no temporary file behind (:class:`ExportError` says why)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O failures as its own error
        tmp.unlink(missing_ok=True)
        why = getattr(e, "strerror", None) or str(e).split(" at path ")[0]
        raise ExportError(f"cannot write {path} ({why}); choose a writable --out") from None


def save_backbone(backbone: nn.Module, path: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the backbone's timm model to ``path`` (safetensors, atomically) with arch metadata."""
    path = writable_target(path)
    model, kwargs = timm_model(backbone)
    meta = {
        "format": "timm",
        "arch": backbone.cfg.arch,  # type: ignore[union-attr]
        "backbone_type": backbone.cfg.type,  # type: ignore[union-attr]
        "timm_kwargs": json.dumps(kwargs),
        "stratavit_version": __version__,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    state = _vit_state(model)
    replace_atomically(lambda tmp: save_file(state, str(tmp), metadata=meta), path)
    return path


def export_backbone(module: Any, path: Path, which: str = "teacher") -> Path:
    """Export the teacher (default) or student backbone of a :class:`~stratavit.engine.module.PretrainModule`."""
    backbone = module.teacher.backbone if which == "teacher" else module.backbone
    return save_backbone(backbone, path, {"recipe": module.cfg.recipe, "weights": which})


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except FileNotFoundError:
        raise ExportError(f"no file at {path}") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ExportError(f"{path} is not a readable safetensors file ({e})") from None


def load_backbone(path: str | Path, **timm_overrides: Any) -> nn.Module:
    """Rebuild the timm model stored by :func:`save_backbone` and load its weights, refusing any mismatch.

    Also accepts a run folder (loads ``RUN_DIR/backbone.safetensors``). ``num_classes=N`` adds a
    fresh N-way classifier head after loading (to fine-tune); ``img_size=S`` resamples the position
    embedding; an override that changes the architecture (``depth``, ``embed_dim``, ...) raises
    :class:`~stratavit.backbones.weights_fit.WeightsMismatchError` naming the difference.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE
    meta = read_metadata(path)
    if "arch" not in meta:
        raise ExportError(f"{path} has no 'arch' metadata; it was not written by stratavit export")
    kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    num_classes = int(timm_overrides.pop("num_classes", 0) or 0)
    kwargs.update(timm_overrides)
    model = timm.create_model(meta["arch"], pretrained=False, **kwargs)
    load_weights_into(model, load_file(str(path)), path)
    if num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an exported backbone file (or run folder) into a timm ``model`` you built yourself.

    Strict: every tensor must fit (the model's classifier head excepted); otherwise
    :class:`~stratavit.backbones.weights_fit.WeightsMismatchError` says how they differ.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE
    read_metadata(path)  # one-line error for a missing or unreadable file
    return load_weights_into(model, load_file(str(path)), path)


def export_run(run_dir: Path, out: Path, which: str = "teacher") -> Path:
    """Export a run's backbone from its last checkpoint (or its ``backbone.safetensors``)."""
    run_dir = Path(run_dir)
    ckpt = last_checkpoint(run_dir)
    if ckpt.exists():
        backbone = backbone_from_checkpoint(ckpt, which)
        return save_backbone(backbone, out, {"weights": which})
    final = RunFolder(run_dir).backbone
    if final.exists() and which == "teacher":
        out = writable_target(Path(out))
        if final.resolve() != out.resolve():
            replace_atomically(lambda tmp: shutil.copyfile(final, tmp), out)
        return out
    raise _not_a_run(run_dir)


def _not_a_run(run_dir: Path) -> ExportError:
    ckpt, final = last_checkpoint(run_dir), RunFolder(run_dir).backbone
    return ExportError(f"{run_dir} has neither {ckpt} nor {final}; is it a stratavit run folder?")


def run_timm_model(run_dir: Path, which: str = "teacher") -> nn.Module:
    """The plain timm model (eval mode) of a run's teacher (default) or student backbone: from its
    last checkpoint, else (teacher only) from its ``backbone.safetensors``; what :func:`export_run` writes."""
    run_dir = Path(run_dir)
    ckpt = last_checkpoint(run_dir)
    if ckpt.exists():
        return plain_timm_model(backbone_from_checkpoint(ckpt, which))
    final = RunFolder(run_dir).backbone
    if final.exists() and which == "teacher":
        return load_backbone(final)
    raise _not_a_run(run_dir)


def backbone_from_checkpoint(ckpt: Path, which: str = "teacher") -> nn.Module:
    """Load the teacher or student backbone from a Lightning checkpoint (weights only, no pickle)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"cannot read checkpoint {ckpt} safely ({e})") from None
    cfg = config_from_dict(state["hyper_parameters"]["config"])
    backbone = build_backbone(cfg.backbone)
    prefix = "teacher.backbone." if which == "teacher" else "backbone."
    sd = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    backbone.load_state_dict(sd, strict=True)
    return backbone


def random_backbone(cfg: BackboneConfig, seed: int = 0) -> nn.Module:
    """The same architecture at random initialisation (the evaluation baseline)."""
    torch.manual_seed(seed)
    return build_backbone(cfg)

"""Load an exported backbone's weights into a timm model, refusing any mismatch loudly.

timm loads a checkpoint non-strictly as soon as ``num_classes`` differs from the checkpoint's, so a
depth-2 export loaded into ``vit_small_patch16_224`` silently leaves blocks 2-11 random. Here every
backbone key must exist in the model with the same shape, and every model key must come from the
file, apart from the classifier head (``head.*``: the one part a user adds to fine-tune). A ViT
position embedding of another grid is resampled (as timm does for another ``img_size``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from stratavit.backbones.errors import ExportError

_BLOCK = re.compile(r"^(?:blocks|stages|layer)\.?(\d+)\.")
_HEAD = ("head.", "fc.", "classifier.")


class WeightsMismatchError(ExportError):
    """The file's weights do not fit the model; the message says how they differ and what to do."""


def _block_count(keys: set[str]) -> int:
    found = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    return max(found) + 1 if found else 0


def _resample_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resample ``pos_embed`` (1, P + N, D) of ``state`` in place to the model's grid, if only N differs."""
    ours, theirs = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if ours is None or theirs is None or ours.shape == theirs.shape or ours.shape[-1] != theirs.shape[-1]:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = model.patch_embed.grid_size  # type: ignore[union-attr]
    state["pos_embed"] = resample_abs_pos_embed(ours, list(grid), num_prefix_tokens=prefix, verbose=False)


def describe_mismatch(file_keys: dict[str, tuple[int, ...]], model_keys: dict[str, tuple[int, ...]]) -> str:
    """One sentence on how a file's weights ``{name: shape}`` differ from a model's, or ``""`` if they fit."""
    body = {k: s for k, s in model_keys.items() if not k.startswith(_HEAD)}
    missing = sorted(set(body) - set(file_keys))
    unexpected = sorted(set(file_keys) - set(model_keys))
    shapes = sorted(k for k in set(file_keys) & set(model_keys) if tuple(file_keys[k]) != tuple(model_keys[k]))
    if not (missing or unexpected or shapes):
        return ""
    parts = []
    nf, nm = _block_count(set(file_keys)), _block_count(set(body))
    if nf != nm:
        parts.append(f"the file has {nf} blocks, the model {nm}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape (e.g. {k}: file {tuple(file_keys[k])}, model {tuple(model_keys[k])})")
    if missing and nf == nm:
        parts.append(f"{len(missing)} model weights are not in the file (e.g. {missing[0]})")
    if unexpected and nf == nm:
        parts.append(f"{len(unexpected)} file weights have no place in the model (e.g. {unexpected[0]})")
    return "; ".join(parts)


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` (an exported backbone's tensors) into ``model``; WeightsMismatchError if they do not fit.

    Args:
        model: a timm model; its classifier head (``head.*``), if any, keeps its own initialisation.
        state: ``{name: tensor}`` as :func:`safetensors.torch.load_file` returns it.
        source: where ``state`` came from, for the message.
    """
    state = dict(state)
    _resample_pos_embed(state, model)
    model_sd = model.state_dict()
    why = describe_mismatch({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in model_sd.items()})
    if why:
        raise WeightsMismatchError(
            f"{source} does not fit this model: {why}. Build the model the file describes: "
            f"stratavit.load_backbone('{source}') or timm.create_model(arch, **timm_kwargs) from the file's "
            "metadata (README § Using the exported backbone)"
        )
    model.load_state_dict(state, strict=False)  # every body key checked above; the head keeps its init
    return model

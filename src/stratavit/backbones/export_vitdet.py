"""Export a run's ViT in the key layout of ViTDet's ``ViT`` backbone (Detectron2 and MMDetection).

Both frameworks declare the same plain ViT (MMDetection's ``projects/ViTDet/vitdet/vit.py`` is a
port of Detectron2's ``detectron2/modeling/backbone/vit.py``), whose parameters for depth ``D`` are::

    patch_embed.proj.weight (C, 3, p, p)   patch_embed.proj.bias (C,)
    pos_embed (1, 1 + (S/p)², C)           # pretrain_use_cls_token=True; (1, (S/p)², C) if False
    blocks.{i}.norm1.{weight,bias} (C,)    blocks.{i}.norm2.{weight,bias} (C,)
    blocks.{i}.attn.qkv.weight (3C, C)     blocks.{i}.attn.qkv.bias (3C,)   # qkv_bias=True
    blocks.{i}.attn.proj.{weight (C, C), bias (C,)}
    blocks.{i}.mlp.fc1.{weight (H, C), bias (H,)}   blocks.{i}.mlp.fc2.{weight (C, H), bias (C,)}
    blocks.{i}.attn.rel_pos_{h,w}          # use_rel_pos=True only; not in the file (see below)

with ``S = pretrain_img_size``, ``H = int(C · mlp_ratio)``. These are timm's own names, so the key map
from timm is the identity on every kept key (the tensor is timm's, unchanged); what is **dropped**:

* ``cls_token``: ViTDet runs without a class token; its position stays in ``pos_embed`` (row 0, which
  ``get_abs_pos`` strips when ``pretrain_use_cls_token=True``, the default). A timm ViT with
  ``no_embed_class`` has no such row: the config then says ``pretrain_use_cls_token=False``.
* ``norm.*`` (timm's final LayerNorm), ``fc_norm.*``, ``head.*``: ViTDet's ViT has no final norm (its
  output goes to the simple feature pyramid, which normalises each level itself).

Not in the file, so the detector initialises them: ``rel_pos_h`` / ``rel_pos_w`` (zeros, as with the
MAE weights the ViTDet configs start from), the feature pyramid and the heads.

``pos_embed`` keeps its pre-training grid: the framework's ``pos_embed`` is built from
``pretrain_img_size`` (default 224) and must have exactly the file's shape (Detectron2 skips a
mismatched tensor with a warning; MMDetection's ``load_state_dict`` raises), so the printed config
sets ``pretrain_img_size`` to the run's image size; both resample it bicubically to the detection grid.

**Detectron2** (``--to detectron2``): ``torch.save({"model": state})`` with every key under
``backbone.net.`` (the ViT is ``model.backbone.net`` inside ``SimpleFeaturePyramid`` in all ViTDet
configs), so ``DetectionCheckpointer`` loads it by exact name, no ``?matching_heuristics=True``
needed (with it, the exact names still match)::

    train.init_checkpoint = "/path/backbone_detectron2.pth"

**MMDetection** (``--to mmdet``): ``torch.save({"model": state})`` with the bare names above: the
project's ``ViT.init_weights`` reads ``checkpoint["model"]`` itself (no ``prefix`` applies, and a file
without a ``"model"`` entry fails there), then loads it non-strictly::

    init_cfg=dict(type='Pretrained', checkpoint='/path/backbone_mmdet.pth')

Both files also hold ``"stratavit"``: a dict of strings and numbers (arch, layout, the config fields)
that neither loader reads. Refused, in one line: a CNN backbone (``mcl-resnet``) and timm ViT options
ViTDet's ``ViT`` lacks (register tokens, layer scale, q/k norm, a pre-norm, bias-free projections,
non-LayerNorm norms, a non-GELU MLP, a non-square grid).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from stratavit import __version__
from stratavit.backbones.errors import ExportError
from stratavit.backbones.export import replace_atomically, writable_target, run_timm_model

LAYOUTS = ("detectron2", "mmdet")
"""The ``--to`` values this module writes (``timm`` is :mod:`stratavit.backbones.export`)."""

PREFIX = {"detectron2": "backbone.net.", "mmdet": ""}
"""Key prefix of the ViT in each framework's file (see the module docstring)."""

DROPPED = ("cls_token", "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
"""timm keys ViTDet's ViT has no place for (the module docstring says why each may go)."""

_BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)


@dataclass(frozen=True)
class VitDetFields:
    """The arguments of ViTDet's ``ViT`` that must match the exported backbone."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    pretrain_img_size: int
    pretrain_use_cls_token: bool
    use_abs_pos: bool
    in_chans: int
    norm_eps: float

    def global_blocks(self) -> list[int]:
        """Blocks with global attention in ViTDet's recipe: every (depth/4)-th (B: 2, 5, 8, 11)."""
        step = max(self.depth // 4, 1)
        return [i for i in range(self.depth) if (i + 1) % step == 0]

    def window_blocks(self) -> list[int]:
        return [i for i in range(self.depth) if i not in self.global_blocks()]


def _refuse(why: str) -> ExportError:
    return ExportError(f"the run's ViT {why}, which ViTDet's ViT cannot hold; export it with --to timm instead")


def vitdet_fields(model: nn.Module) -> VitDetFields:
    """The ViTDet ``ViT`` arguments of a timm ``VisionTransformer``, or :class:`ExportError` naming
    the option that ViTDet's ViT lacks (or, for a CNN, what to do instead)."""
    if not isinstance(model, VisionTransformer):
        raise ExportError(
            f"the run's backbone is a {type(model).__name__} (a CNN, e.g. recipe mcl-resnet), not a ViT: the "
            "ViTDet layouts hold a plain ViT; export it with --to timm (a plain timm ResNet body) and load that "
            "into your detector's ResNet backbone"
        )
    patch = tuple(model.patch_embed.patch_size)
    grid = tuple(model.patch_embed.grid_size)
    if patch[0] != patch[1] or grid[0] != grid[1]:
        raise _refuse(f"has a non-square patch {patch} or grid {grid}")
    if getattr(model, "reg_token", None) is not None:
        raise _refuse(f"has {model.num_reg_tokens} register tokens")
    blocks = list(model.blocks)
    norms = [b.norm1 for b in blocks] + [b.norm2 for b in blocks]
    if any(not isinstance(n, nn.LayerNorm) for n in norms):
        raise _refuse(f"uses {type(norms[0]).__name__} norms, not LayerNorm")
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1 or any(n.weight is None or n.bias is None for n in norms):
        raise _refuse("has LayerNorms without affine weights or with different eps")
    acts = [getattr(b.mlp, "act", None) for b in blocks]
    if any(not isinstance(a, nn.GELU) or a.approximate != "none" for a in acts):
        raise _refuse(f"has an MLP activation {type(acts[0]).__name__}, not exact GELU")
    dim = int(model.embed_dim)
    hidden = int(blocks[0].mlp.fc1.out_features)
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        raise _refuse(f"has an MLP width {hidden} that int({dim} * mlp_ratio) does not give")
    pos = model.pos_embed
    uses_cls = pos is not None and not model.no_embed_class and model.num_prefix_tokens == 1  # a class position
    if pos is not None and pos.shape[1] != grid[0] * grid[1] + int(uses_cls):
        raise _refuse(f"has a pos_embed of {pos.shape[1]} positions for a {grid} grid")
    return VitDetFields(
        patch_size=int(patch[0]),
        embed_dim=dim,
        depth=len(blocks),
        num_heads=int(blocks[0].attn.num_heads),
        mlp_ratio=mlp_ratio,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        pretrain_img_size=int(grid[0] * patch[0]),
        pretrain_use_cls_token=bool(uses_cls),
        use_abs_pos=pos is not None,
        in_chans=int(model.patch_embed.proj.in_channels),
        norm_eps=eps.pop(),
    )


def expected_keys(fields: VitDetFields) -> list[str]:
    """The ViTDet ViT keys the file holds (bare names), in timm's order."""
    keys = (["pos_embed"] if fields.use_abs_pos else []) + ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    per_block = [k for k in _BLOCK_KEYS if fields.qkv_bias or k != "attn.qkv.bias"]
    return keys + [f"blocks.{i}.{k}" for i in range(fields.depth) for k in per_block]


def vitdet_state(model: nn.Module) -> tuple[dict[str, Tensor], VitDetFields]:
    """A timm ViT's state dict in ViTDet's ViT layout (bare names) and the config fields it needs.

    Every timm key is either kept under its own name or in :data:`DROPPED`; any other key (an option
    ViTDet lacks: ``ls1.gamma``, ``attn.q_norm.weight``, ``norm_pre.weight``, ...) or a missing one (a
    bias-free projection) raises :class:`ExportError`.
    """
    fields = vitdet_fields(model)
    sd = model.state_dict()
    wanted = expected_keys(fields)
    extra = [k for k in sd if k not in wanted and k not in DROPPED]
    if extra:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise _refuse(f"has parameters {shown}")
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise _refuse(f"lacks {', '.join(missing[:4])} (a bias-free layer)")
    state = {k: sd[k].detach().cpu().contiguous().clone() for k in wanted}
    return state, fields


def config_text(layout: str, fields: VitDetFields, path: Path) -> str:
    """The config lines a user pastes to load ``path`` (an export in ``layout``) with these fields."""
    f, p = fields, str(Path(path).resolve())
    window = f"[{', '.join(map(str, f.window_blocks()))}]"
    if layout == "detectron2":
        net = "model.backbone.net"
        lines = [
            "# Detectron2 LazyConfig (e.g. after projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py;",
            "# from functools import partial; import torch.nn as nn):",
            f"{net}.patch_size = {f.patch_size}",
            f"{net}.embed_dim = {f.embed_dim}",
            f"{net}.depth = {f.depth}",
            f"{net}.num_heads = {f.num_heads}",
            f"{net}.mlp_ratio = {f.mlp_ratio!r}",
            f"{net}.qkv_bias = {f.qkv_bias}",
            f"{net}.pretrain_img_size = {f.pretrain_img_size}",
            f"{net}.pretrain_use_cls_token = {f.pretrain_use_cls_token}",
            f"{net}.use_abs_pos = {f.use_abs_pos}",
            f"{net}.norm_layer = partial(nn.LayerNorm, eps={f.norm_eps!r})",
            f"{net}.window_block_indexes = {window}",
            "optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, "
            f"num_layers={f.depth}, lr_decay_rate=0.7)  # 0.7: ViT-B's rate",
            f'train.init_checkpoint = "{p}"',
        ]
        if f.in_chans != 3:
            lines.insert(2, f"{net}.in_chans = {f.in_chans}")
        return "\n".join(lines)
    if layout == "mmdet":
        c = f.embed_dim
        inner = [
            f"patch_size={f.patch_size}, embed_dim={f.embed_dim}, depth={f.depth}, num_heads={f.num_heads},",
            f"mlp_ratio={f.mlp_ratio!r}, qkv_bias={f.qkv_bias}, norm_cfg=dict(type='LN', eps={f.norm_eps!r}),",
            f"pretrain_img_size={f.pretrain_img_size}, pretrain_use_cls_token={f.pretrain_use_cls_token}, "
            f"use_abs_pos={f.use_abs_pos},",
            f"window_block_indexes={window},",
        ]
        if f.in_chans != 3:
            inner.insert(0, f"in_chans={f.in_chans},")
        lines = [
            "# MMDetection config (_base_ = projects/ViTDet/configs/vitdet_mask-rcnn_vit-b-mae_lsj-100e.py):",
            "model = dict(",
            "    backbone=dict(",
            *(f"        {line}" for line in inner),
            f"        init_cfg=dict(type='Pretrained', checkpoint='{p}')),",
            f"    neck=dict(backbone_channel={c}, in_channels=[{c // 4}, {c // 2}, {c}, {c}]))",
            f"optim_wrapper = dict(paramwise_cfg=dict(num_layers={f.depth}))",
        ]
        return "\n".join(lines)
    raise ExportError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def save_vitdet(model: nn.Module, path: Path, layout: str, extra: dict[str, Any] | None = None) -> tuple[Path, VitDetFields]:
    """Write a timm ViT's weights to ``path`` in ``layout`` (``torch.save({"model": ...})``, atomically)."""
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    state, fields = vitdet_state(model)
    path = writable_target(Path(path))
    prefix = PREFIX[layout]
    meta: dict[str, Any] = {"layout": layout, "stratavit_version": __version__, **asdict(fields), **(extra or {})}
    payload = {"model": {prefix + k: v for k, v in state.items()}, "stratavit": meta}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)

    replace_atomically(write, path)
    return path, fields


def default_out(run_dir: Path, layout: str) -> Path:
    """``RUN_DIR/backbone_<layout>.pth``."""
    return Path(run_dir) / f"backbone_{layout}.pth"


def export_run_vitdet(run_dir: Path, layout: str, out: Path | None = None, which: str = "teacher") -> tuple[Path, str]:
    """Export a run's teacher (default) or student ViT for ``layout``; returns the file and the
    config lines to paste (:func:`config_text`)."""
    model = run_timm_model(Path(run_dir), which)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    path, fields = save_vitdet(model, out or default_out(run_dir, layout), layout, {"weights": which, "arch": arch})
    return path, config_text(layout, fields, path)

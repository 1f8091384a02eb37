"""Typed configuration: dataclasses, recipe YAML loading and validated dotted overrides.

The sections of a :class:`Config` and the generic machinery that builds any dataclass from plain
data: every key is checked against the dataclass fields and every value against the field's type;
mistakes raise :class:`ConfigError` naming the key and what is allowed. This module knows no
objective: ``Config.objectives`` holds each objective's own config dataclass, which the recipe
layer (:mod:`stratavit.recipe`) builds through the objectives registry.
"""

from __future__ import annotations

import re

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message says which and what to do."""


# ----------------------------------------------------------------------------------------------
# The sections


@dataclass
class BackboneConfig:
    """A timm Vision Transformer (``type: vit``; ``None`` fields keep the value of the timm ``arch``)
    or a timm CNN + FPN feature pyramid (``type: resnet_fpn``, MCL's original setting)."""

    type: Literal["vit", "resnet_fpn"] = "vit"
    arch: str = "vit_small_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    pos_embed: Literal["learned", "sincos"] = "learned"
    """``sincos``: fixed 2-D sin-cos position embedding, not trained (MoCo v3)."""
    freeze_patch_embed: bool = False
    """Keep the random patch projection frozen (MoCo v3's stability trick)."""
    fpn_dim: int = 256
    """``resnet_fpn`` only: channels of every FPN level."""


@dataclass
class ViewsConfig:
    """Multi-crop views. Global views go through student and teacher; local views only the student."""

    resize: int | None = None
    """Resize every source image to ``resize x resize`` (bilinear, antialiased; aspect ratio not
    kept) before any crop, as Local-Global's code does; crop boxes and source sizes are then in that
    resized frame. ``None``: crop the original image."""
    global_crops: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    global_blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    """Blur probability per global view (cycled when there are more global views)."""
    global_solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])
    local_blur_p: float = 0.5
    local_solarize_p: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    photometric: Literal["loader", "device"] = "loader"
    """Where colour jitter, grayscale, Gaussian blur, solarize and normalisation run. ``loader``: in
    the loader workers, on PIL images (blur: PIL's ``GaussianBlur(radius=σ)``, σ ~ U(0.1, 2.0), as
    the authors' code). ``device``: the workers only decode, crop, resize and flip and send uint8
    crops; the training step applies the same augmentations, with the same per-view probabilities
    and parameter ranges, batched on the device (:mod:`stratavit.data.photometric`): many more
    images per loader core. Crops and flips are the same in both for the same seed."""


@dataclass
class OptimConfig:
    """AdamW (or LARS / SGD) with linear warm-up then cosine decay; lr = base_lr * global_batch / 256."""

    name: Literal["adamw", "lars", "sgd"] = "adamw"
    """``lars``: SGD + momentum with layer-wise trust ratios (MCL's ResNet setting); ``sgd``: plain momentum SGD."""
    base_lr: float = 1.5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_includes_end: bool = True
    """Shape of the linear lr warm-up over its W steps. ``true``: ``linspace(0, lr, W)`` with its end
    point, so step W−1 is at the full lr (DINO's ``cosine_scheduler``, used by DINO, iBOT, SERE and
    Local-Global); ``false``: ``lr · t / W``, reaching the full lr at step W (MoCo v3's
    ``adjust_learning_rate``). The cosine decay after it is the same in both."""
    weight_decay: float = 0.1
    weight_decay_end: float | None = None
    """Cosine weight-decay schedule end value (DINO: 0.04 -> 0.4); ``None`` keeps it constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW only."""
    momentum: float = 0.9
    """LARS / SGD momentum."""
    lars_eta: float = 0.001
    """LARS trust coefficient."""
    clip_grad: float | None = None
    """Gradient clipping threshold (``None`` = off); how it applies is ``clip_mode``."""
    clip_mode: Literal["global", "per_tensor"] = "global"
    """``global``: scale all gradients together so their joint L2 norm is at most ``clip_grad``
    (``clip_grad_norm_``; MoCo v3, MCL); ``per_tensor``: scale every parameter's gradient on its own
    to norm ≤ ``clip_grad`` (the ``clip_gradients`` of DINO, iBOT, SERE and Local-Global)."""


@dataclass
class TeacherConfig:
    """EMA teacher: m(t) = 1 - (1 - m0) (1 + cos(pi t / T)) / 2, updated every step."""

    momentum: float = 0.99
    momentum_end: float = 1.0


@dataclass
class DataConfig:
    path: str | None = None
    """ImageFolder directory or a named set (cifar10, cifar100, stl10)."""
    root: str | None = None
    """Download/cache folder for named sets (default ~/.cache/stratavit)."""
    batch_size: int = 256
    """Per-process batch size."""
    num_workers: int | Literal["auto"] = "auto"
    """Loader worker processes per training process. ``auto``: picked on the machine that runs,
    min(8, usable cores per process − 1), at least 0 (:func:`stratavit.engine.data.resolve_num_workers`);
    ``config.yaml`` keeps ``auto`` (a run continued elsewhere picks again: data order and views do
    not depend on it) and ``environment.json`` records the number each start used."""
    limit: int | None = None
    """Train on a fixed random subset of this many images (seeded by train.seed)."""
    allow_upsampling: bool = False
    """Train on images smaller than views.global_size (every global crop is then enlarged); off, such
    data fails before training with the sizes found."""


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int | None = None
    """Stop after this many optimiser steps (schedules are laid out over min(epochs, steps))."""
    max_time_s: float | None = None
    """Also stop after this many seconds of training (the schedule still follows epochs/max_steps)."""
    budget: str | None = None
    """Wall-clock budget of the whole run, e.g. ``15m``, ``2h``, ``1h30m``: the run measures its own
    cost, plans its steps so every schedule (lr, weight decay, EMA, and the epoch schedules: warm-ups,
    teacher temperature, ProtoNCE's E-steps) ends inside the budget, and re-plans if the pace drifts
    (:mod:`stratavit.engine.budget`). Planned vs actual time in ``run.json``. ``None``: the recipe's epochs."""
    budget_tolerance: float = 0.05
    """Re-plan when the projected end misses the budget by more than this fraction of it."""
    preset: Literal["auto", "small", "none"] = "auto"
    """``auto``: a new run on small images (<= 64 px) with no ``backbone.*`` / ``views.*`` override gets
    the small-compute preset (:mod:`stratavit.engine.preset`); ``small``: always; ``none``: the recipe's
    sizes as written. The run's ``config.yaml`` records what was applied (``small`` or ``none``)."""
    seed: int = 0
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    """``auto``: bf16-mixed on a GPU that supports it, 32-true otherwise."""
    sync_batchnorm: bool = True
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int | None = None
    """Also checkpoint every N steps (``last.ckpt`` is always written at epoch ends)."""
    checkpoint_every_minutes: float | None = 30.0
    """Also checkpoint when this many minutes of wall-clock time have passed since the last
    checkpoint (checked at step boundaries, agreed by all processes), so a kill loses at most about
    this much work even in long epochs; ``null`` turns it off. A SIGINT (Ctrl-C) or SIGTERM
    (SLURM pre-emption) always stops the run at the next step boundary with a checkpoint."""
    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["csv"])
    """Where training metrics go. ``metrics.csv`` (``csv``) is always written: it is the run
    folder's record. Add ``tensorboard`` (``RUN_DIR/tensorboard/``), ``wandb`` or ``mlflow``
    (their packages must be installed; see README § Loggers)."""
    max_nonfinite_steps: int = 20
    """Stop the run after this many consecutive steps with a non-finite loss."""
    progress_bar: bool = True
    compile: bool = False
    """``torch.compile`` the student and teacher backbones (GPU runs; the first steps pay the compile)."""
    collapse_monitor: bool = True
    """Log collapse indicators of the teacher's CLS embeddings (``collapse/rankme``, ``collapse/std``,
    ...) every ``log_every_n_steps`` steps and warn once when they fall (:mod:`stratavit.engine.callbacks.collapse`)."""
    collapse_rank_fraction: float = 0.02
    """Warn when RankMe < this fraction of min(global batch, embed_dim), or < 1.5 (RankMe 1 = complete collapse)."""
    collapse_std_threshold: float = 0.05
    """Warn when the per-dim std of the L2-normalised embeddings × √D < this (1 = isotropic, 0 = collapsed)."""
    collapse_patience: int = 3
    """Warn only after this many consecutive checks below a threshold (checks: every log_every_n_steps)."""


@dataclass
class Config:
    recipe: str = "custom"
    description: str = ""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    objectives: dict[str, Any] = field(default_factory=dict)
    """Objective name -> that objective's config dataclass (see ``stratavit.objectives``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Type checking of values


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise :class:`ConfigError`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def unknown_key(key: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Allowed here: {', '.join(sorted(allowed))}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating keys and types recursively."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise unknown_key(key, name, names)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Overrides (dotted keys; the recipe layer, stratavit.recipe, applies them)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> (["a", "b"], 1). Values are read as YAML (numbers, lists, null, true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(parts)}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def check_override_path(cls: Any, parts: list[str], start: int = 0) -> None:
    """Reject an unknown key of an override (``parts`` from ``start`` are fields of dataclass ``cls``
    and its nested dataclasses) before anything is merged, naming the allowed keys."""
    for i in range(start, len(parts)):
        part, key = parts[i], ".".join(parts[: i + 1])
        if cls is None:
            raise ConfigError(f"'{'.'.join(parts[:i])}' is a value, not a section: cannot set '{key}'")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise unknown_key(key, part, names)
        tp = get_type_hints(cls)[part]
        cls = tp if dataclasses.is_dataclass(tp) else None


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration(text: str | float | int) -> float:
    """Seconds of a duration: ``"15m"``, ``"2h"``, ``"1h30m"``, ``"90s"``, ``"0.5h"``; a bare number is seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", s):
            seconds = float(s)
        elif s and re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", s):
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(s))
        else:
            raise ConfigError(f"train.budget={text!r} is not a duration; write e.g. 15m, 2h, 1h30m or 900s")
    if not seconds > 0:
        raise ConfigError(f"train.budget={text!r} must be longer than zero")
    return seconds


def validate(cfg: Config) -> None:
    """Cross-field checks that no single type annotation can express."""
    if not cfg.objectives:
        raise ConfigError("the config has no objectives; a recipe must list at least one under 'objectives'")
    if cfg.train.budget is not None:
        parse_duration(cfg.train.budget)
        if not 0 < cfg.train.budget_tolerance < 1:
            raise ConfigError(f"train.budget_tolerance={cfg.train.budget_tolerance} must be between 0 and 1 (e.g. 0.05)")
    v = cfg.views
    if v.global_crops < 1:
        raise ConfigError("views.global_crops must be >= 1 (the teacher needs global views)")
    if v.local_crops < 0:
        raise ConfigError("views.local_crops must be >= 0")
    for name, (lo, hi) in (("views.global_scale", v.global_scale), ("views.local_scale", v.local_scale)):
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
    for name in ("flip_p", "color_jitter_p", "grayscale_p", "local_blur_p", "local_solarize_p"):
        p = getattr(v, name)
        if not 0 <= p <= 1:
            raise ConfigError(f"views.{name} must be a probability in [0, 1], got {p}")
    if v.local_crops > 0 and v.local_size > v.global_size:
        raise ConfigError(
            f"views.local_size={v.local_size} is larger than views.global_size={v.global_size}: local crops "
            f"are the small views; set views.local_size <= {v.global_size} (or views.local_crops=0)"
        )
    if v.resize is not None and v.resize < v.global_size:  # local_size <= global_size: checked above
        raise ConfigError(
            f"views.resize={v.resize} is smaller than views.global_size={v.global_size}: crops are cut from "
            f"the resized image; set views.resize={v.global_size} or more, or views.resize=null to crop the "
            "original image"
        )
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size must be >= 1")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError("data.limit must be >= 1 (or null for the whole data set)")
    if cfg.train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1 (or null)")
    if cfg.train.checkpoint_every_minutes is not None and cfg.train.checkpoint_every_minutes <= 0:
        raise ConfigError("train.checkpoint_every_minutes must be > 0 (or null to checkpoint only by steps and epochs)")
    if isinstance(cfg.data.num_workers, int) and cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 or 'auto', got {cfg.data.num_workers}")
    if not 0 <= cfg.teacher.momentum <= 1 or not 0 <= cfg.teacher.momentum_end <= 1:
        raise ConfigError("teacher.momentum and teacher.momentum_end must be in [0, 1]")
    if cfg.optim.base_lr <= 0:
        raise ConfigError("optim.base_lr must be > 0")
    if cfg.optim.clip_grad is not None and cfg.optim.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be > 0 (or null for no clipping), got {cfg.optim.clip_grad}")


# ----------------------------------------------------------------------------------------------
# Serialisation


def to_dict(obj: Any) -> Any:
    """Config (or any nested dataclass) -> plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "TeacherConfig",
    "TrainConfig",
    "ViewsConfig",
    "build_dataclass",
    "check_override_path",
    "dump_yaml",
    "parse_override",
    "set_path",
    "unknown_key",
    "validate",
    "to_dict",
]

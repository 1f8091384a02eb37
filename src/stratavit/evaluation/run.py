"""``stratavit evaluate``: frozen-feature evaluation of a run's backbone, block by block.

:func:`evaluate` runs every enabled evaluation of
:data:`~stratavit.evaluation.evaluations.EVALUATIONS` on the run's backbone (and, with
``baselines``, on the same architecture at random initialisation), then writes ``OUT/results.json``::

    {"knn": {"top1": …}, "linear": {"top1": …},                        # last block, CLS
     "layers": [{"block": i, "knn_top1": …, "linear_top1": …,           # block is 1-based
                 "knn_top1_patch": …, "linear_top1_patch": …}, …],       # *_patch: mean patch token
     "dense": {"miou": …, "pixel_acc": …, "layers": [{"block": i, "miou": …}, …]},   # optional
     "correspondence": {"top1": …, "layers": [{"block": i, "top1": …, "chance": …}, …]},
     "baselines": {"random_init": {…same keys…}, "raw_pixels": {"knn_top1": …, "linear_top1": …}},
     "meta": {…}}

and ``OUT/report.md`` (+ PNGs, + a self-contained ``report.html``). Features are cached under
``OUT/cache`` keyed by the weights, the data and the resolution, so re-running is cheap.

The evaluation size is the run's training resolution unless ``img_size`` says otherwise
(:mod:`stratavit.evaluation.resolution`). What would make a number mislead is said at once on
stderr, kept in ``meta.warnings`` and put at the top of the report: another size than the
training resolution, classes that make a classification score meaningless
(:mod:`stratavit.evaluation.class_checks`; test labels are matched to the train labels by class
name), and weights that have barely moved from the run's initialisation
(:mod:`stratavit.evaluation.movement`). ``meta`` records what ``compare`` needs to tell comparable
numbers from others (data fingerprints, limits, size, resize, seed; see
:mod:`stratavit.evaluation.comparability`).

A CNN backbone (``backbone.type=resnet_fpn``, evaluated as its plain timm body) has its feature
stages as blocks (layer1..layer4 of a ResNet, strides 4..32), each probed on its own grid; its
"CLS" entries (``knn_top1``, ``linear_top1``, the headline) hold the global average pool of the
stage, the ``*_patch`` entries are left out (they would repeat them), and ``meta`` says so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from stratavit.backbones.export import (
    ExportError,
    backbone_from_checkpoint,
    load_backbone,
    plain_timm_model,
    random_backbone,
)
from stratavit.config import Config
from stratavit.data.datasets import bad_files, build_dataset, set_skip_log
from stratavit.data.views import describe_resize, eval_transform
from stratavit.evaluation.class_checks import align_test_labels
from stratavit.evaluation.data_identity import dataset_fingerprint
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.evaluations import EVALUATIONS, option_sections
from stratavit.evaluation.evaluations.classification import num_classes
from stratavit.evaluation.movement import Movement, relative_change
from stratavit.evaluation.options import Options, build_options
from stratavit.evaluation.protocol import Context, Evaluation, Figure, Result
from stratavit.evaluation.report import write_report
from stratavit.evaluation.report_figures import model_figures
from stratavit.evaluation.resolution import size_note, sized, training_size
from stratavit.evaluation.tokens import (
    cnn_stages,
    figure_block,
    is_cnn,
    model_at_size,
)
from stratavit.recipe import load_config_file
from stratavit.run_folder import EvalFolder, RunFolder, read_json, write_json

__all__ = ["evaluate", "evaluate_run", "load_run_backbone"]


def load_run_backbone(run_dir: Path, which: str = "teacher") -> nn.Module:
    """The run's timm model (ViT or CNN body): ``backbone.safetensors`` (teacher) or the last checkpoint."""
    run = RunFolder(Path(run_dir))
    if which == "teacher" and run.backbone.exists():
        return load_backbone(run.backbone)
    if run.checkpoint.exists():
        return plain_timm_model(backbone_from_checkpoint(run.checkpoint, which))
    raise ExportError(f"{run.root} has no backbone.safetensors or {run.checkpoint}; pre-train first (stratavit pretrain)")


def _weights_key(run: RunFolder, which: str) -> str:
    for f in (run.backbone, run.checkpoint):
        if f.exists():
            st = f.stat()
            return f"{which}-{f.name}-{st.st_size}-{st.st_mtime_ns}"
    return which


def _run_all(
    model: nn.Module, ctx: Context, evaluations: Sequence[Evaluation], plans: dict[str, Any]
) -> dict[str, Result]:
    return {e.name: e.run(model, ctx, plans[e.name]) for e in evaluations}


def evaluate(
    run_dir: str | Path, train: str, test: str, out: str | Path | None = None, options: Options | None = None,
    *, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the backbone of ``run_dir`` with ``options``; writes ``results.json`` and the report.

    Args:
        train, test: labelled ImageFolder directories or named sets (``cifar10``, ``cifar10:test``, …),
            of any image size: images are brought to the evaluation size by the ``resize`` policy.
            The evaluation size is ``options.img_size``, by default the run's training resolution
            (:func:`~stratavit.evaluation.resolution.training_size`).
        out: output folder (default ``RUN_DIR/eval``).
        options: see :mod:`stratavit.evaluation.options` (default: every default).
        meta: extra entries of ``results["meta"]``.

    Returns:
        the results, as written to ``results.json``.
    """
    run = RunFolder(Path(run_dir))
    folder = EvalFolder(Path(out) if out is not None else run.eval_dir)
    o = options or build_options(option_sections())
    if not run.is_run():
        raise ExportError(
            f"{run.root} is not a stratavit run folder (no config.yaml); pass the --out folder of `stratavit pretrain`"
        )
    folder.root.mkdir(parents=True, exist_ok=True)
    cfg: Config = load_config_file(run.config)
    base_model = load_run_backbone(run.root, o.which)
    ctx, model = _context(run, folder, train, test, cfg, o, base_model)
    init = plain_timm_model(random_backbone(cfg.backbone, seed=cfg.train.seed))
    movement = _movement(run, base_model, init, o.which)
    warning = movement.warning() if movement is not None else None
    if warning:
        ctx.warn(warning)
    evaluations = [e for e in EVALUATIONS if e.enabled(o)]
    plans = {e.name: e.check(model, ctx.size, cfg, o) for e in evaluations}  # before any feature is extracted
    started = time.time()
    ctx_main = ctx.for_model(o.which, _weights_key(run, o.which))
    main = _run_all(model, ctx_main, evaluations, plans)
    results: dict[str, Any] = {}
    for e in evaluations:
        results.update(main[e.name].entries())
    if o.baselines:
        results["baselines"] = _baselines(model_at_size(init, ctx.size), ctx_main, cfg, evaluations, plans)
    results["meta"] = _meta(run, cfg, model, ctx_main, started, meta)
    if movement is not None:
        results["meta"]["weights_change"] = movement.to_dict()
    _warn_skipped(results["meta"]["skipped_images"], folder)
    write_json(folder.results, results)
    _write_report(folder, run, cfg, model, ctx_main, evaluations, main, results)
    return results


def _context(
    run: RunFolder, folder: EvalFolder, train: str, test: str, cfg: Config, o: Options, base_model: nn.Module,
) -> tuple[Context, nn.Module]:
    """The evaluation's context (size, data sets, warnings so far) and the model at the evaluation size."""
    train_size = training_size(cfg)
    size = o.img_size or train_size
    model = sized(base_model, size, "--img-size")
    try:
        transform = eval_transform(size, cfg.views.mean, cfg.views.std, o.resize)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    train_ds = build_dataset(train, split="train", transform=transform, limit=o.train_limit, seed=o.seed)
    test_ds = build_dataset(test, split="test", transform=transform, limit=o.test_limit, seed=o.seed)
    test_ds, mapping = align_test_labels(train_ds, test_ds)
    for ds in (train_ds, test_ds):
        set_skip_log(ds, folder.skipped)
    data_key = (train, test, o.train_limit, o.test_limit, size, o.resize, *(("labels", *mapping) if mapping else ()))
    ctx = Context(run, folder, train, test, cfg, o, size, train_ds, test_ds, data_key, train_size=train_size)
    note = size_note("evaluating", size, train_size, "--img-size")
    if note:
        ctx.warn(note)
    return ctx, model


def _movement(run: RunFolder, model: nn.Module, init: nn.Module, which: str) -> Movement | None:
    """How far ``model`` went from the run's initialisation (None when that is not comparable)."""
    change = relative_change(model, init)
    if change is None:
        return None
    steps = read_json(run.summary).get("global_step") if run.summary.exists() else None
    return Movement(change, int(steps) if isinstance(steps, int) else None, which)


def _baselines(
    rand: nn.Module, ctx: Context, cfg: Config, evaluations: Sequence[Evaluation], plans: dict[str, Any]
) -> dict[str, Any]:
    """The random-init backbone (the run's own initial weights) through every evaluation, and the extra
    baselines; ``ctx``: the evaluated model's context."""
    rand_ctx = ctx.for_model("random init", f"random-init-{cfg.backbone}-{cfg.train.seed}")
    rand_results = _run_all(rand, rand_ctx, evaluations, plans)
    baselines: dict[str, Any] = {"random_init": {}}
    for e in evaluations:
        baselines["random_init"].update(rand_results[e.name].baseline_entries())
    for e in evaluations:
        baselines.update(e.extra_baselines(ctx))
    return baselines


def _write_report(
    folder: EvalFolder, run: RunFolder, cfg: Config, model: nn.Module, ctx: Context,
    evaluations: Sequence[Evaluation], main: dict[str, Result], results: dict[str, Any],
) -> None:
    o = ctx.options
    figures: list[Figure] = []
    if o.visuals:
        figures = model_figures(folder.root, model, ctx.test_ds, results, [p for e in EVALUATIONS for p in e.panels],
                                mean=cfg.views.mean, std=cfg.views.std)
        for e in evaluations:
            figures += e.figures(model, ctx, main[e.name], folder.root)
        figures.sort(key=lambda f: f.order)
    write_report(
        folder.root, results, metrics_csv=run.metrics, title=f"stratavit evaluation: {cfg.recipe}",
        figures=[(f.caption, f.png) for f in figures], html=o.visuals,
        extra_md=_cnn_note(model, ctx.size, o.visuals) if is_cnn(model) else "",
    )


def _meta(
    run: RunFolder, cfg: Config, model: nn.Module, ctx: Context, started: float, extra: dict[str, Any] | None,
) -> dict[str, Any]:
    _, test_feats = ctx.features(model)  # extracted by the classification probes: served from memory
    o, size = ctx.options, ctx.size
    meta: dict[str, Any] = {
        "run_dir": str(run.root),
        "recipe": cfg.recipe,
        "weights": ctx.options.which,
        "warnings": list(ctx.warnings),
        "train": ctx.train,
        "test": ctx.test,
        "train_fingerprint": dataset_fingerprint(ctx.train_ds),
        "test_fingerprint": dataset_fingerprint(ctx.test_ds),
        "train_images": len(ctx.train_ds),  # type: ignore[arg-type]
        "test_images": len(ctx.test_ds),  # type: ignore[arg-type]
        "train_limit": o.train_limit,
        "test_limit": o.test_limit,
        "classes": num_classes(test_feats.labels),
        "img_size": size,
        "train_img_size": ctx.train_size,
        "resize": o.resize,
        "resize_policy": describe_resize(size, o.resize),
        "seed": o.seed,
        "skipped_images": len(set(bad_files(ctx.train_ds)) | set(bad_files(ctx.test_ds))),  # one shared skip log
        "seconds": ctx.timings,
        "eval_seconds": round(time.time() - started, 1),
        **(extra or {}),
    }
    if is_cnn(model):
        stages = cnn_stages(model)
        meta["blocks"] = (
            f"the {len(stages)} feature stages of the CNN {cfg.backbone.arch} "
            f"({', '.join(f'{s.module} at stride {s.stride}' for s in stages)})"
        )
        meta["global_feature"] = "global average pool of each stage (a CNN has no CLS token)"
    if run.summary.exists():
        meta["training"] = read_json(run.summary)
    return meta


def _warn_skipped(count: int, folder: EvalFolder) -> None:
    if count:
        print(
            f"warning: {count} unreadable image(s) were skipped (the next readable image stands in for each); "
            f"they are listed in {folder.skipped}",
            file=sys.stderr,
        )


def _cnn_note(model: nn.Module, size: int, visuals: bool) -> str:
    """The report's note on how a CNN backbone is read (stages as blocks, no CLS, no attention)."""
    stages = cnn_stages(model)
    grids = ", ".join(f"{size // s.stride}x{size // s.stride}" for s in stages)
    lines = [
        "## CNN backbone",
        "",
        f"The backbone is a CNN: its **blocks are its {len(stages)} feature stages** "
        f"({', '.join(s.module for s in stages)}; strides {', '.join(str(s.stride) for s in stages)}; "
        f"grids {grids} at {size} px). A CNN has no class token: every \"CLS\" figure (kNN and linear "
        "top-1, the headline, the confusion matrix, the 2-D map) is the **global average pool** of the "
        "stage's feature map, so no separate mean-patch columns are listed. The dense probe and the "
        "correspondence score read each stage on its own grid: a \"patch\" is one cell of that stage "
        "(stride x stride pixels) and the one-patch tolerance of the correspondence score is one such cell.",
    ]
    if visuals:
        lines += [
            "",
            "The CLS-attention picture is skipped (a CNN has neither a class token nor attention); the "
            f"PCA and matches pictures show stage {figure_block(model, size)}.",
        ]
    return "\n".join(lines)


# keyword arguments of evaluate_run -> (section, field) of the options
_SECTION_KWARGS = {
    "k": ("knn", "k"),
    "temperature": ("knn", "temperature"),
    "linear_epochs": ("linear", "epochs"),
    "dense_train": ("dense", "train"),
    "dense_val": ("dense", "val"),
    "dense_blocks": ("dense", "blocks"),
    "dense_size": ("dense", "size"),
    "correspondence_images": ("correspondence", "images"),
}


def evaluate_run(
    run_dir: str | Path, train: str, test: str, out: str | Path | None = None, *,
    meta: dict[str, Any] | None = None, **kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate` with the options as keyword arguments (the Python API of earlier versions).

    ``kwargs``: the general options by name (``train_limit``, ``batch_size``, ``img_size``,
    ``resize``, ``which``, ``baselines``, ``num_workers``, ``visuals``, ``seed``) and ``k``,
    ``temperature``, ``linear_epochs``, ``dense_train``, ``dense_val``, ``dense_blocks``,
    ``dense_size``, ``correspondence_images`` (= ``knn.k`` ... ``correspondence.images``); any
    other evaluation's section as a dict (``mean_norm={"blocks": 2}``).
    """
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _SECTION_KWARGS:
            section, name = _SECTION_KWARGS[key]
            if value is not None or name in ("train", "val", "blocks", "size"):
                values.setdefault(section, {})[name] = str(value) if isinstance(value, Path) else value
        else:
            values[key] = value
    if isinstance(values.get("dense", {}).get("blocks"), tuple):
        values["dense"]["blocks"] = list(values["dense"]["blocks"])
    return evaluate(run_dir, train, test, out, build_options(option_sections(), values), meta=meta)

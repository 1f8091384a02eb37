"""Command line: ``stratavit {recipes,config,pretrain,evaluate,compare,export,demo,shard}``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from stratavit import __version__
from stratavit.run_folder import RunFolder


def _user_errors() -> tuple[type[BaseException], ...]:
    from stratavit.backbones.export import ExportError
    from stratavit.config import ConfigError
    from stratavit.data.datasets import DataError
    from stratavit.engine.nonfinite import NonFiniteLossError
    from stratavit.evaluation.errors import EvaluationError

    return (ConfigError, DataError, EvaluationError, ExportError, NonFiniteLossError, FileNotFoundError)


_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")


def _quiet_libraries(verbose: bool = False) -> None:
    """Keep the terminal for progress bars and our own messages; with ``verbose``, show the
    libraries' logs once each.

    Lightning sets its loggers to INFO and gives ``lightning`` a console handler of its own *when
    it is imported*, which the CLI does lazily (only the commands that train load it): so this
    runs again once it is loaded (:func:`cmd_pretrain`). Its handlers are removed either way (the
    root handler of :func:`main` shows what passes, once), and quiet, its loggers say only warnings.
    """
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler
                logger.removeHandler(handler)
        logger.propagate = True
        if not verbose:
            logger.setLevel(logging.WARNING)
    if verbose:
        return
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def cmd_recipes(args: argparse.Namespace) -> int:
    from stratavit.recipe import load_recipe_dict, recipe_names

    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        desc = str(load_recipe_dict(name).get("description", "")).strip()
        print(f"{name:<{width}}  {desc}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from stratavit.config import dump_yaml
    from stratavit.recipe import resolve_config

    print(dump_yaml(resolve_config(args.recipe, args.overrides)), end="")
    return 0


def _recipe_given_as_override(recipe: str | None, overrides: Sequence[str]) -> None:
    """``stratavit pretrain dino --out X``: the recipe given without ``--recipe`` is named in one line."""
    from stratavit.config import ConfigError
    from stratavit.recipe import recipe_names

    for text in overrides:
        if "=" not in text and (text in recipe_names() or text.endswith((".yaml", ".yml"))):
            raise ConfigError(f"'{text}' looks like a recipe: name it with --recipe, e.g. stratavit pretrain --recipe {text} "
                              "--data DIR --out RUN" + (f" (this command also has --recipe {recipe})" if recipe else ""))


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train. A SIGINT / SIGTERM stops the run at a step boundary with a checkpoint and raises
    ``TrainingInterrupted``, which :func:`main` reports in one line (exit code 130 / 143)."""
    from stratavit.engine.callbacks.interrupt import launched_as_rank_zero
    from stratavit.engine.train import pretrain  # Lightning and torch: loaded only for this command

    _quiet_libraries(args.verbose)  # again: Lightning's import reset its loggers
    _recipe_given_as_override(args.recipe, args.overrides)
    out = pretrain(args.recipe, args.data, args.out, args.overrides, resume=args.resume,
                   from_previous=args.from_previous, report=lambda line: print(line, flush=True))
    if not launched_as_rank_zero():
        return 0  # the other processes of a multi-process run stay quiet
    run = RunFolder(out)
    print(f"run folder: {run.root}")
    print(f"backbone:   {run.backbone}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stratavit.evaluation.evaluations import EVALUATIONS, option_sections
    from stratavit.evaluation.options import build_options, parse_overrides
    from stratavit.evaluation.run import evaluate
    from stratavit.run_folder import EvalFolder, RunFolder

    flags = {
        "train_limit": args.train_limit, "test_limit": args.test_limit, "batch_size": args.batch_size,
        "img_size": args.img_size, "resize": args.resize, "which": args.which, "baselines": args.baselines,
        "num_workers": args.num_workers, "visuals": not args.no_visuals, "seed": args.seed,
        "linear": {"epochs": args.linear_epochs},
        "dense": {"train": args.dense_train, "val": args.dense_val, "blocks": args.dense_blocks, "size": args.dense_size},
        "correspondence": {"images": args.correspondence},
        "detection": {"train": args.detection_train, "val": args.detection_val},
    }
    options = build_options(option_sections(), parse_overrides(args.overrides, flags))
    results = evaluate(args.run_dir, args.train, args.test, args.out, options)
    out = EvalFolder(Path(args.out) if args.out else RunFolder(Path(args.run_dir)).eval_dir)
    summary: dict[str, float] = {}
    for evaluation in EVALUATIONS:
        summary.update(evaluation.summary(results))
        line = evaluation.settings_line(results)
        if line:
            print(line)
    print(json.dumps({k: round(v, 2) for k, v in summary.items()}))
    print(f"results: {out.results}")
    print(f"report:  {out.report_md}")
    if out.report_html.exists():
        print(f"         {out.report_html} (self-contained, pictures embedded)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from stratavit.evaluation.compare import compare_runs

    result = compare_runs([Path(r) for r in args.run_dirs], Path(args.out), labels=args.labels,
                          eval_subdir=args.eval_subdir)
    for line in result["flags"]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"table: {Path(args.out) / 'compare.md'} ({Path(args.out) / 'compare.csv'})")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from stratavit.ablation.plan import build_plan, route_overrides
    from stratavit.ablation.run import ablate
    from stratavit.evaluation.evaluations import option_sections
    from stratavit.evaluation.options import build_options, parse_overrides

    overrides, eval_overrides = route_overrides(args.eval, args.overrides)
    flags = {"visuals": False, "dense": {"train": args.dense_train, "val": args.dense_val}}
    options = build_options(option_sections(), parse_overrides(eval_overrides, flags))
    plan = build_plan(
        args.recipes, args.seeds, args.data, budget=args.budget, steps=args.steps, overrides=overrides,
        eval_train=args.eval_train, eval_test=args.eval_test, eval_options=options.to_dict(),
    )
    report = ablate(plan, Path(args.out), base=args.base, overwrite=args.overwrite)
    for line in report.headlines:
        print(line)
    print(f"table:  {report.md}")
    print(f"values: {report.csv} (long form), {report.json}")
    if report.png is not None:
        print(f"plot:   {report.png}")
    if report.failed:
        print(f"{len(report.failed)} run(s) failed ({', '.join(report.failed)}); the report lists why. "
              "Re-run the same command to retry them.", file=sys.stderr)
        return 1
    return 0


class _TrailingOverrides(argparse.ArgumentParser):
    """A sub-command parser that takes ``key=value`` overrides after the options too.

    argparse alone binds a ``nargs="*"`` positional right after the first positional, so
    ``evaluate RUN --train A --test B knn.k=10`` would refuse ``knn.k=10``.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        ns, extras = super().parse_known_args(args, namespace)
        trailing = [a for a in extras if "=" in a and not a.startswith("-")]
        ns.overrides = [*(getattr(ns, "overrides", None) or []), *trailing]
        return ns, [a for a in extras if a not in trailing]


def _blocks(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give block numbers like 4,8,12 or -1") from None


def cmd_shard(args: argparse.Namespace) -> int:
    from stratavit.data.shard_writer import write_shards

    summary = write_shards(
        args.src, args.out, shard_size=args.shard_size, seed=args.seed, workers=args.workers, overwrite=args.overwrite
    )
    skipped = summary["skipped"]
    print(
        f"wrote {summary['total']} images ({len(summary['classes'])} classes) in {summary['shards']} shards "
        f"to {summary['out']} in {summary['seconds']:.1f} s"
    )
    if skipped:
        shown = "\n  ".join(skipped[:10]) + ("\n  ..." if len(skipped) > 10 else "")
        print(f"skipped {len(skipped)} unreadable images (all listed in index.json):\n  {shown}")
    print(f"train on them: stratavit pretrain --recipe RECIPE --data {summary['out']} --out RUN_DIR")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stratavit.backbones.export import export_run

    if args.to != "timm":
        from stratavit.backbones.export_vitdet import export_run_vitdet

        path, config = export_run_vitdet(Path(args.run_dir), args.to, Path(args.out) if args.out else None, args.which)
        print(f"wrote {path}\n{config}")
        return 0
    out = Path(args.out) if args.out else Path(args.run_dir) / "backbone.safetensors"
    path = export_run(Path(args.run_dir), out, which=args.which)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stratavit.demo import run_demo
    from stratavit.evaluation.tables import dig

    _quiet_libraries(args.verbose)  # again: importing Lightning reset its loggers
    results = run_demo(Path(args.out), args.overrides, detection=args.detection)
    rand, raw = results["baselines"]["random_init"], results["baselines"]["raw_pixels"]
    print(f"\n{'(last block)':<22}{'pre-trained':>12}{'random init':>13}{'raw pixels':>12}")
    rows = [
        ("kNN top-1 %", results["knn"]["top1"], rand["knn_top1"], raw["knn_top1"]),
        ("linear top-1 %", results["linear"]["top1"], rand["linear_top1"], raw["linear_top1"]),
        ("dense mIoU % (horses)", results["dense"]["miou"], rand["dense"]["miou"], None),
        ("retrieval mIoU %", dig(results, "retrieval", "miou"), dig(rand, "retrieval", "miou"), None),
        ("correspondence %", results["correspondence"]["top1"], rand["correspondence"]["top1"], None),
        ("detection AP %", dig(results, "detection", "ap"), dig(rand, "detection", "ap"), None),
    ]
    rows = [row for row in rows if row[1] is not None]
    for name, *values in rows:
        print(f"{name:<22}" + "".join(f"{v:>12.2f} " if v is not None else f"{'–':>12} " for v in values))
    report = Path(args.out) / "eval"
    print(f"report: {report / 'report.html'} (open in a browser; Markdown: {report / 'report.md'})")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    """The ``evaluate`` sub-command: its flags, and ``key=value`` overrides of the evaluations' options."""
    s = sub.add_parser(
        "evaluate",
        help="per-block kNN and linear probes (CLS and patches), dense probe, correspondence, visual report",
    )
    s.add_argument("run_dir")
    s.add_argument("--train", required=True, help="labelled train set (ImageFolder dir or named set)")
    s.add_argument("--test", required=True, help="labelled test set (ImageFolder dir or named set, e.g. cifar10:test)")
    s.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    s.add_argument("--train-limit", type=int, help="use a fixed random subset of the train set")
    s.add_argument("--test-limit", type=int, help="use a fixed random subset of the test set")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--img-size", type=int, help="evaluation resolution (default: the run's training resolution, "
                   "views.global_size)")
    s.add_argument("--resize", choices=("center_crop", "stretch"), default="center_crop",
                   help="how images of other sizes reach --img-size (default: shorter side + centre crop)")
    s.add_argument("--which", choices=("teacher", "student"), default="teacher")
    s.add_argument("--baselines", action="store_true", help="also evaluate random init and raw pixels")
    s.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    s.add_argument("--linear-epochs", type=int, default=100, help="epochs of each linear probe (default 100; = linear.epochs)")
    s.add_argument("--dense-train", help="images/ + masks/ folder to train the dense probe on (or horses-sample:train)")
    s.add_argument("--dense-val", help="images/ + masks/ folder to report the dense probe's mIoU on (or horses-sample:val)")
    s.add_argument("--dense-blocks", type=_blocks, help="blocks of the dense probe, e.g. 4,8,12 (default: 4 spread)")
    s.add_argument("--dense-size", type=int, help="input size of the dense probe (default: the evaluation's; "
                   "dense.max_images=1000 and dense.steps=400 bound its cost)")
    s.add_argument("--detection-train", help="detection fine-tune data: DIR with annotations.json (COCO) + images/, "
                   "a COCO .json with images/ beside it, or horses-boxes:train")
    s.add_argument("--detection-val", help="detection data scored by COCO box AP (same layouts, or horses-boxes:val); "
                   "detection.steps=300 detection.mode=finetune|frozen bound it")
    s.add_argument("--correspondence", type=int, default=200, metavar="N",
                   help="held-out images for the correspondence score (default 200; 0 skips it)")
    s.add_argument("--no-visuals", action="store_true", help="skip the pictures and report.html")
    s.add_argument("--seed", type=int, default=0, help="seed of subsets, crops and probes")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="evaluation options, e.g. knn.k=10 linear.epochs=50 dense.blocks=[2,4] (override the flags)")
    s.__class__ = _TrailingOverrides  # key=value also after the options
    s.set_defaults(func=cmd_evaluate)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    """The ``ablate`` sub-command: recipes × seeds under one budget, evaluated alike, mean ± 95 % interval."""
    s = sub.add_parser(
        "ablate",
        help="equal-budget comparison: train recipes × seeds, evaluate alike, report mean ± 95 %% interval and verdicts",
    )
    s.add_argument("--recipes", nargs="+", required=True, metavar="RECIPE", help="recipes to compare (names or YAML files)")
    s.add_argument("--data", required=True, help="training data: ImageFolder dir or named set (cifar10, ...)")
    s.add_argument("--out", required=True, help="ablation folder (runs/, ablation.md/.csv/.json/.png, the plan)")
    budget = s.add_mutually_exclusive_group()
    budget.add_argument("--budget", help="equal wall time per run, e.g. 15m, 2h (the config key train.budget)")
    budget.add_argument("--steps", type=int, help="equal optimiser steps per run (train.max_steps)")
    s.add_argument("--seeds", type=int, default=3, help="seeds per recipe: 0..N-1 (default 3)")
    s.add_argument("--base", help="the recipe the others are judged against (default: the last of --recipes)")
    s.add_argument("--eval-train", help="labelled train set of the evaluation (default: --data's named set)")
    s.add_argument("--eval-test", help="labelled test set of the evaluation (default: --data's named test split)")
    s.add_argument("--dense-train", help="images/ + masks/ folder for the dense probe (or horses-sample:train)")
    s.add_argument("--dense-val", help="images/ + masks/ folder the dense probe is scored on (or horses-sample:val)")
    s.add_argument("--eval", nargs="+", action="extend", default=[], metavar="key=value",
                   help="evaluation options for every run, e.g. --eval knn.k=20 linear.epochs=50 train_limit=5000 "
                        "(training keys after it, backbone.* data.* train.* ..., still go to training)")
    s.add_argument("--overwrite", action="store_true", help="start the ablation in --out over (deletes its runs)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run, e.g. data.batch_size=128")
    s.__class__ = _TrailingOverrides  # key=value also after the options
    s.set_defaults(func=cmd_ablate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stratavit", description="Multi-level self-supervised pre-training of ViTs.")
    p.add_argument("--version", action="version", version=f"stratavit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("recipes", help="list recipes with one-line descriptions")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("config", help="print the resolved config of a recipe with overrides")
    s.add_argument("--recipe", required=True)
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("pretrain", help="pre-train a backbone")
    s.add_argument("--recipe", help="recipe name or YAML file (optional when continuing a run)")
    s.add_argument("--data", help="ImageFolder directory, or cifar10 / cifar100 / stl10 (downloaded)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.ckpt (required to exist)")
    s.add_argument("--from-previous", action="store_true",
                   help="continue from RUN_DIR/checkpoints/previous.ckpt, the checkpoint before last.ckpt (when that is damaged)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=2")
    s.set_defaults(func=cmd_pretrain)

    _add_evaluate(sub)
    _add_ablate(sub)

    s = sub.add_parser("compare", help="one table and overlaid plots across evaluated runs")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--out", required=True, help="folder for compare.md, compare.csv and the plots")
    s.add_argument("--labels", nargs="+", help="one label per run (default: recipe names)")
    s.add_argument("--eval-subdir", default="eval", help="evaluation folder inside each run (default eval)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("shard", help="write an ImageFolder as tar shards (WebDataset layout) to stream for pretrain")
    s.add_argument("src", help="ImageFolder directory (root/<class>/<image>) or cifar10-sample")
    s.add_argument("--out", required=True, help="shard folder (shard-000000.tar, ..., index.json)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    s.add_argument("--workers", type=int, help="processes that read and check the images (default: up to 8 cores)")
    s.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("export", help="write the backbone for timm (safetensors) or ViTDet (Detectron2 / MMDetection)")
    s.add_argument("run_dir")
    s.add_argument("--to", default="timm", choices=("timm", "detectron2", "mmdet"),
                   help="timm: safetensors a plain timm model loads (default); detectron2 / mmdet: ViTDet's ViT "
                        "key layout (.pth), and the config lines to paste are printed")
    s.add_argument("--out", help="output file (default RUN_DIR/backbone.safetensors, RUN_DIR/backbone_<to>.pth)")
    s.add_argument("--which", choices=("teacher", "student"), default="teacher")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="pre-train on the shipped CIFAR-10 sample, evaluate, write a report (~6.5 min on 2 cores)")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--detection", action="store_true",
                   help="also the detection transfer on the horse boxes (frozen backbone, 100 steps; a few more minutes)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the demo run")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from stratavit.engine.callbacks.interrupt import TrainingInterrupted, launched_as_rank_zero  # no Lightning in it

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"stratavit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:  # SIGINT / SIGTERM stopped training at a step, with a checkpoint
        if launched_as_rank_zero():
            again = f"stratavit demo --out {args.out}" if args.command == "demo" else None
            print(f"\n{stop.message(again)}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # outside training (which stops on a signal by itself): while loading, exporting, ...
        print(f"\nstratavit {args.command}: interrupted; run the same command again "
              "(a run folder with a checkpoint continues from it)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

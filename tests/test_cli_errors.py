"""Every bad input a user can give the CLI, walked command by command, as the user types it.

Each case asserts what the house promises: exit code 2, exactly one line on stderr that says what is
wrong (and, where there is one, what to do), and no Python traceback. The cases fail before any
training or evaluation starts, so the whole walk takes seconds.
"""

from __future__ import annotations


import pytest

from conftest import TINY
from stratavit.cli import main

# {C}: CIFAR-10 train JPEGs (32 px), {T}: CIFAR-10 test, {RUN}: a tiny trained run, {H}: horses
# dense layout, {tmp}: a fresh folder. "…" in an expectation: only the text around it is checked.
CASES: list[tuple[str, list[str], str]] = [
    # pretrain: recipe and data
    ("no recipe", ["pretrain", "--out", "{tmp}/x"], "choose a recipe with --recipe"),
    ("recipe without --recipe", ["pretrain", "--out", "{tmp}/x", "dino"], "'dino' looks like a recipe: name it with --recipe, e.g. stratavit pretrain --recipe dino"),
    ("unknown recipe", ["pretrain", "--recipe", "nope", "--out", "{tmp}/x"], "unknown recipe 'nope'. Available: cl-edi"),
    ("missing recipe file", ["pretrain", "--recipe", "{tmp}/nope.yaml", "--out", "{tmp}/x"], "no such recipe file"),
    ("no data", ["pretrain", "--recipe", "dino", "--out", "{tmp}/x"], "no training data: pass --data DIR"),
    ("data folder missing", ["pretrain", "--recipe", "dino", "--data", "{tmp}/none", "--out", "{tmp}/x"], "data folder {tmp}/none does not exist"),
    ("data folder empty", ["pretrain", "--recipe", "dino", "--data", "{tmp}/empty", "--out", "{tmp}/x"], "no images found in {tmp}/empty"),
    ("data is a file", ["pretrain", "--recipe", "dino", "--data", "{tmp}/file.txt", "--out", "{tmp}/x"], "is not a directory"),
    # pretrain: config
    ("unknown key", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "foo.bar=1"], "unknown config key 'foo'"),
    ("typo'd key", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "train.max_step=3"], "Did you mean 'max_steps'"),
    ("wrong type", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "train.max_steps=abc"], "train.max_steps: expected int"),
    ("not key=value", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "noequals"], "must look like key=value"),
    ("batch 0", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "data.batch_size=0"], "data.batch_size must be >= 1"),
    ("negative lr", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "optim.base_lr=-1"], "optim.base_lr must be > 0"),
    ("limit 0", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "data.limit=0"], "data.limit must be >= 1"),
    ("no global crop", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "views.global_crops=0"], "views.global_crops must be >= 1"),
    ("scale reversed", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "views.global_scale=[0.9,0.1]"], "0 < min <= max <= 1"),
    ("local above global", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "views.global_size=8"], "views.local_size=96 is larger than views.global_size=8"),
    ("crop below a patch", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "views.global_size=8", "views.local_size=8"], "patch"),
    ("images smaller than crops", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "train.preset=none"], "smaller than views.global_size=224"),
    ("preset on unreadable sizes", ["pretrain", "--recipe", "dino", "--data", "{tmp}", "--out", "{tmp}/x", "train.preset=small"], "train.preset=small"),
    ("bad preset", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", "train.preset=tiny"], "train.preset"),
    ("unknown arch", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", *TINY, "backbone.arch=vit_nonsense"], "cannot be built as a ViT"),
    ("heads do not divide width", ["pretrain", "--recipe", "dino", "--data", "{C}", "--out", "{tmp}/x", *TINY, "backbone.embed_dim=30", "backbone.num_heads=4"], "multiple of backbone.num_heads"),
    ("bad enum", ["config", "--recipe", "mcvt", "objectives.protonce.proto_scale=half"], "proto_scale"),
    # pretrain: continuing
    ("--resume with nothing", ["pretrain", "--out", "{tmp}/none", "--resume"], "no checkpoint at"),
    ("recipe changed on continue", ["pretrain", "--recipe", "mocov3", "--out", "{RUN}"], "mocov3"),
    # evaluate
    ("not a run", ["evaluate", "{tmp}/none", "--train", "{C}", "--test", "{T}"], "is not a stratavit run folder"),
    ("eval data missing", ["evaluate", "{RUN}", "--train", "{tmp}/none", "--test", "{T}"], "data folder {tmp}/none does not exist"),
    ("eval size not a patch multiple", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "--img-size", "30"], "not a multiple of the patch size"),
    ("eval batch 0", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "--batch-size", "0"], "batch_size=0 must be >= 1"),
    ("eval limit 0", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "--train-limit", "0"], "train_limit=0 must be >= 1"),
    ("knn k 0", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "knn.k=0"], "knn.k=0 must be >= 1"),
    ("linear epochs 0", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "linear.epochs=0"], "linear.epochs=0 must be >= 1"),
    ("unknown eval option", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "knn.kk=3"], "Did you mean 'k'"),
    ("dense half given", ["evaluate", "{RUN}", "--train", "{C}", "--test", "{T}", "--dense-train", "{H}/train"], "needs both --dense-train and --dense-val"),
    # compare
    ("compare a non-run", ["compare", "{tmp}/none", "--out", "{tmp}/cmp"], "is not a stratavit run folder"),
    ("compare unevaluated", ["compare", "{RUN}", "--out", "{tmp}/cmp"], "has no evaluation"),
    ("compare twice the same", ["compare", "{RUN}", "{RUN}", "--out", "{tmp}/cmp"], "run folder given twice"),
    # export
    ("export a non-run", ["export", "{tmp}/none"], "is it a stratavit run folder?"),
    ("export onto a folder", ["export", "{RUN}", "--out", "{tmp}"], "is a folder; give a file name"),
    ("export under a file", ["export", "{RUN}", "--out", "{tmp}/file.txt/b.safetensors"], "cannot create the folder"),
    # shard
    ("shard a missing folder", ["shard", "{tmp}/none", "--out", "{tmp}/sh"], "does not exist"),
    ("shard an empty folder", ["shard", "{tmp}/empty", "--out", "{tmp}/sh"], "no images found"),
    ("shard size 0", ["shard", "{C}", "--out", "{tmp}/sh", "--shard-size", "0"], "give at least 1 sample per shard"),
    # config
    ("config typo", ["config", "--recipe", "dino", "foo=1"], "unknown config key 'foo'"),
    ("config section without value", ["config", "--recipe", "dino", "views"], "must look like key=value"),
]


# small_cifar and tiny_run (a 1-step dino run of the TINY backbone) are fixtures of conftest.py.


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(name, argv, expected, tmp_path, small_cifar, horses_dir, tiny_run, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not images")
    fill = {"{C}": str(small_cifar), "{T}": str(small_cifar), "{RUN}": str(tiny_run), "{H}": str(horses_dir), "{tmp}": str(tmp_path)}

    def sub(s: str) -> str:
        for k, v in fill.items():
            s = s.replace(k, v)
        return s

    capsys.readouterr()
    code = main([sub(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, (name, err)
    assert lines[0].startswith(f"stratavit {argv[0]}: error: ")
    assert sub(expected) in lines[0], (name, lines[0])
    assert not (tmp_path / "x").exists(), "a failed start left a run folder behind"

from __future__ import annotations

import pytest

from stratavit.config import ConfigError, dump_yaml
from stratavit.objectives import DINOConfig, InfoNCEConfig
from stratavit.recipe import load_config_file, recipe_names, resolve_config


def test_recipes_exist():
    assert {"mocov3", "dino"} <= set(recipe_names())


def test_overrides_are_typed_and_applied():
    cfg = resolve_config(
        "mocov3",
        ["train.epochs=2", "backbone.depth=4", "data.batch_size=64", "train.max_steps=20", "data.limit=5000",
         "optim.base_lr=1e-3", "views.global_scale=[0.2, 1]", "objectives.infonce.temperature=0.1"],
    )
    assert cfg.train.epochs == 2 and cfg.backbone.depth == 4 and cfg.data.batch_size == 64
    assert cfg.train.max_steps == 20 and cfg.data.limit == 5000
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.views.global_scale == (0.2, 1.0)
    assert isinstance(cfg.objectives["infonce"], InfoNCEConfig)
    assert cfg.objectives["infonce"].temperature == pytest.approx(0.1)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=2", ["train.epoch", "epochs"]),
        ("trian.epochs=2", ["trian", "train"]),
        ("train.epochs=two", ["train.epochs", "integer"]),
        ("train.epochs=1.5", ["train.epochs", "integer"]),
        ("data.batch_size=true", ["data.batch_size", "integer"]),
        ("backbone.pos_embed=rope", ["backbone.pos_embed", "learned", "sincos"]),
        ("views.global_scale=[0.1]", ["views.global_scale", "2 values"]),
        ("objectives.dnio.out_dim=10", ["objectives.dnio", "dino"]),
        ("objectives.infonce.temprature=0.3", ["temprature", "temperature"]),
        ("train.epochs.x=1", ["train.epochs", "not a section"]),
        ("noequals", ["key=value"]),
        ("views.global_scale=[0.5, 0.2]", ["views.global_scale", "min <= max"]),
        ("train.epochs=0", ["train.epochs", ">= 1"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        resolve_config("mocov3", [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match="mocov3"):
        resolve_config("mocov", [])


def test_adding_an_objective_by_override_composes():
    cfg = resolve_config("mocov3", ["objectives.dino.out_dim=1024"])
    assert set(cfg.objectives) == {"infonce", "dino"}
    assert isinstance(cfg.objectives["dino"], DINOConfig) and cfg.objectives["dino"].out_dim == 1024


def test_yaml_round_trip(tmp_path):
    cfg = resolve_config("dino", ["backbone.depth=3", "objectives.dino.out_dim=512"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config_file(path) == cfg


def test_unknown_key_in_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("objectives:\n  infonce: {}\ntrain:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="train.epocs"):
        resolve_config(str(path), [])


def test_missing_recipe_file_and_bad_yaml_are_one_line_errors(tmp_path, capsys):
    from stratavit.cli import main

    assert main(["config", "--recipe", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such recipe file" in err and "unknown recipe" not in err and "\n" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectives:\n  dino: {out_dim: 8\nviews: [\n")
    assert main(["config", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not valid YAML at line" in err and "Traceback" not in err and "\n" not in err

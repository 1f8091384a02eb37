from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from stratavit.data.datasets import (
    DataError,
    ImageFolderDataset,
    bad_files,
    build_dataset,
    dataset_targets,
)


def _img(path: Path, color=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def test_class_folders_and_flat_folders(tmp_path):
    for cls in ("b", "a"):
        for i in range(3):
            _img(tmp_path / "cls" / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path / "cls")
    assert ds.classes == ["a", "b"] and len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    for i in range(4):
        _img(tmp_path / "flat" / f"{i}.jpg")
    flat = ImageFolderDataset(tmp_path / "flat")
    assert len(flat) == 4 and set(flat.targets) == {0}


def test_clear_errors_for_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        build_dataset(str(tmp_path / "empty"))


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    _img(tmp_path / "d" / "x" / "0.png", (1, 2, 3))
    (tmp_path / "d" / "x" / "1.png").write_bytes(b"not an image at all")
    _img(tmp_path / "d" / "x" / "2.png", (7, 8, 9))
    ds = ImageFolderDataset(tmp_path / "d")
    img, label = ds[1]  # unreadable -> next readable image
    assert img.getpixel((0, 0)) == (7, 8, 9) and label == 0
    assert bad_files(ds) == [str(tmp_path / "d" / "x" / "1.png")]


def test_limit_is_a_fixed_subset(cifar_train):
    a = build_dataset(str(cifar_train), limit=50, seed=1)
    b = build_dataset(str(cifar_train), limit=50, seed=1)
    c = build_dataset(str(cifar_train), limit=50, seed=2)
    assert len(a) == 50 and a.indices == b.indices and a.indices != c.indices
    assert dataset_targets(a) is not None and len(set(dataset_targets(a))) > 1


def test_shipped_sample_unpacks(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATAVIT_CACHE", str(tmp_path))
    train = build_dataset("cifar10-sample:train")
    test = build_dataset("cifar10-sample:test")
    assert len(train) == 10000 and len(test) == 2000
    img, label = test[0]
    assert img.size == (32, 32) and 0 <= label < 10


def _sized(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (50, 60, 70)).save(path)


def test_images_smaller_than_the_crop_fail_before_training_unless_allowed(tmp_path):
    from stratavit.data.datasets import check_image_sizes, image_sizes
    from stratavit.engine.train import build_train_loader
    from stratavit.recipe import resolve_config

    for i in range(6):
        _sized(tmp_path / "data" / "a" / f"{i}.png", (40, 30))
    _sized(tmp_path / "data" / "a" / "big.png", (300, 200))
    ds = build_dataset(str(tmp_path / "data"))
    assert sorted(image_sizes(ds)) == [(40, 30)] * 6 + [(300, 200)]  # headers only
    check_image_sizes(ds, 24, "data", allow_upsampling=False)  # crops within the images: fine
    with pytest.raises(DataError, match=r"6 of 7 sampled images .* smaller than views.global_size=32 \(e.g. 40x30\).*"
                                        r"views.global_size=30.*data.allow_upsampling=true"):
        check_image_sizes(ds, 32, "data", allow_upsampling=False)
    check_image_sizes(ds, 32, "data", allow_upsampling=True)
    cfg = resolve_config("mocov3", [f"data.path={tmp_path / 'data'}", "views.global_size=64", "backbone.patch_size=16",
                                    "data.batch_size=2"])
    with pytest.raises(DataError, match="smaller than views.global_size=64"):  # what pretrain calls first
        build_train_loader(cfg, patch_size=16)


def _suggested(err: DataError) -> list[str]:
    """The ``key=value`` overrides a size error suggests (``e.g. views.global_size=G [views.local_size=L]``)."""
    import re

    m = re.search(r"e\.g\. (views\.global_size=\d+(?: views\.local_size=\d+)?)", str(err))
    assert m, str(err)
    return m.group(1).split()


def _folder(tmp_path: Path, size: tuple[int, int], n: int = 3) -> Path:
    for i in range(n):
        _sized(tmp_path / "data" / "a" / f"{i}.png", size)
    return tmp_path / "data"


@pytest.mark.parametrize(
    "recipe, size, expect",
    [
        ("dino", (150, 148), ["views.global_size=144", "views.local_size=48"]),  # was 148: not a multiple of 16
        ("mcl", (100, 130), ["views.global_size=96", "views.local_size=96"]),  # equal sizes stay equal
        ("mocov3", (40, 33), ["views.global_size=32"]),  # no local crops: no local suggestion
        ("local-global", (120, 90), ["views.global_size=80", "views.local_size=32"]),  # views.resize=256
    ],
)
def test_the_suggested_view_sizes_pass_the_next_checks(tmp_path, recipe, size, expect):
    from stratavit.engine.train import build_train_loader
    from stratavit.recipe import resolve_config

    data = _folder(tmp_path, size)
    base = [f"data.path={data}", "backbone.patch_size=16", "data.batch_size=2", "data.num_workers=0"]
    cfg = resolve_config(recipe, base)
    with pytest.raises(DataError, match="smaller than views.global_size=224") as err:
        build_train_loader(cfg, patch_size=16)  # MultiCropTransform, then check_image_sizes
    assert _suggested(err.value) == expect
    assert ("views.resize=256 is set" in str(err.value)) == (recipe == "local-global")
    assert "multiples of backbone.patch_size=16" in str(err.value)
    fixed = resolve_config(recipe, base + expect)
    build_train_loader(fixed, patch_size=16)  # the suggestion passes every check the loader makes


def test_images_smaller_than_one_patch_say_so_and_suggest_upsampling(tmp_path):
    from stratavit.engine.train import build_train_loader
    from stratavit.recipe import resolve_config

    data = _folder(tmp_path, (12, 10))
    base = [f"data.path={data}", "backbone.patch_size=16", "data.batch_size=2", "data.num_workers=0"]
    with pytest.raises(DataError, match=r"smaller than one patch \(backbone.patch_size=16\).*data.allow_upsampling=true") as err:
        build_train_loader(resolve_config("dino", base), patch_size=16)
    assert "e.g. views.global_size" not in str(err.value)
    build_train_loader(resolve_config("dino", base + ["data.allow_upsampling=true"]), patch_size=16)


def test_suggest_view_sizes():
    from stratavit.data.datasets import suggest_view_sizes

    assert suggest_view_sizes(148, 224, 16, 96) == (144, 48)
    assert suggest_view_sizes(148, 224, 1, None) == (148, None)
    assert suggest_view_sizes(40, 224, 16, 96) == (32, 16)  # at least one patch
    assert suggest_view_sizes(20, 224, 16, 224) == (16, 16)
    assert suggest_view_sizes(15, 224, 16, 96) is None

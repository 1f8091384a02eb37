"""Tar shards: write -> read back exactly; split across ranks x workers; epochs; corruption; CLI; pretrain."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from torch.utils.data import DataLoader

from stratavit.data.datasets import DataError, ImageFolderDataset, build_dataset
from stratavit.data.shard_format import INDEX, is_shard_dir, read_index
from stratavit.data.shard_writer import write_shards
from stratavit.data.shards import ShardDataset, ShardMapDataset
from stratavit.engine.train import build_train_loader
from stratavit.recipe import resolve_config

PER_CLASS = 10  # 10 classes -> 100 images


def _pixels(img: Image.Image) -> str:
    return hashlib.sha1(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


def _first_indices(batch: list) -> list:
    return [int(item[2]) for item in batch]


def _indices(ds: ShardDataset, workers: int, batch_size: int = 1, **kw) -> list[list[int]]:
    """The batches (lists of global indices) a real DataLoader yields from ``ds``."""
    dl = DataLoader(ds, batch_size=batch_size, drop_last=True, num_workers=workers, collate_fn=_first_indices, **kw)
    return list(dl)


@pytest.fixture(scope="module")
def small_src(cifar_train: Path, tmp_path_factory) -> Path:
    """10 real CIFAR-10 JPEGs per class in root/<class>/ (100 images)."""
    root = tmp_path_factory.mktemp("src")
    for cls in sorted(p.name for p in cifar_train.iterdir() if p.is_dir()):
        (root / cls).mkdir()
        for f in sorted((cifar_train / cls).iterdir())[:PER_CLASS]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def shards(small_src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    summary = write_shards(small_src, out, shard_size=7, seed=0, workers=0, progress=False)
    assert summary["total"] == 100 and summary["shards"] == 15 and summary["skipped"] == []
    return out


def test_round_trip_bytes_labels_and_pixels(small_src, shards):
    src = ImageFolderDataset(small_src)
    by_bytes = {Path(p).read_bytes(): label for p, label in src.samples}
    assert len(by_bytes) == 100
    meta = json.loads((shards / INDEX).read_text())
    assert meta["total"] == 100 and meta["classes"] == src.classes
    assert [s["count"] for s in meta["shards"]] == [7] * 14 + [2]
    assert [s["name"] for s in meta["shards"]] == [f"shard-{i:06d}.tar" for i in range(15)]

    stored: list[tuple[bytes, int]] = []
    for s in meta["shards"]:
        with tarfile.open(shards / s["name"]) as tar:
            names = tar.getnames()
            assert len(names) == 2 * s["count"]
            for jpg in (n for n in names if n.endswith(".jpg")):
                key = jpg[: -len(".jpg")]
                assert int(key) == len(stored)  # KEY is the global index
                data = tar.extractfile(jpg).read()
                stored.append((data, int(tar.extractfile(key + ".cls").read().decode("ascii"))))
    assert Counter(stored) == Counter(by_bytes.items())  # every original file, byte for byte, right label
    first_shard_labels = {label for _, label in stored[:7]}
    assert len(first_shard_labels) > 1  # shuffled across shards, not one class folder per shard

    # Streaming (no shuffle) and random access give back the same pixels and labels, by global index.
    by_pixels = {_pixels(Image.open(io.BytesIO(b))): label for b, label in by_bytes.items()}
    streamed = list(ShardDataset(shards, shuffle=False, with_index=True))
    assert [i for _, _, i in streamed] == list(range(100))
    assert Counter((_pixels(img), label) for img, label, _ in streamed) == Counter(by_pixels.items())
    mapped = ShardMapDataset(shards)
    assert len(mapped) == 100 and mapped.classes == src.classes
    for i in (0, 6, 7, 50, 99):
        img, label = mapped[i]
        assert (_pixels(img), label) == (_pixels(streamed[i][0]), streamed[i][1])
        assert _pixels(img) == _pixels(Image.open(io.BytesIO(stored[i][0]))) and label == stored[i][1]


def test_writer_is_deterministic_and_seeded(small_src, shards, tmp_path):
    again = write_shards(small_src, tmp_path / "a", shard_size=7, seed=0, workers=2, progress=False)
    assert again["total"] == 100
    for i in range(15):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (shards / name).read_bytes()
    write_shards(small_src, tmp_path / "b", shard_size=7, seed=1, workers=0, progress=False)
    assert (tmp_path / "b" / "shard-000000.tar").read_bytes() != (shards / "shard-000000.tar").read_bytes()


def test_every_sample_once_across_two_ranks_and_two_workers(shards):
    # 100 samples, 2 ranks -> 50 each; 2 workers each -> 25 (pieces cut inside shards of 7).
    seen: list[int] = []
    for rank in range(2):
        ds = ShardDataset(shards, rank=rank, world_size=2, with_index=True)
        ds.set_epoch(3)
        got = [i for b in _indices(ds, workers=2) for i in b]
        assert len(got) == len(ds) == 50
        seen += got
    assert sorted(seen) == list(range(100))  # no duplicates, nothing missed

    # With batch_size every worker's part is whole batches: every rank yields len(ds) // B full
    # batches (what DDP needs), 100 // 2 = 50 -> 6 batches of 8 per rank, 4 samples unread.
    seen = []
    for rank in range(2):
        ds = ShardDataset(shards, rank=rank, world_size=2, batch_size=8, with_index=True)
        batches = _indices(ds, workers=2, batch_size=8)
        assert len(ds) == 48 and len(batches) == 6 == len(DataLoader(ds, batch_size=8, drop_last=True))
        assert all(len(b) == 8 for b in batches)
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 96

    # Three ranks: 100 // 3 = 33 each, exactly one sample (the epoch's last) unread.
    plans = [ShardDataset(shards, rank=r, world_size=3).worker_plan(0, r, 3, w, 2) for r in range(3) for w in range(2)]
    index = read_index(shards)
    covered = [index.offsets[s] + p for plan in plans for s, a, b in plan for p in range(a, b)]
    assert len(covered) == len(set(covered)) == 99


def test_fewer_shards_than_ranks_times_workers(small_src, tmp_path):
    write_shards(small_src, tmp_path / "big", shard_size=60, workers=0, progress=False)  # 2 shards: 60 + 40
    seen = []
    for rank in range(2):
        ds = ShardDataset(tmp_path / "big", rank=rank, world_size=2, with_index=True, shuffle_buffer=10)
        seen += [i for b in _indices(ds, workers=2) for i in b]
    assert sorted(seen) == list(range(100))


def test_epochs_reshuffle_seeded_and_reach_persistent_workers(shards):
    def order(seed: int, epoch: int) -> list[int]:
        ds = ShardDataset(shards, seed=seed, with_index=True)
        ds.set_epoch(epoch)
        return [i for _, _, i in ds]

    e0, e1 = order(0, 0), order(0, 1)
    assert sorted(e0) == sorted(e1) == list(range(100))
    assert e0 != e1 and e0 == order(0, 0) and order(1, 0) != e0

    ds = ShardDataset(shards, with_index=True)
    dl = DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True, collate_fn=_first_indices)
    first = [i for b in dl for i in b]
    ds.set_epoch(1)  # the workers hold copies made at epoch 0: the epoch reaches them through shared memory
    second = [i for b in dl for i in b]
    fresh = ShardDataset(shards, with_index=True)
    fresh.set_epoch(1)
    assert first != second and second == [i for b in _indices(fresh, workers=2, batch_size=5) for i in b]


def test_views_are_seeded_per_sample(shards):
    """A sample's random transform is the same whatever the number of workers (sample_seed)."""

    def draws(workers: int) -> dict[int, float]:
        ds = ShardDataset(shards, lambda img: float(torch.rand(())), with_index=True)
        dl = DataLoader(ds, batch_size=None, num_workers=workers)
        return {int(i): x for x, _, i in dl}

    a, b = draws(0), draws(2)
    assert a == b and len(set(a.values())) == 100


def test_resume_skips_the_batches_already_trained(shards):
    def batches(resume: tuple[int, int] | None) -> list[list[int]]:
        ds = ShardDataset(shards, batch_size=4, with_index=True)
        ds.set_epoch(1)
        if resume:
            ds.resume(*resume)
        return _indices(ds, workers=2, batch_size=4)

    full = batches(None)
    assert len(full) == 25
    assert batches((1, 3)) == full[3:]  # workers 0, 1, 0 had given the first three
    assert batches((0, 25 + 4)) == full[4:]  # past the end of epoch 0: carries into epoch 1


def _rewrite_member(shard: Path, name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, blob in members:
            blob = data if m.name == name else blob
            m.size = len(blob)
            tar.addfile(m, io.BytesIO(blob))


def test_corrupt_samples_are_skipped_counted_and_logged(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    _rewrite_member(bad / "shard-000002.tar", "00000016.jpg", b"not a jpeg")
    ds = ShardDataset(bad, with_index=True)
    ds.skip_log = tmp_path / "skipped.txt"
    got = [i for _, _, i in ds]
    assert len(got) == 100  # the count holds: the bad sample is replaced by another one
    assert 16 not in got and len(set(got)) == 99
    assert ds.bad_files == ["shard-000002.tar:00000016"]
    assert (tmp_path / "skipped.txt").read_text() == "shard-000002.tar:00000016\n"
    mapped = ShardMapDataset(bad)
    assert _pixels(mapped[16][0]) == _pixels(mapped[17][0]) and mapped.bad_files == ["shard-000002.tar:#2"]

    # A truncated shard: its missing samples are counted and replaced too.
    blob = (bad / "shard-000005.tar").read_bytes()
    (bad / "shard-000005.tar").write_bytes(blob[: len(blob) // 2])
    ds = ShardDataset(bad, with_index=True)
    got = [i for _, _, i in ds]
    assert len(got) == 100 and set(range(35, 42)) - set(got)
    assert len(ds.bad_files) == 100 - len(set(got))  # exactly the samples that did not come back


def test_writer_skips_unreadable_images(small_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_src, src)
    (src / "cat" / "garbage.jpg").write_bytes(b"\xff\xd8 not really")
    good = next((src / "dog").iterdir()).read_bytes()
    (src / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (5, 4), (1, 2, 3)).save(src / "cat" / "tiny.png")
    summary = write_shards(src, tmp_path / "out", shard_size=50, workers=0, progress=False)
    assert summary["total"] == 101 and sorted(Path(p).name for p in summary["skipped"]) == ["garbage.jpg", "truncated.jpg"]
    assert len(read_index(tmp_path / "out").skipped) == 2
    names = []
    for shard in sorted((tmp_path / "out").glob("*.tar")):  # 50 + 50 + 1
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    assert sum(n.endswith(".png") for n in names) == 1 and sum(n.endswith(".jpg") for n in names) == 100


def test_tars_from_other_writers_long_names_and_pax(small_src, tmp_path):
    """Shards made by hand (pax headers, names over 100 characters) read the same (tarfile takes over)."""
    src = ImageFolderDataset(small_src)
    root = tmp_path / "hand"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (path, label) in enumerate(src.samples[:6]):
            # k0, k1: plain headers; 2, 3: ustar prefix field; 4, 5: pax headers (tarfile takes over)
            key = f"k{i}" if i < 2 else f"{'deep/' * 25}{i:03d}" if i < 4 else f"{'x' * 110}{i}"
            tar.format = tarfile.USTAR_FORMAT if i < 4 else tarfile.PAX_FORMAT
            for ext, data in (("jpg", Path(path).read_bytes()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = {"format": "stratavit-shards", "version": 1, "total": 6, "classes": src.classes,
             "shards": [{"name": "a.tar", "count": 6}]}
    (root / INDEX).write_text(json.dumps(index))
    want = [(_pixels(Image.open(p)), label) for p, label in src.samples[:6]]
    streamed = [(_pixels(img), label) for img, label in ShardDataset(root, shuffle=False)]
    mapped = [(_pixels(img), label) for img, label in (ShardMapDataset(root)[i] for i in range(6))]
    assert streamed == mapped == want
    part = list(ShardDataset(root, shuffle=False, rank=1, world_size=2, with_index=True))
    assert [i for _, _, i in part] == [3, 4, 5] and [(_pixels(x), y) for x, y, _ in part] == want[3:]


def test_bad_inputs_give_clear_errors(small_src, shards, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no shards in"):
        ShardDataset(tmp_path / "empty")
    no_index = tmp_path / "no_index"
    shutil.copytree(shards, no_index)
    (no_index / INDEX).unlink()
    assert is_shard_dir(no_index) and not is_shard_dir(small_src)
    stray = tmp_path / "folder_with_tar"
    (stray / "cls").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(stray / "cls" / "a.png")
    (stray / "old.tar").write_bytes(b"")
    (stray / INDEX).write_text("{}")
    assert not is_shard_dir(stray) and len(build_dataset(str(stray))) == 1  # still an ImageFolder
    with pytest.raises(DataError, match="no index.json"):
        ShardDataset(no_index)
    with pytest.raises(DataError, match="no index.json"):
        build_dataset(str(no_index))  # not mistaken for an ImageFolder ("no images found")
    (no_index / INDEX).write_text("{not json")
    with pytest.raises(DataError, match="not a valid"):
        ShardDataset(no_index)
    broken = json.loads((shards / INDEX).read_text())
    broken["shards"].append({"name": "shard-999999.tar", "count": 1})
    broken["total"] += 1
    (no_index / INDEX).write_text(json.dumps(broken))
    with pytest.raises(DataError, match="missing"):
        ShardDataset(no_index)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(small_src, shards, progress=False)
    with pytest.raises(DataError, match="other files than shards"):
        write_shards(small_src, stray, progress=False)
    with pytest.raises(DataError, match="already a shard folder"):
        write_shards(shards, tmp_path / "x", progress=False)
    with pytest.raises(DataError, match="ImageFolder"):
        write_shards("cifar10", tmp_path / "x", progress=False)  # no download attempted
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(shards, rank=2, world_size=2)
    cfg = resolve_config("mocov3", [*TINY, f"data.path={shards}", "data.batch_size=64", "train.devices=2"])
    with pytest.raises(DataError, match="50 per process"):
        build_train_loader(cfg, 4)


def test_overwrite_replaces_and_removes_stale_shards(small_src, tmp_path):
    out = tmp_path / "o"
    write_shards(small_src, out, shard_size=10, workers=0, progress=False)
    summary = write_shards(small_src, out, shard_size=40, workers=0, progress=False, overwrite=True)
    assert summary["shards"] == 3 and sorted(p.name for p in out.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(3)]


def test_training_loader_and_build_dataset_on_shards(shards):
    cfg = resolve_config("mocov3", [*TINY, f"data.path={shards}", "data.limit=40", "data.batch_size=8"])
    loader = build_train_loader(cfg, 4)
    assert isinstance(loader.dataset, ShardDataset) and len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    idx = torch.cat([b.indices for b in batches]).tolist()
    assert sorted(idx) == list(range(40))  # data.limit: the first 40 global indices
    mapped = build_dataset(str(shards), limit=40)  # the E-step / evaluation view: same indices, same labels
    assert isinstance(mapped, ShardMapDataset) and len(mapped) == 40
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert all(mapped[i][1] == y for i, y in zip(idx, labels))
    g = batches[0].global_views[0]
    assert g.images.shape == (8, 3, 32, 32) and g.boxes.shape == (8, 4)

    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 4)  # what Lightning does before every epoch
    assert loader.dataset.epoch == 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stratavit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stratavit.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_shard_then_pretrain_on_the_shards(small_src, tmp_path):
    out = tmp_path / "sh"
    res = _cli("shard", str(small_src), "--out", str(out), "--shard-size", "30", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "wrote 100 images (10 classes) in 4 shards" in res.stdout
    assert read_index(out).counts == (30, 30, 30, 10)
    res = _cli("shard", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "does not exist" in res.stderr

    from stratavit import pretrain

    run = pretrain("mocov3", data=str(out), out=tmp_path / "run", overrides=[*TINY, "train.max_steps=2"])
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == 2 and summary["skipped_images"] == 0
    assert (run / "backbone.safetensors").exists()

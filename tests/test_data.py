"""adcore.data: the embedded textures and digits benchmarks, the MVTec-family loaders, and their errors.

Real-benchmark tests build tiny 16×16 trees in each published layout under tmp_path (MVTec AD's with
``make_fake_mvtec``, which is tested here too); nothing is downloaded.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adcore.data import (AnomalyDataset, DataError, defects, digits, list_categories, load_dataset, make_fake_mvtec,
                         make_fake_weights, mvtec, textures)

# ---------------------------------------------------------------- helpers


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(seed: int, size: int = 16, grey: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size) if grey else (size, size, 3), dtype=np.uint8)


def _mask(size: int = 16, value: int = 255) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[4:12, 4:12] = value
    return m


def _mvtec_tree(root: Path) -> Path:
    """A fake MVTec AD of bottle (RGB) and screw (grey) at 16 px: 3 train, 2 good and 2 defective test images each.
    Its second mask of each is rewritten with value 128: any non-zero value must still binarise to 1."""
    make_fake_mvtec(root, ("bottle", "screw"), image_size=16, n_train=3, n_test=2)
    for category in ("bottle", "screw"):
        mask_path = root / category / "ground_truth" / mvtec.DEFECT_TYPES[category][0] / "001_mask.png"
        _png(mask_path, np.where(np.asarray(Image.open(mask_path)) > 0, 128, 0).astype(np.uint8))
    return root


def _small_textures(monkeypatch):
    """Shrink the textures generator so that build tests take well under a second each."""
    monkeypatch.setattr(textures, "NUM_TRAIN", 2)
    monkeypatch.setattr(textures, "NUM_TEST_GOOD", 1)
    monkeypatch.setattr(textures, "NUM_PER_DEFECT", 1)


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def textures_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("adcore_cache")
    textures.build(cache)
    return cache


# ---------------------------------------------------------------- textures: the embedded benchmark


def test_textures_counts_by_defect(textures_cache):
    counts = textures.describe(textures_cache)
    expected_test = {"good": 100, "foreign_texture": 15, "scratch": 15, "hole": 15, "blotch": 15}
    assert sorted(counts) == ["brick", "grass", "gravel"] == list_categories("textures", data_root=textures_cache)
    for cat in counts:
        assert counts[cat] == {"train": {"good": 80}, "test": expected_test}
    assert len(defects.DEFECT_FAMILIES) >= 4
    # nothing but the versioned benchmark folder lives in the cache
    assert [p.name for p in textures_cache.iterdir()] == [textures.folder_name()]


def test_textures_items_masks_and_coverage(textures_cache):
    train = load_dataset("textures", "brick", "train", data_root=textures_cache)
    test = load_dataset("textures", "brick", "test", data_root=textures_cache)
    assert (len(train), len(test)) == (80, 160) and train.image_size == 128 and test.has_masks
    assert (train.labels == 0).all() and int(test.labels.sum()) == 60
    assert test.cache_in_memory  # embedded benchmarks cache by default
    lo, hi = defects.COVERAGE_RANGE
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
        image, mask = item["image"].numpy(), item["mask"].numpy()
        assert 0 <= image.min() and image.max() <= 1
        assert np.array_equal(image[0], image[1])  # grey repeated to 3 channels
        assert item["mask"].dtype == torch.uint8 and set(np.unique(mask).tolist()) <= {0, 1}
        coverage = float(mask.mean())
        if item["label"] == 0:
            assert coverage == 0 and item["defect"] == "good"
        else:
            assert lo <= coverage <= hi, (item["path"], coverage)
            assert item["defect"] in defects.DEFECT_FAMILIES


def test_textures_resize_image_and_mask_separately(textures_cache):
    ds = load_dataset("textures", "grass", "test", image_size=64, mask_size=32, data_root=textures_cache)
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (32, 32)
    assert item["mask"].sum() > 0


@pytest.mark.parametrize("family", defects.DEFECT_FAMILIES)
def test_defects_are_pixel_exact_and_visible(family):
    rng = np.random.default_rng(0)
    sources = defects.load_sources()
    base = sources["gravel"][300:428, 100:228]
    for _ in range(4):
        out, mask = defects.synthesise(family, base, rng, sources, exclude="gravel")
        assert out.shape == base.shape and mask.dtype == bool
        assert np.array_equal(out[~mask], base[~mask])  # nothing changes outside the mask
        assert defects.COVERAGE_RANGE[0] <= mask.mean() <= defects.COVERAGE_RANGE[1]
        assert np.abs(out - base)[mask].mean() > 0.03  # at least ~8 grey levels on average: visible
    with pytest.raises(ValueError, match="defect family"):
        defects.synthesise("smudge", base, rng)


def test_test_defect_sources_name_the_benchmark_photos():
    assert set(textures.CATEGORIES) <= set(defects.TEST_DEFECT_SOURCES)
    assert len(set(defects.TEST_DEFECT_SOURCES)) > len(textures.CATEGORIES)
    sources = defects.load_sources()
    assert all(a.ndim == 2 and 0 <= a.min() and a.max() <= 1 for a in sources.values())


def _overlap(a, b) -> bool:
    """Whether square windows (top, left, side) a and b share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def test_textures_windows_never_share_a_pixel_across_splits(textures_cache):
    stamp = json.loads((textures_cache / textures.folder_name() / textures.STAMP).read_text())
    for category in textures.CATEGORIES:
        boxes = textures.windows(category)
        assert stamp["windows"][category] == {k: [list(b) for b in v] for k, v in boxes.items()}  # stamp = generator
        train = boxes.pop("train/good")
        test = [b for v in boxes.values() for b in v]
        assert len(train) == 80 and len(test) == 100 + 15 * len(defects.DEFECT_FAMILIES)
        for top, left, side in train + test:
            assert textures.CROP_SIZES[0] <= side <= textures.CROP_SIZES[1]
            assert 0 <= top and top + side <= 512 and 0 <= left and left + side <= 512
            # inside one 256 px quadrant
            assert top // 256 == (top + side - 1) // 256 and left // 256 == (left + side - 1) // 256
        assert not any(_overlap(a, b) for a in train for b in test)
    assert not _overlap((0, 0, 10), (0, 10, 10)) and _overlap((0, 0, 10), (9, 9, 10))  # the check itself can fail


def test_textures_good_windows_have_the_same_position_distribution_in_both_splits():
    from scipy import stats

    for category in textures.CATEGORIES:
        boxes = textures.windows(category)
        train, good = np.array(boxes["train/good"]), np.array(boxes["test/good"])
        for split in (train, good):
            assert (split[:, 0] < 256).mean() == 0.5 and (split[:, 1] < 256).mean() == 0.5  # both halves, each axis
        # window centres along each photo axis, and the window sides: one distribution for both splits
        for column in (0, 1):
            a, b = train[:, column] + train[:, 2] / 2, good[:, column] + good[:, 2] / 2
            assert stats.ks_2samp(a, b).pvalue > 0.01, (category, column)
        assert stats.ks_2samp(train[:, 2], good[:, 2]).pvalue > 0.01
        defective = np.array([b for k, v in boxes.items() if k not in ("train/good", "test/good") for b in v])
        assert abs((defective[:, 0] < 256).mean() - 0.5) < 0.05 and abs((defective[:, 1] < 256).mean() - 0.5) < 0.05
    with pytest.raises(ValueError, match="category"):
        textures.windows("wood")


def test_textures_build_is_deterministic_and_concurrency_safe(tmp_path, monkeypatch):
    _small_textures(monkeypatch)
    results, errors = [], []

    def run():
        try:
            results.append(textures.build(tmp_path / "a"))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "a").iterdir()] == [textures.folder_name()]  # no temp folders left
    other = textures.build(tmp_path / "b")
    assert _tree_digest(results[0]) == _tree_digest(other)


def test_textures_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    _small_textures(monkeypatch)
    calls = {"n": 0}
    original = defects.synthesise

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(defects, "synthesise", failing)
    with pytest.raises(KeyboardInterrupt):
        textures.build(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(defects, "synthesise", original)
    assert textures._is_complete(textures.build(tmp_path))


def test_textures_rebuilds_on_version_change_and_force(tmp_path, monkeypatch):
    _small_textures(monkeypatch)
    monkeypatch.setattr(textures, "VERSION", 900)
    old = textures.build(tmp_path)
    assert old.name == "textures-v900" and json.loads((old / textures.STAMP).read_text())["version"] == 900
    victim = old / "brick" / "train" / "good" / "000.png"
    good_bytes = victim.read_bytes()
    victim.write_bytes(b"broken")
    assert textures.build(tmp_path) == old and victim.read_bytes() == b"broken"  # complete copy is reused
    assert textures.build(tmp_path, force=True) == old and victim.read_bytes() == good_bytes
    monkeypatch.setattr(textures, "VERSION", 901)
    new = textures.build(tmp_path)
    assert new.name == "textures-v901" and not old.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["textures-v901"]


def test_textures_build_removes_stale_temp_folders(tmp_path, monkeypatch):
    _small_textures(monkeypatch)
    stale, fresh = tmp_path / f".{textures.folder_name()}-tmp-crashed", tmp_path / f".{textures.folder_name()}-tmp-busy"
    for d in (stale, fresh):
        (d / "brick").mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    textures.build(tmp_path)
    assert not stale.exists() and fresh.exists()  # a young temp folder may be another process's build in progress


def test_textures_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADCORE_DATA_DIR", str(tmp_path / "env_cache"))
    assert textures.default_cache_dir() == tmp_path / "env_cache"
    monkeypatch.delenv("ADCORE_DATA_DIR")
    assert textures.default_cache_dir() == Path("~/.cache/adcore").expanduser()


# ---------------------------------------------------------------- digits


def test_digits_one_class_split():
    train = load_dataset("digits", "3", "train")
    test = load_dataset("digits", "3", "test")
    assert not train.has_masks and not test.has_masks
    assert train.image_size == 32 and train[0]["image"].shape == (3, 32, 32)
    assert (train.labels == 0).all()
    n_normal_test = int((test.labels == 0).sum())
    n_digit = len(train) + n_normal_test
    assert n_digit == 183 and len(train) == round(0.7 * n_digit)  # sklearn has 183 threes
    assert int(test.labels.sum()) == min(n_normal_test, digits.MAX_ANOMALIES)
    assert set(train.paths).isdisjoint(test.paths)
    assert {d for d, y in zip(test.defects, test.labels) if y == 1} <= {f"digit_{k}" for k in range(10) if k != 3}
    assert all(int(test[i]["mask"].sum()) == 0 for i in range(len(test)))
    again = load_dataset("digits", "3", "test")
    assert again.paths == test.paths and torch.equal(again[5]["image"], test[5]["image"])
    assert load_dataset("digits", "3", "test", image_size=16)[0]["image"].shape == (3, 16, 16)
    assert list_categories("digits") == [str(d) for d in range(10)]
    with pytest.raises(DataError, match="found: 0, 1"):
        load_dataset("digits", "10", "train")


# ---------------------------------------------------------------- MVTec-family layouts


def test_mvtec_layout(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    assert list_categories("mvtec", data_root=root) == ["bottle", "screw"] == list_categories(str(root))
    train = load_dataset("mvtec", "bottle", "train", data_root=root)
    assert isinstance(train, AnomalyDataset) and len(train) == 3 and (train.labels == 0).all()
    # a 3-image split fits in memory, so it is cached by default (issue 19 §4; tests/test_gpu_defaults.py checks the
    # other side, a split that does not fit)
    assert train.cache_in_memory and train.name == "mvtec" and train.category == "bottle"
    test = load_dataset("mvtec", "screw", "test", data_root=root)
    assert test.image_size == 16 and test.mask_size == 16  # native size kept
    defect = "manipulated_front"  # after "good" in folder order
    assert test.defects == ["good", "good", defect, defect] and test.labels.tolist() == [0, 0, 1, 1]
    for i, value in zip((2, 3), (255, 128)):
        item = test[i]
        written = np.asarray(Image.open(test.samples[i].mask_path))
        assert sorted(np.unique(written)) == [0, value]
        assert torch.equal(item["mask"], torch.from_numpy((written > 0).astype(np.uint8)))  # both binarise to 1
        assert torch.equal(item["image"][0], item["image"][2])  # grey repeated
        expected = torch.from_numpy(np.array(Image.open(test.paths[i]))).float() / 255
        assert expected.shape == (16, 16) and torch.allclose(item["image"][1], expected)
    assert int(test[1]["mask"].sum()) == 0
    _png(Path(test.samples[2].mask_path), _mask())  # a known square, to check nearest-neighbour resizing
    small = load_dataset(str(root), "screw", "test", image_size=8, mask_size=4)
    assert small.name == "mvtec" and small[2]["image"].shape == (3, 8, 8)
    assert small[2]["mask"].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]  # nearest


def test_resize_is_antialiased(tmp_path):
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    _png(tmp_path / "d" / "c" / "train" / "good" / "0.png", checker)
    item = load_dataset(str(tmp_path / "d"), "c", "train", image_size=8)[0]
    assert torch.allclose(item["image"], torch.full_like(item["image"], 0.5), atol=0.05)


def test_btad_layout_with_bmp(tmp_path):
    root = tmp_path / "BTAD"
    for i in range(2):
        _png(root / "01" / "train" / "ok" / f"{i:04d}.bmp", _image(i))
        _png(root / "01" / "test" / "ok" / f"{i:04d}.bmp", _image(10 + i))
        _png(root / "01" / "test" / "ko" / f"{i:04d}.bmp", _image(20 + i))
        _png(root / "01" / "ground_truth" / "ko" / f"{i:04d}.png", _mask())
    (root / "02" / "train" / "ok").mkdir(parents=True)
    assert list_categories("btad", data_root=root) == ["01", "02"]
    test = load_dataset("btad", "01", "test", data_root=root)
    assert test.labels.tolist() == [1, 1, 0, 0] and test.defects[:2] == ["ko", "ko"]
    assert int(test[0]["mask"].sum()) == 64 and int(test[2]["mask"].sum()) == 0
    assert torch.allclose(test[2]["image"], torch.from_numpy(_image(10)).permute(2, 0, 1).float() / 255)
    assert len(load_dataset("btad", "01", "train", data_root=root)) == 2


def test_visa_layout_from_split_csv(tmp_path):
    root = tmp_path / "VisA"
    rows = []
    for i in range(2):
        rows.append(["candle", "train", "normal", _rel(root, _png(root / "candle/Data/Images/Normal" /
                                                                   f"{i:03d}.JPG", _image(i))), ""])
        rows.append(["candle", "test", "normal", _rel(root, _png(root / "candle/Data/Images/Normal" /
                                                                  f"{10 + i:03d}.JPG", _image(10 + i))), ""])
        img = _png(root / "candle/Data/Images/Anomaly" / f"{i:03d}.JPG", _image(20 + i))
        msk = _png(root / "candle/Data/Masks/Anomaly" / f"{i:03d}.png", _mask(value=1))  # VisA masks hold 1, 2, ...
        rows.append(["candle", "test", "anomaly", _rel(root, img), _rel(root, msk)])
    rows.append(["pcb1", "train", "normal", rows[0][3], ""])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    assert list_categories("visa", data_root=root) == ["candle", "pcb1"]
    test = load_dataset("visa", "candle", "test", data_root=root, image_size=8)
    assert len(test) == 4 and int(test.labels.sum()) == 2
    anomalous = [test[i] for i in range(4) if test[i]["label"] == 1]
    assert all(int(it["mask"].sum()) == 16 for it in anomalous)  # 8x8 block at 16² → 4x4 at 8²
    assert len(load_dataset("visa", "candle", "train", data_root=root)) == 2
    with pytest.raises(DataError, match="found: candle, pcb1"):
        load_dataset("visa", "capsules", "test", data_root=root)


def _rel(root: Path, path: Path) -> str:
    return str(path.relative_to(root))


def test_mvtec3d_rgb_layout(tmp_path):
    root = tmp_path / "mvtec3d"
    cat = root / "bagel"
    for i in range(2):
        _png(cat / "train" / "good" / "rgb" / f"{i:03d}.png", _image(i))
        _png(cat / "test" / "good" / "rgb" / f"{i:03d}.png", _image(10 + i))
        _png(cat / "test" / "good" / "gt" / f"{i:03d}.png", np.zeros((16, 16), np.uint8))
        _png(cat / "test" / "crack" / "rgb" / f"{i:03d}.png", _image(20 + i))
        _png(cat / "test" / "crack" / "gt" / f"{i:03d}.png", _mask())
        (cat / "test" / "crack" / "xyz").mkdir(exist_ok=True)
    test = load_dataset("mvtec3d", "bagel", "test", data_root=root)
    assert test.defects == ["crack", "crack", "good", "good"] and test.paths[0].endswith("crack/rgb/000.png")
    assert int(test[1]["mask"].sum()) == 64
    assert list_categories("mvtec3d", data_root=root) == ["bagel"]


# ---------------------------------------------------------------- the fake MVTec AD


def test_mvtec_ad_facts():
    assert len(mvtec.CATEGORIES) == 15 and sorted(mvtec.TEXTURES + mvtec.OBJECTS) == list(mvtec.CATEGORIES)
    assert set(mvtec.DEFECT_TYPES) == set(mvtec.CATEGORIES) and set(mvtec.GREY) < set(mvtec.CATEGORIES)
    assert sum(len(d) for d in mvtec.DEFECT_TYPES.values()) == 73  # as the MVTec AD paper counts them
    assert all(list(d) == sorted(set(d)) and "good" not in d for d in mvtec.DEFECT_TYPES.values())


def test_fake_mvtec_writes_mvtec_ads_layout_and_names(tmp_path):
    root = make_fake_mvtec(tmp_path / "m", ("toothbrush", "bottle", "screw"), image_size=12, n_train=3, n_test=2,
                           n_defect_types=2)
    assert root == tmp_path / "m"
    defects = {"bottle": ["broken_large", "broken_small"], "screw": ["manipulated_front", "scratch_head"],
               "toothbrush": ["defective"]}  # MVTec AD's toothbrush has one defect type
    expected = set()
    for cat, names in defects.items():
        expected |= {f"{cat}/train/good/{i:03d}.png" for i in range(3)} | {f"{cat}/test/good/{i:03d}.png"
                                                                            for i in range(2)}
        for d in names:
            expected |= {f"{cat}/test/{d}/{i:03d}.png" for i in range(2)}
            expected |= {f"{cat}/ground_truth/{d}/{i:03d}_mask.png" for i in range(2)}
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == expected
    assert list_categories("mvtec", data_root=root) == ["bottle", "screw", "toothbrush"]
    for cat, names in defects.items():
        test = load_dataset("mvtec", cat, "test", data_root=root)
        assert test.defects == sorted(names * 2 + ["good", "good"])  # folder order
        assert all(int(x["mask"].sum()) > 0 for x in test if x["label"] == 1)
        assert len(load_dataset("mvtec", cat, "train", data_root=root)) == 3


def test_fake_mvtec_is_grey_where_mvtec_ad_is_and_masks_are_binary(tmp_path):
    root = make_fake_mvtec(tmp_path, mvtec.CATEGORIES, image_size=8, n_train=1, n_test=1, n_defect_types=9)
    pngs = sorted(root.rglob("*.png"))
    assert len(pngs) == 15 * 2 + 2 * 73  # every category and defect type, at the smallest size
    for path in pngs:
        with Image.open(path) as im:
            pixels = np.asarray(im)
            assert im.size == (8, 8), path
            if path.name.endswith("_mask.png"):
                assert im.mode == "L" and sorted(np.unique(pixels)) == [0, 255], path  # never empty
            else:
                assert im.mode == ("L" if path.relative_to(root).parts[0] in ("grid", "screw", "zipper") else "RGB")


def test_fake_mvtec_defects_are_visible_exactly_in_their_masks(tmp_path):
    from adcore import metrics

    root = make_fake_mvtec(tmp_path, ("cable", "carpet", "screw"), image_size=64, n_train=8, n_test=4,
                           n_defect_types=2)
    for cat in ("cable", "carpet", "screw"):
        reference = torch.stack([x["image"] for x in load_dataset(str(root), cat, "train")]).median(0).values
        test = load_dataset(str(root), cat, "test")
        maps = torch.stack([(x["image"] - reference).abs().amax(0) for x in test])  # (N, S, S)
        masks = torch.stack([x["mask"] for x in test])
        for diff, mask, label in zip(maps, masks, test.labels):
            if label:
                inside, outside = diff[mask.bool()].mean(), diff[~mask.bool()].mean()
                assert 0.005 <= mask.float().mean() <= 0.08 and inside > 0.3 and inside > 4 * outside, cat
        # a distance to the mean good image finds the defects: the masks are where the images changed
        assert metrics.pixel_auroc(maps.numpy(), masks.numpy()) > 0.9, cat


def test_fake_mvtec_is_deterministic_per_seed_and_category(tmp_path):
    a = make_fake_mvtec(tmp_path / "a", ("bottle", "grid"), image_size=16, seed=3)
    b = make_fake_mvtec(tmp_path / "b", "grid", image_size=16, seed=3)
    c = make_fake_mvtec(tmp_path / "c", "grid", image_size=16, seed=4)
    grid = _tree_digest(a / "grid")
    assert grid == _tree_digest(b / "grid")  # the same whichever other categories are written
    other = _tree_digest(c / "grid")
    assert other.keys() == grid.keys() and all(other[k] != grid[k] for k in grid)
    assert len({grid[k] for k in grid if k.startswith("train/")}) == 4  # every training image differs


def test_the_suites_fake_tree_holds_an_object_and_a_texture(fake_mvtec_tree):
    assert list_categories(str(fake_mvtec_tree)) == ["bottle", "cable", "carpet"]
    assert mvtec.OBJECTS.count("bottle") == mvtec.TEXTURES.count("carpet") == 1
    for cat in ("bottle", "carpet"):
        test = load_dataset("mvtec", cat, "test", data_root=fake_mvtec_tree)
        assert len(test) == 6 and test.labels.tolist() == [1, 1, 1, 0, 0, 0] and test.image_size == 64
        assert len(load_dataset("mvtec", cat, "train", data_root=fake_mvtec_tree)) == 8


def test_fake_mvtec_rejects_bad_arguments(tmp_path):
    with pytest.raises(DataError, match=r"unknown MVTec AD categories \['bottel'\]; expected some of bottle, cable"):
        make_fake_mvtec(tmp_path, ["bottle", "bottel"])
    with pytest.raises(DataError, match="at most once, and at least one"):
        make_fake_mvtec(tmp_path, ["bottle", "bottle"])
    with pytest.raises(DataError, match="at most once, and at least one"):
        make_fake_mvtec(tmp_path, [])
    for kwargs, message in [({"image_size": 7}, "image_size must be an int >= 8, got 7"),
                            ({"image_size": 16.0}, "image_size must be an int >= 8, got 16.0"),
                            ({"n_train": 0}, "n_train must be an int >= 1"), ({"n_test": True}, "n_test must be"),
                            ({"n_defect_types": 0}, "n_defect_types must be"), ({"seed": -1}, "seed must be")]:
        with pytest.raises(DataError, match=message):
            make_fake_mvtec(tmp_path, "bottle", **kwargs)
    assert not any(tmp_path.iterdir())  # a rejected call writes nothing
    make_fake_mvtec(tmp_path, "bottle", image_size=8)
    with pytest.raises(DataError, match="bottle already exist"):
        make_fake_mvtec(tmp_path, ("grid", "bottle"))
    assert not (tmp_path / "grid").exists()


def test_fake_wrn_weights_load_as_the_imagenet_file_does(fake_wrn_weights, tmp_path):
    import warnings

    import torchvision

    from adcore.backbones import create_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not the pretrained=False switch, which warns
        backbone = create_backbone("wide_resnet50_2", weights_path=fake_wrn_weights)
    assert backbone.pretrained and backbone.weights_path == str(fake_wrn_weights)
    assert [f.shape[1] for f in backbone(torch.rand(1, 3, 32, 32))] == [256, 512, 1024]
    state = torch.load(fake_wrn_weights, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        expected = torchvision.models.wide_resnet50_2(weights=None).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    # Seeded and drawn aside from the global RNG: the same file again, and the caller's next draw unchanged.
    torch.manual_seed(5)
    again = make_fake_weights(tmp_path / fake_wrn_weights.name, seed=0)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert again.read_bytes() == fake_wrn_weights.read_bytes()
    with pytest.raises(ValueError, match="writes wide_resnet50_2, got arch='resnet18'"):
        make_fake_weights(tmp_path / "r.pth", arch="resnet18")


# ---------------------------------------------------------------- errors


def test_error_missing_root_and_name(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mvtec", "bottle", "train", data_root=tmp_path / "nope")
    with pytest.raises(DataError, match="data_root"):
        load_dataset("btad", "01", "train")
    with pytest.raises(DataError, match="neither a benchmark name"):
        load_dataset(str(tmp_path / "nope"), "bottle", "train")
    with pytest.raises(DataError, match="split must be"):
        load_dataset("digits", "1", "val")
    assert issubclass(DataError, ValueError)


def test_error_unknown_category_lists_found(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    with pytest.raises(DataError, match="'cable' not found.*found: bottle, screw"):
        load_dataset("mvtec", "cable", "test", data_root=root)


def test_error_test_image_without_mask(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    (root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"broken_large/001\.png' has no mask; expected .*001_mask\.png"):
        load_dataset("mvtec", "bottle", "test", data_root=root)


def test_error_truncated_image_at_construction(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    victim = root / "bottle" / "test" / "good" / "001.png"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError, match="001.png.*unreadable or truncated"):
        load_dataset("mvtec", "bottle", "test", data_root=root)
    (root / "bottle" / "train" / "good" / "002.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="002.png.*unreadable"):
        load_dataset("mvtec", "bottle", "train", data_root=root)


def test_error_truncated_bmp_at_construction(tmp_path):
    path = _png(tmp_path / "d" / "c" / "train" / "good" / "0.bmp", _image(0))
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DataError, match="0.bmp.*truncated"):
        load_dataset(str(tmp_path / "d"), "c", "train")


def test_error_file_damaged_after_construction_raises_on_read(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    ds = load_dataset("mvtec", "bottle", "train", data_root=root)
    victim = Path(ds.paths[1])
    victim.write_bytes(victim.read_bytes()[:200])
    ds[0]
    with pytest.raises(DataError, match="001.png.*unreadable or truncated"):
        ds[1]


def test_error_mask_size_differs_from_image(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    _png(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png", _mask(size=8))
    with pytest.raises(DataError, match=r"000_mask\.png' is 8x8 but its image .*000\.png' is 16x16"):
        load_dataset("mvtec", "bottle", "test", data_root=root)


def test_error_mixed_native_sizes_need_image_size(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    _png(root / "bottle" / "train" / "good" / "009.png", _image(9, size=20))
    with pytest.raises(DataError, match="16x16, 20x20.*pass image_size"):
        load_dataset("mvtec", "bottle", "train", data_root=root)
    assert load_dataset("mvtec", "bottle", "train", data_root=root, image_size=12)[3]["image"].shape == (3, 12, 12)
    with pytest.raises(DataError, match="image_size must be a positive int"):
        load_dataset("mvtec", "bottle", "train", data_root=root, image_size=0)


def test_error_visa_without_split_csv(tmp_path):
    (tmp_path / "VisA").mkdir()
    with pytest.raises(DataError, match="1cls.csv"):
        load_dataset("visa", "candle", "test", data_root=tmp_path / "VisA")


def test_cache_in_memory_switch(tmp_path):
    root = _mvtec_tree(tmp_path / "m")
    cached = load_dataset("mvtec", "bottle", "train", data_root=root, cache_in_memory=True)
    lazy = load_dataset("mvtec", "bottle", "train", data_root=root)
    first = cached[0]["image"]
    Path(cached.paths[0]).write_bytes(b"gone")
    assert torch.equal(cached[0]["image"], first)  # served from memory
    with pytest.raises(DataError, match="unreadable"):
        lazy[0]


def test_resample_chooses_the_resize_filter():
    from PIL import Image

    bilinear = load_dataset("textures", "brick", "train", image_size=64)
    bicubic = load_dataset("textures", "brick", "train", image_size=64, resample="bicubic")
    native = np.asarray(Image.open(bilinear.paths[0]).convert("RGB"))
    want = np.asarray(Image.fromarray(native).resize((64, 64), Image.Resampling.BICUBIC), np.float32) / 255.0
    got = bicubic[0]["image"].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, bilinear[0]["image"].permute(1, 2, 0).numpy())
    # at the native size nothing is resized, so the filter changes nothing
    same = load_dataset("textures", "brick", "train", image_size=128, resample="bicubic")[0]["image"]
    np.testing.assert_array_equal(same, load_dataset("textures", "brick", "train", image_size=128)[0]["image"])
    with pytest.raises(DataError, match="resample"):
        load_dataset("textures", "brick", "train", image_size=64, resample="lanczos")

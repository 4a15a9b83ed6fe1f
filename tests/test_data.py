"""Tests of dataset listing, image and mask reading, the holdout split and the demo dataset."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from anoseg.data import demo as demo_module
from anoseg.data.demo import (DEMO_CATEGORIES, DEMO_DEFECT_TYPES, DEMO_IMAGE_SIZE,
                              DEMO_NUM_PER_DEFECT, DEMO_NUM_TEST_GOOD, DEMO_NUM_TRAIN,
                              MARKER_NAME, default_demo_root, ensure_demo_dataset)
from anoseg.data.mvtec import (MVTecTestDataset, Sample, image_size_of, list_test_samples,
                               list_train_images, load_image, load_images_cached, load_mask,
                               split_holdout)
from anoseg.errors import AnoSegError, ConfigError, DataError


def _files_by_name(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------------- listing


def test_list_train_images_sorted_and_ignores_junk(make_mvtec):
    root = make_mvtec(n_train=3)
    good = root / "widget" / "train" / "good"
    (good / ".DS_Store").write_bytes(b"junk")
    (good / "._000.png").write_bytes(b"resource fork")
    (good / "notes.txt").write_text("not an image")
    (good / "nested").mkdir()
    Image.new("RGB", (32, 32)).save(good / "nested" / "999.png")
    (root / "__MACOSX").mkdir()
    Image.new("RGB", (8, 8)).save(good / "010.JPG")  # upper-case extension still counts

    images = list_train_images(root, "widget")

    assert [p.name for p in images] == ["000.png", "001.png", "002.png", "010.JPG"]
    assert all(isinstance(p, Path) and p.is_file() for p in images)


def test_list_test_samples_pairs_masks_and_sorts(make_mvtec):
    root = make_mvtec(n_test_good=2, defects={"scratch": 2, "color": 1})
    samples = list_test_samples(root, "widget")

    assert [(s.defect_type, s.image_path.name) for s in samples] == [
        ("color", "000.png"), ("good", "000.png"), ("good", "001.png"),
        ("scratch", "000.png"), ("scratch", "001.png")]
    for s in samples:
        assert isinstance(s, Sample)
        if s.defect_type == "good":
            assert s.label == 0 and s.mask_path is None
        else:
            assert s.label == 1
            assert s.mask_path == (root / "widget" / "ground_truth" / s.defect_type
                                   / f"{s.image_path.stem}_mask.png")


def test_masks_paired_by_stem_with_other_names_and_extensions(make_mvtec):
    root = make_mvtec(defects={"crack": 3})
    gt = root / "widget" / "ground_truth" / "crack"
    # 001: mask without the _mask suffix; 002: mask in another format, upper-case suffix.
    (gt / "001_mask.png").rename(gt / "001.png")
    Image.open(gt / "002_mask.png").save(gt / "002_mask.BMP")
    (gt / "002_mask.png").unlink()
    (gt / ".hidden_mask.png").write_bytes(b"ignored")

    masks = {s.image_path.name: s.mask_path.name
             for s in list_test_samples(root, "widget") if s.label == 1}

    assert masks == {"000.png": "000_mask.png", "001.png": "001.png", "002.png": "002_mask.BMP"}


def test_any_category_name_and_stray_test_folders(make_mvtec):
    root = make_mvtec(category="my parts", defects={"dent": 1})
    (root / "my parts" / "test" / "__MACOSX").mkdir()
    (root / "my parts" / "test" / ".cache").mkdir()
    (root / "my parts" / "test" / "dent" / "thumbs.db").write_bytes(b"x")

    samples = list_test_samples(root, "my parts")

    assert sorted({s.defect_type for s in samples}) == ["dent", "good"]
    assert len(samples) == 3


# --------------------------------------------------------------------------- image formats


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".PNG"])
def test_load_image_formats(tmp_path, ext):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # solid red survives JPEG compression closely
    path = tmp_path / f"img{ext}"
    Image.fromarray(pixels).save(path, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(
        ext.lower(), None))

    image = load_image(path, 16)

    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert abs(int(image[0].float().mean()) - 200) <= 3
    assert int(image[1:].max()) <= 5
    assert image_size_of(path) == (40, 60)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1", "LA"])
def test_load_image_modes_become_rgb(tmp_path, mode):
    gray = np.full((20, 30), 128, dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray((gray.astype(np.uint16) * 257))  # 16-bit 128*257 -> 8-bit 128
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 50)]))
    elif mode == "1":
        img = Image.fromarray(gray).convert("1", dither=Image.Dither.NONE)
    else:
        img = Image.fromarray(gray).convert(mode)
    path = tmp_path / "img.png"
    img.save(path)
    assert Image.open(path).mode == mode

    image = load_image(path, 8)

    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    expected = 255 if mode == "1" else 128
    assert int((image.int() - expected).abs().max()) <= 1


def test_load_image_resize_is_smooth_bilinear(tmp_path):
    # A 1-pixel checkerboard shrunk by 4 averages to grey with antialiasing; without it,
    # it would alias to black/white.
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    path = tmp_path / "checker.png"
    Image.fromarray(checker).save(path)

    image = load_image(path, 16)

    assert int(image.min()) > 100 and int(image.max()) < 155


def test_load_mask_nearest_keeps_binary(tmp_path):
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[::2, ::3] = 255
    mask[5:12, 7:20] = 1  # faint values in a 0/255 mask: below half the maximum, not defect
    path = tmp_path / "m_mask.png"
    Image.fromarray(mask).save(path)

    for size in (7, 16, 64):
        out = load_mask(path, size)
        assert out.dtype == torch.uint8 and out.shape == (size, size)
        assert set(out.unique().tolist()) <= {0, 1}
        assert 0 < int(out.sum()) < size * size

    # Upscaling by an integer factor repeats each pixel exactly.
    block = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(block).save(tmp_path / "block.png")
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]],
                            dtype=torch.uint8)
    assert torch.equal(load_mask(tmp_path / "block.png", 4), expected)


def test_load_mask_rgb_mask(tmp_path):
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[2:4, 2:4, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb_mask.png")
    out = load_mask(tmp_path / "rgb_mask.png", 10, expected_hw=(10, 10))
    assert int(out.sum()) == 4 and int(out[2, 2]) == 1


# ------------------------------------------------------------------------- dataset objects


def test_test_dataset_items(make_mvtec):
    root = make_mvtec(n_test_good=1, defects={"crack": 1}, image_hw=(40, 48))
    dataset = MVTecTestDataset(root, "widget", image_size=32)

    assert len(dataset) == 2
    by_type = {item["defect_type"]: item for item in (dataset[0], dataset[1])}
    for item in by_type.values():
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 32, 32)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert Path(item["path"]).is_file()
    assert by_type["good"]["label"] == 0 and float(by_type["good"]["mask"].sum()) == 0.0
    assert by_type["crack"]["label"] == 1 and float(by_type["crack"]["mask"].sum()) > 0.0
    torch.testing.assert_close(
        by_type["crack"]["image"],
        load_image(by_type["crack"]["path"], 32).float() / 255.0)


def test_load_images_cached_matches_load_image(make_mvtec):
    root = make_mvtec(n_train=3, image_hw=(20, 24))
    paths = list_train_images(root, "widget")

    cached = load_images_cached(paths, 16, progress=False)

    assert cached.dtype == torch.uint8 and cached.shape == (3, 3, 16, 16)
    for i, path in enumerate(paths):
        assert torch.equal(cached[i], load_image(path, 16))
    assert load_images_cached([], 16, progress=False).shape == (0, 3, 16, 16)


# ---------------------------------------------------------------------------------- errors


def _raises_naming(match_parts: List[str], func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(info.value, AnoSegError)
    return message


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    _raises_naming([str(missing), "does not exist"], list_train_images, missing, "bottle")
    _raises_naming([str(missing)], list_test_samples, missing, "bottle")


def test_root_is_a_file(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    _raises_naming([str(file), "expected a folder"], list_train_images, file, "bottle")


def test_missing_category_lists_available(make_mvtec):
    root = make_mvtec(category="bottle")
    make_mvtec(category="zipper", root=root)
    (root / "not_a_category").mkdir()

    message = _raises_naming([str(root / "botle"), "bottle", "zipper"],
                             list_train_images, root, "botle")
    assert "not_a_category" not in message


def test_missing_category_in_empty_root_hints_layout(tmp_path):
    message = _raises_naming([str(tmp_path / "bottle")], list_train_images, tmp_path, "bottle")
    assert "train" in message


def test_empty_or_missing_train_good(make_mvtec):
    root = make_mvtec(n_train=0)
    good = root / "widget" / "train" / "good"
    (good / "readme.txt").write_text("no images here")
    _raises_naming([str(good), "no images"], list_train_images, root, "widget")
    (good / "readme.txt").unlink()
    good.rmdir()
    _raises_naming([str(good), "does not exist"], list_train_images, root, "widget")


def test_unreadable_image(tmp_path):
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    _raises_naming(["cannot read image", str(garbage)], load_image, garbage, 16)
    _raises_naming([str(garbage)], image_size_of, garbage)
    _raises_naming([str(garbage)], load_images_cached, [garbage], 16, progress=False)


def test_truncated_image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.png"
    Image.fromarray(pixels).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    _raises_naming(["cannot read image", str(truncated)], load_image, truncated, 16)


def test_missing_image_file(tmp_path):
    _raises_naming([str(tmp_path / "gone.png")], load_image, tmp_path / "gone.png", 16)


def test_missing_test_folder(make_mvtec):
    root = make_mvtec(n_test_good=0, defects={})
    test_dir = root / "widget" / "test"
    (test_dir / "good").rmdir()
    _raises_naming([str(test_dir), "no images"], list_test_samples, root, "widget")
    test_dir.rmdir()
    _raises_naming([str(test_dir), "does not exist"], list_test_samples, root, "widget")


def test_defect_image_without_mask(make_mvtec):
    root = make_mvtec(defects={"crack": 2})
    mask = root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    image = root / "widget" / "test" / "crack" / "001.png"
    _raises_naming([str(image), str(mask), "no mask"], list_test_samples, root, "widget")


def test_defect_folder_without_ground_truth_folder(make_mvtec):
    root = make_mvtec(defects={"crack": 1})
    gt = root / "widget" / "ground_truth" / "crack"
    (gt / "000_mask.png").unlink()
    gt.rmdir()
    _raises_naming([str(root / "widget" / "test" / "crack" / "000.png"),
                    str(gt / "000_mask.png")], list_test_samples, root, "widget")


def test_mask_without_image(make_mvtec):
    root = make_mvtec(defects={"crack": 2})
    (root / "widget" / "test" / "crack" / "001.png").unlink()
    orphan = root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    _raises_naming([str(orphan), "no image"], list_test_samples, root, "widget")


def test_masks_of_a_missing_defect_folder(make_mvtec):
    root = make_mvtec(defects={"crack": 1})
    stray = root / "widget" / "ground_truth" / "hole"
    stray.mkdir()
    Image.new("L", (32, 32)).save(stray / "000_mask.png")
    _raises_naming([str(stray / "000_mask.png"), "no image"], list_test_samples, root, "widget")


def test_good_images_need_no_masks_and_good_masks_are_ignored(make_mvtec):
    root = make_mvtec(n_test_good=2, defects={})
    gt_good = root / "widget" / "ground_truth" / "good"
    gt_good.mkdir(parents=True)
    Image.new("L", (32, 32)).save(gt_good / "000_mask.png")
    samples = list_test_samples(root, "widget")
    assert [s.mask_path for s in samples] == [None, None]


def test_two_masks_for_one_image(make_mvtec):
    root = make_mvtec(defects={"crack": 1})
    gt = root / "widget" / "ground_truth" / "crack"
    Image.open(gt / "000_mask.png").save(gt / "000_mask.tif")
    _raises_naming([str(gt / "000_mask.png"), str(gt / "000_mask.tif")],
                   list_test_samples, root, "widget")


def test_mask_of_another_size(make_mvtec):
    root = make_mvtec(defects={"crack": 2}, image_hw=(32, 32))
    bad = root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    Image.new("L", (20, 24)).save(bad)  # (W, H) = (20, 24)

    _raises_naming([str(bad), "24x20", "32x32"], MVTecTestDataset, root, "widget", 16)
    _raises_naming([str(bad), "24x20", "32x32"], load_mask, bad, 16, expected_hw=(32, 32))
    # Opting out of the check lets the dataset load; the mask is then simply resized.
    dataset = MVTecTestDataset(root, "widget", 16, check_mask_sizes=False)
    assert dataset[1]["mask"].shape == (1, 16, 16)


def test_unreadable_mask_fails_at_construction(make_mvtec):
    root = make_mvtec(defects={"crack": 1})
    bad = root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    bad.write_bytes(b"garbage")
    _raises_naming(["cannot read mask", str(bad)], MVTecTestDataset, root, "widget", 16)
    _raises_naming(["cannot read mask", str(bad)], load_mask, bad, 16)


# ---------------------------------------------------------------------------- holdout split


def test_split_holdout_sizes():
    paths = [Path(f"/data/train/good/{i:03d}.png") for i in range(60)]
    train, holdout = split_holdout(paths, 0.1, seed=0)
    assert len(holdout) == 6 and len(train) == 54
    assert set(train).isdisjoint(holdout) and set(train) | set(holdout) == set(paths)
    assert train == sorted(train) and holdout == sorted(holdout)  # input order kept

    assert [len(h) for h in (split_holdout(paths[:10], 0.01, 0)[1],
                             split_holdout(paths[:2], 0.9, 0)[1],
                             split_holdout(paths[:1], 0.5, 0)[1],
                             split_holdout(paths[:10], 0.0, 0)[1],
                             split_holdout(paths[:10], 0.99, 0)[1])] == [1, 1, 0, 0, 9]


def test_split_holdout_deterministic():
    paths = [Path(f"/data/train/good/{i:03d}.png") for i in range(50)]
    first = split_holdout(paths, 0.2, seed=3)
    assert split_holdout(paths, 0.2, seed=3) == first
    assert split_holdout(list(reversed(paths)), 0.2, seed=3)[1] == list(reversed(first[1]))
    moved = [Path("/elsewhere") / p.name for p in paths]  # the root does not matter
    assert [p.name for p in split_holdout(moved, 0.2, seed=3)[1]] == [p.name for p in first[1]]
    other_seeds = [split_holdout(paths, 0.2, seed=s)[1] for s in range(4, 8)]
    assert all(holdout != first[1] for holdout in other_seeds)


def test_split_holdout_errors():
    with pytest.raises(DataError, match="no training images"):
        split_holdout([], 0.1, seed=0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="holdout fraction"):
            split_holdout([Path("a.png"), Path("b.png")], bad, seed=0)


# ----------------------------------------------------------------------------- demo dataset


def test_demo_layout_and_contents(demo_root):
    assert (demo_root / MARKER_NAME).is_file()
    for category in DEMO_CATEGORIES:
        train = list_train_images(demo_root, category)
        samples = list_test_samples(demo_root, category)
        assert len(train) == DEMO_NUM_TRAIN
        assert sum(s.label == 0 for s in samples) == DEMO_NUM_TEST_GOOD
        for defect in DEMO_DEFECT_TYPES:
            assert sum(s.defect_type == defect for s in samples) == DEMO_NUM_PER_DEFECT
        assert not (demo_root / category / "ground_truth" / "good").exists()
        for s in samples:
            assert image_size_of(s.image_path) == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
            if s.label == 0:
                assert s.mask_path is None
                continue
            mask = np.asarray(Image.open(s.mask_path))
            assert mask.shape == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
            assert set(np.unique(mask).tolist()) == {0, 255}
            assert 5 <= int((mask > 0).sum()) < mask.size // 4
        # Images vary: two normal training images are not the same picture.
        first, second = (np.asarray(Image.open(p)) for p in train[:2])
        assert first.shape == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3)
        assert not np.array_equal(first, second)
        MVTecTestDataset(demo_root, category, 64)  # all mask sizes agree


def test_demo_defects_are_visible(demo_root):
    # The mean colour inside each defect mask differs clearly from that of the normal pixels.
    for category in DEMO_CATEGORIES:
        for s in list_test_samples(demo_root, category):
            if s.label == 0:
                continue
            image = np.asarray(Image.open(s.image_path)).astype(np.float64)
            mask = np.asarray(Image.open(s.mask_path)) > 0
            inside = image[mask].mean(axis=0)
            outside = image[~mask].mean(axis=0)
            assert np.abs(inside - outside).max() > 25, (s.image_path, inside, outside)


def test_demo_generated_once(demo_root):
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*")}
    assert ensure_demo_dataset(demo_root) == demo_root
    after = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*")}
    assert before == after


def test_demo_deterministic(demo_root, tmp_path):
    again = ensure_demo_dataset(tmp_path / "again")
    assert _files_by_name(again) == _files_by_name(demo_root)


def test_demo_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOSEG_DEMO_DIR", str(tmp_path / "custom"))
    assert default_demo_root() == tmp_path / "custom" / f"v{demo_module.DEMO_VERSION}"
    monkeypatch.delenv("ANOSEG_DEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_root() == (tmp_path / "xdg" / "anoseg" / "demo"
                                   / f"v{demo_module.DEMO_VERSION}")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == (tmp_path / "home" / ".cache" / "anoseg" / "demo"
                                   / f"v{demo_module.DEMO_VERSION}")


def test_demo_uses_default_root(monkeypatch, tmp_path, demo_root):
    monkeypatch.setenv("ANOSEG_DEMO_DIR", str(tmp_path))
    target = default_demo_root()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(demo_root, target)  # reuse the session's dataset instead of generating again
    assert ensure_demo_dataset() == target


def test_demo_interrupted_generation_leaves_nothing(monkeypatch, tmp_path):
    def fail_halfway(folder: Path, category: str) -> None:
        (folder / "train" / "good").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "_write_category", fail_halfway)
    root = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(root)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # the partial folder was removed too


def test_demo_refuses_foreign_folder(tmp_path):
    root = tmp_path / "occupied"
    root.mkdir()
    (root / "something.txt").write_text("user data")
    with pytest.raises(DataError, match="not a complete demo dataset") as info:
        ensure_demo_dataset(root)
    assert str(root) in str(info.value)
    assert (root / "something.txt").read_text() == "user data"


def test_demo_concurrent_calls_share_one_dataset(monkeypatch, tmp_path):
    # Two racing generators (small stand-in content keeps this fast): both return the root,
    # exactly one dataset is published, and no partial folders remain.
    started = threading.Barrier(2)

    def small_category(folder: Path, category: str) -> None:
        started.wait(timeout=10)
        (folder / "train" / "good").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "train" / "good" / f"{threading.get_ident()}.png")

    monkeypatch.setattr(demo_module, "_write_category", small_category)
    monkeypatch.setattr(demo_module, "DEMO_CATEGORIES", ("only",))
    root = tmp_path / "race"
    results: List[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_dataset(root)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert results == [root, root]
    assert len(list((root / "only" / "train" / "good").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race"]

"""Shared fixtures: the demo dataset and a factory for tiny MVTec-layout datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
from PIL import Image

from anoseg.data.demo import ensure_demo_dataset

MakeMVTec = Callable[..., Path]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the built-in demo dataset, generated once per test session into a temp folder."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("anoseg_demo") / "v1")


def _write_rgb(path: Path, hw: Tuple[int, int], rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 256, size=(hw[0], hw[1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_mask(path: Path, hw: Tuple[int, int]) -> None:
    mask = np.zeros(hw, dtype=np.uint8)
    mask[hw[0] // 4: hw[0] // 2, hw[1] // 4: hw[1] // 2] = 255
    Image.fromarray(mask).save(path)


@pytest.fixture
def make_mvtec(tmp_path: Path) -> MakeMVTec:
    """Factory writing a tiny category in MVTec AD layout; returns the dataset root.

    Call as ``make_mvtec(category="widget", n_train=4, n_test_good=2, defects={"crack": 2},
    image_hw=(32, 32), ext=".png", root=None)``. Images are seeded random RGB noise, masks are
    0/255 with one rectangle, named ``<stem>_mask.png``. Call it several times with the same
    ``root`` to get several categories; delete or add files afterwards to break it.
    """
    counter = [0]

    def factory(category: str = "widget", n_train: int = 4, n_test_good: int = 2,
                defects: Optional[Dict[str, int]] = None, image_hw: Tuple[int, int] = (32, 32),
                ext: str = ".png", root: Optional[Path] = None) -> Path:
        root = Path(root) if root is not None else tmp_path / "mvtec"
        defects = {"crack": 2} if defects is None else defects
        rng = np.random.default_rng(counter[0])
        counter[0] += 1
        folder = root / category
        train_good = folder / "train" / "good"
        train_good.mkdir(parents=True)
        for i in range(n_train):
            _write_rgb(train_good / f"{i:03d}{ext}", image_hw, rng)
        test_good = folder / "test" / "good"
        test_good.mkdir(parents=True)
        for i in range(n_test_good):
            _write_rgb(test_good / f"{i:03d}{ext}", image_hw, rng)
        for defect, count in defects.items():
            image_dir = folder / "test" / defect
            mask_dir = folder / "ground_truth" / defect
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for i in range(count):
                _write_rgb(image_dir / f"{i:03d}{ext}", image_hw, rng)
                _write_mask(mask_dir / f"{i:03d}_mask.png", image_hw)
        return root

    return factory


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

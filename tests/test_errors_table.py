"""docs/errors.md, "bad input -> message": one case per row of the table, each a clear
AnoSegError (through the CLI: exit status 2, one line, no traceback). A second test checks that
the table and this list name the same cases."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoseg.cli.common import run_cli
from anoseg.cli.train import main as train_main
from anoseg.errors import AnoSegError

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TINY = ["--no-progress", "--set", "data.image_size=64", "--set", "model.width=0.125",
        "--set", "train.batch_size=4", "--set", "data.num_workers=0", "--set", "train.steps=1"]


def _cat(make_mvtec, **kw) -> Path:
    return make_mvtec(**kw) / "widget"


def _train(data_root, out, *extra):
    return ("cli", ["--data-root", str(data_root), "--category", "widget",
                    "--output-dir", str(out), *TINY, *extra])


def _fake_run(path: Path, content: bytes = b"not a checkpoint") -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.pt").write_bytes(content)
    return path


def _load(kind, path):
    from anoseg.data.mvtec import image_size_of, load_image, load_mask

    return {"image": lambda: load_image(path, 32), "mask": lambda: load_mask(path, 32),
            "size": lambda: image_size_of(path)}[kind]


def _bomb(path: Path) -> Path:
    """A valid PNG header declaring 30000 x 30000 pixels, then a tiny body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _lock(path: Path, pid: int, host: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.lock").write_text(json.dumps({"pid": pid, "host": host}))
    return path


def _corrupt_first(folder: Path, data: bytes) -> Path:
    """Overwrite every image of ``folder`` (any of them may be the held-out one)."""
    for path in sorted(folder.iterdir()):
        path.write_bytes(data)
    return folder


# Each case: (tmp_path, make_mvtec) -> ("cli", argv) or ("call", function); then the words the
# message must contain. "{tmp}" in a word is replaced by tmp_path.
CASES = {
    "data-root-missing": (lambda t, m: _train(t / "nope", t / "run"),
                          ["{tmp}/nope", "does not exist"]),
    "data-root-is-file": (lambda t, m: (t.joinpath("f").write_text(""), _train(t / "f", t / "r"))[1],
                          ["{tmp}/f is a file"]),
    "category-missing": (lambda t, m: _train(m(category="other"), t / "run"),
                         ["widget does not exist", "categories found there: other"]),
    "train-good-missing": (lambda t, m: (__import__("shutil").rmtree(_cat(m) / "train"),
                                         _train(t / "mvtec", t / "run"))[1],
                           ["train/good does not exist"]),
    "train-good-empty": (lambda t, m: ([p.unlink() for p in (_cat(m) / "train/good").iterdir()],
                                       _train(t / "mvtec", t / "run"))[1],
                         ["train/good contains no images"]),
    "image-zero-bytes": (lambda t, m: (_corrupt_first(_cat(m) / "train/good", b""),
                                       _train(t / "mvtec", t / "run"))[1],
                         ["cannot read image", "train/good/00"]),
    "image-random-bytes": (lambda t, m: (_corrupt_first(_cat(m) / "train/good",
                                                        os.urandom(300)),
                                         _train(t / "mvtec", t / "run"))[1],
                           ["cannot read image", "train/good/00"]),
    "image-truncated": (lambda t, m: (_corrupt_first(_cat(m) / "train/good", _png_bytes()[:40]),
                                      _train(t / "mvtec", t / "run"))[1],
                        ["cannot read image", "train/good/00"]),
    "image-mislabelled-text": (lambda t, m: (_corrupt_first(_cat(m) / "train/good",
                                                            b"<html>404</html>"),
                                             _train(t / "mvtec", t / "run"))[1],
                               ["cannot read image", "train/good/00", "PNG, JPEG, BMP or TIFF"]),
    "image-decompression-bomb": (lambda t, m: ("call", _load("image", _bomb(t / "b.png"))),
                                 ["b.png", "decompression bomb", "MAX_IMAGE_PIXELS"]),
    "mask-decompression-bomb": (lambda t, m: ("call", _load("mask", _bomb(t / "b.png"))),
                                ["cannot read mask", "b.png", "decompression bomb"]),
    "header-decompression-bomb": (lambda t, m: ("call", _load("size", _bomb(t / "b.png"))),
                                  ["b.png", "decompression bomb"]),
    "mask-random-bytes": (lambda t, m: (t.joinpath("m.png").write_bytes(os.urandom(100)),
                                        ("call", _load("mask", t / "m.png")))[1],
                          ["cannot read mask", "m.png"]),
    "image-file-missing": (lambda t, m: ("call", _load("image", t / "gone.png")),
                           ["cannot read image", "gone.png", "No such file"]),
    "image-is-a-folder": (lambda t, m: (t.joinpath("d.png").mkdir(),
                                        ("call", _load("image", t / "d.png")))[1],
                          ["cannot read image", "d.png"]),
    "mask-missing": (lambda t, m: (next((_cat(m) / "ground_truth/crack").iterdir()).unlink(),
                                   ("call", _test_set(t)))[1],
                     ["has no mask", "000_mask.png"]),
    "mask-orphan": (lambda t, m: (next((_cat(m) / "test/crack").iterdir()).unlink(),
                                  ("call", _test_set(t)))[1],
                    ["000_mask.png has no image"]),
    "mask-wrong-size": (lambda t, m: (Image.new("L", (8, 8)).save(
        _cat(m) / "ground_truth/crack/000_mask.png"), ("call", _test_set(t)))[1],
                        ["000_mask.png is 8x8", "expected a mask of the image's size"]),
    "unknown-config-key": (lambda t, m: _train(m(), t / "run", "--set", "train.stepz=3"),
                           ["unknown config key 'train.stepz'", "train.steps"]),
    "image-size-not-multiple": (lambda t, m: _train(m(), t / "run", "--set",
                                                    "data.image_size=100"),
                                ["data.image_size", "multiple of 32"]),
    "image-size-hw-not-multiple": (lambda t, m: _train(m(), t / "run", "--set",
                                                       "data.image_size=[100, 64]"),
                                   ["data.image_size", "[height, width]", "multiple of 32"]),
    "resize-unknown": (lambda t, m: _train(m(), t / "run", "--set", "data.resize=crop"),
                       ["data.resize", "'stretch' or 'keep_aspect'"]),
    "tiling-key-unknown": (lambda t, m: _train(m(), t / "run", "--set",
                                               "data.tiling.scal=0.5"),
                           ["unknown config key 'data.tiling.scal'", "data.tiling.scale"]),
    "batch-size-zero": (lambda t, m: _train(m(), t / "run", "--set", "train.batch_size=0"),
                        ["train.batch_size", ">= 1"]),
    "batch-size-absurd": (lambda t, m: _train(m(), t / "run", "--set",
                                              "train.batch_size=100000000"),
                          ["train.batch_size=100000000 is too large", "GiB",
                           "expected train.batch_size between 1 and"]),
    "config-file-missing": (lambda t, m: _train(m(), t / "run", "--config", str(t / "no.yaml")),
                            ["no.yaml"]),
    "output-dir-is-file": (lambda t, m: (t.joinpath("out.txt").write_text(""),
                                         _train(m(), t / "out.txt"))[1],
                           ["{tmp}/out.txt is a file", "--output-dir"]),
    "output-dir-below-file": (lambda t, m: (t.joinpath("out.txt").write_text(""),
                                            _train(m(), t / "out.txt" / "run"))[1],
                              ["{tmp}/out.txt is a file"]),
    "run-exists-without-resume": (lambda t, m: _train(m(), _fake_run(t / "run")),
                                  ["already holds a run", "--resume"]),
    "resume-without-checkpoint": (lambda t, m: _train(m(), t / "run", "--resume"),
                                  ["{tmp}/run", "checkpoints/last.pt"]),
    "resume-corrupt-checkpoint": (lambda t, m: _train(m(), _fake_run(t / "run"), "--resume"),
                                  ["cannot read checkpoint", "{tmp}/run/checkpoints/last.pt"]),
    "run-folder-locked": (lambda t, m: _train(m(), _lock(t / "run", os.getpid(),
                                                         socket.gethostname())),
                          ["{tmp}/run is in use", f"pid {os.getpid()}", "train.lock"]),
    "run-folder-locked-other-host": (lambda t, m: _train(m(), _lock(t / "run", 1, "far-host")),
                                     ["host far-host", "delete the lock file", "--resume"]),
    "detector-without-run": (lambda t, m: ("cli", ["--stage", "detector"]),
                             ["--stage detector needs --run"]),
    "detector-no-segmenter": (lambda t, m: ("cli", ["--stage", "detector", "--run",
                                                    str(t / "run")]),
                              ["no trained segmenter", "{tmp}/run/checkpoints/last.pt"]),
    "run-flag-for-segmenter": (lambda t, m: ("cli", ["--run", str(t)]),
                               ["--run is for --stage detector"]),
    "checkpoint-not-anoseg": (lambda t, m: ("call", _torch_file(t / "x.pt")),
                              ["x.pt is not an anoseg checkpoint"]),
    "demo-cache-unwritable": (lambda t, m: ("call", _demo_under_file(t)),
                              ["cannot write the demo dataset", "blocker", "ANOSEG_DEMO_DIR"]),
}
ROWS_TESTED_ELSEWHERE = {
    "checkpoint-write-fails": "tests/test_reliability.py::"
                              "test_checkpoint_write_failure_keeps_the_previous_one",
    "export-extra-missing": "tests/test_export.py::test_cli_refuses_without_the_export_extra",
    "export-several-runs": "tests/test_export.py::"
                           "test_several_runs_need_ensemble_and_a_bad_file_is_caught",
    "export-does-not-reproduce": "tests/test_export.py::"
                                 "test_several_runs_need_ensemble_and_a_bad_file_is_caught",
    "tensorboard-extra-missing": "tests/test_train_logger.py::"
                                 "test_missing_extra_stops_before_any_work",
}


def _test_set(tmp: Path):
    from anoseg.data.mvtec import MVTecTestDataset

    return lambda: MVTecTestDataset(tmp / "mvtec", "widget", 32)


def _torch_file(path: Path):
    import torch

    from anoseg.checkpoint import load_checkpoint

    torch.save({"weights": torch.ones(1)}, path)
    return lambda: load_checkpoint(path)


def _demo_under_file(tmp: Path):
    from anoseg.data.demo import ensure_demo_dataset

    (tmp / "blocker").write_text("")
    return lambda: ensure_demo_dataset(tmp / "blocker" / "demo" / "v1")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_its_message(case, tmp_path, make_mvtec, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setup, words = CASES[case]
    kind, target = setup(tmp_path, make_mvtec)
    if kind == "cli":
        code = run_cli(train_main, target)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1
        message = err
    else:
        with pytest.raises(AnoSegError) as info:
            target()
        message = str(info.value)
    for word in words:
        assert word.replace("{tmp}", str(tmp_path)) in message, message
    if os.environ.get("ANOSEG_PRINT_MESSAGES"):  # to refresh docs/errors.md by hand
        print(f"\nMSG {case}: {message.strip().replace(str(tmp_path), '<tmp>')}")


def test_the_table_in_docs_lists_every_case():
    text = DOC.read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.MULTILINE)
    assert len(rows) == len(set(rows)) >= 30
    assert set(rows) == set(CASES) | set(ROWS_TESTED_ELSEWHERE)

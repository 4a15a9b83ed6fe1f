"""Issue 16: absurd values refused before any work, the run folder's lock, checkpoint write
failures, stale temporaries, the mask rule, EXIF orientation, a fuzz test of the readers, and
an unwritable demo cache."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from anoseg.checkpoint import load_checkpoint
from anoseg.config import load_config
from anoseg.data import demo as demo_module
from anoseg.data.mvtec import (MAX_IMAGE_PIXELS, binarize_mask, image_size_of, load_image,
                               load_mask)
from anoseg.engine import check_batch_fits
from anoseg.errors import ConfigError, DataError, OutputError, RunInUseError
from anoseg.run_dir import LOCK_FILE, RunDir, StageLock
from anoseg.training import train

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.log_every=1", "train.checkpoint_every=1000"]


def tiny_config(root, *extra, category="demo_texture"):
    return load_config(None, TINY + [f"data.root={root}", f"data.category={category}", *extra])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- absurd values


def test_absurd_batch_size_is_refused_before_any_work(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=1", "train.batch_size=100000000")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"train\.batch_size=100000000 is too large.*"
                                          r"expected train\.batch_size between 1 and"):
        train(cfg, tmp_path / "run", progress=False)
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "run").exists()  # nothing written, not even an empty folder


def test_plausible_large_batch_sizes_pass_the_memory_check(demo_root, tmp_path):
    cpu = torch.device("cpu")
    gib = 1024 ** 3
    # batch 256 of 256x256 images at width 1 fits in a 64 GiB machine; 10**6 does not
    check_batch_fits("train.batch_size", 256, 256, 8 + 256, cpu, memory=64 * gib)
    with pytest.raises(ConfigError, match="between 1 and about"):
        check_batch_fits("train.batch_size", 10 ** 6, 256, 8 + 256, cpu, memory=64 * gib)
    # a batch larger than the category (12 images here) still trains
    cfg = tiny_config(demo_root, "train.steps=1", "train.batch_size=32")
    assert train(cfg, tmp_path / "run", progress=False).steps == 1


def test_output_dir_that_is_a_file(demo_root, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(OutputError, match="notes.txt is a file"):
        train(tiny_config(demo_root, "train.steps=1"), target, progress=False)
    assert target.read_text() == "mine"
    below = target / "run"
    with pytest.raises(OutputError, match="notes.txt is a file"):
        train(tiny_config(demo_root, "train.steps=1"), below, progress=False)


def test_cli_output_dir_that_is_a_file_gives_one_line(demo_root, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "anoseg.cli.train", "--no-progress",
                           "--data-root", str(demo_root), "--category", "demo_texture",
                           "--output-dir", str(target), "--set", "train.steps=1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(target) in proc.stderr and "is a file" in proc.stderr


# --------------------------------------------------------------------------- lock, temporaries


def test_second_training_into_a_locked_folder_is_refused(demo_root, tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(RunInUseError, match=rf"pid {os.getpid()}.*{LOCK_FILE}"):
        train(tiny_config(demo_root, "train.steps=1"), run.path, progress=False)
    assert run.lock.exists()  # someone else's lock is left alone
    run.lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere"}))
    with pytest.raises(RunInUseError, match="host elsewhere"):
        train(tiny_config(demo_root, "train.steps=1"), run.path, progress=False)


def test_stale_lock_is_taken_over_and_removed_at_the_end(demo_root, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    train(tiny_config(demo_root, "train.steps=1"), run.path, progress=False)
    assert "stale lock" in capsys.readouterr().out
    assert not run.lock.exists() and run.has_checkpoint()


def test_lock_is_held_during_training_and_released_on_errors(demo_root, tmp_path, monkeypatch):
    import anoseg.training as training

    seen = {}
    real_step = training.train_step

    def step(state, *args, **kwargs):
        seen["lock"] = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(demo_root, "train.steps=2"), tmp_path / "run", progress=False)
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    monkeypatch.setattr(training, "train_step", real_step)


def test_detector_folder_is_locked(demo_root, tmp_path):
    from anoseg.detector_training import train_detector

    train(tiny_config(demo_root, "train.steps=1"), tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "detector"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(),
                                                "host": socket.gethostname()}))
    with pytest.raises(RunInUseError, match="detector"):
        train_detector(tmp_path / "run", ["detector.steps=1"], progress=False)
    (folder / LOCK_FILE).unlink()
    result = train_detector(tmp_path / "run", ["detector.steps=1", "detector.batch_size=2"],
                            progress=False)
    assert result.steps == 1 and not (folder / LOCK_FILE).exists()


def test_stale_temporary_checkpoints_are_removed_on_resume(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=2")
    train(cfg, tmp_path / "run", progress=False, stop_at=1)
    ckpts = tmp_path / "run" / "checkpoints"
    stale = [ckpts / ".last.pt.abc123.tmp", ckpts / ".last.pt.zz_9.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (ckpts / "keep.txt").write_text("not ours")
    train(cfg, tmp_path / "run", progress=False, resume=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["keep.txt", "last.pt"]


def test_lock_removes_the_folder_it_created_when_nothing_was_written(tmp_path):
    folder = RunDir(tmp_path / "fresh")
    with StageLock(folder):
        assert folder.lock.is_file()
    assert not folder.path.exists()


# --------------------------------------------------------------------------- write failures


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_checkpoint_write_failure_keeps_the_previous_one(demo_root, tmp_path, monkeypatch, err):
    import anoseg.checkpoint as checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save: the checkpoint at step 4
            handle.write(b"\0" * 1000)  # half written, then the disk is full
            raise OSError(err, os.strerror(err))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    cfg = tiny_config(demo_root, "train.steps=6", "train.checkpoint_every=2")
    with pytest.raises(OutputError, match=rf"cannot write checkpoint {path}: "
                                          rf"{os.strerror(err)}.*unchanged.*--resume"):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    result = train(cfg, tmp_path / "run", progress=False, resume=True)
    assert result.steps == 6


def test_torch_writer_runtime_error_is_a_clear_error(tmp_path, monkeypatch):
    import anoseg.checkpoint as checkpoint

    def failing_save(obj, handle, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed "
                           "writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OutputError, match="c.pt.*no checkpoint was written"):
        checkpoint.save_checkpoint(tmp_path / "c.pt", {"generator": {}, "config": {}})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the mask rule


def _jpeg_square_mask(path, side=64, square=20, offset=22):
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[offset:offset + square, offset:offset + square] = 255
    Image.fromarray(mask).save(path, quality=75)
    return mask


def test_jpeg_mask_reads_as_its_square(tmp_path):
    _jpeg_square_mask(tmp_path / "m.jpg")
    noisy = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert int((noisy > 0).sum()) > 420  # the old `> 0` rule read the noise as defect
    out = load_mask(tmp_path / "m.jpg", 64)
    assert abs(int(out.sum()) - 400) <= 8
    assert int(out[22:42, 22:42].sum()) >= 392


@pytest.mark.parametrize("peak, mode", [(1, "L"), (255, "L"), (65535, "I;16"), (40000, "I"),
                                        (1.0, "F")])
def test_masks_of_any_scale_read_alike(tmp_path, peak, mode):
    values = np.zeros((16, 16), dtype=np.float64)
    values[4:8, 4:12] = peak
    dtype = {"L": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    img = Image.fromarray(values.astype(dtype))  # uint16 gives I;16
    path = tmp_path / ("m.tif" if mode in ("F", "I") else "m.png")
    img.save(path)
    out = load_mask(path, 16)
    assert int(out.sum()) == 32 and int(out[4, 4]) == 1


def test_palette_and_rgb_masks(tmp_path):
    rgb = np.zeros((12, 12, 3), dtype=np.uint8)
    rgb[1:4, 1:4] = (200, 30, 30)
    rgb[0, 0] = (3, 2, 1)  # compression-like noise
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    for name in ("rgb.png", "pal.png"):
        out = load_mask(tmp_path / name, 12)
        assert int(out.sum()) == 9, name


def test_binarize_mask_rule():
    assert binarize_mask(np.zeros((3, 3))).sum() == 0
    assert binarize_mask(np.array([[0, 1], [1, 0]])).tolist() == [[0, 1], [1, 0]]
    assert binarize_mask(np.array([[0, 3, 5], [255, 250, 100]])).tolist() == [[0, 0, 0],
                                                                              [1, 1, 0]]


# --------------------------------------------------------------------------- EXIF orientation


def _exif_jpeg(path, array, orientation):
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    image = np.zeros((32, 64, 3), dtype=np.uint8)  # stored landscape, displayed portrait
    image[:, :8] = 255
    _exif_jpeg(tmp_path / "img.jpg", image, 6)  # 6: rotate 90 degrees clockwise to display
    mask = np.zeros((32, 64), dtype=np.uint8)
    mask[:, :8] = 255
    _exif_jpeg(tmp_path / "mask.jpg", mask, 6)
    assert image_size_of(tmp_path / "img.jpg") == (64, 32)  # (H, W) as displayed
    shown = load_image(tmp_path / "img.jpg", 64).float().mean(dim=0)
    assert shown[:8].mean() > 200 and shown[32:].mean() < 30  # the bright band is at the top
    out = load_mask(tmp_path / "mask.jpg", 64, expected_hw=(64, 32))
    assert out[:8].float().mean() > 0.9 and out[32:].sum() == 0


# --------------------------------------------------------------------------- fuzz


def _encoded(fmt: str, rng: np.random.Generator, mode: str = "RGB") -> bytes:
    hw = tuple(int(v) for v in rng.integers(4, 40, size=2))
    array = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    img = Image.fromarray(array).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png(side: int) -> bytes:
    """A valid PNG header (IHDR) declaring ``side`` x ``side`` pixels, then a tiny body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _fuzz_files(tmp_path, count: int = 300):
    rng = np.random.default_rng(16)
    formats = [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")]
    files = []
    for i in range(count):
        kind = i % 6
        fmt, ext = formats[int(rng.integers(len(formats)))]
        if kind == 0:  # random bytes
            data = rng.integers(0, 256, size=int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
        elif kind in (1, 2):  # a valid file cut short
            full = _encoded(fmt, rng)
            data = full[:int(rng.integers(0, max(len(full) - 1, 1)))]
        elif kind == 3:  # a valid file with bytes flipped (past the signature)
            data = bytearray(_encoded(fmt, rng))
            for _ in range(int(rng.integers(1, 20))):
                data[int(rng.integers(8, len(data)))] = int(rng.integers(256))
            data = bytes(data)
        elif kind == 4:  # mislabelled: another format's bytes, or text, under this extension
            other = formats[(formats.index((fmt, ext)) + 1) % len(formats)][0]
            data = _encoded(other, rng) if i % 12 < 6 else b"<html>not an image</html>"
        else:  # a header declaring a huge image
            data = _bomb_png(int(rng.integers(20_000, 60_000)))
            ext = ".png"
        path = tmp_path / f"f{i:03d}{ext}"
        path.write_bytes(data)
        files.append(path)
    return files


def test_fuzz_image_and_mask_readers(tmp_path):
    started = time.perf_counter()
    outcomes = {"error": 0, "read": 0}
    for path in _fuzz_files(tmp_path):
        for reader in (lambda p: load_image(p, 32), lambda p: load_mask(p, 32),
                       image_size_of):
            try:
                out = reader(path)
            except DataError as exc:
                assert str(path) in str(exc), str(exc)
                outcomes["error"] += 1
            else:  # a corruption the decoder tolerates: still a well-formed result
                if isinstance(out, torch.Tensor):
                    assert out.dtype == torch.uint8 and out.shape[-2:] == (32, 32)
                outcomes["read"] += 1
    assert outcomes["error"] > 400
    assert time.perf_counter() - started < 20


def test_decompression_bomb_is_a_data_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(40_000))
    for reader in (lambda p: load_image(p, 32), lambda p: load_mask(p, 32), image_size_of):
        with pytest.raises(DataError, match=rf"bomb.png.*{MAX_IMAGE_PIXELS:,}"):
            reader(path)


@pytest.mark.parametrize("mode", ["RGB", "I;16", "P", "LA", "RGBA", "1"])
def test_valid_masks_of_unusual_modes_read_by_the_rule(tmp_path, mode):
    values = np.zeros((10, 10), dtype=np.uint8)
    values[2:5, 2:5] = 255
    img = Image.fromarray(values)
    if mode == "I;16":
        img = Image.fromarray(values.astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    path = tmp_path / "m.png"
    img.save(path)
    assert int(load_mask(path, 10).sum()) == 9


# --------------------------------------------------------------------------- demo cache


def test_unwritable_demo_cache_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "home_is_a_file"
    blocker.write_text("")
    monkeypatch.setenv("ANOSEG_DEMO_DIR", str(blocker / "cache"))
    with pytest.raises(DataError, match=r"home_is_a_file.*ANOSEG_DEMO_DIR"):
        demo_module.ensure_demo_dataset()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setenv("ANOSEG_DEMO_DIR", str(tmp_path / "ro"))
    monkeypatch.setattr(demo_module.tempfile, "mkdtemp", read_only)
    with pytest.raises(DataError, match=r"ro.*Permission denied.*ANOSEG_DEMO_DIR"):
        demo_module.ensure_demo_dataset()

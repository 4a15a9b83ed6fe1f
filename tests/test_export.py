"""anoseg-export (issue 15): the ONNX and TorchScript files reproduce the PyTorch path
(anoseg.inference's maps, anoseg.metrics' image scores, the detector's eq. 5 score) at dynamic
batch sizes, carry the thresholds and image size, and the CLI refuses clearly without the
``export`` extra."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from anoseg.cli.common import run_cli
from anoseg.cli.export import main as export_main
from anoseg.config import load_config
from anoseg.detector_training import train_detector
from anoseg.errors import ConfigError, ExportError
from anoseg.export import (TORCH_IMAGE_SCORES, DeployedAnoSeg, read_export_metadata,
                           verify_export)
from anoseg.inference import (detector_scores, load_detector, load_ensemble, load_images,
                              load_model, predict_anomaly_scores)
from anoseg.metrics import IMAGE_SCORES, image_scores
from anoseg.threshold import cached_label_free_threshold, holdout_image_paths, image_threshold_for
from anoseg.training import train

CATEGORY = "demo_texture"
TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=2", "train.checkpoint_every=1000", "train.device=cpu",
        "model.map_skips=2", "model.normal_stats=true", "model.feature_stats=true",
        "model.compare_head=true", "train.rec_target=clean", "model.residual_weight=1.0",
        "model.lowpass_weight=0.125",
        "data.split_seed=0"]
MAP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """Two tiny runs of one category (one split, so they ensemble), with the preprocessing the
    export must carry (coordinate channels, normal-statistics channels, skips, the feature
    statistics, the comparison head, the residual and the low-pass signals)."""
    base = tmp_path_factory.mktemp("export")
    paths = []
    for seed in (0, 1):
        cfg = load_config(None, TINY + [f"data.root={demo_root}", f"data.category={CATEGORY}",
                                        f"train.seed={seed}"])
        train(cfg, base / f"s{seed}", progress=False)
        paths.append(base / f"s{seed}")
    return paths


@pytest.fixture(scope="module")
def test_images(demo_root):
    """Four test images (defective and good) as the networks take them."""
    folder = demo_root / CATEGORY / "test"
    paths = (sorted((folder / "stain").glob("*.png"))[:2]
             + sorted((folder / "good").glob("*.png"))[:2])
    return load_images(paths, 64)


def _onnx_run(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, lambda x: session.run(["anomaly_map", "image_score"], {"images": x.numpy()})


def _torchscript_run(path: Path):
    files = {"anoseg_metadata.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), _extra_files=files)

    def run(x):
        with torch.no_grad():
            return [t.numpy() for t in module(x)]

    return files, run


def _compare(run, images, want_maps, want_scores, rtol=1e-5, atol=1e-5):
    """The exported outputs at batch sizes 1 and 3 against the PyTorch path's."""
    for rows in (slice(0, 1), slice(0, 3), slice(1, 4)):
        got_map, got_score = run(images[rows])
        assert got_map.shape == tuple(want_maps[rows].shape) and got_map.dtype == np.float32
        assert np.abs(got_map - want_maps[rows].numpy()).max() <= MAP_TOLERANCE
        np.testing.assert_allclose(got_score, want_scores[rows], rtol=rtol, atol=atol)


def test_torch_image_scores_equal_the_metrics():
    logits = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 5
    assert set(TORCH_IMAGE_SCORES) == set(IMAGE_SCORES)
    want = image_scores(logits)
    for name, score in TORCH_IMAGE_SCORES.items():
        np.testing.assert_allclose(score(logits).numpy(), want[name], rtol=1e-6, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_pytorch_and_stores_the_thresholds(fmt, runs, test_images, tmp_path,
                                                             capsys):
    output = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert export_main(["--run", str(runs[0]), "--format", fmt, "--output", str(output),
                        "--no-progress"]) == 0
    assert f"wrote: {output}" in capsys.readouterr().out

    model = load_model(runs[0], device="cpu")
    maps, logits = predict_anomaly_scores(model.generator, test_images)
    holdout = holdout_image_paths(model)
    checkpoint = runs[0] / "checkpoints" / "last.pt"
    pixel, _ = cached_label_free_threshold(model, checkpoint, holdout)
    image = image_threshold_for(model, holdout, "max", checkpoint, None, batch_size=16,
                                progress=False)
    if fmt == "onnx":
        session, run = _onnx_run(output)
        assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch size
        props = session.get_modelmeta().custom_metadata_map
        assert props["image_size"] == "64" and props["image_score"] == "max"
        assert float(props["image_threshold"]) == image
        assert float(props["pixel_threshold"]) == pixel
    else:
        files, run = _torchscript_run(output)
        assert b'"image_size": 64' in files["anoseg_metadata.json"]
    _compare(run, test_images, maps, image_scores(logits)["max"])
    meta = read_export_metadata(output)
    assert (meta["image_size"], meta["image_score"]) == (64, "max")
    assert meta["image_threshold"] == image and meta["pixel_threshold"] == pixel
    assert meta["n_holdout_images"] == len(holdout) > 0 and meta["members"] == []


def test_ensemble_exports_its_averaged_map(runs, test_images, tmp_path):
    output = tmp_path / "ensemble.pt"
    assert export_main(["--run", *map(str, runs), "--ensemble", "--format", "torchscript",
                        "--output", str(output), "--image-score", "blur3_max",
                        "--no-progress"]) == 0
    model = load_ensemble(runs, device="cpu")
    maps, logits = predict_anomaly_scores(model.generator, test_images)
    _, run = _torchscript_run(output)
    _compare(run, test_images, maps, image_scores(logits)["blur3_max"])
    meta = read_export_metadata(output)
    assert meta["image_score"] == "blur3_max" and len(meta["members"]) == 2
    assert meta["image_threshold"] is not None  # the members share their held-out images


def test_a_calibrated_ensemble_exports_with_its_fit(runs, test_images, tmp_path):
    from anoseg.inference import calibrate_ensemble

    output = tmp_path / "calibrated.pt"
    assert export_main(["--run", *map(str, runs), "--ensemble", "--format", "torchscript",
                        "--output", str(output), "--ensemble-combine", "calibrated",
                        "--image-score", "max", "--no-progress"]) == 0
    model = load_ensemble(runs, device="cpu")
    model.config.eval.ensemble_combine = "calibrated"
    calibrate_ensemble(model, [Path(p) for p in model.data.split.holdout])
    maps, logits = predict_anomaly_scores(model.generator, test_images)
    plain, _ = predict_anomaly_scores(load_ensemble(runs, device="cpu").generator, test_images)
    assert not torch.allclose(maps, plain, atol=1e-3)  # the file must carry the fit
    _, run = _torchscript_run(output)
    _compare(run, test_images, maps, image_scores(logits)["max"])


@pytest.mark.parametrize("fmt, score", [("onnx", "signals_max"), ("torchscript", "signals_max"),
                                        ("onnx", "signals_mean"), ("torchscript", "signals_mean")])
def test_signal_scores_export_from_the_same_pass(fmt, score, runs, test_images, tmp_path):
    output = tmp_path / f"signals.{'onnx' if fmt == 'onnx' else 'pt'}"
    args = ["--run", *map(str, runs), "--ensemble"] if fmt == "torchscript" else [
        "--run", str(runs[0])]
    assert export_main([*args, "--format", fmt, "--output", str(output), "--image-score",
                        score, "--no-progress"]) == 0
    model = (load_ensemble(runs, device="cpu") if fmt == "torchscript"
             else load_model(runs[0], device="cpu"))
    assert model.generator.has_signal_image_map()
    maps, _ = predict_anomaly_scores(model.generator, test_images)
    with torch.no_grad():
        peaks = model.generator.signal_maps(test_images).flatten(2).amax(2)
    want = (peaks.amax(1) if score == "signals_max" else peaks.mean(1)).numpy()
    run = _onnx_run(output)[1] if fmt == "onnx" else _torchscript_run(output)[1]
    _compare(run, test_images, maps, want, atol=1e-4)  # export.SCORE_TOLERANCE's units
    meta = read_export_metadata(output)
    assert meta["image_score"] == score and meta["image_threshold"] is not None


def test_detector_exports_with_its_score(runs, test_images, tmp_path):
    train_detector(runs[1], ["detector.steps=2", "detector.batch_size=4",
                             "detector.checkpoint_every=1000"], progress=False)
    output = tmp_path / "detector.onnx"
    assert export_main(["--run", str(runs[1]), "--format", "onnx", "--output", str(output),
                        "--image-score", "detector", "--no-progress"]) == 0
    model = load_model(runs[1], device="cpu")
    maps, _ = predict_anomaly_scores(model.generator, test_images)
    scores = detector_scores(load_detector(runs[1], device="cpu"), model.generator, test_images)
    _, run = _onnx_run(output)
    _compare(run, test_images, maps, scores.numpy(), rtol=1e-4)
    meta = read_export_metadata(output)
    assert meta["image_score"] == "detector" and meta["detector_step"] == 2


def test_cli_refuses_without_the_export_extra(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    code = run_cli(export_main, ["--run", str(runs[0]), "--format", "onnx", "--output",
                                 str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "needs the package onnxscript" in err
    assert "pip install 'anoseg-torch[export]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_several_runs_need_ensemble_and_a_bad_file_is_caught(runs, test_images, tmp_path):
    with pytest.raises(ConfigError, match="2 runs given: pass --ensemble"):
        export_main(["--run", *map(str, runs), "--format", "torchscript",
                     "--output", str(tmp_path / "x.pt")])
    output = tmp_path / "one.pt"
    export_main(["--run", str(runs[0]), "--format", "torchscript", "--output", str(output),
                 "--no-progress"])
    other = load_model(runs[1], device="cpu")  # other weights: the check must fail
    with pytest.raises(ExportError, match="does not reproduce"):
        verify_export(output, "torchscript", DeployedAnoSeg(other.generator, "max").eval(),
                      test_images[:3])


def test_non_square_run_exports_and_tiled_run_is_refused(demo_root, tmp_path):
    """A [height, width] keep_aspect run exports at its canvas size; a tiled run is refused
    (its maps come from a sliding window the one-window file does not do)."""
    from anoseg.export import export_run

    base = [x for x in TINY if not x.startswith(("data.image_size", "model.normal_stats"))]
    cfg = load_config(None, base + [f"data.root={demo_root}", f"data.category={CATEGORY}",
                                    "data.image_size=[64, 96]", "data.resize=keep_aspect"])
    train(cfg, tmp_path / "wide", progress=False)
    result = export_run(tmp_path / "wide", "torchscript")
    assert result.metadata["image_size"] == [64, 96] and result.metadata["resize"] == "keep_aspect"
    assert result.max_map_difference <= MAP_TOLERANCE
    tiled = load_config(None, base + [f"data.root={demo_root}", f"data.category={CATEGORY}",
                                      "data.tiling.enabled=true", "data.tiling.scale=0.5",
                                      "model.feature_stats=false",
                                      "model.residual_weight=0", "model.lowpass_weight=0"])
    train(tiled, tmp_path / "tiled", progress=False)
    with pytest.raises(ExportError, match="tiling"):
        export_run(tmp_path / "tiled", "torchscript")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_roughness_channel_exports(fmt, runs, test_images, tmp_path):
    from anoseg.refit import refit_run

    rough = refit_run(runs[0], tmp_path / "rough", ["model.lowpass_roughness=true"],
                      device="cpu", progress=False)
    output = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert export_main(["--run", str(rough), "--format", fmt, "--output", str(output),
                        "--no-progress"]) == 0
    model = load_model(rough, device="cpu")
    assert model.generator.lowpass.lowpass_mean.shape[1] == 5
    maps, logits = predict_anomaly_scores(model.generator, test_images)
    run = _onnx_run(output)[1] if fmt == "onnx" else _torchscript_run(output)[1]
    _compare(run, test_images, maps, image_scores(logits)["max"])

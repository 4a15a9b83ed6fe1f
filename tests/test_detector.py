"""The image-level detector (paper 3.4, appendix A): model, step, ablation switches, frozen
AnoSeg, score, run folder, resume, NaN guard and the CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anoseg
from anoseg.checkpoint import load_checkpoint
from anoseg.config import load_config
from anoseg.data.mvtec import MVTecTestDataset
from anoseg.detector_training import (DetectorTrainingDataset, create_detector_state,
                                      detector_train_step, freeze, train_detector)
from anoseg.inference import detector_scores, load_detector
from anoseg.errors import CheckpointError, ConfigError, TrainingDivergedError
from anoseg.models.detector import AnoSegDetector
from anoseg.training import train

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.log_every=1", "train.checkpoint_every=1000", "detector.batch_size=4",
        "detector.checkpoint_every=1000"]
CATEGORY = "demo_texture"


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def segmenter_run(demo_root, tmp_path_factory):
    """A tiny AnoSeg run, trained once for the whole module."""
    run = tmp_path_factory.mktemp("detector") / "run"
    cfg = load_config(None, TINY + [f"data.root={demo_root}", f"data.category={CATEGORY}",
                                    "train.steps=30", "train.lr_generator=1e-3"])
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def trained_detector(segmenter_run):
    """The paper's detector trained briefly on ``segmenter_run``; the segmenter checkpoint's
    digest before training is returned with it."""
    before = _digest(segmenter_run / "checkpoints" / "last.pt")
    result = train_detector(segmenter_run, ["detector.steps=20"] + TINY[4:], progress=False)
    return result, before


@pytest.fixture(scope="module")
def frozen_segmenter(segmenter_run):
    return freeze(anoseg.load_model(segmenter_run, device="cpu").generator)


def _batch(cfg, n=4, seed=0):
    images = (torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
              * 255).to(torch.uint8)
    dataset = DetectorTrainingDataset(images, 64, cfg.synthesis)
    samples = [dataset[(i, seed + i)] for i in range(n)]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def test_detector_shapes():
    det = AnoSegDetector(image_size=64, width=0.125).eval()
    assert det.generator.map_decoder is None and det.generator.reconstruction_decoder is not None
    x = torch.rand(2, 3, 64, 64)
    assert det.reconstruct(x).shape == (2, 3, 64, 64)
    logits, features = det.discriminate(x, torch.ones(2, 1, 64, 64))
    assert logits.shape == (2,) and features.ndim == 2 and features.shape[0] == 2
    assert det.score(x, torch.ones(2, 1, 64, 64)).shape == (2,)
    base = AnoSegDetector(image_size=64, width=0.125, use_anomaly_map=False).eval()
    assert base.discriminator.features[0].in_channels == 3
    assert det.discriminator.features[0].in_channels == 4
    assert base.score(x, None).shape == (2,)


def test_dataset_gives_normals_and_their_synthetic_anomalies():
    cfg = load_config(None, TINY)
    batch = _batch(cfg)
    assert torch.equal(batch["normality"], torch.ones(4, 1, 64, 64))
    ano = batch["anomaly_normality"]
    assert ano.shape == (4, 1, 64, 64) and (ano < 1).flatten(1).any(1).all()
    changed = (batch["anomaly_image"] != batch["image"]).any(1, keepdim=True)
    assert not changed[ano == 1].any()  # only pasted pixels differ from the normal image


def test_one_step_changes_both_networks_and_not_anoseg(frozen_segmenter):
    cfg = load_config(None, TINY)
    state = create_detector_state(cfg, CPU)
    g0, d0 = _state(state.detector.generator), _state(state.detector.discriminator)
    a0 = _state(frozen_segmenter)
    losses = detector_train_step(state, frozen_segmenter, _batch(cfg), cfg.detector,
                                 device=CPU)
    assert set(losses) == {"adv", "rec", "fea", "cls", "disc", "total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert _changed(g0, state.detector.generator) and _changed(d0, state.detector.discriminator)
    assert not _changed(a0, frozen_segmenter)  # weights and batch-norm statistics
    assert not frozen_segmenter.training
    assert all(p.grad is None and not p.requires_grad for p in frozen_segmenter.parameters())
    assert state.step == 1 and state.images_seen == 4


@pytest.mark.parametrize("name, keys, in_channels", [
    ("detector_base", {"adv", "rec", "disc", "total"}, 3),
    ("detector_feature_matching", {"adv", "rec", "fea", "disc", "total"}, 3),
    ("detector_anomaly_map", {"adv", "rec", "fea", "disc", "total"}, 4),
    ("detector_full", {"adv", "rec", "fea", "cls", "disc", "total"}, 4),
])
def test_ablation_configs_change_the_loss(frozen_segmenter, name, keys, in_channels):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", TINY)
    state = create_detector_state(cfg, CPU)
    assert state.detector.discriminator.features[0].in_channels == in_channels
    losses = detector_train_step(state, frozen_segmenter, _batch(cfg), cfg.detector,
                                 device=CPU)
    assert set(losses) == keys


def test_input_map_and_cls_map_change_the_loss_values(frozen_segmenter):
    """Same seed and batch: switching the input map or L_cls's map changes the numbers."""
    def run(*extra):
        cfg = load_config(None, TINY + list(extra))
        state = create_detector_state(cfg, CPU)
        return detector_train_step(state, frozen_segmenter, _batch(cfg), cfg.detector,
                                   device=CPU)

    with_map = run()
    without_map = run("detector.use_anomaly_map=false")
    anoseg_map = run("detector.cls_map=anoseg")
    assert with_map["disc"] != without_map["disc"]
    assert with_map["cls"] != anoseg_map["cls"]
    assert with_map["rec"] == anoseg_map["rec"]  # the generator side is untouched by cls_map


def test_training_writes_the_run_and_keeps_anoseg_frozen(segmenter_run, trained_detector):
    result, digest_before = trained_detector
    assert result.steps == 20 and result.stopped == "completed"
    assert _digest(segmenter_run / "checkpoints" / "last.pt") == digest_before
    folder = segmenter_run / "detector"
    for name in ("last.pt", "losses.jsonl", "summary.json", "config.yaml"):
        assert (folder / name).is_file()
    ckpt = load_checkpoint(folder / "last.pt")
    assert ckpt["kind"] == "anoseg-detector" and ckpt["step"] == 20
    assert ckpt["anoseg_step"] == load_checkpoint(segmenter_run)["step"] == 30
    assert load_config(folder / "config.yaml").detector.steps == 20
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["anoseg_step"] == 30 and summary["steps"] == 20


def test_score_is_higher_for_an_obvious_defect(segmenter_run, trained_detector):
    segmenter = anoseg.load_model(segmenter_run, device="cpu")
    bundle = load_detector(segmenter_run, device="cpu")
    assert bundle.anoseg_step == 30 and not bundle.detector.training
    dataset = MVTecTestDataset(segmenter.config.data.root, CATEGORY, 64)
    items = [dataset[i] for i in range(len(dataset))]
    normals = torch.stack([it["image"] for it in items if it["label"] == 0])
    # The defect with the largest area is the obvious one.
    obvious = max((it for it in items if it["label"] == 1), key=lambda it: it["mask"].sum())
    scores = detector_scores(bundle, segmenter.generator,
                             torch.cat([obvious["image"][None], normals]), batch_size=8)
    assert scores.shape == (1 + len(normals),) and torch.isfinite(scores).all()
    assert scores[0] > scores[1:].median(), scores
    # One image's score does not depend on the batch it is scored in.
    alone = detector_scores(bundle, segmenter.generator, normals[:1])
    assert torch.allclose(alone, scores[1:2], rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(segmenter_run, tmp_path):
    args = ["detector.steps=6"] + TINY[4:]
    train_detector(segmenter_run, args, output_dir=tmp_path / "full", progress=False)
    stopped = train_detector(segmenter_run, args, output_dir=tmp_path / "resumed",
                             progress=False, stop_at=3)
    assert stopped.steps == 3 and stopped.stopped == "stop_at"
    with pytest.raises(CheckpointError, match="--resume"):
        train_detector(segmenter_run, args, output_dir=tmp_path / "resumed", progress=False)
    resumed = train_detector(segmenter_run, args, output_dir=tmp_path / "resumed",
                             progress=False, resume=True)
    assert resumed.steps == 6
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    again = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for part in ("generator", "discriminator"):
        for key, value in full[part].items():
            assert torch.equal(value, again[part][key]), (part, key)
    log = (tmp_path / "resumed" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 7))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(segmenter_run, tmp_path, monkeypatch):
    import anoseg.detector_training as detector

    real_loss = detector.reconstruction_loss
    calls = {"n": 0}

    def poisoned(reconstruction, images):
        calls["n"] += 1
        loss = real_loss(reconstruction, images)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(detector, "reconstruction_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="rec.*nan.*step 2"):
        train_detector(segmenter_run, ["detector.steps=5", "detector.checkpoint_every=2",
                                       "detector.use_cls_loss=false", "detector.batch_size=4"],
                       output_dir=tmp_path / "det", progress=False)
    assert load_checkpoint(tmp_path / "det" / "last.pt")["step"] == 2


def test_config_file_time_budget_and_guards(segmenter_run, tmp_path):
    result = train_detector(segmenter_run, ["detector.steps=100000"] + TINY[4:],
                            config_path=REPO / "configs" / "detector_base.yaml",
                            output_dir=tmp_path / "det", progress=False, time_budget=0.01)
    assert result.stopped == "time_budget" and 0 < result.steps < 100000
    assert load_checkpoint(tmp_path / "det" / "last.pt")["step"] == result.steps
    saved = load_config(tmp_path / "det" / "config.yaml")
    assert not saved.detector.use_anomaly_map and not saved.detector.use_cls_loss
    assert saved.detector.time_budget == 0.01
    with pytest.raises(ConfigError, match="model.width"):
        train_detector(segmenter_run, ["model.width=0.5"], output_dir=tmp_path / "other")
    with pytest.raises(CheckpointError, match="no detector checkpoint"):
        load_detector(tmp_path / "nowhere")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "anoseg.cli.train", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_without_segmenter_gives_one_clear_line(tmp_path):
    proc = _cli("--stage", "detector", "--run", str(tmp_path / "empty"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "empty" / "checkpoints" / "last.pt") in lines[0]


def test_eval_and_predict_report_the_detector(segmenter_run, trained_detector, demo_root,
                                              tmp_path):
    from anoseg.evaluation import evaluate_run
    from anoseg.predict import predict_run

    report = evaluate_run(segmenter_run, output_dir=tmp_path / "eval", device="cpu",
                          progress=False)
    result = report.results[CATEGORY]
    assert 0.0 <= result["image_auroc_detector"] <= 1.0 and 0.0 <= result["image_auroc"] <= 1.0
    assert "Image AUROC (detector)" in report.table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["categories"][CATEGORY]["image_auroc_detector"] == result[
        "image_auroc_detector"]
    images = sorted((demo_root / CATEGORY / "test" / "stain").glob("*.png"))[:2]
    prediction = predict_run(segmenter_run, images, tmp_path / "pred", device="cpu",
                             progress=False)
    assert all(row["detector_score"] > 0 for row in prediction.rows)
    header = (tmp_path / "pred" / "scores.csv").read_text().splitlines()[0]
    assert "detector_score" in header.split(",")


def test_run_detector_never_gives_an_ensemble_its_first_members_detector(segmenter_run,
                                                                          trained_detector):
    from anoseg.inference import load_ensemble, run_detector

    ckpt = segmenter_run / "checkpoints" / "last.pt"
    single = anoseg.load_model(segmenter_run, device="cpu")
    assert run_detector(ckpt, single, "cpu")[0] is not None  # the run has one
    ensemble = load_ensemble([segmenter_run, segmenter_run], device="cpu")
    assert run_detector(ckpt, ensemble, "cpu") == (None, None)

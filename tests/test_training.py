import json
import subprocess
import sys
import warnings

import pytest
import torch

import anoseg
from anoseg.checkpoint import load_checkpoint, save_checkpoint
from anoseg.config import load_config
from anoseg.data.training_data import synthetic_batch
from anoseg.errors import CheckpointError, TrainingDivergedError
from anoseg.training import create_train_state, train, train_step

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.log_every=1", "train.checkpoint_every=1000"]


def tiny_config(root, *extra, category="demo_texture"):
    return load_config(None, TINY + [f"data.root={root}", f"data.category={category}",
                                     *extra])


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_one_step_changes_generator_and_discriminator():
    cfg = load_config(None, TINY)
    state = create_train_state(cfg, torch.device("cpu"))
    g0, d0 = _params(state.generator), _params(state.discriminator)
    batch = synthetic_batch(torch.rand(4, 3, 64, 64), cfg.synthesis, seed=0, anomaly_ratio=0.5)
    losses = train_step(state, batch, cfg.train, device=torch.device("cpu"))
    assert set(losses) >= {"seg", "rec", "adv", "disc", "total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, _params(state.generator)))
    assert any(not torch.equal(a, b) for a, b in zip(d0, _params(state.discriminator)))
    assert state.step == 1 and state.images_seen == 4


def test_grad_clip_scales_gradients_to_the_norm_and_reports_it():
    from anoseg.engine import optimizer_step

    weight = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.tensor([6.0, 8.0, 0.0, 0.0])  # norm 10
    norm = optimizer_step(opt, None, max_norm=1.0)
    assert float(norm) == pytest.approx(10.0)
    assert torch.allclose(weight.detach(), torch.tensor([-0.6, -0.8, 0.0, 0.0]))
    weight.grad = torch.tensor([6.0, 8.0, 0.0, 0.0])
    assert optimizer_step(opt, None) is None  # off: the plain step
    assert torch.allclose(weight.detach(), torch.tensor([-6.6, -8.8, 0.0, 0.0]))

    cfg = load_config(None, TINY + ["train.grad_clip=0.5"])
    state = create_train_state(cfg, torch.device("cpu"))
    batch = synthetic_batch(torch.rand(4, 3, 64, 64), cfg.synthesis, seed=0)
    losses = train_step(state, batch, cfg.train, device=torch.device("cpu"))
    assert losses["grad_norm"] > 0.5  # a fresh model's gradients are larger: they were clipped
    plain = load_config(None, TINY)
    state = create_train_state(plain, torch.device("cpu"))
    assert "grad_norm" not in train_step(state, batch, plain.train, device=torch.device("cpu"))


def test_base_model_ablation_trains_map_only():
    cfg = load_config(None, TINY + ["model.reconstruction=false", "train.adversarial=false"])
    state = create_train_state(cfg, torch.device("cpu"))
    assert state.discriminator is None
    batch = synthetic_batch(torch.rand(4, 3, 64, 64), cfg.synthesis, seed=0)
    losses = train_step(state, batch, cfg.train, device=torch.device("cpu"))
    assert set(losses) == {"seg", "total", "map_std"}


def test_short_run_lowers_segmentation_loss(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=60", "train.batch_size=8",
                      "train.lr_generator=1e-3")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 60 and result.stopped == "completed"
    log = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    first = sum(r["seg"] for r in log[:10]) / 10
    last = sum(r["seg"] for r in log[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    for name in ("config.yaml", "split.json", "summary.json", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).is_file()
    model = anoseg.load_model(tmp_path / "run", device="cpu")
    maps = anoseg.predict_anomaly_maps(model.generator, torch.rand(3, 3, 64, 64))
    assert maps.shape == (3, 64, 64) and 0 <= maps.min() and maps.max() <= 1


@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9", "model.map_skips=2"],
                                   ["train.ema_decay=0.9", "model.normal_stats=true"]],
                         ids=["plain", "ema+skips", "ema+normal_stats"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(demo_root, tmp_path, extra):
    cfg = tiny_config(demo_root, "train.steps=8", *extra)
    train(cfg, tmp_path / "full", progress=False)
    stopped = train(cfg, tmp_path / "resumed", progress=False, stop_at=4)
    assert stopped.steps == 4 and stopped.stopped == "stop_at"
    resumed = train(cfg, tmp_path / "resumed", progress=False, resume=True)
    assert resumed.steps == 8
    full = load_checkpoint(tmp_path / "full")
    again = load_checkpoint(tmp_path / "resumed")
    parts = ("generator", "discriminator") + (("generator_ema",) if extra else ())
    for part in parts:
        for key, value in full[part].items():
            assert torch.equal(value, again[part][key]), (part, key)
    log = (tmp_path / "resumed" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 9))


def test_ema_weights_average_the_raw_weights_and_serve_inference(demo_root, tmp_path):
    from anoseg.training import ema_update

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * a.weight.detach().clone() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9, step=1000)
    assert torch.allclose(a.weight, expected)

    cfg = tiny_config(demo_root, "train.steps=6", "train.ema_decay=0.5")
    train(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run")
    raw, ema = ckpt["generator"], ckpt["generator_ema"]
    name = "map_decoder.head.0.weight"
    assert not torch.equal(raw[name], ema[name])
    for key in raw:  # batch-norm statistics are copied, not averaged
        if key.endswith("running_mean"):
            assert torch.equal(raw[key], ema[key])
    for weights, expected in (("auto", ema), ("ema", ema), ("raw", raw)):
        model = anoseg.load_model(tmp_path / "run", device="cpu", weights=weights)
        assert torch.equal(model.generator.state_dict()[name], expected[name]), weights
        assert model.weights == ("raw" if weights == "raw" else "ema")
    # the cached label-free threshold belongs to one set of weights, not to the file
    from anoseg.threshold import cached_label_free_threshold, holdout_image_paths

    ckpt_path = tmp_path / "run" / "checkpoints" / "last.pt"
    for weights, from_cache in (("ema", False), ("ema", True), ("raw", False), ("raw", True)):
        model = anoseg.load_model(tmp_path / "run", device="cpu", weights=weights)
        paths = holdout_image_paths(model, None, tmp_path / "run")
        assert paths
        assert cached_label_free_threshold(model, ckpt_path, paths)[1] is from_cache, weights
    plain = tiny_config(demo_root, "train.steps=1")
    train(plain, tmp_path / "plain", progress=False)
    assert "generator_ema" not in load_checkpoint(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="ema_decay=0"):
        anoseg.load_model(tmp_path / "plain", device="cpu", weights="ema")


def test_existing_run_needs_resume(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=1")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(demo_root, tmp_path, monkeypatch):
    cfg = tiny_config(demo_root, "train.steps=6", "train.checkpoint_every=2")
    import anoseg.training as training

    real_loss = training.segmentation_loss
    calls = {"n": 0}

    def poisoned(normality, target, **kwargs):
        calls["n"] += 1
        loss = real_loss(normality, target, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "segmentation_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="seg.*nan.*step 2"):
        train(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values()
               if v.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"generator": {"w": torch.ones(2)}, "config": {}, "step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"generator": {"w": torch.zeros(2)}, "config": {}, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(path)


def test_time_budget_stops_cleanly(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=100000", "train.time_budget=2")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.stopped == "time_budget" and 0 < result.steps < 100000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == result.steps and summary["images_seen"] == result.steps * 4
    assert load_checkpoint(tmp_path / "run")["step"] == result.steps


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "anoseg.cli.train", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["--data-root", "/nonexistent/root", "--category", "bottle"], ["/nonexistent/root"]),
    (["--set", "train.stepz=3"], ["unknown config key 'train.stepz'", "train.steps"]),
    (["--set", "data.image_size=100"], ["data.image_size", "multiple of 32"]),
])
def test_cli_bad_input_gives_one_clear_line(args, words, tmp_path):
    proc = _cli(*args, "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr


def test_cli_trains_and_saves_resolved_config(demo_root, tmp_path):
    proc = _cli("--data-root", str(demo_root), "--category", "demo_object",
                "--output-dir", str(tmp_path / "run"), *sum((["--set", s] for s in TINY), []),
                "--set", "train.steps=2")
    assert proc.returncode == 0, proc.stderr
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.category == "demo_object" and saved.train.steps == 2
    assert saved.data.root == str(demo_root)


def test_balanced_segmentation_loss_weighs_both_classes_equally():
    from anoseg.losses import segmentation_loss

    target = torch.ones(1, 1, 10, 10)
    target[..., :1, :1] = 0  # one pasted pixel out of 100
    all_normal = torch.ones_like(target)  # the trivial "everything normal" prediction
    assert segmentation_loss(all_normal, target).item() == pytest.approx(0.01)
    assert segmentation_loss(all_normal, target, balanced=True).item() == pytest.approx(0.5)
    assert segmentation_loss(target, target, balanced=True).item() == 0.0
    # no pasted pixel in the batch: the plain mean
    pred = torch.full_like(target, 0.9)
    assert segmentation_loss(pred, torch.ones_like(target), balanced=True).item() == \
        pytest.approx(0.1)


def test_collapsed_map_is_reported(demo_root, tmp_path, monkeypatch):
    import anoseg.training as training

    real_build = training.build_generator

    def collapsed(cfg, **kwargs):
        g = real_build(cfg, **kwargs)
        if g.map_decoder is not None:  # a saturated constant map, as after a collapse
            head = g.map_decoder.head[0]
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.constant_(head.bias, 40.0)
        return g

    monkeypatch.setattr(training, "build_generator", collapsed)
    cfg = tiny_config(demo_root, "train.steps=22", "train.log_every=1")
    with pytest.warns(RuntimeWarning, match="collapsed"):
        train(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["map_collapsed_at_step"] == training.COLLAPSE_STEPS
    log = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert all(r["map_std"] < training.COLLAPSE_STD for r in log)


def test_healthy_run_reports_no_collapse(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=22")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["map_collapsed_at_step"] is None


def test_focal_segmentation_loss_is_bce_at_gamma_zero_and_focuses_on_hard_pixels():
    import torch.nn.functional as F

    from anoseg.losses import focal_segmentation_loss

    p = torch.tensor([0.9, 0.6, 0.2, 0.7])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(focal_segmentation_loss(p, target, gamma=0.0),
                          F.binary_cross_entropy(p, target))
    # an easy pixel (0.9 for a normal one) counts far less than a hard one (0.7 for a pasted one)
    easy = focal_segmentation_loss(p[:1], target[:1])
    hard = focal_segmentation_loss(p[3:], target[3:])
    assert hard > 20 * easy
    assert focal_segmentation_loss(target, target) < 1e-6


def test_focal_seg_loss_trains(demo_root, tmp_path):
    cfg = load_config("configs/cpu_small.yaml", [
        f"data.root={demo_root}", "data.category=demo_texture", "data.image_size=64",
        "train.steps=3", "train.seg_loss=focal", "data.num_workers=0"])
    result = anoseg.train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 3 and result.last_losses["seg"] > 0


def test_focal_anomaly_weight_raises_the_pasted_pixels_share():
    from anoseg.losses import focal_segmentation_loss

    p = torch.tensor([0.8, 0.8, 0.8, 0.6])
    target = torch.tensor([1.0, 1.0, 1.0, 0.0])
    plain = focal_segmentation_loss(p, target)
    assert torch.allclose(focal_segmentation_loss(p, target, anomaly_weight=1.0), plain)
    weighted = focal_segmentation_loss(p, target, anomaly_weight=10.0)
    # the anomalous pixel (p = 0.6 normal, a bad answer) dominates more with the weight
    normal_term = focal_segmentation_loss(p[:1], target[:1])
    anomalous_term = focal_segmentation_loss(p[3:], target[3:])
    assert torch.allclose(weighted, (3 * normal_term + 10 * anomalous_term) / 13)
    assert weighted > plain

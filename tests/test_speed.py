"""The training step's speed switches (issue 17: the multi-tensor EMA, losses read at log lines,
the Adam implementations, the loop's loader timing) give the results of the plain step.

Speed itself is the benchmark's (``scripts/benchmark.py --config``), never a test's."""

import json

import pytest
import torch

from anoseg.config import load_config
from anoseg.data.training_data import synthetic_batch
from anoseg.engine import LossWindow, load_optimizer_state, make_adam
from anoseg.errors import ConfigError, TrainingDivergedError
from anoseg.training import create_train_state, set_learning_rates, train, train_step

CPU = torch.device("cpu")
TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "train.steps=20",
        "train.precision=fp32", "train.ema_decay=0.9", "train.grad_clip=1.0",
        "model.map_skips=2", "train.seg_loss=focal"]
"""A tiny model with every part the switches touch: EMA, gradient clipping, skips."""


def seeded_run(adam: str, steps: int = 20, **switches):
    """``steps`` seeded steps on seeded synthetic batches; the state and each step's losses
    as floats."""
    cfg = load_config(None, TINY + [f"train.adam={adam}"])
    state = create_train_state(cfg, CPU)
    losses = []
    for step in range(steps):
        images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(step))
        batch = synthetic_batch(images, cfg.synthesis, seed=100 * step, anomaly_ratio=0.5)
        set_learning_rates(state, cfg.train)
        out = train_step(state, batch, cfg.train, device=CPU, **switches)
        losses.append({name: float(value) for name, value in out.items()})
    return state, losses


def weights(state):
    """Every tensor that training changes, by name."""
    out = {f"g.{k}": v for k, v in state.generator.state_dict().items()}
    out.update({f"d.{k}": v for k, v in state.discriminator.state_dict().items()})
    out.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    for name, opt in (("opt_g", state.opt_g), ("opt_d", state.opt_d)):
        for i, param_state in enumerate(opt.state_dict()["state"].values()):
            out.update({f"{name}.{i}.{k}": v for k, v in param_state.items()})
    return out


def test_foreach_ema_and_unread_losses_give_the_same_bits():
    """The multi-tensor EMA runs the loop's operations and the unread losses are the same
    tensors, so 20 steps give bitwise the same weights, EMA, optimiser state and losses."""
    plain_state, plain_losses = seeded_run("loop", foreach_ema=False, read_losses=True)
    fast_state, fast_losses = seeded_run("loop", foreach_ema=True, read_losses=False)
    assert fast_losses == plain_losses
    plain, fast = weights(plain_state), weights(fast_state)
    assert plain.keys() == fast.keys()
    for name, value in plain.items():
        assert torch.equal(value, fast[name]), name


def test_foreach_adam_gives_the_loops_bits():
    loop_state, loop_losses = seeded_run("loop", steps=5)
    foreach_state, foreach_losses = seeded_run("foreach", steps=5)
    assert foreach_losses == loop_losses
    loop, foreach = weights(loop_state), weights(foreach_state)
    assert all(torch.equal(value, foreach[name]) for name, value in loop.items())


def test_adam_implementations_and_a_resume_keeps_the_configured_one():
    """``auto`` is PyTorch's own choice (no flag: the loop on a CPU); a checkpoint's saved
    groups would switch a resumed optimiser back to the saved implementation, the loader keeps
    the configured one."""
    param = torch.nn.Parameter(torch.zeros(3))
    auto = make_adam([param], 1e-3, (0.5, 0.999)).param_groups[0]
    assert auto["foreach"] is None and auto["fused"] is None
    loop = make_adam([param], 1e-3, (0.5, 0.999), implementation="loop")
    assert loop.param_groups[0]["foreach"] is False
    param.grad = torch.ones(3)
    loop.step()
    fused = make_adam([param], 1e-3, (0.5, 0.999), implementation="fused")
    load_optimizer_state(fused, loop.state_dict())  # the saved group says "not fused"
    assert fused.param_groups[0]["fused"] is True
    assert float(fused.state[param]["step"]) == 1.0
    before = param.detach().clone()
    fused.step()
    assert not torch.equal(param.detach(), before)
    with pytest.raises(ConfigError, match="train.adam"):
        load_config(None, ["train.adam=fast"])


def test_loss_window_reads_once_checks_in_step_order_and_averages():
    seen = []
    window = LossWindow(lambda steps, losses: seen.append((steps, losses)))
    window.add(0, {"seg": torch.tensor(0.5), "total": 1.0})
    window.add(1, {"seg": torch.tensor(0.25), "total": 3.0})
    window.read()
    assert seen == [(1, {"seg": 0.5, "total": 1.0}), (2, {"seg": 0.25, "total": 3.0})]
    assert window.last == {"seg": 0.25, "total": 3.0}
    assert window.means() == {"seg": 0.375, "total": 2.0}
    window.add(2, {"seg": torch.tensor(0.125), "total": 1.0})
    window.add(3, {"seg": torch.tensor(float("inf")), "total": float("nan")})
    window.add(4, {"seg": torch.tensor(float("nan")), "total": 1.0})
    with pytest.raises(TrainingDivergedError, match="loss seg became inf at step 3"):
        window.read()
    assert seen[-1][0] == 3  # the good step before it was read and passed on


def test_nan_between_log_lines_stops_before_the_next_checkpoint(demo_root, tmp_path,
                                                                monkeypatch):
    """Losses are read at log lines and checkpoints only: a NaN at step 4 (log every 4,
    checkpoint every 3) is found at the checkpoint after it (step count 6), before it is
    written, and named with its own step; the step-3 checkpoint and the step-4 log line
    stay."""
    import anoseg.training as training

    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                    "data.num_workers=0", "train.log_every=4",
                                    "train.checkpoint_every=3", "train.steps=10",
                                    "train.seg_loss=l1"])
    real_loss = training.segmentation_loss
    calls = {"n": 0}

    def poisoned(normality, target, **kwargs):
        calls["n"] += 1
        loss = real_loss(normality, target, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(training, "segmentation_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="seg.*nan.*step 4"):
        train(cfg, tmp_path / "run", progress=False)
    assert calls["n"] == 6  # the loop ran on to the checkpoint step, no further
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values()
               if v.is_floating_point())
    log = (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [4]


def test_summary_reports_the_loader_wait_and_the_log_keeps_its_lines(demo_root, tmp_path):
    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                    "data.num_workers=0", "train.log_every=3",
                                    "train.steps=7"])
    train(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["data_wait_seconds"] < summary["train_seconds"]
    log = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text()
           .splitlines()]
    assert [r["step"] for r in log] == [3, 6, 7]
    assert all(isinstance(r["seg"], float) and r["grad_norm"] > 0 for r in log)
    assert summary["last_losses"].keys() == {k for k in log[-1]} - {"step", "lr_g", "seconds"}


def test_benchmark_switch_table_runs_on_a_tiny_config():
    """``scripts/benchmark.py --config`` prints every row, the peaks and the loader lines (its
    numbers are the benchmark's business, not this test's)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "scripts" / "benchmark.py"
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's anoseg
    proc = subprocess.run(
        [sys.executable, str(script), "--config", "configs/cpu_small.yaml", "--steps", "1",
         "--repeats", "1", "--set", "data.image_size=64", "model.width=0.125",
         "train.batch_size=2", "data.num_workers=0"],
        capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for text in ("matmul peak", "before: EMA loop", "+ foreach EMA", "= after (defaults)",
                 "+ fused Adam", "GFLOP/step", "data, 0 loader workers (the config's)"):
        assert text in out, (text, out)
    assert "1.00x" in out

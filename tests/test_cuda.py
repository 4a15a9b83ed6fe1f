"""CUDA paths: training in each precision, checkpoints that move between devices, evaluation,
the detector stage and a one-process NCCL launch. Skipped where no GPU is present (CI); run them
on a GPU machine with ``python -m pytest -q tests/test_cuda.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import anoseg
from anoseg.checkpoint import load_checkpoint
from anoseg.config import load_config
from anoseg.data.training_data import synthetic_batch
from anoseg.evaluation import evaluate_run
from anoseg.training import create_train_state, train, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.log_every=1", "train.checkpoint_every=1000", "train.device=cuda"]


def tiny_config(root, *extra):
    return load_config(None, TINY + [f"data.root={root}", "data.category=demo_texture", *extra])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_step_on_cuda_in_each_precision(precision):
    cfg = load_config(None, TINY + [f"train.precision={precision}", "model.map_skips=2",
                                    "train.ema_decay=0.9", "train.grad_clip=1.0"])
    device = torch.device("cuda")
    from anoseg.runtime import resolve_precision

    amp_dtype = resolve_precision(precision, device)
    state = create_train_state(cfg, device)
    assert (state.scaler is not None) == (precision == "fp16")
    before = [p.detach().clone() for p in state.generator.parameters()]
    batch = synthetic_batch(torch.rand(4, 3, 64, 64), cfg.synthesis, seed=0)
    for _ in range(3):
        losses = train_step(state, batch, cfg.train, device=device, amp_dtype=amp_dtype,
                            channels_last=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert losses["grad_norm"] > 0  # clipping ran (after unscaling, with the fp16 scaler)
    assert all(p.is_cuda for p in state.generator.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, state.generator.parameters())]
    assert sum(changed) > len(changed) // 2


def test_cuda_run_loads_on_cpu_with_the_same_maps(demo_root, tmp_path):
    cfg = tiny_config(demo_root, "train.steps=6", "train.precision=bf16", "train.ema_decay=0.5",
                      "model.map_skips=3")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 6
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"].startswith("cuda"), summary
    assert load_checkpoint(tmp_path / "run")["step"] == 6

    images = torch.rand(3, 3, 64, 64)
    on_cpu = anoseg.load_model(tmp_path / "run", device="cpu")
    on_gpu = anoseg.load_model(tmp_path / "run", device="cuda")
    maps_cpu = anoseg.predict_anomaly_maps(on_cpu.generator, images)
    maps_gpu = anoseg.predict_anomaly_maps(on_gpu.generator, images.cuda())
    assert maps_gpu.shape == maps_cpu.shape == (3, 64, 64)
    # fp32 on both devices (TF32 convolutions on the GPU): equal to a few 1e-3
    assert torch.allclose(maps_gpu.float().cpu(), maps_cpu, atol=5e-3), \
        (maps_gpu.float().cpu() - maps_cpu).abs().max()

    # resume on the GPU continues the step count and the log
    cfg_more = tiny_config(demo_root, "train.steps=9", "train.precision=bf16",
                           "train.ema_decay=0.5", "model.map_skips=3")
    resumed = train(cfg_more, tmp_path / "run", progress=False, resume=True)
    assert resumed.steps == 9
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))

    # evaluation on the GPU gives the CPU's metrics
    gpu = evaluate_run(tmp_path / "run", output_dir=tmp_path / "eval_gpu", device="cuda",
                       progress=False).results["demo_texture"]
    cpu = evaluate_run(tmp_path / "run", output_dir=tmp_path / "eval_cpu", device="cpu",
                       progress=False).results["demo_texture"]
    for key in ("pixel_auroc", "image_auroc", "aupro", "iou_pooled_best"):
        assert abs(gpu[key] - cpu[key]) < 0.02, (key, gpu[key], cpu[key])


def test_detector_stage_trains_on_cuda(demo_root, tmp_path):
    from anoseg.detector_training import train_detector

    train(tiny_config(demo_root, "train.steps=2"), tmp_path / "run", progress=False)
    train_detector(tmp_path / "run", ["detector.steps=2", "train.device=cuda"], progress=False)
    report = evaluate_run(tmp_path / "run", output_dir=tmp_path / "eval", device="cuda",
                          progress=False)
    assert "image_auroc_detector" in report.results["demo_texture"]



def test_torchrun_uses_nccl_on_the_gpu(demo_root, tmp_path, free_port):
    run = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
            f"--master_port={free_port}", "-m", "anoseg.cli.train", "--no-progress",
            "--data-root", str(demo_root), "--category", "demo_texture", "--device", "cuda",
            "--output-dir", str(run), "--set", "train.sync_batchnorm=true"]
    for setting in TINY[:-1] + ["train.steps=3"]:
        args += ["--set", setting]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["device"].startswith("cuda")
    assert load_checkpoint(run)["step"] == 3

"""Issue 16: a training killed with SIGKILL at random moments, resumed each time, ends with the
weights of an uninterrupted run; the checkpoint always loads, the stale lock is taken over and
no temporary checkpoint is left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from anoseg.checkpoint import load_checkpoint
from anoseg.run_dir import LOCK_FILE, RunDir

STEPS = 30
SCRIPT = """
import sys
from anoseg.config import load_config
from anoseg.training import train
root, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cfg = load_config(None, ["data.image_size=64", "model.width=0.125", "train.batch_size=4",
                         "data.num_workers=0", "train.log_every=1", "train.checkpoint_every=1",
                         "train.steps=%d", "data.root=" + root, "data.category=demo_texture"])
train(cfg, out, resume=resume, progress=False)
""" % STEPS


def _start(demo_root, out, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(demo_root), str(out),
                             "1" if resume else "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _weights(path):
    ckpt = load_checkpoint(path)
    return ckpt["step"], {**{f"g.{k}": v for k, v in ckpt["generator"].items()},
                          **{f"d.{k}": v for k, v in ckpt["discriminator"].items()}}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(demo_root, tmp_path):
    started = time.perf_counter()
    reference = _start(demo_root, tmp_path / "reference", resume=False)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    run = RunDir(tmp_path / "killed")
    rng = random.Random(16)
    kills = 0
    for attempt in range(12):
        proc = _start(demo_root, run.path, resume=run.has_checkpoint())
        if kills < 4:
            while not run.lock.exists() and proc.poll() is None:
                time.sleep(0.01)  # wait until it runs (imports done), then a random moment
            time.sleep(rng.uniform(0.3, 2.5))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        code = proc.wait(timeout=120)
        if run.has_checkpoint():
            assert load_checkpoint(run.checkpoint)["step"] <= STEPS  # always loadable
        if code == 0:
            break
        assert code == -signal.SIGKILL, proc.stderr.read()
    assert kills >= 2 and run.is_complete()
    assert not run.lock.exists() and run.stale_temporaries() == []
    assert not list(run.checkpoint.parent.glob("*.tmp"))

    step, killed = _weights(run.checkpoint)
    ref_step, expected = _weights(tmp_path / "reference")
    assert step == ref_step == STEPS
    assert killed.keys() == expected.keys()
    assert all(torch.equal(killed[k], expected[k]) for k in expected)
    assert time.perf_counter() - started < 90

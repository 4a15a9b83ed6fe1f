"""train.logger=tensorboard (issue 15): the event file holds the losses.jsonl values, the
learning rates and the probe's map grids and statistics; a resumed run purges the events after
its checkpoint; without the extra the run stops with one clear line before any work."""

from __future__ import annotations

import json
import sys

import pytest

from anoseg.config import load_config
from anoseg.errors import MissingExtraError
from anoseg.training import train

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=4", "train.checkpoint_every=1000", "train.device=cpu", "train.log_every=1",
        "train.logger=tensorboard", "train.logger_image_every=2", "train.logger_images=2",
        "data.category=demo_texture"]


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"),
                                   size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_logs_losses_rates_and_map_grids(demo_root, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, TINY + [f"data.root={demo_root}"]), run,
          progress=False, stop_at=2)
    train(load_config(None, TINY + [f"data.root={demo_root}"]), run, progress=False,
          resume=True)
    events = _events(run)
    tags = events.Tags()
    assert {"loss/seg", "loss/rec", "loss/adv", "loss/discriminator", "map/batch_std",
            "lr/generator", "lr/discriminator", "probe/normal_mean", "probe/normal_std",
            "probe/synthetic_inside_mean"} <= set(tags["scalars"])
    assert set(tags["images"]) == {"maps/normal", "maps/synthetic"}
    lines = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    seg = events.Scalars("loss/seg")
    assert [e.step for e in seg] == [line["step"] for line in lines] == [1, 2, 3, 4]
    assert [e.value for e in seg] == pytest.approx([line["seg"] for line in lines], rel=1e-6)
    assert [e.value for e in events.Scalars("lr/generator")] == pytest.approx(
        [line["lr_g"] for line in lines], rel=1e-6)
    grids = events.Images("maps/synthetic")
    assert [e.step for e in grids] == [2, 4]  # resumed at 2: step 2's grid is kept once
    assert grids[0].width > 2 * 64 and grids[0].height > 2 * 64  # two columns, three rows


def test_logger_off_writes_no_events(demo_root, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, TINY[:-4] + [f"data.root={demo_root}", "train.steps=1",
                                         "data.category=demo_texture"]), run, progress=False)
    assert (run / "losses.jsonl").is_file() and not (run / "tensorboard").exists()


def test_missing_extra_stops_before_any_work(demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"train.logger=tensorboard needs the package "
                       r"tensorboard, which is not installed: pip install "
                       r"'anoseg-torch\[tensorboard\]'"):
        train(load_config(None, TINY + [f"data.root={demo_root}"]), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()

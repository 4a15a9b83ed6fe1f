"""The reproduction scripts (scripts/run_categories.py, scripts/run_ablations.py), the shipped
ablation configs and the paper's numbers in anoseg.paper_results.

Every run is tiny (64x64, width 0.125, batch 4, 3 steps, 2 detector steps) on the demo data."""

import csv
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from anoseg import batch_runs
from anoseg import paper_results as paper
from anoseg.reporting import build_tables
from anoseg.config import MVTEC_CATEGORIES, load_config
from anoseg.training import train

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["demo_texture", "demo_object"]
TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=3", "train.checkpoint_every=1000", "eval.num_thresholds=200",
        "detector.steps=2", "detector.batch_size=4", "detector.checkpoint_every=1000"]
SWITCHES = {"synthesis.hard_augmentation", "train.adversarial", "model.reconstruction",
            "model.coord_channels"}


def _load_script(name):
    """Import ``scripts/<name>.py`` as module ``name`` (for their command lines; the library
    logic they call is imported from the package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rc():
    return _load_script("run_categories")


@pytest.fixture(scope="module")
def ra(rc):
    return _load_script("run_ablations")


def _args(demo_root, output_dir, categories=CATEGORIES, extra=()):
    args = ["--data-root", str(demo_root), "--output-dir", str(output_dir), "--categories",
            *categories, "--device", "cpu", "--no-progress", *extra]
    for text in TINY:
        args += ["--set", text]
    return args


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def categories_run(rc, demo_root, tmp_path_factory):
    """run_categories.py --detector on both demo categories, once for the module."""
    out = tmp_path_factory.mktemp("scripts") / "all"
    code = rc.main(_args(demo_root, out, extra=["--detector"]))
    return out, code


# ------------------------------------------------------------------------- run_categories.py


def test_run_categories_writes_runs_and_tables(categories_run):
    out, code = categories_run
    assert code == 0
    for category in CATEGORIES:
        run = out / category
        assert json.loads((run / "summary.json").read_text())["stopped"] == "completed"
        assert (run / "eval" / "metrics.json").is_file()
        record = json.loads((run / "detector" / "image_auroc.json").read_text())
        assert 0.0 <= record["image_auroc"] <= 1.0 and record["anoseg_step"] == 3
    for name in ("tables.md", "table1_auroc.csv", "table2_iou.csv", "aupro_f1.csv"):
        assert (out / name).is_file(), name

    rows = _read_csv(out / "table1_auroc.csv")
    assert rows[0] == ["category", "pixel_auroc", "paper_pixel_auroc", "image_auroc",
                       "image_auroc_detector", "paper_image_auroc"]
    assert [r[0] for r in rows[1:]] == [*CATEGORIES, "mean"]
    for row in rows[1:]:
        assert row[2] == "-" and row[5] == "-"  # the paper has no demo categories
        assert all(0.0 <= float(row[i]) <= 1.0 for i in (1, 3, 4))
    for column in (1, 3, 4):
        assert float(rows[3][column]) == pytest.approx(
            statistics.mean(float(r[column]) for r in rows[1:3]))
    metrics = json.loads((out / "demo_texture" / "eval" / "metrics.json").read_text())
    assert float(rows[1][1]) == metrics["categories"]["demo_texture"]["pixel_auroc"]

    iou = _read_csv(out / "table2_iou.csv")
    assert iou[0][:3] == ["category", "iou", "paper_iou"]
    assert [r[0] for r in iou[1:]] == [*CATEGORIES, "mean"] and all(r[2] == "-" for r in iou[1:])
    assert _read_csv(out / "aupro_f1.csv")[0] == ["category", "aupro", "pixel_f1_max"]

    markdown = (out / "tables.md").read_text()
    for title in ("Table 1", "Table 2", "AUPRO and F1-max", "Image AUROC (detector)"):
        assert title in markdown
    table1 = markdown.split("## Table 1")[1].split("## ")[0]
    lines = [line for line in table1.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| demo_texture", "| demo_object",
                                                           "| **Mean**"]
    assert all(line.split(" | ")[2] == "-" for line in lines[1:])


def test_second_call_skips_done_categories(rc, categories_run, demo_root, capsys):
    out, _ = categories_run
    watched = [out / c / name for c in CATEGORIES
               for name in ("summary.json", "checkpoints/last.pt", "eval/metrics.json",
                            "detector/last.pt", "detector/image_auroc.json")]
    before = {path: path.stat().st_mtime_ns for path in watched}
    capsys.readouterr()
    assert rc.main(_args(demo_root, out, extra=["--detector"])) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 2 and "evaluating" not in printed
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    assert (out / "tables.md").is_file()


def test_interrupted_run_is_resumed(rc, demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture"])
    train(cfg, out / "demo_texture", progress=False, stop_at=1)
    assert json.loads((out / "demo_texture" / "summary.json").read_text())["steps"] == 1
    assert rc.main(_args(demo_root, out, categories=["demo_texture"])) == 0
    assert "resuming" in capsys.readouterr().out
    summary = json.loads((out / "demo_texture" / "summary.json").read_text())
    assert summary["stopped"] == "completed" and summary["steps"] == 3
    metrics = json.loads((out / "demo_texture" / "eval" / "metrics.json").read_text())
    assert metrics["categories"]["demo_texture"]["checkpoint_step"] == 3
    table1 = _read_csv(out / "table1_auroc.csv")
    assert "image_auroc_detector" not in table1[0]  # no --detector, no detector column


def test_one_category_per_gpu_path_runs_subprocesses(rc, demo_root, tmp_path):
    """The --gpus path on a machine without GPUs: the child sees CUDA_VISIBLE_DEVICES=0 and
    falls back to the CPU; checks the subprocess plumbing, the log and the tables."""
    out = tmp_path / "gpu"
    args = _args(demo_root, out, categories=["demo_object"], extra=["--gpus", "0"])
    args.remove("--device")
    args.remove("cpu")
    assert rc.main(args) == 0
    assert batch_runs.category_done(out / "demo_object")
    log = (out / "logs" / "demo_object.log").read_text()
    assert "completed at step 3" in log and "evaluating" in log
    assert [r[0] for r in _read_csv(out / "table1_auroc.csv")[1:]] == ["demo_object", "mean"]


def test_child_command_carries_the_job(rc, tmp_path):
    job = batch_runs.Job(tmp_path / "data", tmp_path / "out", ["configs/cpu_small.yaml"],
                 ["train.steps=5"], [batch_runs.DetectorSpec("detector"),
                                     batch_runs.DetectorSpec("base", "configs/detector_base.yaml")])
    command = rc.child_command(job, "bottle")
    assert command[1] == str(REPO / "scripts" / "run_categories.py")
    joined = " ".join(command)
    assert "--categories bottle --no-tables" in joined and "--set train.steps=5" in joined
    assert f"--config {(Path('configs/cpu_small.yaml')).resolve()}" in joined
    assert "--detector " in joined + " "
    assert f"--detector-variant base={Path('configs/detector_base.yaml').resolve()}" in joined


def test_bad_input_gives_one_line_and_status_2(rc, demo_root, tmp_path, capsys):
    assert rc.main(_args(demo_root, tmp_path / "o", categories=["no_such"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such" in err[0]
    assert rc.main(_args(demo_root, tmp_path / "o", extra=["--set", "train.stepz=1"])) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert not (tmp_path / "o" / "demo_texture").exists()


def test_paper_columns_and_means(rc):
    fake = {"pixel_auroc": 0.9, "image_auroc": 0.8, "iou_pooled_best": 0.5, "aupro": 0.7,
            "pixel_f1_max": 0.6}
    table1 = build_tables(["bottle", "demo_texture"],
                             {"bottle": fake, "demo_texture": {}})[0]
    assert table1.rows[0][:3] == ["bottle", "0.900", "0.99"]
    assert table1.rows[1][1:3] == ["-", "-"]
    assert table1.rows[2][1:3] == ["0.900", "-"]  # mean over defined values; paper: no mean
    subset = build_tables(["bottle", "capsule"], {"bottle": fake, "capsule": fake})
    assert subset[0].csv_rows[-1][2] == pytest.approx((0.99 + 0.90) / 2)
    assert subset[1].rows[-1][2] == "-"  # no per-category IoU in the paper
    full = build_tables(list(MVTEC_CATEGORIES), {c: fake for c in MVTEC_CATEGORIES})
    assert full[0].rows[-1][2] == "0.97" and full[0].rows[-1][-1] == "0.96"
    assert full[1].rows[-1][2] == "0.542"
    assert len(full[0].rows) == 16


# ------------------------------------------------------------------------- run_ablations.py


def test_run_ablations_writes_the_paper_layout(ra, demo_root, tmp_path):
    out = tmp_path / "abl"
    args = _args(demo_root, out, categories=["demo_texture"], extra=["--detector"])
    assert ra.main(args) == 0
    for name in ("cutpaste_only", "hard_aug", "adversarial", "coord"):
        assert (out / name / "demo_texture" / "eval" / "metrics.json").is_file()
        saved = yaml.safe_load((out / name / "demo_texture" / "config.yaml").read_text())
        assert saved["data"]["image_size"] == 64  # --set applied on top of the ablation file
    assert not (out / "cutpaste_only" / "demo_texture" / "detectors").exists()
    assert sorted(p.name for p in (out / "coord" / "demo_texture" / "detectors").iterdir()) == \
        ["anomaly_map", "base", "feature_matching", "full"]

    markdown = (out / "ablations.md").read_text()
    table3 = markdown.split("## Table 3")[1].split("## Table 5")[0]
    lines = [line for line in table3.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| Category | Base model (CutPaste only) | + Hard augmentation | "
                        "+ Adversarial learning | + Coordinate channel |")
    cells = [line.strip("| ").split(" | ") for line in lines[1:]]
    assert [c[0] for c in cells] == ["demo_texture", "**Mean**", "Paper (mean)"]
    assert all(len(c) == 5 and all(" / " in x for x in c[1:]) for c in cells)
    assert cells[2][1:] == ["0.923 / 0.492", "0.942 / 0.503", "0.951 / 0.527", "0.970 / 0.542"]
    table5 = [line.strip("| ").split(" | ") for line in
              markdown.split("## Table 5")[1].splitlines() if line.startswith("| ")]
    assert len(table5[0]) == 5 and table5[-1] == ["Paper (mean)", "0.812", "0.842", "0.943",
                                                  "0.961"]
    assert all(0.0 <= float(x) <= 1.0 for x in table5[2][1:])

    rows = _read_csv(out / "table3_ablation.csv")
    assert len(rows[0]) == 9 and [r[0] for r in rows[1:]] == ["demo_texture", "mean",
                                                             "paper_mean"]
    assert _read_csv(out / "table5_ablation.csv")[0] == ["category", "base", "feature_matching",
                                                          "anomaly_map", "full"]
    before = (out / "coord" / "demo_texture" / "summary.json").stat().st_mtime_ns
    assert ra.main(args) == 0
    assert (out / "coord" / "demo_texture" / "summary.json").stat().st_mtime_ns == before


# ------------------------------------------------------------------------- configs and paper


def _flat(path):
    raw = yaml.safe_load(path.read_text())
    return {f"{s}.{k}": v for s, values in raw.items() for k, v in values.items()}


def test_ablation_configs_differ_exactly_in_their_switches(ra):
    flat = [_flat(a.config) for a in ra.TABLE3]
    assert [a.config.name for a in ra.TABLE3] == [
        "ablation_cutpaste_only.yaml", "ablation_hard_aug.yaml", "ablation_adversarial.yaml",
        "ablation_coord.yaml"]
    assert all(set(f) == SWITCHES for f in flat)
    assert not any(flat[0].values())  # the base model: every switch off
    steps = [{k for k in SWITCHES if a[k] != b[k]} for a, b in zip(flat, flat[1:])]
    assert steps == [{"synthesis.hard_augmentation"},
                     {"train.adversarial", "model.reconstruction"}, {"model.coord_channels"}]
    assert all(flat[-1].values())  # the full AnoSeg
    defaults = load_config(None).to_dict()
    assert all(defaults[k.split(".")[0]][k.split(".")[1]] == v for k, v in flat[-1].items())
    for ablation in ra.TABLE3:
        cfg = load_config(ablation.config)
        assert cfg.model.reconstruction == cfg.train.adversarial
    assert [a.name for a in ra.TABLE3] == list(paper.TABLE3_MEANS)
    assert [a.name for a in ra.TABLE5] == list(paper.TABLE5_MEANS)
    det = [_flat(a.config) for a in ra.TABLE5]
    assert all(a.config.is_file() for a in ra.TABLE5)
    assert [sum(d.values()) for d in det] == [0, 1, 2, 3]  # one more component per column


def test_paper_numbers():
    for table, published in ((paper.PIXEL_AUROC, paper.PIXEL_AUROC_MEAN),
                             (paper.IMAGE_AUROC, paper.IMAGE_AUROC_MEAN)):
        assert list(table) == list(MVTEC_CATEGORIES)
        assert all(0.0 <= v <= 1.0 for v in table.values())
        assert statistics.mean(table.values()) == pytest.approx(published, abs=0.01)
    assert paper.IOU_MEAN == 0.542
    assert paper.TABLE3_MEANS["coord"] == (paper.PIXEL_AUROC_MEAN, paper.IOU_MEAN)
    assert paper.TABLE5_MEANS["full"] == pytest.approx(paper.IMAGE_AUROC_MEAN, abs=0.01)
    for means in (list(paper.TABLE3_MEANS.values()), list(paper.TABLE5_MEANS.values())):
        assert means == sorted(means) and all(0.0 <= x <= 1.0 for m in means
                                              for x in (m if isinstance(m, tuple) else (m,)))
    assert paper.paper_value(paper.PIXEL_AUROC, "demo_texture") is None


def test_real_data_benchmark_seeds_mean_and_margin(demo_root, tmp_path, monkeypatch, capsys):
    rdb = _load_script("real_data_benchmark")
    peer = {"pixel_auroc": 0.5, "image_auroc": 0.5, "aupro": 0.1, "iou_pooled_best": 0.01,
            "pixel_f1_max": 0.02}
    monkeypatch.setattr(rdb, "PEERS", {"toy peer": {"demo_texture": peer}})
    out = tmp_path / "real"
    argv = ["real_data_benchmark.py", "--data-root", str(demo_root), "--categories",
            "demo_texture", "--config", str(REPO / "configs" / "cpu_small.yaml"),
            "--budget", "600", "--output-dir", str(out), "--seeds", "0", "1", "--no-progress"]
    for text in TINY:
        argv += ["--set", text]
    monkeypatch.setattr(sys, "argv", argv)
    rdb.main()
    table = (out / "table.md").read_text()
    runs = [json.loads((out / d / "eval" / "metrics.json").read_text())
            for d in ("demo_texture", "demo_texture_seed1")]
    # the two seeds really are different runs
    assert json.loads((out / "demo_texture_seed1" / "summary.json").read_text())["steps"] == 3
    rows = {line.split(" | ")[1]: line.split(" | ")[2:] for line in table.splitlines()
            if line.startswith("| demo_texture")}
    assert set(rows) == {"anoseg seed 0", "anoseg seed 1", "**anoseg mean of 2**", "toy peer",
                         "margin of anoseg mean over the better peer"}

    mean_auroc = sum(r["categories"]["demo_texture"]["pixel_auroc"] for r in runs) / 2
    assert float(rows["**anoseg mean of 2**"][0]) == pytest.approx(mean_auroc, abs=6e-4)
    assert float(rows["margin of anoseg mean over the better peer"][0]) == pytest.approx(
        mean_auroc - 0.5, abs=1.1e-3)
    assert rows["margin of anoseg mean over the better peer"][1] == ""  # image AUROC: no goal


def test_real_data_benchmark_ensemble_shares_budget_and_split(demo_root, tmp_path, monkeypatch):
    rdb = _load_script("real_data_benchmark")
    out = tmp_path / "real"
    argv = ["real_data_benchmark.py", "--data-root", str(demo_root), "--categories",
            "demo_texture", "--config", str(REPO / "configs" / "cpu_small.yaml"),
            "--budget", "600", "--output-dir", str(out), "--seeds", "0", "1", "--ensemble",
            "--no-progress"]
    for text in TINY:
        argv += ["--set", text]
    monkeypatch.setattr(sys, "argv", argv)
    rdb.main()
    configs = [yaml.safe_load((out / d / "config.yaml").read_text())
               for d in ("demo_texture", "demo_texture_seed1")]
    assert [c["train"]["time_budget"] for c in configs] == [300.0, 300.0]
    assert [c["data"]["split_seed"] for c in configs] == [0, 0]
    table = (out / "table.md").read_text()
    assert "| demo_texture | **anoseg ensemble of 2** |" in table
    ens = json.loads((out / "demo_texture_ensemble" / "metrics.json").read_text())
    row = [line for line in table.splitlines() if "ensemble of 2" in line][0].split(" | ")
    assert float(row[2]) == pytest.approx(ens["categories"]["demo_texture"]["pixel_auroc"],
                                          abs=6e-4)
    assert row[-2] == "6"  # steps of both members


@pytest.mark.parametrize("script", sorted(p.name for p in
                                          (Path(__file__).resolve().parent.parent / "scripts")
                                          .glob("*.py")))
def test_every_script_imports_and_shows_its_help(script):
    """A moved name breaks a script only when it runs; --help imports everything it needs."""
    import subprocess
    import sys as _sys

    root = Path(__file__).resolve().parent.parent
    path = root / "scripts" / script
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this checkout's anoseg, not another
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([_sys.executable, str(path), "--help"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()

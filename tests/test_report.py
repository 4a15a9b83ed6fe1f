"""anoseg-eval --report (issue 15): report.html is one self-contained page (no network, no
script, every picture an embedded PNG) with every section, for a run and for an ensemble; the
galleries pick the images they claim to."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anoseg.cli.evaluate import main as eval_main
from anoseg.config import load_config
from anoseg.evaluation import evaluate_run
from anoseg.galleries import GalleryCollector
from anoseg.training import train

CATEGORY = "demo_texture"
TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=2", "train.checkpoint_every=1000", "train.device=cpu",
        "eval.num_thresholds=200", "data.split_seed=0", f"data.category={CATEGORY}"]
PNG_URI = "data:image/png;base64,"
SECTIONS = ["summary", "metrics", "thresholds", "iou-curve", "missed", "false-alarms", "random"]


@pytest.fixture(scope="module")
def members(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    for seed in (0, 1):
        train(load_config(None, TINY + [f"data.root={demo_root}", f"train.seed={seed}"]),
              base / f"s{seed}", progress=False)
    return [base / "s0", base / "s1"]


class _Page(HTMLParser):
    """Every tag with its attributes, and the section each gallery picture is in."""

    def __init__(self) -> None:
        super().__init__()
        self.tags, self.sections, self.images = [], [], {}
        self._section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs.get("data-section")
            self.sections.append(self._section)
        if tag == "img":
            self.images.setdefault(self._section, []).append(attrs["src"])


def _check_page(path: Path, gallery_size: int) -> _Page:
    text = path.read_text()
    page = _Page()
    page.feed(text)
    assert [s for s in page.sections if s != "warnings"] == SECTIONS
    names = {tag for tag, _ in page.tags}
    assert "svg" in names and "polyline" in names and not names & {"script", "link", "iframe"}
    assert "http:" not in text and "https:" not in text and "url(" not in text
    for tag, attrs in page.tags:  # nothing to fetch: pictures inline, links within the page
        assert attrs.get("src", PNG_URI).startswith(PNG_URI), (tag, attrs)
        assert attrs.get("href", "#").startswith("#"), (tag, attrs)
    for section in ("missed", "false-alarms", "random"):
        assert len(page.images[section]) == gallery_size, section
    for uri in sum(page.images.values(), []):
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as picture:
            assert picture.format == "PNG" and picture.width > 3 * 64
    for defect in ("cut", "scratch", "spot", "stain"):  # a row per defect type
        assert f"{CATEGORY} / {defect}" in text
    return page


def test_report_of_one_run(members, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_main(["--run", str(members[0]), "--output-dir", str(out), "--report",
                      "--no-progress"]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    _check_page(out / "report.html", gallery_size=6)
    result = evaluate_run(members[0], output_dir=tmp_path / "again", progress=False,
                          report=True, report_gallery=2).results[CATEGORY]
    text = (tmp_path / "again" / "report.html").read_text()
    _check_page(tmp_path / "again" / "report.html", gallery_size=2)
    assert f"{result.label_free_threshold:.4g}" in text and f"{result.image_threshold:.4g}" in text


def test_report_of_an_ensemble(members, tmp_path):
    report = evaluate_run(members, output_dir=tmp_path / "ens", progress=False, ensemble=True,
                          report=True, report_gallery=3)
    assert tmp_path / "ens" / "report.html" in report.files
    _check_page(tmp_path / "ens" / "report.html", gallery_size=3)
    assert "ensemble of 2" in (tmp_path / "ens" / "report.html").read_text()


def test_galleries_pick_the_worst_missed_and_the_strongest_false_alarms():
    collector = GalleryCollector(size=2)
    maps = torch.zeros(5, 8, 8)
    masks = torch.zeros(5, 1, 8, 8)
    masks[2:, :, 2:4, 2:4] = 1
    for index, value in zip((2, 3, 4), (0.9, 0.1, 0.5)):  # defect coverage of images 2, 3, 4
        maps[index, 2:4, 2:4] = value
    batch = {"mask": masks, "path": [f"{i}.png" for i in range(5)],
             "defect_type": ["good", "good", "cut", "cut", "cut"],
             "label": torch.tensor([0, 0, 1, 1, 1])}
    collector.update(batch, list(maps), list(masks[:, 0]),
                     np.array([0.3, 0.7, 0.2, 0.1, 0.4]), threshold=0.4)
    chosen = collector.choose()
    assert [r["index"] for r in chosen["missed"]] == [3, 4]
    assert [r["found"] for r in chosen["missed"]] == [0.0, 1.0]
    assert [r["index"] for r in chosen["false-alarms"]] == [1, 0]
    assert len(chosen["random"]) == 2 and len({r["index"] for r in chosen["random"]}) == 2

"""The development suite's generated categories and the per-pixel Gaussian floor."""

import numpy as np
import pytest
import torch

from anoseg.baselines import PerPixelGaussian
from anoseg.data.mvtec import list_test_samples, list_train_images
from anoseg.data.suite import SUITE_CATEGORIES, render, write_suite


def test_every_suite_defect_draws_a_mask_of_the_right_kind():
    areas = {}
    for c, (category, (_, _, defects)) in enumerate(SUITE_CATEGORIES.items()):
        good, none = render(category, None, (c, 0, 0, 0))
        assert good.shape == (128, 128, 3) and good.dtype == np.uint8 and none is None
        for d, defect in enumerate(defects, start=1):
            fractions = []
            for i in range(3):
                image, mask = render(category, defect, (c, 2, d, i))
                assert set(np.unique(mask)) <= {0, 255} and mask.any()
                fractions.append((mask > 0).mean())
            areas[(category, defect)] = float(np.mean(fractions))
    # sizes are controlled: tiny spots, large faint regions
    assert areas[("suite_grain", "spot")] < 0.005
    assert 0.07 < areas[("suite_grain", "region")] < 0.35
    assert 0.07 < areas[("suite_weave", "region")] < 0.35
    assert 0.07 < areas[("suite_grain", "band")] < 0.35


def test_a_band_is_a_strip_along_one_edge_with_smoothed_grain():
    c = list(SUITE_CATEGORIES).index("suite_grain")
    d = SUITE_CATEGORIES["suite_grain"][2].index("band") + 1
    good, _ = render("suite_grain", None, (c, 2, d, 0))  # the same image without the band
    image, mask = render("suite_grain", "band", (c, 2, d, 0))
    inside = mask > 0
    edges = [inside[0].mean(), inside[-1].mean(), inside[:, 0].mean(), inside[:, -1].mean()]
    assert max(edges) == 1.0 and sorted(edges)[-2] < 1.0  # it runs along one whole edge
    assert np.array_equal(image[~inside], good[~inside])  # nothing changes outside it

    def roughness(x):  # mean absolute difference between horizontal neighbours
        grey = x.astype(np.float64).mean(axis=2)
        return np.abs(np.diff(grey, axis=1))[inside[:, 1:] & inside[:, :-1]].mean()

    assert roughness(image) < 0.6 * roughness(good)


def test_rendering_is_deterministic():
    a = render("suite_grain", "crack", (0, 2, 2, 1))
    b = render("suite_grain", "crack", (0, 2, 2, 1))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_write_suite_makes_mvtec_layout(tmp_path, monkeypatch):
    import anoseg.data.suite as suite

    monkeypatch.setattr(suite, "SUITE_NUM_TRAIN", 3)
    monkeypatch.setattr(suite, "SUITE_NUM_TEST_GOOD", 2)
    monkeypatch.setattr(suite, "SUITE_NUM_PER_DEFECT", 1)
    root = write_suite(tmp_path / "suite")
    for category, (_, _, defects) in SUITE_CATEGORIES.items():
        assert len(list_train_images(root, category)) == 3
        samples = list_test_samples(root, category)
        assert sorted({s.defect_type for s in samples}) == sorted(("good",) + defects)


def test_suite_sets_finds_known_and_users_own_real_sets(tmp_path, monkeypatch):
    import anoseg.data.suite as suite
    from anoseg.dev_suite import suite_sets
    from anoseg.errors import DataError

    monkeypatch.setattr(suite, "SUITE_NUM_TRAIN", 2)
    monkeypatch.setattr(suite, "SUITE_NUM_TEST_GOOD", 1)
    monkeypatch.setattr(suite, "SUITE_NUM_PER_DEFECT", 1)
    real = tmp_path / "real"
    for folder in ("kolektorsdd/train/good", "my_tiles/train/good", "notes"):
        (real / folder).mkdir(parents=True)
    sets = suite_sets(real, tmp_path / "suite")
    assert sets["kolektorsdd"] == (real, "kolektorsdd")
    assert sets["my_tiles"] == (real, "my_tiles")
    assert "notes" not in sets and "bsdata" not in sets
    assert set(SUITE_CATEGORIES) <= set(sets)
    assert set(suite_sets(real, tmp_path / "suite", only=["my_tiles"])) == {"my_tiles"}
    (real / "suite_grain" / "train" / "good").mkdir(parents=True)  # a generated set's name
    with pytest.raises(DataError, match="suite_grain"):
        suite_sets(real, tmp_path / "suite")


def test_gaussian_floor_finds_a_bright_square():
    rng = torch.Generator().manual_seed(0)
    train = 0.5 + 0.05 * torch.randn(20, 3, 32, 32, generator=rng)
    test = 0.5 + 0.05 * torch.randn(1, 3, 32, 32, generator=rng)
    test[:, :, 10:14, 10:14] = 1.0
    maps = PerPixelGaussian.fit(train).anomaly_maps(test)
    assert maps.shape == (1, 32, 32)
    inside = maps[0, 10:14, 10:14].min()
    outside = torch.cat([maps[0, :8].flatten(), maps[0, 16:].flatten()]).max()
    assert inside > outside


def test_dev_suite_scores_a_recipe_and_the_floor_by_defect_type(demo_root, tmp_path):
    from anoseg.dev_suite import KEYS, run_suite
    from anoseg.reporting import suite_table

    sets = {"demo": (demo_root, "demo_texture")}
    results = run_suite(sets, "configs/cpu_small.yaml",
                        ["train.steps=2", "data.image_size=64", "data.num_workers=0"],
                        budget=600, seeds=[0], output_dir=tmp_path / "suite", image_size=64)
    demo = results["demo"]
    types = {"all", "cut", "scratch", "spot", "stain"}
    assert set(demo["model"]) == types and set(demo["floor"]) == types
    for method in ("model", "floor"):
        for row in demo[method].values():
            assert set(row) == set(KEYS)
            assert 0.0 <= row["pixel_auroc"] <= 1.0
    # the floor finds the demo's loud defects far better than chance
    assert demo["floor"]["all"]["pixel_auroc"] > 0.7
    assert (tmp_path / "suite" / "suite.json").is_file()
    assert "| demo | stain | Gaussian |" in suite_table(results, KEYS)
    # a finished run is reused, not retrained
    again = run_suite(sets, "configs/cpu_small.yaml",
                      ["train.steps=2", "data.image_size=64", "data.num_workers=0"],
                      budget=600, seeds=[0], output_dir=tmp_path / "suite", image_size=64)
    assert again["demo"]["model"] == demo["model"]


def test_dev_suite_separate_seeds_reports_mean_and_spread(demo_root, tmp_path):
    import json

    from anoseg.dev_suite import KEYS, run_suite, seed_statistics
    from anoseg.reporting import suite_table

    sets = {"demo": (demo_root, "demo_texture")}
    results = run_suite(sets, "configs/cpu_small.yaml",
                        ["train.steps=2", "data.image_size=64", "data.num_workers=0"],
                        budget=600, seeds=[1, 2], output_dir=tmp_path / "suite",
                        image_size=64, separate_seeds=True)
    demo = results["demo"]
    first, second = demo["per_seed"]["1"], demo["per_seed"]["2"]
    assert first["all"] != second["all"]  # two models, not one ensemble scored twice
    for key in KEYS:
        values = [first["all"][key], second["all"][key]]
        if None in values:
            continue
        assert demo["model"]["all"][key] == pytest.approx(sum(values) / 2)
        assert demo["model_std"]["all"][key] == pytest.approx(abs(values[0] - values[1])
                                                              / 2 ** 0.5)
    # each seed trained with the whole budget, on split_seed 0's held-out split whatever
    # the seeds (so runs of separate calls join as an ensemble)
    runs = tmp_path / "suite" / "demo"
    splits = [json.loads((runs / f"s{s}" / "split.json").read_text()) for s in (1, 2)]
    assert splits[0]["holdout"] == splits[1]["holdout"]
    for s in (1, 2):
        config = (runs / f"s{s}" / "config.yaml").read_text()
        assert "time_budget: 600" in config and "split_seed: 0" in config
    table = suite_table(results, KEYS)
    assert "| demo | all | anoseg, mean of 2 seeds |" in table and " ± " in table
    # a metric missing for one seed is averaged over the others; no spread from one value
    mean, std = seed_statistics([{"all": {"a": 0.5, "b": None}}, {"all": {"a": 0.7, "b": 0.2}}])
    assert mean["all"] == {"a": pytest.approx(0.6), "b": 0.2}
    assert std["all"]["b"] is None and std["all"]["a"] == pytest.approx(0.1414, abs=1e-3)


def test_dev_suite_scores_several_recipes_as_one_calibrated_ensemble(demo_root, tmp_path):
    import json

    from anoseg.dev_suite import KEYS, Member, run_suite
    from anoseg.errors import ConfigError

    sets = {"demo": (demo_root, "demo_texture")}
    tiny = ["train.steps=2", "data.image_size=64", "data.num_workers=0"]
    members = [Member("configs/cpu_small.yaml", 600, (0, 1)),
               Member("configs/cpu_real.yaml", 300, (0,))]
    results = run_suite(sets, members, tiny, output_dir=tmp_path / "suite", image_size=64)
    # scoring an uncalibrated ensemble of two recipes raises, so these scores went through
    # the calibration on the shared held-out images
    row = results["demo"]["model"]["all"]
    assert set(row) == set(KEYS) and 0.0 <= row["pixel_auroc"] <= 1.0
    runs = tmp_path / "suite" / "demo"
    for member, seed in (("cpu_small", 0), ("cpu_small", 1), ("cpu_real", 0)):
        config = (runs / member / f"s{seed}" / "config.yaml").read_text()
        assert "split_seed: 0" in config
        assert ("time_budget: 600" if member == "cpu_small" else "time_budget: 300") in config
    recorded = json.loads((tmp_path / "suite" / "suite.json").read_text())["members"]
    assert recorded[1] == {"config": "configs/cpu_real.yaml", "seconds": 300, "seeds": [0]}
    with pytest.raises(ConfigError, match="separate-seeds"):
        run_suite(sets, members, tiny, output_dir=tmp_path / "s2", separate_seeds=True)
    with pytest.raises(ConfigError, match="share a folder"):
        run_suite(sets, [members[0], Member("other/cpu_small.yaml", 1, (0,))], tiny,
                  output_dir=tmp_path / "s3")
    with pytest.raises(ConfigError, match="no seeds"):
        run_suite(sets, [Member("configs/cpu_small.yaml", 1, ())], tiny,
                  output_dir=tmp_path / "s4")


def test_a_cached_floor_is_computed_again_when_the_test_set_changes(make_mvtec, tmp_path,
                                                                     monkeypatch):
    import anoseg.dev_suite as dev_suite

    root = make_mvtec(n_train=4, n_test_good=2, defects={"crack": 2}, image_hw=(32, 32))
    calls = []
    real_floor = dev_suite.gaussian_floor

    def counted(*args, **kwargs):
        calls.append(args)
        return real_floor(*args, **kwargs)

    monkeypatch.setattr(dev_suite, "gaussian_floor", counted)
    path = tmp_path / "floor.json"
    first = dev_suite.cached_floor(path, root, "widget", 32, "stretch", "model")
    again = dev_suite.cached_floor(path, root, "widget", 32, "stretch", "model")
    assert len(calls) == 1 and again == first and set(first) == {"all", "crack"}
    # a new defect type in the test set: the cache no longer fits
    import shutil

    for kind, name in (("test", "000.png"), ("ground_truth", "000_mask.png")):
        (root / "widget" / kind / "dent").mkdir()
        shutil.copy(root / "widget" / kind / "crack" / name, root / "widget" / kind / "dent")
    changed = dev_suite.cached_floor(path, root, "widget", 32, "stretch", "model")
    assert len(calls) == 2 and set(changed) == {"all", "crack", "dent"}

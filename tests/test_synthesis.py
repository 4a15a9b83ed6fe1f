import math

import pytest
import torch

from anoseg.config import SynthesisConfig
from anoseg.data import synthesis
from anoseg.data.synthesis import (EDIT_OPERATIONS, blob_mask, color_jitter, cutpaste, hard_augment,
                                   local_edit, permute_patches, rotate, synthesize_anomaly)
from anoseg.data.training_data import StepSampler, SyntheticAnomalyDataset, synthetic_batch


def _noise(size=64, seed=0):
    # Continuous random values: a pasted pixel can never equal the one it replaces by chance.
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_mask_is_exactly_the_changed_pixels(seed, hard):
    image = _noise(64, seed)
    cfg = SynthesisConfig(hard_augmentation=hard)
    out, normality = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(seed))
    changed = (out != image).any(0)
    pasted = normality[0] == 0
    assert normality.shape == (1, 64, 64)
    assert set(normality.unique().tolist()) <= {0.0, 1.0}
    assert pasted.any()
    assert torch.equal(changed, pasted)


def test_scar_and_patch_masks_exact_and_scar_is_thin():
    cfg = SynthesisConfig(hard_augmentation=False)
    image = _noise(128, 1)
    source = _noise(128, 2)
    for seed in range(10):
        for scar in (False, True):
            out, mask = cutpaste(image, source, cfg, torch.Generator().manual_seed(seed),
                                 scar=scar)
            assert torch.equal((out != image).any(0), mask)
            area = mask.float().mean().item()
            if scar:
                assert 0 < area < 0.02
            else:
                assert cfg.patch_area[0] * 0.7 <= area <= cfg.patch_area[1] * 1.3


def _scar_extents(angle, seeds=range(40)):
    """(height, width) of each scar's bounding box for ``scar_angle=angle``."""
    cfg = SynthesisConfig(hard_augmentation=False, scar_angle=angle,
                          scar_width=(0.01, 0.02), scar_length=(0.2, 0.3))
    image, source = _noise(128, 1), _noise(128, 2)
    extents = []
    for seed in seeds:
        _, mask = cutpaste(image, source, cfg, torch.Generator().manual_seed(seed), scar=True)
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        extents.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)))
    return extents


def test_scar_angle_controls_orientation():
    # The paper's CutPaste-scar (-45..45 degrees from vertical) is never closer to horizontal
    # than to vertical; the full half-turn (configs/cpu_unseen.yaml) draws both.
    paper = _scar_extents((-45.0, 45.0))
    assert all(h >= w for h, w in paper)
    full = _scar_extents((-90.0, 90.0))
    assert sum(w > 2 * h for h, w in full) >= 5
    assert sum(h > 2 * w for h, w in full) >= 5
    horizontal = _scar_extents((90.0, 90.0), seeds=range(5))
    assert all(h <= 4 and w >= 20 for h, w in horizontal)


def test_blob_is_round_inside_its_box_and_exact():
    cfg = SynthesisConfig(hard_augmentation=False, scar_p=0.0, patch_area=(0.02, 0.03))
    image, source = _noise(128, 1), _noise(128, 2)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        shape = blob_mask(20, 14, g)
        assert shape.shape == (1, 20, 14) and shape.any()
        # corners of the box stay outside: it is a round shape, not the rectangle
        assert shape[0, 0, 0] == 0 and shape[0, -1, -1] == 0
        assert 0.4 < shape.mean().item() < 0.95
        out, mask = cutpaste(image, source, cfg, torch.Generator().manual_seed(seed), blob=True)
        _, rect = cutpaste(image, source, cfg, torch.Generator().manual_seed(seed), blob=False)
        assert torch.equal((out != image).any(0), mask)
        assert 0 < mask.sum() < rect.sum()


@pytest.mark.parametrize("seed", range(6))
def test_several_anomalies_per_image_union_of_exact_masks(seed):
    image = _noise(96, seed)
    cfg = SynthesisConfig(anomalies_per_image=(3, 3), scar_p=0.0, patch_area=(0.002, 0.004),
                          blob_p=0.5)
    out, normality = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(seed))
    pasted = normality[0] == 0
    assert torch.equal((out != image).any(0), pasted)
    one = SynthesisConfig(scar_p=0.0, patch_area=(0.002, 0.004), blob_p=0.5)
    single = synthesize_anomaly(image, one, torch.Generator().manual_seed(seed))[1]
    # three small patches (rarely overlapping) cover more than one
    assert pasted.sum() > (single[0] == 0).sum()


def test_mask_leaves_out_pasted_pixels_that_did_not_change():
    # A flat image: every pasted pixel equals the one it covers unless jitter changes it, so
    # an exact mask must not mark the unchanged ones.
    image = torch.full((3, 64, 64), 0.5)
    image[:, :, 32:] = 0.0
    cfg = SynthesisConfig(hard_augmentation=False)
    for seed in range(8):
        out, normality = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal((out != image).any(0), normality[0] == 0)


def _lines(size=96):
    """A binary 'circuit': white background, black lines and pads (like the PCB images)."""
    image = torch.ones(3, size, size)
    for k in range(8, size, 16):
        image[:, k:k + 3, :] = 0.0
        image[:, :, k + 4:k + 6] = 0.0
    return image


@pytest.mark.parametrize("operation", EDIT_OPERATIONS)
def test_local_edit_changes_a_small_blob_exactly(operation):
    cfg = SynthesisConfig(patch_area=(0.005, 0.02), edit_radius=(0.02, 0.04))
    for seed in range(10):
        for image in (_lines(), _noise(96, seed)):
            out, mask = local_edit(image, cfg, torch.Generator().manual_seed(seed), operation)
            changed = (out != image).any(0)
            assert torch.equal(changed, mask), (operation, seed)
            assert 0 < mask.sum() <= 0.02 * 96 * 96 + 1
            if operation == "dilate":  # grey-level maximum: values only go up
                assert (out >= image).all()
            elif operation == "erode":
                assert (out <= image).all()
            else:  # one colour of the image itself
                colours = out[:, mask].T.unique(dim=0)
                assert len(colours) == 1
                assert ((image.flatten(1).T == colours[0]).all(1)).any()


def test_local_edit_of_a_flat_image_changes_nothing_and_says_so():
    image = torch.full((3, 64, 64), 0.3)
    out, mask = local_edit(image, SynthesisConfig(), torch.Generator().manual_seed(0), "dilate")
    assert torch.equal(out, image) and not mask.any()
    with pytest.raises(ValueError, match="operation must be one of"):
        local_edit(image, SynthesisConfig(), torch.Generator(), "blur")


def test_edit_p_chooses_between_local_edits_and_cutpaste(monkeypatch):
    calls = {"edit": 0, "cutpaste": 0}
    real_edit, real_cutpaste = synthesis.local_edit, synthesis.cutpaste

    def counting(name, function):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(synthesis, "local_edit", counting("edit", real_edit))
    monkeypatch.setattr(synthesis, "cutpaste", counting("cutpaste", real_cutpaste))
    image = _lines(64)
    for p, expect_edit, expect_paste in ((0.0, False, True), (1.0, True, False),
                                         (0.5, True, True)):
        calls.update(edit=0, cutpaste=0)
        cfg = SynthesisConfig(edit_p=p, anomalies_per_image=(2, 2))
        for seed in range(20):
            out, normality = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(seed))
            assert torch.equal((out != image).any(0), normality[0] == 0)
        assert (calls["edit"] > 0) == expect_edit and (calls["cutpaste"] > 0) == expect_paste
        assert calls["edit"] + calls["cutpaste"] == 40
    assert 10 <= calls["edit"] <= 30  # p = 0.5 of 40 anomalies, well inside 3 sigma


def test_log_patch_area_scale_spreads_areas_over_the_decades():
    from anoseg.data.synthesis import _rectangle_patch

    g = torch.Generator().manual_seed(0)
    side = 1000
    for scale, expected_median in (("uniform", (0.001 + 0.1) / 2), ("log", (0.001 * 0.1) ** 0.5)):
        cfg = SynthesisConfig(patch_area=(0.001, 0.1), patch_area_scale=scale)
        areas = torch.tensor([h * w / side ** 2 for h, w in
                              (_rectangle_patch(side, side, cfg, g) for _ in range(2000))])
        assert areas.min() >= 0.001 * 0.9 and areas.max() <= 0.1 * 1.1
        assert abs(areas.median().item() / expected_median - 1) < 0.15, scale


def test_synthesis_is_reproducible_from_the_seed():
    image = _noise(64, 3)
    cfg = SynthesisConfig()
    a = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(7))
    b = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(7))
    c = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_each_hard_augmentation_fires_at_its_probability():
    image = _noise(32, 0)
    n = 600
    for p in (0.5, 0.2):
        cfg = SynthesisConfig(rotation_p=p, permutation_p=p, jitter_p=p)
        counts = {"rotation": 0, "permutation": 0, "jitter": 0}
        for seed in range(n):
            _, fired = hard_augment(image, cfg, torch.Generator().manual_seed(seed))
            for key in counts:
                counts[key] += fired[key]
        tolerance = 4 * math.sqrt(p * (1 - p) / n)  # four standard deviations
        for key, count in counts.items():
            assert abs(count / n - p) < tolerance, (key, count / n, p)


def test_rotation_permutation_jitter_change_the_image():
    image = _noise(32, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(rotate(image, 90.0), torch.rot90(image, 1, (-2, -1)))
    permuted = permute_patches(image, 2, g)
    assert not torch.equal(permuted, image)
    # A permutation moves whole tiles: the multiset of values is unchanged.
    assert torch.equal(permuted.flatten().sort().values, image.flatten().sort().values)
    jittered = color_jitter(image, SynthesisConfig(), g)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, image)


def test_patch_area_range_is_respected():
    cfg = SynthesisConfig(hard_augmentation=False, scar_p=0.0, patch_area=(0.01, 0.02))
    for seed in range(20):
        _, normality = synthesize_anomaly(_noise(128, seed), cfg,
                                          torch.Generator().manual_seed(seed))
        area = (normality == 0).float().mean().item()
        assert 0.005 < area < 0.03


def test_sampler_is_a_pure_function_of_the_step():
    full = StepSampler(10, 4, seed=3)
    it = iter(full)
    keys = [next(it) for _ in range(40)]
    resumed = StepSampler(10, 4, seed=3, start_step=5)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(20)] == keys[20:]
    # every epoch visits each image once
    assert sorted(k[0] for k in keys[:10]) == list(range(10))
    # two ranks split each global batch without overlap
    r0, r1 = iter(StepSampler(10, 2, 3, rank=0, world_size=2)), iter(
        StepSampler(10, 2, 3, rank=1, world_size=2))
    assert [next(r0) for _ in range(2)] + [next(r1) for _ in range(2)] == keys[:4]


def test_dataset_mixes_normal_and_synthetic_samples():
    images = (torch.rand(6, 3, 64, 64) * 255).to(torch.uint8)
    ds = SyntheticAnomalyDataset(images, 64, SynthesisConfig(anomaly_ratio=0.5))
    samples = [ds[(i % 6, i)] for i in range(60)]
    synthetic = [s for s in samples if s["synthetic"]]
    normal = [s for s in samples if not s["synthetic"]]
    assert 15 < len(synthetic) < 45
    assert all(torch.all(s["normality"] == 1) for s in normal)
    assert all((s["normality"] == 0).any() for s in synthetic)
    batch = synthetic_batch(torch.rand(4, 3, 64, 64), SynthesisConfig(), seed=0,
                            anomaly_ratio=1.0)
    assert batch["image"].shape == (4, 3, 64, 64) and (batch["normality"] == 0).any()


# ------------------------------------------------------------------ noise regions (issue 11)


def test_perlin_noise_is_smooth_and_bounded():
    noise = synthesis.perlin_noise(64, 96, 4, 2, torch.Generator().manual_seed(0))
    assert noise.shape == (64, 96)
    assert noise.abs().max() <= 1.0
    assert noise.std() > 0.05
    # neighbouring pixels are close: a smooth field, not white noise
    assert (noise[:, 1:] - noise[:, :-1]).abs().mean() < 0.1 * noise.std() * 4


@pytest.mark.parametrize("seed", range(8))
def test_region_mask_area_follows_the_drawn_fraction(seed):
    cfg = SynthesisConfig(region_area=(0.01, 0.2))
    mask = synthesis.region_mask(64, 64, cfg, torch.Generator().manual_seed(seed))
    fraction = mask.float().mean().item()
    assert 0.01 * 0.9 <= fraction <= 0.2 * 1.1


def test_region_areas_span_the_log_range():
    cfg = SynthesisConfig(region_area=(0.001, 0.3))
    fractions = [synthesis.region_mask(64, 64, cfg, torch.Generator().manual_seed(s))
                 .float().mean().item() for s in range(60)]
    assert min(fractions) < 0.01 and max(fractions) > 0.1


@pytest.mark.parametrize("source", [s for s in synthesis.REGION_SOURCES if s != "shade"])
def test_noise_region_labels_visible_changes_only(source):
    cfg = SynthesisConfig(region_sources=[source], region_opacity=(0.5, 1.0),
                          region_area=(0.05, 0.2))
    image = _noise(64, 3)
    augmented = _noise(64, 4)
    out, mask = synthesis.noise_region(image, augmented, cfg, torch.Generator().manual_seed(1))
    change = (out - image).abs().amax(0)
    assert mask.any()
    assert torch.equal(mask, mask & (change > cfg.region_min_change))
    # outside the labelled pixels, nothing changed more than the visibility limit
    assert (change[~mask] <= cfg.region_min_change).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_blur_of_a_flat_image_is_not_labelled():
    cfg = SynthesisConfig(region_sources=["blur"])
    image = torch.full((3, 64, 64), 0.4)
    out, mask = synthesis.noise_region(image, image, cfg, torch.Generator().manual_seed(0))
    assert not mask.any()


def test_region_p_makes_noise_regions(monkeypatch):
    calls = []
    real = synthesis.noise_region

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesis, "noise_region", spy)
    for seed in range(20):
        synthesize_anomaly(_noise(32, seed), SynthesisConfig(region_p=1.0),
                           torch.Generator().manual_seed(seed))
    assert len(calls) == 20
    calls.clear()
    for seed in range(20):
        synthesize_anomaly(_noise(32, seed), SynthesisConfig(region_p=0.0),
                           torch.Generator().manual_seed(seed))
    assert not calls


def test_noise_regions_are_reproducible_from_the_seed():
    cfg = SynthesisConfig(region_p=1.0)
    a = synthesize_anomaly(_noise(64, 0), cfg, torch.Generator().manual_seed(5))
    b = synthesize_anomaly(_noise(64, 0), cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("key,value", [("region_p", 1.5), ("region_area", [0.0, 0.1]),
                                       ("region_scale", [3, 1]), ("region_opacity", [0.5, 1.2]),
                                       ("region_sources", ["paint"]), ("region_sources", []),
                                       ("region_min_change", -0.1)])
def test_bad_region_settings_are_refused_with_the_key(key, value):
    from anoseg.config import load_config
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError, match=f"synthesis.{key}"):
        load_config(None, [f"synthesis.{key}={value}"])


def _principal_axis(mask):
    """Angle (radians, in [0, pi)) of the mask's main axis, and its elongation (std ratio)."""
    points = mask.nonzero().to(torch.float64)
    points = points - points.mean(0)
    cov = points.T @ points / len(points)
    values, vectors = torch.linalg.eigh(cov)
    dy, dx = vectors[:, 1].tolist()
    return math.atan2(dy, dx) % math.pi, math.sqrt(values[1] / values[0].clamp_min(1e-6))


def test_cracks_are_thin_long_and_of_every_orientation():
    cfg = SynthesisConfig(crack_length=(0.3, 0.4), crack_width=(0.005, 0.01))
    angles, elongations = [], []
    for seed in range(60):
        mask = synthesis.crack_mask(128, 128, cfg, torch.Generator().manual_seed(seed))
        assert mask.any()
        rows, cols = mask.nonzero().T
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        # at most ~2 px wide: area is about length x 2, far less than a filled box
        assert mask.sum() <= 3 * 0.4 * 128 + 9
        if extent >= 20:
            angle, elongation = _principal_axis(mask)
            angles.append(angle)
            elongations.append(elongation)
    assert len(angles) >= 30
    # they wander, but most stay line-like
    assert sum(e > 4 for e in elongations) >= 0.8 * len(elongations)
    near_horizontal = sum(min(a, math.pi - a) < math.pi / 8 for a in angles)
    near_vertical = sum(abs(a - math.pi / 2) < math.pi / 8 for a in angles)
    assert near_horizontal >= 3 and near_vertical >= 3


@pytest.mark.parametrize("seed", range(8))
def test_crack_mask_is_exactly_the_changed_pixels(seed):
    image, augmented = _noise(96, seed), _noise(96, seed + 100)
    out, mask = synthesis.crack(image, augmented, SynthesisConfig(),
                                torch.Generator().manual_seed(seed))
    assert mask.any()
    assert torch.equal((out != image).any(0), mask)


def test_cracks_darken_brighten_or_paste():
    image = torch.full((3, 64, 64), 0.5)
    augmented = torch.full((3, 64, 64), 0.9)
    seen = set()
    for seed in range(40):
        out, mask = synthesis.crack(image, augmented, SynthesisConfig(),
                                    torch.Generator().manual_seed(seed))
        values = out[:, mask]
        if torch.allclose(values, torch.tensor(0.9)):
            seen.add("augmented")
        elif (values < 0.5).all():
            seen.add("darker")
        elif (values > 0.5).all():
            seen.add("brighter")
    assert seen == {"augmented", "darker", "brighter"}


def test_crack_p_makes_cracks(monkeypatch):
    calls = []
    real = synthesis.crack

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesis, "crack", spy)
    for seed in range(10):
        synthesize_anomaly(_noise(32, seed), SynthesisConfig(crack_p=1.0),
                           torch.Generator().manual_seed(seed))
    assert len(calls) == 10
    calls.clear()
    for seed in range(10):
        synthesize_anomaly(_noise(32, seed), SynthesisConfig(), torch.Generator().manual_seed(seed))
    assert not calls


@pytest.mark.parametrize("key,value", [("crack_p", -0.1), ("crack_width", [0.02, 0.01]),
                                       ("crack_length", [0.0, 0.1]),
                                       ("crack_contrast", [0.5, 1.5])])
def test_bad_crack_settings_are_refused_with_the_key(key, value):
    from anoseg.config import load_config
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError, match=f"synthesis.{key}"):
        load_config(None, [f"synthesis.{key}={value}"])


# ------------------------------------------------------------------ labels against the texture


def test_label_local_z_keeps_only_changes_above_the_local_texture():
    from anoseg.data.synthesis import changed_pixels, local_std

    g = torch.Generator().manual_seed(0)
    before = 0.5 + 0.1 * torch.randn(3, 64, 64, generator=g)  # grain of std ~0.1
    after = before.clone()
    after[:, 8:24, 8:24] += 0.05  # within the grain: invisible
    after[:, 40:56, 40:56] += 0.6  # far above it
    std = local_std(before)
    assert std.shape == (64, 64) and 0.07 < std.median() < 0.13
    visible = changed_pixels(before, after, 2.0)
    assert not visible[8:24, 8:24].any()
    assert visible[40:56, 40:56].all()
    assert visible.sum() == 16 * 16
    # off: every changed pixel counts
    assert changed_pixels(before, after)[8:24, 8:24].all()
    assert torch.equal(changed_pixels(before, after, 0.0), (after != before).any(0))
    # a flat image: the floor of the std keeps a small change visible
    flat = torch.full((3, 16, 16), 0.5)
    assert changed_pixels(flat, flat + 0.05, 2.0).all()


@pytest.mark.parametrize("seed", range(6))
def test_label_local_z_labels_a_subset_of_the_changes(seed):
    from anoseg.data.synthesis import local_std, synthesize_anomaly

    image = 0.5 + 0.1 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed))
    image = image.clamp(0, 1)
    plain_image, plain = synthesize_anomaly(image, SynthesisConfig(),
                                            torch.Generator().manual_seed(seed))
    cfg = SynthesisConfig(label_local_z=2.0)
    out, normality = synthesize_anomaly(image, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(out, plain_image)  # the same anomaly, only the labels
    anomalous, before = normality[0] == 0, plain[0] == 0
    assert (anomalous <= before).all()
    change = (out - image).abs()
    threshold = 2.0 * local_std(image).clamp_min(0.01)
    assert torch.equal((change > threshold).any(0) & before, anomalous)


def test_label_local_z_reaches_the_training_samples():
    from anoseg.data.training_data import make_sample

    image = (0.5 + 0.1 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0)))
    image = image.clamp(0, 1)
    counts = []
    for z in (0.0, 2.0):
        cfg = SynthesisConfig(label_local_z=z)
        sample = make_sample(image, cfg, torch.Generator().manual_seed(3), 1.0)
        counts.append(int((sample["normality"] == 0).sum()))
    assert counts[0] > counts[1]


@pytest.mark.parametrize("value", [-0.5, 11])
def test_bad_label_local_z_is_refused_with_the_key(value):
    from anoseg.config import load_config
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="synthesis.label_local_z"):
        load_config(None, [f"synthesis.label_local_z={value}"])


def test_shade_regions_are_faint_soft_and_often_large():
    cfg = SynthesisConfig(region_sources=["shade"], region_area=(0.0005, 0.3))
    image = _noise(64, 3) * 0.5 + 0.25
    areas = []
    for seed in range(40):
        out, mask = synthesis.noise_region(image, image, cfg, torch.Generator().manual_seed(seed))
        change = (out - image).abs().amax(0)
        # faint: at most a 20 % brightness change
        assert change.max() <= 0.2 * image.max() + 1e-6
        if mask.sum() > 100:
            # soft: the change fades out around the label, no hard outline
            assert (change[~mask] > 0).any()
            assert change[mask].mean() > change[~mask].mean()
        areas.append(mask.float().mean().item())
    # the area is uniform, not log-uniform, over region_area: most shades are large
    assert sum(a > 0.05 for a in areas) > 20

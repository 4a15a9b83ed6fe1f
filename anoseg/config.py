"""One configuration object for a run, loaded from YAML and overridable from the command line.

The defaults of the dataclasses below are the paper-faithful setting (256x256, batch 16, all of
AnoSeg's parts switched on). ``configs/*.yaml`` only list what they change.

Example:
    >>> cfg = load_config(None, overrides=["data.image_size=128", "model.width=0.5"])
    >>> cfg.data.image_size
    128
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from anoseg.errors import ConfigError

MVTEC_CATEGORIES: Tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)

REGION_SOURCES: Tuple[str, ...] = ("augmented", "texture", "intensity", "blur", "shade")
"""What a noise region can be (``synthesis.region_sources``): a fill of
:func:`anoseg.data.synthesis.region_fill`, or ``shade``
(:func:`anoseg.data.synthesis.shade_region`)."""
DEFAULT_REGION_SOURCES: Tuple[str, ...] = ("augmented", "texture", "intensity", "blur")
"""``synthesis.region_sources`` unless a config names them."""

ImageSize = Union[int, Tuple[int, int]]
"""Type of ``data.image_size``: one side (a square) or ``[height, width]``."""

RESIZE_MODES: Tuple[str, ...] = ("stretch", "keep_aspect", "match_aspect")
"""Values of ``data.resize`` (:mod:`anoseg.data.geometry`)."""

TILE_COORDS: Tuple[str, ...] = ("image", "tile")
"""Values of ``data.tiling.coords``: what the coordinate channels of a tile say."""

RESOLUTIONS: Tuple[str, ...] = ("model", "native")
"""Values of ``eval.resolution``: where maps are scored."""

RUNTIME = {"runtime": True}
"""Field metadata of a *run-time* key: it says how a run is executed (steps, budget, device,
precision, logging, workers, ...), not what is trained, so it may change when a run is resumed,
a detector is trained on a run, or a batch of runs is restarted (:func:`runtime_keys`)."""


@dataclass
class TilingConfig:
    """Tiles for high-resolution images (``data.tiling``; off by default). With tiling on, the
    network's input is a tile of ``data.image_size``: training takes random tiles of the
    images (each image first resized by ``scale``, keeping its aspect), inference slides a
    window over the whole image and blends the windows (``docs/design.md``, "Image geometry")."""

    enabled: bool = False
    scale: float = 1.0
    """Every image is resized by this factor before it is tiled (1 = its own pixels)."""
    overlap: float = 0.25
    """At inference, the fraction of a window's side it shares with its neighbour; the windows'
    maps are blended with a separable Hann weight, so seams do not show."""
    coords: str = "image"
    """What a tile's coordinate channels say: ``image`` = where the tile lies in the whole image
    (the image spans ``[-1, 1]``), ``tile`` = each tile spans ``[-1, 1]`` as if it were the
    image. Not measured yet which is better (``docs/experiments.md``)."""


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: Optional[str] = None
    """Folder in MVTec AD layout; ``None`` means the built-in demo dataset."""
    category: str = "bottle"
    image_size: ImageSize = 256
    """The network's input: one side (a square) or ``[height, width]``, each a multiple of 32
    from 64 to 512. With ``data.tiling`` it is the tile's size."""
    resize: str = "stretch"
    """How an image is brought to ``image_size``: ``stretch`` (resized to it, the aspect is
    lost; anoseg 0.x), ``keep_aspect`` (resized so that it fits, then padded; the padding is
    never scored and never holds a synthetic anomaly) or ``match_aspect`` (training replaces
    ``image_size`` by the canvas with about its pixel count that is shaped like the training
    images, their median aspect, and stretches onto it:
    :func:`anoseg.data.geometry.match_aspect_canvas`; the run's saved config holds the
    resolved ``image_size`` and ``stretch``). Ignored with ``data.tiling``, which always keeps
    the aspect."""
    tiling: TilingConfig = field(default_factory=TilingConfig)
    holdout_fraction: float = 0.1
    """Fraction of ``train/good`` kept out of training (seeded split). Evaluation chooses the
    label-free threshold on these normal images, which the model never saw."""
    split_seed: Optional[int] = None
    """Seed of the held-out split; ``None`` = ``train.seed``. Runs meant to be averaged as an
    ensemble (``anoseg-eval --ensemble``) need the same split, hence the same value here."""
    num_workers: int = field(default=2, metadata=RUNTIME)
    """Data-loader worker processes (synthesis runs there, not on the training thread)."""
    cache_images: bool = field(default=True, metadata=RUNTIME)
    """Decode and resize every training image once and keep it in memory."""


@dataclass
class SynthesisConfig:
    """Synthetic anomalies (paper 3.1): hard augmentation of a copy, then CutPaste."""

    anomaly_ratio: float = 0.5
    """Probability that a training sample is a synthetic anomaly instead of a normal image."""
    hard_augmentation: bool = True
    """Switch for the Table 3 ablation: off = CutPaste of an unaugmented copy."""
    rotation_p: float = 0.5
    rotation_angles: List[float] = field(default_factory=lambda: [90.0, 180.0, 270.0])
    permutation_p: float = 0.5
    permutation_grid: int = 2
    """The copy is cut into ``grid x grid`` tiles that are shuffled (never left in place)."""
    jitter_p: float = 0.5
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.1
    scar_p: float = 0.5
    """Probability of a thin rotated "scar" patch instead of a rectangular CutPaste patch."""
    patch_area: Tuple[float, float] = (0.02, 0.15)
    """Rectangular patch area as a fraction of the image area."""
    patch_area_scale: str = "uniform"
    """How the area is drawn from ``patch_area``: ``uniform`` (the paper's CutPaste) or ``log``
    (log-uniform: as many patches between 0.1 % and 1 % as between 1 % and 10 %). Meant for a
    wide range when the defects' size is unknown; on the real sets it did not beat a range
    matched to the defects (docs/experiments.md)."""
    patch_aspect: Tuple[float, float] = (0.3, 3.3)
    """Aspect ratio (height / width), drawn log-uniformly."""
    scar_width: Tuple[float, float] = (0.01, 0.06)
    """Scar width as a fraction of the image side."""
    scar_length: Tuple[float, float] = (0.04, 0.10)
    """Scar length as a fraction of the image side."""
    scar_angle: Tuple[float, float] = (-45.0, 45.0)
    """Rotation of a scar in degrees, drawn uniformly, 0 = vertical. The paper's CutPaste-scar
    range (-45, 45) never draws a scar closer to horizontal than to vertical; (-90, 90) draws
    every orientation (measured on the real sets in docs/experiments.md, eighth round: within
    seed noise, so no config changes it)."""
    blob_p: float = 0.0
    """Probability that a non-scar anomaly is an irregular blob (a wobbly ellipse inside the
    rectangle) instead of the whole rectangle. Not in the paper (0 = CutPaste as published);
    real pits and spots are round, not rectangular."""
    anomalies_per_image: Tuple[int, int] = (1, 1)
    """How many anomalies are pasted into one synthetic sample, drawn uniformly from the range
    (the paper pastes one). Real defects often come several to an image."""
    edit_p: float = 0.0
    """Probability that an anomaly is a *local edit* of the image itself instead of a CutPaste
    patch: inside an irregular blob (sized by ``patch_area``) the image is dilated, eroded
    (grey-level maximum / minimum over a square window) or filled with the colour of one of its
    own pixels. Not in the paper (0 = CutPaste only); these mimic defects that change the shape
    of what is there (spurs, bites, breaks, pin-holes, stray spots) rather than bring in
    something foreign."""
    edit_radius: Tuple[float, float] = (0.01, 0.03)
    """Radius of the dilation / erosion window, as a fraction of the image side (at least 1
    pixel)."""
    crack_p: float = 0.0
    """Probability that an anomaly is a *crack* instead of a CutPaste patch: a thin curved stroke
    (a random walk whose heading drifts, :func:`anoseg.data.synthesis.crack_mask`) of any
    orientation, darkened or brightened by a factor drawn from ``crack_contrast``, or filled from
    the hard-augmented copy. Not in the paper (0 = off); CutPaste scars are straight strips, real
    cracks wander and are often only a pixel or two wide."""
    crack_width: Tuple[float, float] = (0.004, 0.016)
    """Width of a crack as a fraction of the image side (at least one pixel)."""
    crack_length: Tuple[float, float] = (0.05, 0.4)
    """Length of a crack along its path, as a fraction of the image side."""
    crack_contrast: Tuple[float, float] = (0.2, 0.8)
    """How strongly a crack darkens (``x * (1 - c)``) or brightens (``x + c * (1 - x)``) the
    pixels it covers; half the cracks darken, a quarter brighten, a quarter take the augmented
    copy's pixels."""
    region_p: float = 0.0
    """Probability that an anomaly is a *noise region* instead of a CutPaste patch: a mask
    thresholded from Perlin noise (one or several blobs of irregular outline) covering a
    fraction of the image drawn log-uniformly from ``region_area``, filled from one of
    ``region_sources`` and blended with an opacity drawn from ``region_opacity``. Not in the
    paper (0 = CutPaste only); it spans small spots to large, faint regions, so the map is not
    taught one defect size (docs/experiments.md)."""
    region_area: Tuple[float, float] = (0.0005, 0.3)
    """Area of a noise region as a fraction of the image, drawn log-uniformly."""
    region_scale: Tuple[int, int] = (1, 5)
    """Perlin grid resolution per axis, ``2**k`` cells with ``k`` drawn from this range for each
    axis independently: low = one large smooth region, high = many small spots."""
    region_sources: List[str] = field(
        default_factory=lambda: list(DEFAULT_REGION_SOURCES))
    """What fills a noise region, drawn with equal probability: ``augmented`` (the image's own
    hard-augmented copy, as the paper's patches), ``texture`` (a procedural two-colour noise
    texture), ``intensity`` (the image with its brightness / colour smoothly shifted),
    ``blur`` (the image blurred: texture or grain wiped out) and ``shade`` (not in the default:
    a faint brightness change of 4-20 % with soft edges over a region whose area is drawn
    uniformly, not log-uniformly, from ``region_area``: the large low-contrast kind, visible
    only when large)."""
    region_opacity: Tuple[float, float] = (0.3, 1.0)
    """Blending opacity of a noise region (1 = the fill replaces the image)."""
    region_min_change: float = 0.02
    """A noise region's pixel is labelled anomalous only where the blend changed it by more than
    this (largest channel difference, images in ``[0, 1]``): a blur over a flat area or a faint
    blend of similar texture changes nothing one could see, and is not taught as a defect."""
    label_local_z: float = 0.0
    """A changed pixel of a synthetic anomaly is labelled anomalous only where the change
    exceeds ``label_local_z`` times the normal image's own local standard deviation there
    (over a :data:`~anoseg.data.synthesis.LABEL_WINDOW`-pixel square, the largest over
    the channels, floored at 0.01) in at least one channel; smaller changes keep the label
    "normal". A change within the local texture's own contrast (grain, noise, fine
    structure) is not a defect anyone could see, and teaching it as one makes the map mark
    normal texture. 0 = off (every changed pixel is anomalous, as in the paper). Measured at 2
    on the real sets: within seed noise (docs/experiments.md, tenth round)."""


@dataclass
class ModelConfig:
    """Network shape (appendix B, Table 6) and the ablation switches of Table 3."""

    width: float = 1.0
    """Channel multiplier for encoder, decoders and discriminator (1.0 = the paper)."""
    coord_channels: bool = True
    reconstruction: bool = True
    """The reconstruction decoder (and with it L_Re); off = the ablation's map-only base model."""
    init_weights: Optional[str] = None
    """Optional path to torchvision ResNet-18 weights for the encoder (the paper uses none)."""
    map_skips: int = 0
    """U-Net skip connections from the encoder into the map decoder, 0-4 (0 = the paper's
    Table 6; 2 = strides 16 and 8; 4 = down to stride 2). A departure for small defects: without
    them the map is decoded from stride-32 features (docs/experiments.md)."""
    rec_skips: int = 0
    """U-Net skip connections into the reconstruction decoder, 0-2 (0 = the paper; 1 = stride
    16; 2 = strides 16 and 8). Only with ``train.rec_target: clean``: with the paper's masked
    target the decoder could copy the anomaly through them (docs/experiments.md)."""
    normal_stats: bool = False
    """Feed the generator the input's per-pixel z-score against the normal training images'
    mean and standard deviation (three more input channels; not in the paper): a "what is
    normal here" cue for aligned parts that the synthetic anomalies teach the network to use or
    to discount (docs/experiments.md)."""
    feature_stats: bool = False
    """A second signal at inference (not in the paper): the Mahalanobis distance of the
    encoder's stride-2 and stride-4 features to their per-location Gaussian over the normal
    training images, summed with the map head's anomaly logit, both z-scored on the held-out
    normal images. Fitted at the checkpoint written when training stops (periodic ones mark
    it unfitted); training never sees it (docs/experiments.md)."""
    upsample: str = "transpose"
    """How the decoders double their resolution: ``transpose`` (the paper's Table 6: a 4x4
    transposed convolution, stride 2) or ``bilinear`` (bilinear upsampling, then a 3x3
    convolution; not in the paper). Transposed convolutions of stride 2 leave a checkerboard of
    uneven overlap in the maps, noise at the scale of the smallest defects."""
    compare_head: bool = False
    """A small full-resolution head that compares the input with its reconstruction (three
    dilated 3x3 convolutions on the image, the reconstruction and their difference; DRAEM's
    discriminative idea, not in the paper) and adds its logit to the map head's; use it
    with ``train.rec_target: clean``, so that where the two differ means something. Needs
    ``model.reconstruction`` (docs/experiments.md, twelfth round)."""
    residual_weight: float = 0.0
    """A third signal at inference (not in the paper; needs ``model.feature_stats`` and
    ``model.reconstruction``): the reconstruction residual ``|x - x_hat|`` (mean over the
    channels), z-scored on the held-out normal images like the other two and added to the
    combined anomaly logit with this weight (0 = off). Meaningful with ``train.rec_target:
    clean``, whose reconstruction removes anomalies (docs/experiments.md, twelfth round)."""
    lowpass_weight: float = 0.0
    """A low-pass signal at inference (not in the paper; needs ``model.feature_stats``): the
    blurred brightness and colour of the input, each relative to the image's median and
    z-scored per pixel against the normal training images (``anoseg.models.lowpass``), for
    large faint stains and discolourations that the texture hides from the map head. It is
    put on its held-out normal pixels' scale (median 0, quantile 0.999 at 1) and added to the
    combined anomaly logit after its knee, this many times that logit's own held-out spread
    (its quantile 0.999 minus its median), and the sum is bent by the knee again (0 = off;
    docs/experiments.md, twentieth round)."""
    lowpass_roughness: bool = False
    """With ``model.lowpass_weight``, a fifth low-pass channel: the log of the input's blurred
    local roughness (its brightness's distance from a 1 px blur), relative to the image's
    median and z-scored per pixel like the others, for regions whose finish changed (smoother
    or coarser) more than their brightness (docs/experiments.md, twenty-second round). A run
    trained without it gains it without training again: ``scripts/refit_stats.py``."""


REC_TARGETS = ("masked", "clean")
"""The values of ``train.rec_target``."""

UPSAMPLE_MODES = ("transpose", "bilinear")
"""The values of ``model.upsample``."""


ADAM_IMPLEMENTATIONS = ("auto", "loop", "foreach", "fused")
"""The values of ``train.adam``."""


@dataclass
class TrainConfig:
    """Optimisation. How the defaults were chosen, and what is not yet measured: ``docs/design.md``."""

    steps: int = field(default=20000, metadata=RUNTIME)
    batch_size: int = 16
    lr_generator: float = 2e-4
    lr_discriminator: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 0.0
    schedule: str = "cosine"
    """``constant`` or ``cosine`` (decay to ``lr * min_lr_ratio`` over ``steps``)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    weight_seg: float = 1.0
    seg_loss: str = "l1"
    """``l1``: the paper's L_Seg, mean over all pixels. ``balanced_l1``: the mean over pasted
    pixels and the mean over normal pixels, averaged, so tiny synthetic anomalies are not
    drowned by the normal pixels (a departure for small real defects, docs/experiments.md).
    ``focal``: the focal binary cross-entropy (gamma ``seg_focal_gamma``) of the normality map,
    mean over all pixels: hard pixels weigh most, without shifting the decision toward
    "anomalous" the way class balancing does (docs/experiments.md)."""
    seg_focal_gamma: float = 2.0
    """Focusing exponent of ``seg_loss=focal`` (0 = plain binary cross-entropy)."""
    seg_anomaly_weight: float = 1.0
    """Weight of the pasted (anomalous) pixels against the normal ones in ``seg_loss=focal``
    (1 = unweighted). Between the focal loss (1) and the class balance of ``balanced_l1``
    (about normal / anomalous pixels, ~100 for small anomalies): a weight ``w`` makes a pixel
    best called anomalous from a probability of about ``1 / (1 + w)``."""
    weight_rec: float = 1.0
    rec_target: str = "masked"
    """What L_Re reconstructs: ``masked``, the paper's eq. 4 (the input, on its normal pixels
    only), or ``clean``, DRAEM's target (the image *before* synthesis, on every pixel), which
    teaches the reconstruction to remove what was pasted, so that the residual ``|x - x_hat|``
    marks anomalies (``model.residual_weight``; docs/experiments.md, twelfth round)."""
    weight_adv: float = 0.05
    adversarial: bool = True
    """L_Adv and its discriminator (needs ``model.reconstruction``)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the generator's weights with this decay (0 = off,
    the paper); evaluation and prediction then use the averaged weights. Not in the paper:
    it steadies the maps of short, adversarial runs (docs/experiments.md)."""
    grad_clip: float = 0.0
    """Scale each optimiser's gradients (generator, discriminator) down to this global L2
    norm before its step (0 = off, the paper). A guard for runs whose map saturates after a
    swing of the adversarial game (docs/experiments.md)."""
    seed: int = 0
    device: str = field(default="auto", metadata=RUNTIME)
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    precision: str = field(default="auto", metadata=RUNTIME)
    """``auto`` (bf16 or fp16 mixed precision on CUDA; bf16 on a CPU with native bf16, AMX or
    AVX512-BF16; fp32 elsewhere), ``fp32``, ``bf16``, ``fp16``. ``bf16`` works on any CPU through
    autocast, but without native support it is emulated and far slower (warned)."""
    channels_last: bool = False
    """Use the channels-last memory layout (faster convolutions on some hardware)."""
    sync_batchnorm: bool = False
    """Synchronise batch-norm statistics across processes under torchrun (CUDA only)."""
    compile: bool = field(default=False, metadata=RUNTIME)
    """Compile generator and discriminator with ``torch.compile``. On a 2-core CPU (the recipe,
    one thread) compiling took 134 s and the compiled step was at most ~15 % faster: off by
    default, worth trying for runs of thousands of steps (docs/performance.md)."""
    adam: str = field(default="auto", metadata=RUNTIME)
    """Adam's implementation (:data:`ADAM_IMPLEMENTATIONS`): ``auto`` (PyTorch's choice: the
    per-parameter ``loop`` on a CPU, ``foreach`` on CUDA), ``loop``, ``foreach`` (multi-tensor
    ops, the same bits as ``loop``) or ``fused`` (one kernel per step; it rounds differently,
    and Adam's normalisation and the adversarial game amplify that: after 20 steps of a tiny
    model the losses differ by ~1e-3 of their value). On a 2-core CPU ``fused`` saves about
    2.5 ms of a recipe step (~1 %), docs/performance.md."""
    log_every: int = field(default=10, metadata=RUNTIME)
    logger: str = field(default="none", metadata=RUNTIME)
    """``none`` or ``tensorboard`` (``pip install 'anoseg-torch[tensorboard]'``): TensorBoard
    event files in ``RUN_DIR/tensorboard/`` beside ``losses.jsonl`` (which stays the record):
    every log line's values, the learning rates, and every ``logger_image_every`` steps a grid
    of maps of fixed held-out normal images and synthetic anomalies with their statistics."""
    logger_image_every: int = field(default=200, metadata=RUNTIME)
    """Steps between the map grids of ``logger=tensorboard`` (and at the last step)."""
    logger_images: int = field(default=4, metadata=RUNTIME)
    """Held-out normal images in the grid, and as many synthetic anomalies made from them."""
    checkpoint_every: int = field(default=500, metadata=RUNTIME)
    time_budget: Optional[float] = field(default=None, metadata=RUNTIME)
    """Wall-clock seconds of training; the run stops cleanly and saves when it is spent."""
    deterministic: bool = field(default=False, metadata=RUNTIME)


@dataclass
class EvalConfig:
    batch_size: int = field(default=16, metadata=RUNTIME)
    num_thresholds: int = 10000
    """Thresholds swept for the IoU-vs-threshold curve (the paper uses 10,000)."""
    fpr_limit: float = 0.3
    """Integration limit of AUPRO."""
    threshold_quantile: float = 0.999
    """Label-free threshold: this quantile of the anomaly scores of held-out normal pixels."""
    image_score: str = field(default="max", metadata=RUNTIME)
    """The headline image score (``Image AUROC``, the image threshold, ``anoseg-predict``'s
    ``is_anomalous``): one of :data:`IMAGE_SCORE_CHOICES`, computed on the anomaly *logit* map
    (``docs/evaluation.md``); ``detector`` = the downstream detector's eq. 5 score (``max``
    when the run has none). Every cheap score's image AUROC is reported whatever this is."""
    image_threshold_quantile: float = field(default=0.99, metadata=RUNTIME)
    """Label-free image threshold: this quantile of the held-out normal images' image scores;
    an image scoring above it is anomalous (about ``1 - quantile`` of normal images are)."""
    ensemble_combine: str = field(default="auto", metadata=RUNTIME)
    """How an ensemble (``--ensemble``; the first member's setting) joins its members' maps:
    ``mean`` = the plain mean, ``calibrated`` = the members of each recipe averaged, then each
    recipe's anomaly logit rescaled on the held-out normal images (median to 0, quantile
    0.999 to 1) and weighted by how steady its normal images' peaks are, or by the recipes'
    ``ensemble_weight`` (:class:`anoseg.inference.AnoSegEnsemble`); ``auto`` =
    ``calibrated`` for members of several recipes, ``mean`` for seeds of one
    (``docs/evaluation.md``)."""
    ensemble_weight: Optional[float] = field(default=None, metadata=RUNTIME)
    """This recipe's fixed weight in a calibrated ensemble (relative: the recipes' weights are
    normalised to sum to 1), in place of ``1 / std`` of its held-out peaks; used when every
    recipe of the ensemble sets it (:func:`anoseg.inference.recipe_weights`)."""
    resolution: str = field(default="model", metadata=RUNTIME)
    """Where maps are scored (metrics, image scores, the label-free thresholds): ``model`` =
    at the network's resolution (the image's part of it: padding is cut off), ``native`` = at
    each image's own size (maps resized to it, masks read at it)."""


@dataclass
class DetectorConfig:
    """The image-level anomaly detector trained after AnoSeg (paper 3.4, appendix A).

    The paper gives no optimiser settings for the detector; these defaults are documented in
    ``docs/detector.md``. The three switches are the columns of the Table 5 ablation.
    """

    steps: int = field(default=5000, metadata=RUNTIME)
    batch_size: int = 16
    lr_generator: float = 2e-4
    lr_discriminator: float = 2e-4
    weight_adv: float = 0.05
    """Generator side of L_Adv^AD (eq. 6), non-saturating form."""
    weight_rec: float = 1.0
    """L1 reconstruction of the normal input."""
    weight_fea: float = 1.0
    """Feature matching L_fea (generator side); used when ``use_feature_matching``."""
    weight_cls: float = 1.0
    """Synthetic-anomaly classification L_cls (discriminator side); used when ``use_cls_loss``."""
    use_feature_matching: bool = True
    use_anomaly_map: bool = True
    """Discriminator on ``concat(image, map)``; off = the base model that sees images only."""
    use_cls_loss: bool = True
    cls_map: str = "mask"
    """Map paired with ``x_Ano`` in L_cls: ``mask`` (its synthetic normality mask ``A_Ano``, as
    in appendix A) or ``anoseg`` (AnoSeg's map of ``x_Ano``)."""
    score_alpha: float = 1.0
    """Weight of the feature distance in the score (eq. 5)."""
    score_beta: float = 0.1
    """Weight of the image MSE in the score (eq. 5)."""
    checkpoint_every: int = field(default=500, metadata=RUNTIME)
    time_budget: Optional[float] = field(default=None, metadata=RUNTIME)
    """Wall-clock seconds of detector training; it stops cleanly and saves when spent."""


@dataclass
class AnoSegConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        # YAML has no tuples: store them as lists, read back as tuples by ``_coerce``.
        def lists(values: Dict[str, Any]) -> None:
            for key, value in values.items():
                if isinstance(value, tuple):
                    values[key] = list(value)
                elif isinstance(value, dict):
                    lists(value)

        for section in out.values():
            lists(section)
        return out

    def validate(self) -> "AnoSegConfig":
        """Check ranges and combinations; raise :class:`ConfigError` naming the key."""
        _validate_data(self.data)
        _validate_synthesis(self.synthesis)
        _validate_model(self.model)
        _validate_train(self.train, self.model)
        _validate_eval(self.eval)
        _validate_detector(self.detector)
        _check(self.eval.image_score not in ("signals_max", "signals_mean")
               or self.model.feature_stats, "eval.image_score", self.eval.image_score,
               "not signals_max or signals_mean without model.feature_stats: true (their "
               "signals are the feature statistics')")
        _check(not (self.model.feature_stats and self.data.tiling.enabled),
               "model.feature_stats", self.model.feature_stats,
               "false with data.tiling (per-location statistics of whole images; a tile at a "
               "random place has none)")
        _check(not (self.model.normal_stats and self.data.tiling.enabled), "model.normal_stats",
               self.model.normal_stats, "false with data.tiling (per-pixel statistics of whole "
               "images mean nothing for a tile at a random place)")
        return self


def image_hw(size: ImageSize) -> Tuple[int, int]:
    """``(height, width)`` of a ``data.image_size`` value (an int is a square)."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _validate_data(d: DataConfig) -> None:
    """The ``data`` section's checks."""
    size = d.image_size
    if isinstance(size, (tuple, list)):
        _check(all(s % 32 == 0 and 64 <= s <= 512 for s in size), "data.image_size",
               list(size), "[height, width], each a multiple of 32 from 64 to 512 (the "
               "encoder has stride 32)")
    else:
        _check(size % 32 == 0 and 64 <= size <= 512, "data.image_size", size,
               "a multiple of 32 from 64 to 512 (the encoder has stride 32)")
    _check(d.resize in RESIZE_MODES, "data.resize", d.resize,
           " or ".join(f"'{m}'" for m in RESIZE_MODES))
    t = d.tiling
    _check(0.0 < t.scale <= 8.0 and math.isfinite(t.scale), "data.tiling.scale", t.scale,
           "a resize factor in (0, 8] (1 = the image's own pixels)")
    _check(0.0 <= t.overlap <= 0.75, "data.tiling.overlap", t.overlap,
           "a fraction of the tile in [0, 0.75]")
    _check(t.coords in TILE_COORDS, "data.tiling.coords", t.coords,
           " or ".join(f"'{m}'" for m in TILE_COORDS))
    _check(0.0 <= d.holdout_fraction < 1.0, "data.holdout_fraction", d.holdout_fraction,
           "a fraction in [0, 1)")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    _check(bool(d.category) and "/" not in d.category and "\\" not in d.category,
           "data.category", d.category, "a folder name")


def _validate_synthesis(s: SynthesisConfig) -> None:
    """The ``synthesis`` section's checks."""
    for name in ("anomaly_ratio", "rotation_p", "permutation_p", "jitter_p", "scar_p"):
        value = getattr(s, name)
        _check(0.0 <= value <= 1.0, f"synthesis.{name}", value, "a probability in [0, 1]")
    _check(s.permutation_grid >= 2, "synthesis.permutation_grid", s.permutation_grid, ">= 2")
    _check(len(s.rotation_angles) > 0, "synthesis.rotation_angles", s.rotation_angles,
           "a non-empty list of angles in degrees")
    for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
        value = getattr(s, name)
        _check(0.0 <= value <= 1.0, f"synthesis.{name}", value, "a value in [0, 1]")
    _check(0.0 <= s.jitter_hue <= 0.5, "synthesis.jitter_hue", s.jitter_hue, "in [0, 0.5]")
    for name, lo, hi in (("patch_area", 0.0, 1.0), ("scar_width", 0.0, 1.0),
                         ("scar_length", 0.0, 1.0), ("patch_aspect", 0.0, math.inf),
                         ("scar_angle", -360.0, 360.0)):
        a, b = getattr(s, name)
        _check(lo <= a <= b <= hi and (name == "scar_angle" or a > 0), f"synthesis.{name}",
               (a, b), f"a range (low, high) with {lo} < low <= high <= {hi}")
    _check(0.0 <= s.blob_p <= 1.0, "synthesis.blob_p", s.blob_p, "a probability in [0, 1]")
    _check(s.patch_area_scale in ("uniform", "log"), "synthesis.patch_area_scale",
           s.patch_area_scale, "'uniform' or 'log'")
    _check(0.0 <= s.edit_p <= 1.0, "synthesis.edit_p", s.edit_p, "a probability in [0, 1]")
    a, b = s.edit_radius
    _check(0.0 < a <= b <= 0.5, "synthesis.edit_radius", (a, b),
           "a range (low, high) with 0 < low <= high <= 0.5 (fractions of the image side)")
    _validate_regions(s)
    _check(0.0 <= s.crack_p <= 1.0, "synthesis.crack_p", s.crack_p, "a probability in [0, 1]")
    for name in ("crack_width", "crack_length", "crack_contrast"):
        a, b = getattr(s, name)
        _check(0.0 < a <= b <= 1.0, f"synthesis.{name}", (a, b),
               "a range (low, high) with 0 < low <= high <= 1")
    _check(0.0 <= s.label_local_z <= 10.0, "synthesis.label_local_z", s.label_local_z,
           "a value in [0, 10] (local standard deviations; 0 = off)")
    lo, hi = s.anomalies_per_image
    _check(1 <= lo <= hi <= 64, "synthesis.anomalies_per_image", (lo, hi),
           "a range (low, high) of integers with 1 <= low <= high <= 64")


def _validate_regions(s: SynthesisConfig) -> None:
    """The noise-region keys of :class:`SynthesisConfig` (``region_*``)."""
    _check(0.0 <= s.region_p <= 1.0, "synthesis.region_p", s.region_p, "a probability in [0, 1]")
    a, b = s.region_area
    _check(0.0 < a <= b <= 0.9, "synthesis.region_area", (a, b),
           "a range (low, high) with 0 < low <= high <= 0.9 (fractions of the image)")
    a, b = s.region_scale
    _check(0 <= a <= b <= 7, "synthesis.region_scale", (a, b),
           "a range (low, high) of integers with 0 <= low <= high <= 7 (log2 of the grid)")
    a, b = s.region_opacity
    _check(0.0 < a <= b <= 1.0, "synthesis.region_opacity", (a, b),
           "a range (low, high) with 0 < low <= high <= 1")
    _check(0.0 <= s.region_min_change < 1.0, "synthesis.region_min_change",
           s.region_min_change, "a value in [0, 1)")
    known = REGION_SOURCES
    _check(len(s.region_sources) > 0 and all(x in known for x in s.region_sources),
           "synthesis.region_sources", s.region_sources,
           f"a non-empty list of {', '.join(known)}")


def _validate_model(m: ModelConfig) -> None:
    """The ``model`` section's checks."""
    _check(0.0 < m.width <= 4.0, "model.width", m.width, "a multiplier in (0, 4]")
    _check(0 <= m.map_skips <= 4, "model.map_skips", m.map_skips, "an integer from 0 to 4")
    _check(0 <= m.rec_skips <= 2, "model.rec_skips", m.rec_skips, "an integer from 0 to 2")
    _check(m.rec_skips == 0 or m.reconstruction, "model.rec_skips", m.rec_skips,
           "0 with model.reconstruction=false")
    _check(m.upsample in UPSAMPLE_MODES, "model.upsample", m.upsample,
           f"one of {', '.join(UPSAMPLE_MODES)}")
    _check(0.0 <= m.residual_weight <= 100.0, "model.residual_weight", m.residual_weight,
           "a weight in [0, 100] (0 = off)")
    _check(0.0 <= m.lowpass_weight <= 100.0, "model.lowpass_weight", m.lowpass_weight,
           "a weight in [0, 100] (0 = off)")
    _check(m.lowpass_weight == 0.0 or m.feature_stats, "model.lowpass_weight",
           m.lowpass_weight, "0 unless model.feature_stats is on (the signal is fitted and "
           "scaled with the feature statistics)")
    _check(not m.lowpass_roughness or m.lowpass_weight > 0.0, "model.lowpass_roughness",
           m.lowpass_roughness, "false unless model.lowpass_weight > 0 (it is a channel of the "
           "low-pass signal)")
    _check(m.residual_weight == 0.0 or (m.feature_stats and m.reconstruction),
           "model.residual_weight", m.residual_weight,
           "0 unless model.feature_stats and model.reconstruction are on (the residual is "
           "z-scored with the feature statistics' held-out images)")
    _check(not m.compare_head or m.reconstruction, "model.compare_head", m.compare_head,
           "false with model.reconstruction=false (the head compares the input with its "
           "reconstruction)")


def _validate_train(t: TrainConfig, m: ModelConfig) -> None:
    """The ``train`` section's checks (and its combination with ``model``)."""
    _check(t.steps >= 1, "train.steps", t.steps, ">= 1")
    _check(t.grad_clip >= 0.0 and math.isfinite(t.grad_clip), "train.grad_clip",
           t.grad_clip, "a gradient norm >= 0 (0 = off)")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay,
           "a decay in [0, 1) (0 = no averaging)")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    for name in ("lr_generator", "lr_discriminator"):
        value = getattr(t, name)
        _check(0.0 < value < 1.0, f"train.{name}", value, "a learning rate in (0, 1)")
    for name in ("beta1", "beta2"):
        value = getattr(t, name)
        _check(0.0 <= value < 1.0, f"train.{name}", value, "in [0, 1)")
    for name in ("weight_seg", "weight_rec", "weight_adv", "weight_decay"):
        value = getattr(t, name)
        _check(value >= 0.0 and math.isfinite(value), f"train.{name}", value,
               "a finite value >= 0")
    _check(t.schedule in ("constant", "cosine"), "train.schedule", t.schedule,
           "'constant' or 'cosine'")
    _check(t.seg_loss in ("l1", "balanced_l1", "focal"), "train.seg_loss", t.seg_loss,
           "'l1', 'balanced_l1' or 'focal'")
    _check(t.rec_target in REC_TARGETS, "train.rec_target", t.rec_target,
           f"one of {', '.join(REC_TARGETS)}")
    _check(m.rec_skips == 0 or t.rec_target == "clean", "model.rec_skips", m.rec_skips,
           "0 unless train.rec_target is 'clean' (with the masked target the skips let the "
           "reconstruction copy the anomaly)")
    _check(0.0 <= t.seg_focal_gamma <= 10.0, "train.seg_focal_gamma", t.seg_focal_gamma,
           "a value in [0, 10]")
    _check(0.0 < t.seg_anomaly_weight <= 1000.0, "train.seg_anomaly_weight",
           t.seg_anomaly_weight, "a weight in (0, 1000]")
    _check(0 <= t.warmup_steps < max(t.steps, 1) or t.warmup_steps == 0,
           "train.warmup_steps", t.warmup_steps, "in [0, train.steps)")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
    _check(t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", t.precision,
           "'auto', 'fp32', 'bf16' or 'fp16'")
    _check(t.adam in ADAM_IMPLEMENTATIONS, "train.adam", t.adam,
           "one of " + ", ".join(f"'{a}'" for a in ADAM_IMPLEMENTATIONS))
    _check(t.device == "auto" or t.device in ("cpu", "cuda", "mps")
           or t.device.startswith("cuda:"), "train.device", t.device,
           "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _check(t.logger in TRAIN_LOGGERS, "train.logger", t.logger,
           f"one of {', '.join(TRAIN_LOGGERS)}")
    _check(t.logger_image_every >= 1, "train.logger_image_every", t.logger_image_every,
           ">= 1")
    _check(1 <= t.logger_images <= 16, "train.logger_images", t.logger_images,
           "an integer from 1 to 16")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, ">= 1")
    _check(t.time_budget is None or t.time_budget > 0, "train.time_budget", t.time_budget,
           "a number of seconds > 0, or null")
    if t.adversarial and not m.reconstruction:
        raise ConfigError(
            "train.adversarial=true needs model.reconstruction=true: the discriminator "
            "judges (reconstruction, map) pairs. Switch both on or both off.")


TRAIN_LOGGERS = ("none", "tensorboard")
"""Values of ``train.logger``."""

ENSEMBLE_COMBINES = ("auto", "mean", "calibrated")
"""Values of ``eval.ensemble_combine``."""

IMAGE_SCORE_CHOICES = ("max", "blur3_max", "blur5_max", "top10_mean", "top1pct_mean",
                       "signals_max", "signals_mean", "detector")
"""Values of ``eval.image_score``: the names of :data:`anoseg.metrics.IMAGE_SCORES`,
``signals_max`` and ``signals_mean`` (:data:`anoseg.metrics.SIGNAL_IMAGE_SCORES`; need
``model.feature_stats``) and ``detector``."""


def _validate_eval(e: EvalConfig) -> None:
    """The ``eval`` section's checks."""
    _check(e.image_score in IMAGE_SCORE_CHOICES, "eval.image_score", e.image_score,
           f"one of {', '.join(IMAGE_SCORE_CHOICES)}")
    _check(0.0 < e.image_threshold_quantile <= 1.0, "eval.image_threshold_quantile",
           e.image_threshold_quantile, "in (0, 1]")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _check(e.num_thresholds >= 2, "eval.num_thresholds", e.num_thresholds, ">= 2")
    _check(0.0 < e.fpr_limit <= 1.0, "eval.fpr_limit", e.fpr_limit, "in (0, 1]")
    _check(0.0 < e.threshold_quantile <= 1.0, "eval.threshold_quantile",
           e.threshold_quantile, "in (0, 1]")
    _check(e.resolution in RESOLUTIONS, "eval.resolution", e.resolution,
           " or ".join(f"'{m}'" for m in RESOLUTIONS))
    _check(e.ensemble_combine in ENSEMBLE_COMBINES, "eval.ensemble_combine",
           e.ensemble_combine, " or ".join(f"'{m}'" for m in ENSEMBLE_COMBINES))
    _check(e.ensemble_weight is None or (isinstance(e.ensemble_weight, (int, float))
                                         and not isinstance(e.ensemble_weight, bool)
                                         and 0.0 < e.ensemble_weight < math.inf),
           "eval.ensemble_weight", e.ensemble_weight, "null or a number > 0")


def _validate_detector(det: DetectorConfig) -> None:
    """The ``detector`` section's checks."""
    _check(det.steps >= 1, "detector.steps", det.steps, ">= 1")
    _check(det.batch_size >= 1, "detector.batch_size", det.batch_size, ">= 1")
    for name in ("lr_generator", "lr_discriminator"):
        value = getattr(det, name)
        _check(0.0 < value < 1.0, f"detector.{name}", value, "a learning rate in (0, 1)")
    for name in ("weight_adv", "weight_rec", "weight_fea", "weight_cls", "score_alpha",
                 "score_beta"):
        value = getattr(det, name)
        _check(value >= 0.0 and math.isfinite(value), f"detector.{name}", value,
               "a finite value >= 0")
    _check(det.cls_map in ("mask", "anoseg"), "detector.cls_map", det.cls_map,
           "'mask' or 'anoseg'")
    _check(det.checkpoint_every >= 1, "detector.checkpoint_every", det.checkpoint_every,
           ">= 1")
    _check(det.time_budget is None or det.time_budget > 0, "detector.time_budget",
           det.time_budget, "a number of seconds > 0, or null")


_SECTION_TYPES = {
    "data": DataConfig, "synthesis": SynthesisConfig, "model": ModelConfig,
    "train": TrainConfig, "eval": EvalConfig, "detector": DetectorConfig,
}


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected {expected}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the field's declared type, or raise ConfigError naming the key."""
    if tp == ImageSize:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ConfigError(f"config key '{key}' has value {value!r}; expected one side "
                                  "(an integer) or [height, width]")
            return tuple(_coerce(key, v, int) for v in value)
        return _coerce(key, value, int)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' has value {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected a string")
        return value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected a list of "
                              f"{len(args)} numbers [low, high]")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected a list")
        return [_coerce(key, v, args[0]) for v in value]
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _field_types(section_cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Known keys: {', '.join(known)}")


def config_from_dict(raw: Dict[str, Any], base: Optional[AnoSegConfig] = None) -> AnoSegConfig:
    """Apply a nested ``{section: {key: value}}`` dict on top of ``base`` (or the defaults)."""
    cfg = base if base is not None else AnoSegConfig()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            raise _unknown_key(str(section), list(_SECTION_TYPES))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys, "
                              f"got {values!r}")
        _apply(section, getattr(cfg, section), values)
    return cfg


def _apply(prefix: str, target: Any, values: Dict[str, Any]) -> None:
    """Set ``values`` (``{key: value}``) on the dataclass ``target`` whose keys are named
    ``prefix.key``; a nested dataclass (``data.tiling``) takes a mapping of its own keys, which
    are merged into it."""
    types = _field_types(type(target))
    for key, value in values.items():
        if key not in types:
            raise _unknown_key(f"{prefix}.{key}", [f"{prefix}.{k}" for k in types])
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}.{key}' has value {value!r}; expected a "
                                  f"mapping of its keys ({', '.join(_field_types(type(current)))})")
            _apply(f"{prefix}.{key}", current, value)
        else:
            setattr(target, key, _coerce(f"{prefix}.{key}", value, types[key]))


def parse_override(text: str) -> Tuple[str, str, Any]:
    """Parse ``section.key=value`` (value in YAML syntax) from ``--set``; a key of a nested
    section (``data.tiling.scale=0.5``) comes back as ``("data", "tiling", {"scale": 0.5})``."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, value_text = text.split("=", 1)
    key = key.strip()
    if key.count(".") not in (1, 2) or "" in key.split("."):
        raise ConfigError(f"--set expects section.key=value (e.g. train.steps=100), got {key!r}")
    section, name, *sub = key.split(".")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {value_text!r}: {exc}") from None
    return section, name, ({sub[0]: value} if sub else value)


ConfigPaths = Union[None, str, Path, Sequence[Union[str, Path]]]


def read_config_file(path: Union[str, Path]) -> Any:
    """The parsed YAML file ``path`` (``{}`` for an empty file; :func:`config_from_dict`
    rejects anything that is not a mapping of sections).

    Raises:
        ConfigError: the file is missing or is not valid YAML (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def load_config(path: ConfigPaths = None, overrides: Sequence[str] = (),
                base: Union[AnoSegConfig, Dict[str, Any], None] = None,
                values: Optional[Dict[str, Dict[str, Any]]] = None, *,
                validate: bool = True) -> AnoSegConfig:
    """Layer a config: ``base`` (or the defaults), then the YAML file(s) ``path`` in order
    (later ones win), then ``--set`` overrides, then ``values``; validated.

    Args:
        path: one YAML file, a sequence of them, or ``None``.
        overrides: ``section.key=value`` strings (values in YAML syntax).
        base: the starting point: an :class:`AnoSegConfig` (copied, not changed) or a nested
            dict applied on top of the defaults.
        values: a nested dict of already-typed values such as paths from command-line flags:
            unlike ``--set`` text they are not parsed as YAML, so ``#`` or ``:`` in a path and
            a category named ``on`` stay as they are.
        validate: check the result (:meth:`AnoSegConfig.validate`).

    Raises:
        ConfigError: a missing or bad file, an unknown key or a bad value; errors from a file
            name the file.
    """
    if isinstance(base, AnoSegConfig):
        cfg = config_from_dict(base.to_dict())
    else:
        cfg = config_from_dict(base or {})
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) \
        else list(path)
    for file in map(Path, paths):
        raw = read_config_file(file)
        try:
            cfg = config_from_dict(raw, cfg)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
    for text in overrides:
        section, name, value = parse_override(text)
        cfg = config_from_dict({section: {name: value}}, cfg)
    if values:
        cfg = config_from_dict(values, cfg)
    return cfg.validate() if validate else cfg


def save_config(cfg: AnoSegConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Settings used when ``anoseg-train`` runs on the built-in demo dataset without a config file:
# small enough that a laptop CPU finishes the whole job in a few minutes (about 4 minutes of
# training on one core of an AMD EPYC without bf16 in fp32, 70 s on one core with AVX512-BF16).
# They are the real-data recipe (configs/cpu_unseen.yaml) at 64x64: skips into the map decoder,
# the normal-statistics input channels, synthetic anomalies from tiny spots to large noise
# regions, the focal L_Seg with pasted pixels weighted 10x. On demo_texture after 300 steps
# (bf16): pixel AUROC 0.972, best IoU 0.398; without the normal statistics 0.983 / 0.294 (the
# balanced-L1 defaults of the third round: 0.640 / 0.019, a flat map; docs/experiments.md,
# fifth round, runs d6 and d7). Not model.feature_stats: on the demo it lowered the best IoU
# from 0.398 to 0.093 (sixth round, run d8).
DEMO_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "data": {"image_size": 64, "num_workers": 1},
    "synthesis": {"patch_area": [0.0005, 0.05], "patch_area_scale": "log", "blob_p": 0.5,
                  "jitter_p": 1.0, "anomalies_per_image": [1, 3], "region_p": 0.5},
    "model": {"width": 0.25, "map_skips": 3, "normal_stats": True},
    "train": {"steps": 300, "batch_size": 16, "checkpoint_every": 100, "lr_generator": 1e-3,
              "lr_discriminator": 5e-4, "seg_loss": "focal", "seg_anomaly_weight": 10.0,
              "schedule": "constant", "ema_decay": 0.99},
}


def runtime_keys() -> Tuple[str, ...]:
    """``section.key`` of every run-time key (fields declared with :data:`RUNTIME` metadata)."""
    return tuple(f"{section.name}.{item.name}"
                 for section in dataclasses.fields(AnoSegConfig)
                 for item in dataclasses.fields(section.default_factory)
                 if item.metadata.get("runtime"))


def config_diff(a: Dict[str, Dict[str, Any]], b: Dict[str, Dict[str, Any]], *,
                skip: Sequence[str] = ()) -> List[str]:
    """``section.key`` names whose value differs between the config dicts ``a`` and ``b``
    (a key missing on one side differs), in ``a``'s order then ``b``'s; ``skip`` names are
    left out (e.g. :func:`runtime_keys`)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    skipped = set(skip)
    keys = list(flat_a) + [k for k in flat_b if k not in flat_a]
    return [k for k in keys if k not in skipped and flat_a.get(k) != flat_b.get(k)]


def _flatten(config: Dict[str, Any]) -> Dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            for key, value in (values or {}).items()}


def with_runtime_keys(saved: AnoSegConfig, cfg: AnoSegConfig) -> AnoSegConfig:
    """``saved`` with the run-time keys of :func:`runtime_keys` taken from ``cfg`` (in place)."""
    for name in runtime_keys():
        section, key = name.split(".")
        setattr(getattr(saved, section), key, getattr(getattr(cfg, section), key))
    return saved

"""AnoSeg generator (paper 3.3, appendix B Table 6): coordinate channels, a ResNet-18 trunk and
twin decoders, one for the normality map and one for the reconstruction.

Inputs are images in ``[0, 1]``; both outputs end in a sigmoid. The map decoder predicts a
*normality* map (1 = normal), which is what the paper's losses are written for; the anomaly
map handed to users is ``1 - normality`` (see :func:`anoseg.inference.predict_anomaly_maps`).
The map head's pre-sigmoid output is returned too (``GeneratorOutput.map_logit``): the sigmoid
saturates in float32 (every logit above ~17 gives exactly 1), the logit keeps the order.

Example:
    >>> g = AnoSegGenerator(image_size=64, width=0.25)
    >>> out = g(torch.rand(2, 3, 64, 64))
    >>> out.normality_map.shape, out.reconstruction.shape
    (torch.Size([2, 1, 64, 64]), torch.Size([2, 3, 64, 64]))
"""

from __future__ import annotations

import math
from typing import Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from anoseg.models.lowpass import (LowPassStats, gaussian_kernel, median_and_spread,
                                   separable_blur)

ENCODER_STRIDE = 32
STATS_CLIP = 4.0
"""Normal-statistics channels (``normal_stats``) carry ``z / STATS_CLIP`` with the per-pixel
z-score clipped to ``[-STATS_CLIP, STATS_CLIP]``, so they lie in ``[-1, 1]`` like the image."""
STATS_MIN_STD = 1e-2
"""Floor of the per-pixel standard deviation (as the per-pixel Gaussian baseline's)."""
FEATURE_STATS_MAX_CHANNELS = 32
"""``feature_stats`` models at most this many feature channels (a fixed, seeded subset when
the encoder's stride-2 and stride-4 maps have more: PaDiM's random dimension reduction)."""
FEATURE_STATS_RIDGE = 1e-2
"""Added to the diagonal of every location's feature covariance before it is inverted."""
FEATURE_STATS_SIGMA = 1.0
"""Standard deviation, in image pixels, of the Gaussian blur of the feature distance map."""
FEATURE_STATS_OFFSET = 4.0
"""Subtracted from the summed z-scores of the two signals, so a typical normal pixel's
combined anomaly logit is about -4 (anomaly probability ~0.02) and maps look quiet."""
COMBINED_LOGIT_KNEE = 4.0
"""Above this value the combined anomaly logit of ``feature_stats`` grows logarithmically
(:func:`soft_knee`): the order is kept, and the sigmoid map with it (float32's sigmoid is
exactly 1 from a logit of about 17, and a map of ties has no best threshold)."""
COMPARE_CHANNELS = 16
"""Width of the comparison head (``compare_head``), whatever ``width`` is."""


IMAGE_SCALE_STD_FLOOR = 0.1
"""The std of a signal's held-out image maxima (``fstats_image_scale``) is at least this
fraction of the signal's pixel std on the same images."""


def soft_knee(logit: torch.Tensor, knee: float = COMBINED_LOGIT_KNEE) -> torch.Tensor:
    """``logit`` up to ``knee``, ``knee + log(1 + logit - knee)`` above it: continuous, strictly
    increasing, and far from the sigmoid's saturation (a logit of 1000 becomes 10.9)."""
    excess = (logit - knee).clamp_min(0.0)
    return torch.where(logit > knee, knee + torch.log(1.0 + excess), logit)


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 8)."""
    return max(8, int(round(channels * width)))


def coordinate_channels(batch: int, height: int, width: int, *, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """``(batch, 2, height, width)``: x then y coordinates, each spanning ``[-1, 1]`` (CoordConv)."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0).expand(batch, -1, -1, -1)


def spanned_coordinate_channels(spans: torch.Tensor, height: int, width: int, *,
                                dtype=torch.float32) -> torch.Tensor:
    """``(B, 2, height, width)`` coordinate channels of crops of a larger image: row ``b`` of
    ``spans`` (``(B, 4)``: ``y0, x0, y1, x1``) gives the coordinates of the crop's first and
    last pixel centres, linear in between (a tile of an image spanning ``[-1, 1]``)."""
    spans = spans.to(dtype)
    steps_y = torch.linspace(0.0, 1.0, height, device=spans.device, dtype=dtype)
    steps_x = torch.linspace(0.0, 1.0, width, device=spans.device, dtype=dtype)
    ys = spans[:, 0:1] + (spans[:, 2:3] - spans[:, 0:1]) * steps_y  # (B, H)
    xs = spans[:, 1:2] + (spans[:, 3:4] - spans[:, 1:2]) * steps_x  # (B, W)
    grid_x = xs[:, None, :].expand(-1, height, -1)
    grid_y = ys[:, :, None].expand(-1, -1, width)
    return torch.stack([grid_x, grid_y], dim=1)


def side_pair(image_size: Union[int, Tuple[int, int], List[int]]) -> Tuple[int, int]:
    """``(height, width)`` of an image size given as one side or a pair."""
    if isinstance(image_size, (tuple, list)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


class ResNet18Encoder(nn.Module):
    """The convolutional trunk of ResNet-18 (no pooling head), stride 32.

    At ``width=1`` the parameter names equal torchvision's ``resnet18`` so its weights load
    with :meth:`load_torchvision_weights`.
    """

    def __init__(self, *, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.out_channels = widths[-1]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers: List[nn.Module] = []
        previous = widths[0]
        for i, channels in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or previous != channels:
                downsample = nn.Sequential(
                    nn.Conv2d(previous, channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(channels))
            layers.append(nn.Sequential(BasicBlock(previous, channels, stride, downsample),
                                        BasicBlock(channels, channels)))
            previous = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[-1]

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16 and 32 (stem, layer1 .. layer4)."""
        stem = self.relu(self.bn1(self.conv1(x)))
        f4 = self.layer1(self.maxpool(stem))
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return [stem, f4, f8, f16, self.layer4(f16)]

    def fine_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The first two maps of :meth:`features` (strides 2 and 4), without the rest."""
        stem = self.relu(self.bn1(self.conv1(x)))
        return [stem, self.layer1(self.maxpool(stem))]

    @property
    def feature_channels(self) -> List[int]:
        """Channels of :meth:`features`, finest first."""
        return [self.conv1.out_channels, self.layer1[-1].conv2.out_channels,
                self.layer2[-1].conv2.out_channels, self.layer3[-1].conv2.out_channels,
                self.out_channels]

    def load_torchvision_weights(self, state_dict: dict) -> None:
        """Load torchvision ResNet-18 weights; extra input channels of ``conv1`` start at zero."""
        own = self.state_dict()
        for name, tensor in state_dict.items():
            if name not in own:
                continue  # the classifier head (fc.*)
            if name == "conv1.weight" and tensor.shape[1] != own[name].shape[1]:
                padded = torch.zeros_like(own[name])
                padded[:, :tensor.shape[1]] = tensor
                tensor = padded
            if tensor.shape != own[name].shape:
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, the encoder "
                                 f"expects {tuple(own[name].shape)} (use model.width=1.0)")
            own[name] = tensor
        self.load_state_dict(own)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up_bn_relu(channels: int, mode: str = "transpose") -> nn.Sequential:
    """Double the resolution: a 4x4 transposed convolution of stride 2 (the paper), or
    bilinear upsampling then a 3x3 convolution (no checkerboard of uneven kernel overlap)."""
    if mode == "transpose":
        up = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)
    elif mode == "bilinear":
        up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                           nn.Conv2d(channels, channels, 3, padding=1, bias=False))
    else:
        raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {mode!r}")
    return nn.Sequential(up, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """Table 6 decoder: Conv, then five (ConvTr x2, Conv) blocks, then a Conv + sigmoid.

    Channel plan at ``width=1``: 512 -> 512, then blocks ending in 256, 128, 128, 128, 128.

    ``skip_channels`` (not in the paper) lists, for the blocks that end at strides 16, 8, 4
    and 2, the channels of an encoder feature map concatenated to the upsampled features
    before that block's Conv (a U-Net skip connection); 0 = none. The paper's decoder has none,
    so its map is decoded from the stride-32 features alone.

    ``upsample``: ``transpose`` (the paper) or ``bilinear`` (:func:`_up_bn_relu`).
    """

    def __init__(self, *, in_channels: int, out_channels: int, width: float = 1.0,
                 skip_channels: Optional[List[int]] = None, upsample: str = "transpose") -> None:
        super().__init__()
        plan = [scaled(c, width) for c in (512, 256, 128, 128, 128, 128)]
        skips = list(skip_channels or []) + [0] * 5
        self.skip_channels = skips[:5]
        self.stem = _conv_bn_relu(in_channels, plan[0])
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        for cin, cout, extra in zip(plan[:-1], plan[1:], self.skip_channels):
            self.ups.append(_up_bn_relu(cin, upsample))
            self.convs.append(_conv_bn_relu(cin + extra, cout))
        self.head = nn.Sequential(nn.Conv2d(plan[-1], out_channels, 3, padding=1),
                                  nn.Sigmoid())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the skip connections (anoseg 0.1) kept the decoder as one
        # Sequential "layers": 0 = stem, then (up, conv) pairs, then the head's Conv.
        old = prefix + "layers."
        for key in [k for k in state_dict if k.startswith(old)]:
            index, _, rest = key[len(old):].partition(".")
            i = int(index)
            n = len(self.ups)
            if i == 0:
                new = f"stem.{rest}"
            elif i <= 2 * n:
                new = f"{'ups' if i % 2 else 'convs'}.{(i - 1) // 2}.{rest}"
            else:
                new = f"head.{i - 2 * n - 1}.{rest}"
            state_dict[prefix + new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _trunk(self, features: torch.Tensor,
               skips: Optional[List[torch.Tensor]]) -> torch.Tensor:
        x = self.stem(features)
        pending = list(skips or [])
        for up, conv, extra in zip(self.ups, self.convs, self.skip_channels):
            x = up(x)
            if extra:
                x = torch.cat([x, pending.pop(0)], dim=1)
            x = conv(x)
        return x

    def forward(self, features: torch.Tensor,
                skips: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """``skips``: encoder maps for the blocks with ``skip_channels > 0``, coarsest first."""
        return self.head(self._trunk(features, skips))

    def forward_with_logit(self, features: torch.Tensor,
                           skips: Optional[List[torch.Tensor]] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sigmoid output, pre-sigmoid logit)``: the same operations as :meth:`forward`
        (the head's Conv, then its Sigmoid), so the output is bit-identical to it."""
        logit = self.head[0](self._trunk(features, skips))
        return self.head[1](logit), logit


def _sync_fstats_ready(module: nn.Module, incompatible_keys) -> None:
    """After ``load_state_dict``: ``fstats_ready`` follows the loaded ``fstats_fitted``."""
    module.fstats_ready = bool(module.fstats_fitted)
    module.fstats_image_ready = bool(module.fstats_ready
                                     and module.fstats_image_scale[0, 1] > 0)


class ComparisonHead(nn.Module):
    """A small full-resolution network that compares the input with its reconstruction
    (DRAEM's discriminative idea, not in the paper): three 3x3 convolutions dilated 1, 2 and 4
    (a 15-pixel receptive field) on the centred image, the centred reconstruction and their
    absolute difference, then a 1x1 convolution to one channel. Its output is added to the
    map head's normality logit; the last convolution starts at zero, so at initialisation the
    map is the map head's alone. The reconstruction is detached: the head learns to read it,
    it does not bend it."""

    def __init__(self, channels: int = COMPARE_CHANNELS) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        cin = 9
        for dilation in (1, 2, 4):
            layers += [nn.Conv2d(cin, channels, 3, padding=dilation, dilation=dilation,
                                 bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            cin = channels
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` a normality logit (high = normal) from ``images`` and
        ``reconstruction`` (both ``(B, 3, H, W)`` in ``[0, 1]``)."""
        recon = reconstruction.detach().to(images.dtype)
        x = torch.cat([images * 2.0 - 1.0, recon * 2.0 - 1.0, (images - recon).abs()], dim=1)
        return self.out(self.body(x))


class GeneratorOutput(NamedTuple):
    normality_map: Optional[torch.Tensor]
    """``(B, 1, H, W)`` in ``[0, 1]``, 1 = normal; ``None`` without a map decoder."""
    reconstruction: Optional[torch.Tensor]
    """``(B, 3, H, W)`` in ``[0, 1]``; ``None`` without a reconstruction decoder."""
    map_logit: Optional[torch.Tensor] = None
    """``(B, 1, H, W)`` the map head's pre-sigmoid output (``normality_map =
    sigmoid(map_logit)``; high = normal); ``None`` without a map decoder. Inference only: no
    loss uses it."""
    signal_maps: Optional[torch.Tensor] = None
    """``(B, S, H, W)`` the signal maps (:meth:`AnoSegGenerator.signal_maps`, one z-scored map
    per signal; high = anomalous) from the same pass, in eval mode once they are fitted;
    otherwise ``None``."""


class AnoSegGenerator(nn.Module):
    """Encoder with twin decoders.

    Args:
        image_size: input side, or ``(height, width)``; each a multiple of 32 from 64 to 512.
        width: channel multiplier (1.0 = the paper's network).
        coord_channels: concatenate x/y coordinate channels to the input (paper 3.3).
        map_decoder: build the normality-map decoder (off for the downstream detector).
        reconstruction: build the reconstruction decoder (off for the ablation base model).
        map_skips: number of U-Net skip connections from the encoder into the map decoder,
            0-4 (0 = the paper; 1 = stride 16; 2 = strides 16 and 8; ... 4 = down to stride 2).
            The reconstruction decoder has none unless ``rec_skips`` says so.
        rec_skips: skip connections into the reconstruction decoder, 0-2 (0 = the paper;
            1 = stride 16; 2 = strides 16 and 8). With the masked target of L_Re they would
            let the decoder copy its input; with ``train.rec_target: clean`` the pasted
            regions must be inpainted from their surroundings, so the skips sharpen the
            reconstruction of normal detail without copying the anomaly.
        upsample: ``transpose`` (the paper's transposed convolutions) or ``bilinear``
            (bilinear upsampling then a 3x3 convolution, in both decoders).
        normal_stats: three more input channels (not in the paper): the input's per-pixel,
            per-channel z-score against the mean and standard deviation of the normal training
            images (buffers ``stats_mean``/``stats_std``, set by :meth:`set_normal_stats`
            before training and saved with the weights). Where normal images are aligned the
            z-score is a strong cue (the per-pixel Gaussian baseline); where they are not, the
            network learns from the synthetic anomalies to discount it.
        feature_stats: fit the encoder features' per-location Gaussian for inference
            (:meth:`fit_feature_stats`).
        compare_head: a :class:`ComparisonHead` on the input and its reconstruction whose
            logit is added to the map head's (needs both decoders); the forward pass then
            always runs the reconstruction decoder.
        residual_weight: with ``feature_stats``, the weight of a third signal in the combined
            logit: the reconstruction residual ``|x - x_hat|`` (mean over the channels),
            z-scored on the held-out images (0 = off; needs the reconstruction decoder).
        lowpass_weight: with ``feature_stats``, add the low-pass signal
            (:mod:`anoseg.models.lowpass`: large faint brightness or colour changes) to the
            combined anomaly logit after its knee, this many times the combined logit's
            held-out spread per unit of the signal's own held-out scale, and bend the sum by
            the knee again (0 = off).
        lowpass_roughness: the low-pass signal's fifth channel, the local roughness
            (:func:`anoseg.models.lowpass.lowpass_features`; needs ``lowpass_weight``).
    """

    def __init__(self, *, image_size: Union[int, Tuple[int, int]], width: float = 1.0,
                 coord_channels: bool = True, map_decoder: bool = True,
                 reconstruction: bool = True, map_skips: int = 0,
                 normal_stats: bool = False, upsample: str = "transpose",
                 feature_stats: bool = False, compare_head: bool = False,
                 residual_weight: float = 0.0, rec_skips: int = 0,
                 lowpass_weight: float = 0.0, lowpass_roughness: bool = False) -> None:
        super().__init__()
        assert not lowpass_roughness or lowpass_weight > 0.0, (
            "lowpass_roughness needs lowpass_weight")
        assert lowpass_weight == 0.0 or (feature_stats and map_decoder), (
            "lowpass_weight needs feature_stats and the map decoder")
        assert residual_weight == 0.0 or (feature_stats and map_decoder and reconstruction), (
            "residual_weight needs feature_stats and both decoders")
        assert not compare_head or (map_decoder and reconstruction), (
            "compare_head needs both the map and the reconstruction decoder")
        assert all(s % ENCODER_STRIDE == 0 and 64 <= s <= 512 for s in side_pair(image_size)), (
            f"image_size must be a multiple of 32 from 64 to 512, got {image_size}")
        assert map_decoder or reconstruction, "the generator needs at least one decoder"
        self.image_size = image_size
        assert 0 <= map_skips <= 4, f"map_skips must be 0..4, got {map_skips}"
        assert 0 <= rec_skips <= 2, f"rec_skips must be 0..2, got {rec_skips}"
        self.coord_channels = coord_channels
        self.map_skips = map_skips if map_decoder else 0
        self.normal_stats = normal_stats
        if normal_stats:
            shape = (1, 3, *side_pair(image_size))
            self.register_buffer("stats_mean", torch.full(shape, 0.5))
            self.register_buffer("stats_std", torch.ones(shape))
        in_channels = 3 + (2 if coord_channels else 0) + (3 if normal_stats else 0)
        self.encoder = ResNet18Encoder(in_channels=in_channels, width=width)
        enc = self.encoder.out_channels
        # encoder feature channels at strides 16, 8, 4, 2 (the decoder's block order)
        skip_channels = self.encoder.feature_channels[-2::-1][:self.map_skips]
        self.map_decoder = Decoder(in_channels=enc, out_channels=1, width=width,
                                   skip_channels=skip_channels,
                                   upsample=upsample) if map_decoder else None
        self.rec_skips = rec_skips if reconstruction else 0
        self.reconstruction_decoder = Decoder(
            in_channels=enc, out_channels=3, width=width, upsample=upsample,
            skip_channels=self.encoder.feature_channels[-2::-1][:self.rec_skips],
        ) if reconstruction else None
        self.compare = ComparisonHead() if compare_head else None
        self.feature_stats = feature_stats and map_decoder
        self.residual_weight = float(residual_weight)
        self.lowpass_weight = float(lowpass_weight)
        self.lowpass = (LowPassStats(side_pair(image_size), roughness=lowpass_roughness)
                        if self.lowpass_weight > 0 else None)
        if self.feature_stats:
            self._init_feature_stats(image_size)

    def _init_feature_stats(self, image_size: Union[int, Tuple[int, int]]) -> None:
        """The buffers of ``feature_stats`` (unfitted), and its residual's when weighted."""
        height, width_px = side_pair(image_size)
        fine = self.encoder.feature_channels[:2]  # stem (stride 2), layer1 (stride 4)
        total = sum(fine)
        keep = min(total, FEATURE_STATS_MAX_CHANNELS)
        picked = (torch.arange(total) if keep == total else
                  torch.randperm(total, generator=torch.Generator().manual_seed(0))[:keep]
                  .sort().values)
        locations = (height // 2) * (width_px // 2)
        self.register_buffer("fstats_channels", picked)
        self.register_buffer("fstats_mean", torch.zeros(locations, keep))
        self.register_buffer("fstats_icov", torch.eye(keep).repeat(locations, 1, 1))
        # (logit mean, logit std, distance mean, distance std) on held-out normal images
        self.register_buffer("fstats_scale", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("fstats_fitted", torch.zeros(()))
        # (mean, std) of the held-out images' per-image maxima of the head's anomaly logit,
        # the feature distance and the residual (zeros: not fitted, e.g. an older checkpoint)
        self.register_buffer("fstats_image_scale", torch.zeros(3, 2))
        if self.residual_weight:
            # (residual mean, residual std) on the held-out normal images
            self.register_buffer("fstats_res_scale", torch.tensor([0.0, 1.0]))
        # a Python copy of fstats_fitted, so forward does not branch on a tensor (export)
        self.fstats_ready = False
        self.fstats_image_ready = False  # and of fstats_image_scale being fitted
        self.register_load_state_dict_post_hook(_sync_fstats_ready)
        self.register_buffer("fstats_kernel", gaussian_kernel(FEATURE_STATS_SIGMA),
                             persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the signal image map have no fstats_image_scale
        key = prefix + "fstats_image_scale"
        if self.feature_stats and key not in state_dict:
            state_dict[key] = torch.zeros(3, 2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: torch.Tensor, spans: Optional[torch.Tensor] = None, *,
                reconstruct: bool = True) -> GeneratorOutput:
        """Args:
            images: ``(B, 3, H, W)`` in ``[0, 1]``, H and W multiples of 32.
            spans: optional ``(B, 4)`` coordinate spans of tiles of larger images
                (:func:`spanned_coordinate_channels`); default: each input spans ``[-1, 1]``.
            reconstruct: run the reconstruction decoder (inference needs only the map).
        """
        levels = self.encoder.features(self._inputs(images, spans))
        combine = self.feature_stats and not self.training and self.fstats_ready
        with_residual = combine and self.residual_weight > 0
        needs_recon = (reconstruct or self.map_decoder is None or self.compare is not None
                       or with_residual)
        recon = (self.reconstruct(levels)
                 if self.reconstruction_decoder is not None and needs_recon else None)
        normality = logit = signal_maps = None
        if self.map_decoder is not None:
            logit = self._map_logit(images, levels, recon)
            if combine:
                signals = self._signals_of(images, levels, recon, logit)
                anomaly = self.combined_anomaly_logit(signals)
                if self.lowpass is not None:  # bent again: the term is not bounded
                    anomaly = soft_knee(anomaly + self.lowpass_term(images))
                logit = -anomaly
                if self.fstats_image_ready:
                    signal_maps = self._signal_z(signals)
            normality = torch.sigmoid(logit)
        return GeneratorOutput(normality, recon, logit, signal_maps)

    def reconstruct(self, levels: List[torch.Tensor]) -> torch.Tensor:
        """The reconstruction decoder on the encoder maps ``levels`` (with ``rec_skips``)."""
        return self.reconstruction_decoder(levels[-1], levels[-2::-1][:self.rec_skips])

    @staticmethod
    def residual(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` the reconstruction residual ``|x - x_hat|``, mean over channels."""
        return (images.float() - recon.float()).abs().mean(1, keepdim=True)

    def _map_logit(self, images: torch.Tensor, levels: List[torch.Tensor],
                   recon: Optional[torch.Tensor]) -> torch.Tensor:
        """The normality logit of the map head (plus the comparison head's, when built)."""
        logit = self.map_decoder.forward_with_logit(levels[-1],
                                                    levels[-2::-1][:self.map_skips])[1]
        if self.compare is not None:
            logit = logit + self.compare(images.to(logit.dtype), recon).to(logit.dtype)
        return logit

    def _signals_of(self, images: torch.Tensor, levels: List[torch.Tensor],
                    recon: Optional[torch.Tensor], map_logit: torch.Tensor
                    ) -> List[torch.Tensor]:
        """``(B, 1, H, W)`` each, uncalibrated: the head's anomaly logit (from the normality
        logit ``map_logit``), the feature distance and (when the run weights it) the
        residual, from one pass's encoder maps ``levels`` and reconstruction ``recon``."""
        out = [-map_logit.float(), self.feature_distance(levels, images.shape[-2:])]
        if self.residual_weight > 0:
            out.append(self.residual(images, recon))
        return out

    def _signals(self, images: torch.Tensor) -> List[torch.Tensor]:
        """:meth:`_signals_of` of a forward pass over ``images`` (fitting reads them)."""
        levels = self.encoder.features(self._inputs(images))
        recon = (self.reconstruct(levels)
                 if self.compare is not None or self.residual_weight > 0 else None)
        return self._signals_of(images, levels, recon, self._map_logit(images, levels, recon))

    def _signal_z(self, signals: List[torch.Tensor]) -> torch.Tensor:
        """``(B, S, H, W)`` each of ``signals`` z-scored with ``fstats_image_scale``."""
        scale = self.fstats_image_scale
        return torch.cat([(sig - scale[i, 0]) / scale[i, 1] for i, sig in enumerate(signals)],
                         dim=1)

    def has_signal_image_map(self) -> bool:
        """Whether :meth:`signal_maps` and :meth:`signal_image_map` are fitted
        (``feature_stats``, fitted by this version of :meth:`fit_feature_stats`)."""
        return bool(self.feature_stats and self.fstats_image_ready)

    @torch.no_grad()
    def signal_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, S, H, W)``, for image scores: the signals of ``feature_stats`` (head logit,
        feature distance and, when weighted, the residual), each z-scored against the
        *per-image maxima* of that signal over the held-out normal images. A signal whose
        peak varies a lot from one normal image to the next (the residual on every copper
        edge) counts for little, one whose normal peaks are steady counts for much
        (docs/evaluation.md). The forward pass returns the same maps as ``signal_maps`` (in
        eval mode)."""
        if not self.has_signal_image_map():
            raise ValueError("the signal image map needs fitted feature_stats "
                             "(fit_feature_stats)")
        return self._signal_z(self._signals(images))

    def signal_image_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` at each pixel the largest of :meth:`signal_maps`: its maximum over
        an image is the largest of the signals' image-level z-scores (``signals_max``)."""
        return self.signal_maps(images).amax(1, keepdim=True)

    def stats_channels(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` the clipped z-score of ``images`` against the normal statistics,
        scaled to ``[-1, 1]``."""
        if images.shape[-2:] != self.stats_mean.shape[-2:]:
            raise ValueError(f"normal_stats: the statistics are {tuple(self.stats_mean.shape[-2:])}"
                             f" pixels, the input {tuple(images.shape[-2:])}")
        z = (images - self.stats_mean) / self.stats_std
        return z.clamp(-STATS_CLIP, STATS_CLIP) / STATS_CLIP

    def _feature_vectors(self, levels: List[torch.Tensor]) -> torch.Tensor:
        """``(B, L, C)`` the modelled channels of the stride-2 and (upsampled) stride-4
        encoder maps at each of the ``L`` stride-2 locations (``feature_stats``)."""
        stem, f4 = levels[0], levels[1]
        f4 = F.interpolate(f4, size=stem.shape[-2:], mode="bilinear", align_corners=False)
        both = torch.cat([stem, f4], dim=1).float()[:, self.fstats_channels]
        return both.flatten(2).transpose(1, 2)

    def feature_distance(self, levels: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """``(B, 1, H, W)`` the blurred Mahalanobis distance of the fine features to their
        per-location normal Gaussian, at the image size ``size``."""
        feats = self._feature_vectors(levels) - self.fstats_mean
        squared = torch.einsum("blc,lcd,bld->bl", feats, self.fstats_icov, feats)
        h, w = levels[0].shape[-2:]
        dist = squared.clamp_min(0.0).sqrt().reshape(-1, 1, h, w)
        dist = F.interpolate(dist, size=size, mode="bilinear", align_corners=False)
        return separable_blur(dist, self.fstats_kernel)

    def lowpass_term(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` what ``lowpass_weight`` adds to the combined anomaly logit (which
        the forward pass then bends with :func:`soft_knee` again): the weight times the
        combined logit's held-out spread (``lowpass_scale[2]``, its quantile 0.999 minus its
        median) times the low-pass signal on its held-out scale."""
        unit = self.lowpass.lowpass_scale[2]
        return self.lowpass_weight * unit * self.lowpass.scaled(images)

    def combined_anomaly_logit(self, signals: List[torch.Tensor]) -> torch.Tensor:
        """The combined anomaly logit of the signals of :meth:`_signals_of`: the map head's
        anomaly logit plus the feature distance, each z-scored with ``fstats_scale``, minus
        :data:`FEATURE_STATS_OFFSET`; plus ``residual_weight`` times the z-scored residual
        when there is one; through :func:`soft_knee` (above :data:`COMBINED_LOGIT_KNEE` it
        grows logarithmically)."""
        lm, ls, dm, ds = self.fstats_scale
        combined = (signals[0] - lm) / ls + (signals[1] - dm) / ds - FEATURE_STATS_OFFSET
        if len(signals) > 2:
            rm, rs = self.fstats_res_scale
            combined = combined + self.residual_weight * (signals[2] - rm) / rs
        return soft_knee(combined)

    def _inputs(self, images: torch.Tensor,
                spans: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder's input: the centred image, the coordinate channels (of ``spans``
        under tiling) and the normal-statistics channels, as the model was built."""
        batch, _, height, width = images.shape
        x = images * 2.0 - 1.0  # centre the [0, 1] input for the batch-normalised trunk
        if self.coord_channels:
            coords = (coordinate_channels(batch, height, width, device=x.device, dtype=x.dtype)
                      if spans is None else
                      spanned_coordinate_channels(spans.to(x.device), height, width,
                                                  dtype=x.dtype))
            x = torch.cat([x, coords], dim=1)
        if self.normal_stats:
            x = torch.cat([x, self.stats_channels(images)], dim=1)
        return x

    @torch.no_grad()
    def clear_feature_stats(self) -> None:
        """Mark ``feature_stats`` as not fitted (the maps become the map head's alone until
        :meth:`fit_feature_stats` runs again), e.g. because the weights moved on."""
        if not self.feature_stats:
            raise ValueError("this generator was built without feature_stats")
        self.fstats_fitted.fill_(0.0)
        self.fstats_ready = False
        self.fstats_image_ready = False

    @torch.no_grad()
    def fit_feature_stats(self, train_batches: Iterable[torch.Tensor],
                          holdout_batches: Iterable[torch.Tensor]) -> None:
        """Fit ``feature_stats`` (in eval mode; the mode is restored): the per-location mean
        and inverse covariance (plus :data:`FEATURE_STATS_RIDGE` on the diagonal) of the fine
        features over ``train_batches``, then the mean and std of the map head's anomaly
        logit and of the feature distance over ``holdout_batches`` (float images ``(B, 3, H,
        W)`` in ``[0, 1]``, at the model's size; both iterables are read once). With
        ``lowpass_weight``, the low-pass statistics too (training images), and their scale and
        unit (held-out images). Long: one pass over each iterable fits every signal."""
        if not self.feature_stats:
            raise ValueError("this generator was built without feature_stats")
        was_training = self.training
        self.eval()
        self.clear_feature_stats()
        if self.lowpass is not None:
            self.lowpass.reset()
        try:
            total = outer = None
            count = 0
            for images in train_batches:
                if self.lowpass is not None:
                    self.lowpass.accumulate(images)
                feats = self._feature_vectors(self.encoder.fine_features(self._inputs(images)))
                feats = feats.double()
                s, o = feats.sum(0), torch.einsum("blc,bld->lcd", feats, feats)
                total = s if total is None else total + s
                outer = o if outer is None else outer + o
                count += feats.shape[0]
            if count < 2:
                raise ValueError("feature statistics need at least 2 training images")
            if self.lowpass is not None:
                self.lowpass.finish_training_images()
            mean = total / count
            cov = (outer - count * torch.einsum("lc,ld->lcd", mean, mean)) / (count - 1)
            cov = cov + FEATURE_STATS_RIDGE * torch.eye(cov.shape[-1], dtype=cov.dtype,
                                                        device=cov.device)
            self.fstats_mean.copy_(mean.float())
            self.fstats_icov.copy_(torch.linalg.inv(cov).float())
            logits, dists, residuals, peaks, lowpass = [], [], [], [], []
            with_residual = self.residual_weight > 0
            for images in holdout_batches:
                signals = self._signals(images)
                logits.append(signals[0].flatten())
                dists.append(signals[1].flatten())
                if with_residual:
                    residuals.append(signals[2].flatten())
                peaks.append(torch.stack([sig.flatten(1).amax(1) for sig in signals], 1))
                if self.lowpass is not None:
                    lowpass.append(self.lowpass.signal(images).flatten())
            if not logits:
                raise ValueError("feature statistics need at least 1 held-out image")
            logit, dist = torch.cat(logits).double(), torch.cat(dists).double()
            self.fstats_scale.copy_(torch.stack([
                logit.mean(), logit.std().clamp_min(1e-6),
                dist.mean(), dist.std().clamp_min(1e-6)]).float())
            res = torch.cat(residuals).double() if with_residual else None
            pixel_std = [logit.std(), dist.std()] + ([res.std()] if with_residual else [])
            self.fstats_image_scale.zero_()
            peak = torch.cat(peaks).double()
            if len(peak) >= 2:  # one held-out image has no spread of maxima
                # floored at IMAGE_SCALE_STD_FLOOR of the signal's pixel std: where every
                # held-out maximum is the same (a head that has not learned yet), the z-score
                # would turn float noise into the image score
                floor = IMAGE_SCALE_STD_FLOOR * torch.stack(pixel_std)
                self.fstats_image_scale[:peak.shape[1]].copy_(torch.stack(
                    [peak.mean(0), torch.maximum(peak.std(0), floor).clamp_min(1e-6)],
                    1).float())
            if with_residual:
                self.fstats_res_scale.copy_(torch.stack([
                    res.mean(), res.std().clamp_min(1e-6)]).float())
            if self.lowpass is not None:  # its unit: the combined logit's held-out spread
                combined = self.combined_anomaly_logit(
                    [logit.float(), dist.float()] + ([res.float()] if with_residual else []))
                self.lowpass.fit_scale(torch.cat(lowpass), unit=median_and_spread(combined)[1])
            self.fstats_fitted.fill_(1.0)
            self.fstats_ready = True
            self.fstats_image_ready = bool(self.fstats_image_scale[0, 1] > 0)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def set_normal_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-pixel mean and standard deviation ``(3, H, W)`` of the normal images
        (floats in ``[0, 1]``; ``std`` is floored at :data:`STATS_MIN_STD`)."""
        if not self.normal_stats:
            raise ValueError("this generator was built without normal_stats")
        self.stats_mean.copy_(mean.reshape(self.stats_mean.shape))
        self.stats_std.copy_(std.clamp_min(STATS_MIN_STD).reshape(self.stats_std.shape))

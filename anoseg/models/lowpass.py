"""The low-pass signal of ``model.lowpass_weight``: large, faint changes of brightness or
colour (a stain, a discoloured region) that the texture hides from the map head.

Each image is blurred (a Gaussian of :data:`LOWPASS_SIGMA_FRACTION` of its shorter side), its
log brightness and its chromaticity (each channel over the brightness, exactly 1 on grey
pixels) are taken relative to the image's own median (so a uniformly brighter or tinted part is
normal), and each of these four channels is z-scored per pixel against the normal training
images. With ``roughness`` (``model.lowpass_roughness``) a fifth channel joins them: the log
of the blurred local roughness of the brightness (its distance from a blur of
:data:`ROUGHNESS_SIGMA` px, then blurred like the others), relative to its median too, for
regions whose texture changed (a smoothed or coarser finish) more than their brightness
(docs/experiments.md, twenty-second round). The signal is the root mean square of the
z-scores. :class:`LowPassStats` holds
the statistics (buffers, saved with the generator) and puts the signal on the held-out normal
images' scale (docs/experiments.md, twentieth round). On a letterboxed canvas (``data.resize:
keep_aspect``) the median includes the padding.

Example:
    >>> stats = LowPassStats((64, 64))
    >>> stats.accumulate(torch.rand(4, 3, 64, 64)); stats.finish_training_images()
    >>> stats.fit_scale(stats.signal(torch.rand(2, 3, 64, 64)), unit=2.0)
    >>> stats.scaled(torch.rand(1, 3, 64, 64)).shape
    torch.Size([1, 1, 64, 64])
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LOWPASS_SIGMA_FRACTION = 1.0 / 64.0
"""The blur's sigma as a fraction of the image's shorter side (2 px at 128x128)."""
LOWPASS_MIN_STD = 1e-3
"""Floor of the per-pixel std of a low-pass channel (a grey image's chromaticity is constant)."""
LOWPASS_QUANTILE = 0.999
"""The held-out normal pixels' quantile the scaled signal maps to 1 (its median to 0)."""
ROUGHNESS_SIGMA = 1.0
"""The blur (px, at the model's resolution) the roughness channel measures the brightness's
distance from: the finest texture the model's input shows."""
ROUGHNESS_FLOOR = 1e-3
"""Added to the roughness before its log (a quarter of an 8-bit grey level: a flat patch)."""
_BRIGHTNESS_FLOOR = 0.02  # keeps log brightness and chromaticity finite on black pixels


def gaussian_kernel(sigma: float, radius: Optional[int] = None) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``sigma``, ``radius`` taps each side (default
    ``ceil(3 sigma)``), float32."""
    radius = int(math.ceil(3 * sigma)) if radius is None else radius
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2
                     / (2 * sigma ** 2))
    return taps / taps.sum()


def separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` blurred along each axis by the 1-D ``kernel`` (odd length, at most
    ``2 min(H, W) - 1``), each channel on its own, with reflected borders."""
    r, c = kernel.numel() // 2, x.shape[1]
    k = kernel.to(x.dtype)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`separable_blur` by a Gaussian of ``sigma`` (its radius kept inside the image)."""
    radius = min(max(1, int(math.ceil(3 * sigma))), x.shape[-1] - 1, x.shape[-2] - 1)
    return separable_blur(x, gaussian_kernel(sigma, radius).to(x.device))


def _median_per_channel(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, 1, 1)`` the lower median of each image channel (sorting, so it exports)."""
    flat = x.flatten(2)
    return flat.sort(2).values[..., (flat.shape[2] - 1) // 2][..., None, None]


def lowpass_channels(roughness: bool = False) -> int:
    """How many channels :func:`lowpass_features` gives (4, or 5 with ``roughness``)."""
    return 5 if roughness else 4


def lowpass_features(images: torch.Tensor, roughness: bool = False) -> torch.Tensor:
    """``(B, 4, H, W)``: the blurred log brightness and the three blurred chromaticities of
    ``images`` (``(B, 3, H, W)`` in ``[0, 1]``), each minus its median over the image; with
    ``roughness`` ``(B, 5, H, W)``, the log of the blurred local roughness last. Always in
    float32 (under autocast too: a bf16 step near 1 is as large as a chromaticity's normal
    spread)."""
    if torch.is_autocast_enabled(images.device.type):
        with torch.autocast(images.device.type, enabled=False):
            return lowpass_features(images, roughness)
    x = images.float() + _BRIGHTNESS_FLOOR
    brightness = x.mean(1, keepdim=True)
    sigma = LOWPASS_SIGMA_FRACTION * min(x.shape[-2:])
    parts = [torch.log(_gaussian_blur(brightness, sigma)), _gaussian_blur(x / brightness, sigma)]
    if roughness:
        rough = (brightness - _gaussian_blur(brightness, ROUGHNESS_SIGMA)).abs()
        parts.append(torch.log(_gaussian_blur(rough, sigma) + ROUGHNESS_FLOOR))
    feats = torch.cat(parts, 1)
    return feats - _median_per_channel(feats)


def median_and_spread(values: torch.Tensor, quantile: float = LOWPASS_QUANTILE
                      ) -> Tuple[float, float]:
    """The median of ``values`` and their ``quantile`` minus it (at least 1e-6; the quantile
    of an even subsample when there are more than 2 million, torch.quantile's limit)."""
    pixels = values.flatten().double()
    median = float(pixels.median())
    step = max(1, pixels.numel() // 2_000_000)
    top = float(torch.quantile(pixels[::step], quantile))
    return median, max(top - median, 1e-6)


class LowPassStats(nn.Module):
    """The per-pixel statistics of :func:`lowpass_features` over the normal training images,
    and the scale of the signal on the held-out ones. Fitting: :meth:`accumulate` every
    training batch, :meth:`finish_training_images`, then :meth:`fit_scale` with the signals
    (:meth:`signal`) of the held-out images."""

    def __init__(self, image_size: Tuple[int, int], roughness: bool = False) -> None:
        super().__init__()
        self.roughness = bool(roughness)
        shape = (1, lowpass_channels(self.roughness), *image_size)
        self.register_buffer("lowpass_mean", torch.zeros(shape))
        self.register_buffer("lowpass_std", torch.ones(shape))
        # (median, spread = quantile - median) of the signal on held-out normal pixels, and
        # the unit its user adds it in (the generator's combined logit's held-out spread)
        self.register_buffer("lowpass_scale", torch.tensor([0.0, 1.0, 0.0]))
        self.reset()

    def reset(self) -> None:
        """Forget the training images added since the last :meth:`finish_training_images`."""
        self._sum: Optional[torch.Tensor] = None
        self._squares: Optional[torch.Tensor] = None
        self._count = 0

    @torch.no_grad()
    def accumulate(self, images: torch.Tensor) -> None:
        """Add a batch of normal training images (``(B, 3, H, W)`` in ``[0, 1]``)."""
        feats = lowpass_features(images, self.roughness).double()
        s, q = feats.sum(0, keepdim=True), (feats * feats).sum(0, keepdim=True)
        self._sum = s if self._sum is None else self._sum + s
        self._squares = q if self._squares is None else self._squares + q
        self._count += feats.shape[0]

    @torch.no_grad()
    def finish_training_images(self) -> None:
        """The per-pixel mean and std (floored at :data:`LOWPASS_MIN_STD`) of what was added."""
        if self._count < 2:
            raise ValueError("the low-pass statistics need at least 2 training images")
        mean = self._sum / self._count
        var = (self._squares - self._count * mean * mean) / (self._count - 1)
        self.lowpass_mean.copy_(mean.float())
        self.lowpass_std.copy_(var.clamp_min(0.0).sqrt().clamp_min(LOWPASS_MIN_STD).float())
        self.reset()

    def signal(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` the root mean square of the low-pass z-scores (unscaled)."""
        z = (lowpass_features(images, self.roughness) - self.lowpass_mean) / self.lowpass_std
        return z.pow(2).mean(1, keepdim=True).sqrt()

    @torch.no_grad()
    def fit_scale(self, holdout_signals: torch.Tensor, unit: float = 1.0) -> None:
        """Map the held-out normal pixels' median to 0 and their :data:`LOWPASS_QUANTILE`
        to 1 (``holdout_signals``: :meth:`signal` of those images, any shape); ``unit`` is
        stored beside (``lowpass_scale[2]``) for the caller."""
        median, spread = median_and_spread(holdout_signals)
        self.lowpass_scale.copy_(torch.tensor([median, spread, float(unit)]))

    def scaled(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` the signal on the held-out scale (normal median 0, quantile 1)."""
        return (self.signal(images) - self.lowpass_scale[0]) / self.lowpass_scale[1]

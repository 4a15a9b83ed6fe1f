"""No-learning baselines a learned model must beat: the per-pixel Gaussian.

The per-pixel Gaussian fits, at every pixel and channel, the mean and standard deviation of the
resized training images; a test pixel's anomaly score is the root of the summed squared
z-scores over its channels. On aligned parts under steady light it is a strong floor (a change
anywhere is far from that pixel's normal values); on textures and moving parts it is weak. A
recipe that does not beat it has not learned what normal looks like.

Example:
    >>> import torch
    >>> baseline = PerPixelGaussian.fit(torch.rand(10, 3, 32, 32))
    >>> baseline.anomaly_maps(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 32, 32])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PerPixelGaussian:
    """Per-pixel, per-channel mean and standard deviation of normal images."""

    mean: torch.Tensor
    """``(3, H, W)``."""
    std: torch.Tensor
    """``(3, H, W)``, floored at ``min_std``."""

    @classmethod
    def fit(cls, images: torch.Tensor, min_std: float = 1e-2) -> "PerPixelGaussian":
        """Fit on float images ``(N, 3, H, W)`` in ``[0, 1]`` (N >= 2)."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"expected (N >= 2, C, H, W) images, got {tuple(images.shape)}")
        images = images.float()
        return cls(images.mean(0), images.std(0).clamp_min(min_std))

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` scores, higher = more anomalous (not bounded to ``[0, 1]``)."""
        z = (images.float() - self.mean) / self.std
        return z.pow(2).sum(1).sqrt()

"""The image-level anomaly detector fed by AnoSeg's maps (paper 3.4, appendix A, Fig. 5).

Two plain networks:

* a **generator** with AnoSeg's structure minus the map decoder: coordinate channels, the
  ResNet-18 trunk and one reconstruction decoder (:class:`AnoSegGenerator` with
  ``map_decoder=False``);
* a **discriminator** on ``concat(image, normality_map)`` (4 channels) whose penultimate
  features are ``f(.)``; for the Table 5 "base model" it sees the 3 image channels only.

Maps here are *normality* maps (1 = normal), the paper's convention: the real pair is
``(x, A_Nor)`` with ``A_Nor`` all ones, the fake pair ``(x_hat, A_hat)`` with ``A_hat``
AnoSeg's map of the input ``x``. The score (eq. 5) compares the two pairs::

    score = alpha * MSE(f(concat(x, A_Nor)), f(concat(x_hat, A_hat))) + beta * MSE(x, x_hat)

Example:
    >>> det = AnoSegDetector(image_size=64, width=0.25)
    >>> x = torch.rand(2, 3, 64, 64)
    >>> det.eval().score(x, torch.ones(2, 1, 64, 64)).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from anoseg.models.discriminator import AnoSegDiscriminator
from anoseg.models.generator import AnoSegGenerator


class AnoSegDetector(nn.Module):
    """Reconstruction generator and pair discriminator of the downstream detector.

    Args:
        image_size: input side, or ``(height, width)``; each a multiple of 32 from 64 to 512.
        width: channel multiplier of both networks (1.0 = the paper's).
        coord_channels: concatenate coordinate channels to the generator input.
        use_anomaly_map: the discriminator sees ``concat(image, map)``; ``False`` = images only
            (the Table 5 base model).
    """

    def __init__(self, *, image_size: Union[int, Tuple[int, int]], width: float = 1.0,
                 coord_channels: bool = True, use_anomaly_map: bool = True) -> None:
        super().__init__()
        self.use_anomaly_map = use_anomaly_map
        self.generator = AnoSegGenerator(image_size=image_size, width=width,
                                         coord_channels=coord_channels, map_decoder=False,
                                         reconstruction=True)
        self.discriminator = AnoSegDiscriminator(
            image_size=image_size, in_channels=4 if use_anomaly_map else 3, width=width)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``x_hat`` ``(B, 3, H, W)`` in ``[0, 1]`` for images ``(B, 3, H, W)`` in ``[0, 1]``."""
        return self.generator(images).reconstruction

    def pair(self, images: torch.Tensor, normality_map: Optional[torch.Tensor]) -> torch.Tensor:
        """The discriminator input: ``concat(image, map)``, or the image alone without maps."""
        if not self.use_anomaly_map:
            return images
        assert normality_map is not None, "this detector pairs every image with a map"
        return torch.cat([images, normality_map.to(images.dtype)], dim=1)

    def discriminate(self, images: torch.Tensor, normality_map: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B,), features f(.) (B, F))`` of the pair ``(images, normality_map)``."""
        return self.discriminator(self.pair(images, normality_map))

    def score(self, images: torch.Tensor, normality_map: Optional[torch.Tensor], *,
              alpha: float = 1.0, beta: float = 0.1,
              reconstruction: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Anomaly score per image (eq. 5), higher = more anomalous.

        Args:
            images: ``x`` ``(B, 3, H, W)`` in ``[0, 1]``.
            normality_map: AnoSeg's normality map of ``images`` ``(B, 1, H, W)`` (``A_hat``);
                ignored by a detector without input maps.
            alpha: weight of the feature distance.
            beta: weight of the image MSE.
            reconstruction: ``x_hat`` if already computed.

        Returns:
            ``(B,)`` scores. Call in eval mode (batch norm on running statistics) so an image's
            score does not depend on the rest of the batch.
        """
        x_hat = self.reconstruct(images) if reconstruction is None else reconstruction
        ones = torch.ones_like(images[:, :1])
        _, real_features = self.discriminate(images, ones)
        _, fake_features = self.discriminate(x_hat, normality_map)
        feature_mse = (real_features.float() - fake_features.float()).pow(2).flatten(1).mean(1)
        image_mse = (images.float() - x_hat.float()).pow(2).flatten(1).mean(1)
        return alpha * feature_mse + beta * image_mse

"""AnoSeg discriminator (appendix B, Table 6) on ``concat(image, map)``.

Strided 4x4 convolutions halve the side down to 1x1, so the depth follows from the image size
(8 layers at 256). The layer before the last has 128 channels (times the width multiplier) at
2x2; its flattened output is the feature ``f(.)`` that the detector's feature-matching loss and
score use. The last layer returns a logit; the sigmoid of Table 6 is folded into the
numerically stable ``binary_cross_entropy_with_logits`` of the losses.

Example:
    >>> d = AnoSegDiscriminator(image_size=64, width=0.25)
    >>> logits, features = d(torch.rand(2, 4, 64, 64))
    >>> logits.shape, features.shape
    (torch.Size([2]), torch.Size([2, 128]))
"""

from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
from torch import nn

from anoseg.models.generator import scaled, side_pair


class AnoSegDiscriminator(nn.Module):
    """Args:
        image_size: input side, or ``(height, width)`` (a power-of-two multiple of 32 keeps
            every layer exact; other multiples of 32 also reach 1x1 because each layer rounds
            down). The depth follows from the shorter side, so a non-square input ends in
            ``1 x n`` logits (averaged) and a ``2 x 2n`` feature map.
        in_channels: 4 = RGB image + one map channel.
        width: channel multiplier.
    """

    def __init__(self, *, image_size: Union[int, Tuple[int, int]], in_channels: int = 4,
                 width: float = 1.0) -> None:
        super().__init__()
        depth = int(math.floor(math.log2(min(side_pair(image_size)))))
        hidden = [scaled(min(64 * 2 ** i, 512), width) for i in range(depth - 1)]
        hidden[-1] = scaled(128, width)
        layers: List[nn.Module] = []
        previous = in_channels
        for i, channels in enumerate(hidden):
            layers.append(nn.Conv2d(previous, channels, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(previous, 1, 4, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, pair: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits (B,), features (B, F))`` for ``pair`` = ``concat(image, map)``."""
        feats = self.features(pair * 2.0 - 1.0)
        logits = self.head(feats)
        return logits.flatten(1).mean(1), feats.flatten(1)

"""Every loss of both stages, as plain functions of tensors.

AnoSeg (paper 3.2-3.3): :func:`segmentation_loss` (L_Seg, eq. 2),
:func:`masked_reconstruction_loss` (L_Re, eq. 4), :func:`discriminator_loss` and
:func:`generator_adversarial_loss` (the two sides of L_Adv, eq. 3; the detector's L_Adv^AD,
eq. 6, is the same pair of functions on its own pairs).

The detector (paper 3.4, appendix A): :func:`reconstruction_loss` (L_rec),
:func:`feature_matching_loss` (L_fea) and :func:`classification_loss` (L_cls).

Example:
    >>> import torch
    >>> float(segmentation_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)))
    1.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anoseg.runtime import all_reduce_sum, world_size

# --------------------------------------------------------------------------- AnoSeg


def segmentation_loss(normality_map: torch.Tensor, normality_target: torch.Tensor,
                      balanced: bool = False) -> torch.Tensor:
    """L_Seg (eq. 2): mean absolute error between predicted and target normality maps.

    With ``balanced`` the error is averaged separately over pasted (target 0) and normal
    (target 1) pixels and the two means are averaged; a batch without pasted pixels falls
    back to the plain mean.
    """
    error = (normality_map - normality_target).abs()
    if not balanced:
        return error.mean()
    anomalous = (normality_target < 0.5).to(error.dtype)
    n_anomalous = anomalous.sum()
    if n_anomalous == 0:
        return error.mean()
    normal = 1.0 - anomalous
    return 0.5 * ((error * anomalous).sum() / n_anomalous
                  + (error * normal).sum() / normal.sum().clamp_min(1.0))


def focal_segmentation_loss(normality_map: torch.Tensor, normality_target: torch.Tensor,
                            gamma: float = 2.0, eps: float = 1e-6,
                            anomaly_weight: float = 1.0) -> torch.Tensor:
    """Focal binary cross-entropy of the normality map against its 0/1 target, mean over pixels.

    ``-(1 - p_t)^gamma log p_t`` with ``p_t`` the predicted probability of the true class:
    confident, correct pixels (most of the normal ones) contribute almost nothing, so the rare
    anomalous pixels are not drowned. Its minimum is pulled toward 0.5 from the calibrated
    probability, but far less than class balancing pulls it: with anomalies at 1 % of the
    pixels, balancing weighs each anomalous pixel about 100 times a normal one, so any doubtful
    pixel is best called "anomalous" (the large blobs ``balanced_l1`` maps show).
    ``anomaly_weight`` multiplies the pasted pixels' terms (the mean is then taken over the
    weights, so the loss keeps its scale).
    """
    p = normality_map.clamp(eps, 1.0 - eps)
    normal = normality_target >= 0.5
    p_true = torch.where(normal, p, 1.0 - p)
    terms = -(1.0 - p_true).pow(gamma) * p_true.log()
    if anomaly_weight == 1.0:
        return terms.mean()
    weights = torch.where(normal, torch.ones_like(terms), torch.full_like(terms, anomaly_weight))
    return (terms * weights).sum() / weights.sum()


def masked_reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor,
                               normality_target: torch.Tensor) -> torch.Tensor:
    """L_Re (eq. 4): L1 reconstruction error on normal pixels only, normalised by their count.

    Under DistributedDataParallel the count is summed over all processes (and the loss scaled
    by the world size, which DDP's gradient averaging undoes), so the loss is the same ratio
    of sums as in a single process with the global batch.
    """
    weight = normality_target.expand_as(images)
    count = weight.sum().detach()
    world = world_size()
    if world > 1:
        count = all_reduce_sum(count) / world
    return ((images - reconstruction).abs() * weight).sum() / count.clamp_min(1.0)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator side of L_Adv (eq. 3): real pairs -> 1, generated pairs -> 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator side of L_Adv, in the non-saturating form ``-log D(fake)``."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# --------------------------------------------------------------------------- the detector


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between ``x_hat`` and ``x`` over every pixel: the detector's L_rec
    (all its pixels are normal), and L_Re with ``train.rec_target: clean`` (``x`` the image
    before synthesis)."""
    return F.l1_loss(reconstruction, images)


def feature_matching_loss(fake_features: torch.Tensor, real_features: torch.Tensor
                          ) -> torch.Tensor:
    """L_fea: MSE between ``f(x_hat, A_hat)`` and the (fixed) target ``f(x, A_Nor)``."""
    return F.mse_loss(fake_features, real_features.detach())


def classification_loss(real_logits: torch.Tensor, anomaly_logits: torch.Tensor) -> torch.Tensor:
    """L_cls: real pairs ``(x_Nor, A_Nor)`` -> 1, synthetic anomaly pairs ``(x_Ano, A_Ano)`` -> 0
    (the same binary cross-entropy as :func:`discriminator_loss`, on other pairs)."""
    return discriminator_loss(real_logits, anomaly_logits)

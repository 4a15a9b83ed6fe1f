"""The training stream: normal images and synthetic anomalies, a pure function of the step.

:class:`StepSampler` yields ``(image_index, sample_seed)`` keys; :class:`SyntheticAnomalyDataset`
turns a key into a sample. Because the sampler derives both from the global sample number,
the batch of step ``s`` is the same whatever the number of workers, and a resumed run sees
exactly the batches an uninterrupted run would have seen.

Images that do not fill their canvas (``data.resize=keep_aspect``, tiles at an image's border:
:mod:`anoseg.data.geometry`) get their synthetic anomalies inside the image's box only: the
padding never holds one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, Sampler

from anoseg.config import SynthesisConfig
from anoseg.data.geometry import Geometry, Placement, box_within, tile_span
from anoseg.data.synthesis import synthesize_anomaly

_SEED_STRIDE = 1_000_003  # a prime: keeps the streams of different run seeds apart

MIN_SYNTHESIS_SIDE = 8
"""A box narrower than this (a tile that is nearly all padding) gets no synthetic anomaly."""

Box = Tuple[int, int, int, int]


def synthesize_in_box(image: torch.Tensor, box: Optional[Box], cfg: SynthesisConfig,
                      generator: torch.Generator
                      ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`~anoseg.data.synthesis.synthesize_anomaly` inside ``box`` (``(top, left, height,
    width)``; ``None`` = the whole image) of ``image``; the rest of the image and of the
    normality mask stays as it is.

    Returns:
        ``(image, normality (1, H, W), made)``; ``made`` is False when the box is smaller than
        :data:`MIN_SYNTHESIS_SIDE` (the image is returned unchanged).
    """
    height, width = image.shape[1:]
    if box is None or tuple(box) == (0, 0, height, width):
        out, normality = synthesize_anomaly(image, cfg, generator)
        return out, normality, True
    top, left, h, w = box
    normality = torch.ones(1, height, width, dtype=image.dtype)
    if min(h, w) < MIN_SYNTHESIS_SIDE:
        return image, normality, False
    part, part_normality = synthesize_anomaly(
        image[:, top:top + h, left:left + w].contiguous(), cfg, generator)
    out = image.clone()
    out[:, top:top + h, left:left + w] = part
    normality[:, top:top + h, left:left + w] = part_normality
    return out, normality, True


def make_sample(image: torch.Tensor, cfg: SynthesisConfig, generator: torch.Generator,
                anomaly_ratio: float, box: Optional[Box] = None, *,
                keep_clean: bool = False) -> Dict[str, torch.Tensor]:
    """With probability ``anomaly_ratio`` a synthetic anomaly of ``image`` (inside ``box``, the
    image's pixels, when it does not fill the tensor), else ``image``.

    Returns ``{"image", "normality", "synthetic"}``; the normality mask is ``(1, H, W)``. With
    ``keep_clean`` also ``"clean"``, the image before synthesis (the reconstruction target of
    ``train.rec_target: clean``).
    """
    clean = image
    synthetic = torch.rand((), generator=generator).item() < anomaly_ratio
    if synthetic:
        image, normality, synthetic = synthesize_in_box(image, box, cfg, generator)
    else:
        normality = torch.ones(1, *image.shape[1:], dtype=image.dtype)
    sample = {"image": image, "normality": normality, "synthetic": torch.tensor(synthetic)}
    if keep_clean:
        sample["clean"] = clean
    return sample


class StepSampler(Sampler):
    """Infinite stream of ``(index, sample_seed)`` keys starting at a given training step.

    Sample number ``k`` of the run (all processes together) uses the image at position
    ``k mod N`` of the permutation of epoch ``k // N`` and the synthesis seed derived from ``k``.
    With several processes, rank ``r`` takes the ``r``-th slice of each global batch.

    Args:
        num_images: size of the training set.
        batch_size: images per process per step.
        seed: the run seed.
        start_step: first step to yield (``> 0`` when resuming).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_images < 1:
            raise ValueError("StepSampler needs at least one image")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self._epoch = -1
        self._order: torch.Tensor = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            # a negative offset keeps epoch seeds apart from the per-sample seeds below
            epoch_seed = (self.seed * _SEED_STRIDE - 1 - epoch) % (2 ** 63 - 1)
            g = torch.Generator().manual_seed(epoch_seed)
            self._order = torch.randperm(self.num_images, generator=g)
            self._epoch = epoch
        return self._order

    def key(self, sample_number: int) -> Tuple[int, int]:
        epoch, position = divmod(sample_number, self.num_images)
        index = int(self._permutation(epoch)[position])
        sample_seed = (self.seed * _SEED_STRIDE + sample_number) % (2 ** 63 - 1)
        return index, sample_seed

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        step = self.start_step
        global_batch = self.batch_size * self.world_size
        while True:
            first = step * global_batch + self.rank * self.batch_size
            for k in range(first, first + self.batch_size):
                yield self.key(k)
            step += 1


class SyntheticAnomalyDataset(Dataset):
    """Normal training images, each turned into a synthetic anomaly with some probability.

    Args:
        images: a uint8 tensor ``(N, 3, H, W)`` of decoded canvases or a list of uint8
            ``(3, H, W)`` canvases (cached in memory:
            :func:`anoseg.data.mvtec.load_placed_cached`), or a list of image paths decoded
            on every access.
        image_size: side ``S`` or ``(height, width)`` (used when decoding paths without a
            ``geometry``).
        cfg: synthesis settings.
        geometry: how images become canvases (:class:`~anoseg.data.geometry.Geometry`);
            default: a stretch to ``image_size``. Under tiling every sample is a random tile
            of ``geometry.image_hw``.
        placements: the cached canvases' placements (default: each fills its canvas).

    ``dataset[(index, seed)]`` returns ``{"image", "normality", "synthetic"}``: the float image
    ``(3, H, W)`` in ``[0, 1]``, its normality mask ``(1, H, W)`` (all ones for a normal
    image) and whether it is synthetic; with ``keep_clean`` also ``clean``, the image before
    synthesis (``train.rec_target: clean``); under tiling with ``coords=image`` also ``span``
    (``(4,)``: the tile's coordinates in the image,
    :func:`anoseg.models.generator.spanned_coordinate_channels`).
    """

    def __init__(self, images: Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Path]],
                 image_size, cfg: SynthesisConfig, *, geometry: Optional[Geometry] = None,
                 placements: Optional[List[Placement]] = None,
                 keep_clean: bool = False) -> None:
        self.images = images
        self.keep_clean = keep_clean
        self.image_size = image_size
        self.cfg = cfg
        self.geometry = geometry if geometry is not None else Geometry.of(image_size)
        self.placements = placements

    def __len__(self) -> int:
        return len(self.images)

    def canvas(self, index: int) -> Tuple[torch.Tensor, Placement]:
        """Training image ``index`` on its canvas (uint8 ``(3, H, W)``) and its placement."""
        raw = self.images[index]
        if isinstance(raw, torch.Tensor):
            if self.placements is not None:
                return raw, self.placements[index]
            hw = tuple(raw.shape[1:])
            return raw, Placement(hw, hw, (0, 0, *hw))
        from anoseg.data.mvtec import load_placed_image

        return load_placed_image(raw, self.geometry)

    def normal_image(self, index: int) -> torch.Tensor:
        """Training image ``index`` on its canvas as float in [0, 1], (3, H, W), without
        anomaly."""
        return self.canvas(index)[0].float().div_(255.0)

    def view(self, index: int, generator: Optional[torch.Generator]
             ) -> Tuple[torch.Tensor, Box, Optional[torch.Tensor]]:
        """What sample ``index`` shows: ``(float image, box of the image's pixels in it, span
        or None)``; under tiling a random tile (its place drawn from ``generator``)."""
        raw, placement = self.canvas(index)
        if not self.geometry.tiled:
            return raw.float().div_(255.0), placement.box, None
        (tile_h, tile_w), (height, width) = self.geometry.image_hw, placement.canvas_hw
        top = int(torch.randint(0, height - tile_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - tile_w + 1, (), generator=generator))
        tile = raw[:, top:top + tile_h, left:left + tile_w].float().div_(255.0)
        span = None
        if self.geometry.coords == "image":
            span = torch.tensor(tile_span(placement, top, left, (tile_h, tile_w)))
        return tile, box_within(placement, top, left, (tile_h, tile_w)), span

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        index, sample_seed = key
        generator = torch.Generator().manual_seed(int(sample_seed))
        image, box, span = self.view(int(index), generator)
        sample = make_sample(image, self.cfg, generator, self.cfg.anomaly_ratio, box,
                             keep_clean=self.keep_clean)
        if span is not None:
            sample["span"] = span
        return sample


def normal_pixel_statistics(dataset: SyntheticAnomalyDataset
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel, per-channel mean and standard deviation ``(3, S, S)`` of the dataset's
    normal images (no anomalies), accumulated one image at a time in float64."""
    if len(dataset) < 2:
        raise ValueError("normal statistics need at least 2 training images")
    total = squares = None
    for index in range(len(dataset)):
        image = dataset.normal_image(index).double()
        total = image.clone() if total is None else total.add_(image)
        squares = image.pow(2) if squares is None else squares.add_(image.pow(2))
    n = len(dataset)
    mean = total / n
    var = (squares - n * mean.pow(2)).clamp_min(0.0) / (n - 1)
    return mean.float(), var.sqrt().float()


def seed_worker(worker_id: int) -> None:
    """Keep each worker to one thread: on a few cores, the training thread needs them."""
    torch.set_num_threads(1)


def make_train_loader(dataset: SyntheticAnomalyDataset, sampler: StepSampler, batch_size: int,
                      num_workers: int, pin_memory: bool = False):
    """A DataLoader over the infinite step stream (synthesis runs in its workers)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=seed_worker if num_workers > 0 else None,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )


def synthetic_batch(images: torch.Tensor, cfg: SynthesisConfig, seed: int,
                    anomaly_ratio: Optional[float] = None, *,
                    keep_clean: bool = False) -> Dict[str, torch.Tensor]:
    """Synthesize one batch in the calling process (for notebooks, tests and the detector).

    Args:
        images: float ``(B, 3, S, S)`` in ``[0, 1]``.
        seed: seed of the first sample; sample ``i`` uses ``seed + i``.
        anomaly_ratio: override of ``cfg.anomaly_ratio`` (1.0 = every image synthetic).
        keep_clean: also return ``clean``, the images before synthesis.
    """
    ratio = cfg.anomaly_ratio if anomaly_ratio is None else anomaly_ratio
    samples = [make_sample(image, cfg, torch.Generator().manual_seed(seed + i), ratio,
                           keep_clean=keep_clean)
               for i, image in enumerate(images.cpu())]
    return {key: torch.stack([s[key] for s in samples]).to(images.device) for key in samples[0]}

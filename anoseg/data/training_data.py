"""The training stream: normal images and synthetic anomalies, a pure function of the step.

:class:`StepSampler` yields ``(image_index, sample_seed)`` keys; :class:`SyntheticAnomalyDataset`
turns a key into a sample. Because the sampler derives both from the global sample number,
the batch of step ``s`` is the same whatever the number of workers, and a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from anoseg.config import SynthesisConfig
from anoseg.data.synthesis import synthesize_anomaly

_SEED_STRIDE = 1_000_003  # a prime: keeps the streams of different run seeds apart


def make_sample(image: torch.Tensor, cfg: SynthesisConfig, generator: torch.Generator,
                anomaly_ratio: float) -> Dict[str, torch.Tensor]:
    """With probability ``anomaly_ratio`` a synthetic anomaly of ``image``, else ``image``.

    Returns ``{"image", "normality", "synthetic"}``; the normality mask is ``(1, H, W)``.
    """
    synthetic = torch.rand((), generator=generator).item() < anomaly_ratio
    if synthetic:
        image, normality = synthesize_anomaly(image, cfg, generator)
    else:
        normality = torch.ones(1, *image.shape[1:], dtype=image.dtype)
    return {"image": image, "normality": normality, "synthetic": torch.tensor(synthetic)}


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
        images: either a uint8 tensor ``(N, 3, S, S)`` of decoded images (cached in memory) or
            a list of image paths decoded on every access.
        image_size: side ``S`` (used when decoding paths).
        cfg: synthesis settings.

    ``dataset[(index, seed)]`` returns ``{"image", "normality", "synthetic"}``: the float image
    ``(3, S, S)`` in ``[0, 1]``, its normality mask ``(1, S, S)`` (all ones for a normal image)
    and whether it is synthetic.
    """

    def __init__(self, images: torch.Tensor | Sequence[Path], image_size: int,
                 cfg: SynthesisConfig) -> None:
        self.images = images
        self.image_size = image_size
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.images)

    def normal_image(self, index: int) -> torch.Tensor:
        """Training image ``index`` as float in [0, 1], shape (3, S, S), without anomaly."""
        if isinstance(self.images, torch.Tensor):
            raw = self.images[index]
        else:
            from anoseg.data.mvtec import load_image

            raw = load_image(self.images[index], self.image_size)
        return raw.float().div_(255.0)

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        index, sample_seed = key
        generator = torch.Generator().manual_seed(int(sample_seed))
        return make_sample(self.normal_image(int(index)), self.cfg, generator, self.cfg.anomaly_ratio)


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
                    anomaly_ratio: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """Synthesize one batch in the calling process (for notebooks, tests and the detector).

    Args:
        images: float ``(B, 3, S, S)`` in ``[0, 1]``.
        seed: seed of the first sample; sample ``i`` uses ``seed + i``.
        anomaly_ratio: override of ``cfg.anomaly_ratio`` (1.0 = every image synthetic).
    """
    ratio = cfg.anomaly_ratio if anomaly_ratio is None else anomaly_ratio
    samples = [make_sample(image, cfg, torch.Generator().manual_seed(seed + i), ratio)
               for i, image in enumerate(images.cpu())]
    return {key: torch.stack([s[key] for s in samples]).to(images.device)
            for key in ("image", "normality", "synthetic")}

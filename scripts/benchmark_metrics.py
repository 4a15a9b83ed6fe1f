"""Benchmark of the streaming metrics on an MVTec-AD-sized synthetic test set.

1,725 anomaly maps of 256x256 (113 M pixels), generated in batches of 16 with random elliptical
defects (about 70 % of the images defective). The streaming pass runs in a fresh subprocess that
reports its wall time and peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) next to its RSS
just before the pass, so the increase is what the pass itself needed (data generation included),
and the peak of the numpy memory the metric allocates (``tracemalloc``, which sees numpy but not
torch tensors: the generator's, and the metric's per-batch counts, 1 MiB each). The update's CPU
time (``time.thread_time``) is printed next to its wall time: on a shared machine the wall time is
higher, on an idle one the two agree. Data generation runs single-threaded torch (faster than two
contended threads on a 2-core machine); the metric itself is single-threaded (numpy, and torch's
``bincount`` for the histograms). Then ``sklearn.metrics.roc_auc_score`` runs on the pixels of
every ``--sklearn-every``-th batch (all of them with ``--sklearn-every 1``, about 6 GB of RAM)
together with the streaming metric on the same pixels, and the AUROC difference is printed.

Usage:
    python scripts/benchmark_metrics.py [--sklearn-every 4] [--num-images 1725]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Dict, Iterator, Tuple

import numpy as np
import torch

IMAGE_SIZE = 256
BATCH_SIZE = 16


def synthetic_batch(batch_index: int, n_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch ``batch_index``: (maps float32 (n,H,W) in [0,1], masks bool (n,H,W))."""
    generator = torch.Generator().manual_seed(1000 + batch_index)
    size = IMAGE_SIZE
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    n_blobs = 3
    centre = torch.rand(n_images, n_blobs, 2, generator=generator) * size
    radius = 4.0 + torch.rand(n_images, n_blobs, 2, generator=generator) * 36.0
    used = torch.rand(n_images, n_blobs, generator=generator) < 0.5
    used[:, 0] = torch.rand(n_images, generator=generator) < 0.7  # ~70 % defective images
    used[:, 1:] &= used[:, :1]
    distance = (((rows - centre[..., 0, None, None]) / radius[..., 0, None, None]) ** 2
                + ((cols - centre[..., 1, None, None]) / radius[..., 1, None, None]) ** 2)
    used = used[..., None, None]
    masks = ((distance <= 1.0) & used).any(dim=1)
    # The "model" sees a slightly shifted, larger blob of random strength, plus noise.
    strength = 0.2 + 0.25 * torch.rand(n_images, n_blobs, 1, 1, generator=generator)
    response = (strength * (distance <= 1.3) * used).amax(dim=1)
    noise = torch.rand(n_images, size, size, generator=generator)
    maps = (0.55 * noise + response).clamp_(0.0, 1.0)
    return maps, masks


def batches(num_images: int, every: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yields every ``every``-th batch of the synthetic test set."""
    n_batches = (num_images + BATCH_SIZE - 1) // BATCH_SIZE
    for batch_index in range(0, n_batches, every):
        n_images = min(BATCH_SIZE, num_images - batch_index * BATCH_SIZE)
        yield synthetic_batch(batch_index, n_images)


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def streaming_pass(num_images: int) -> Dict[str, float]:
    """Runs in the child process: the whole metric pass, timed, with memory figures."""
    from anoseg.metrics import SegmentationMetrics

    torch.set_num_threads(1)
    warm_up = SegmentationMetrics()
    warm_up.update(*next(batches(BATCH_SIZE)))  # first-call costs (imports, allocator) not timed
    warm_up.compute()
    del warm_up
    rss_before = current_rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tracemalloc.start()
    metrics = SegmentationMetrics()
    start = time.perf_counter()
    generate_s = update_s = update_cpu_s = 0.0
    tick = time.perf_counter()
    for maps, masks in batches(num_images):
        generated = time.perf_counter()
        generate_s += generated - tick
        cpu_start = time.thread_time()
        metrics.update(maps, masks)
        update_cpu_s += time.thread_time() - cpu_start
        tick = time.perf_counter()
        update_s += tick - generated
    compute_start = time.perf_counter()
    result = metrics.compute()
    compute_s = time.perf_counter() - compute_start
    total_s = time.perf_counter() - start
    numpy_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "n_images": result["n_images"], "n_pixels": result["n_pixels"],
        "n_defective": result["n_defective"], "n_regions": result["n_regions"],
        "pixel_auroc": result["pixel_auroc"], "image_auroc": result["image_auroc"],
        "aupro": result["aupro"], "iou_pooled_best": result["iou_pooled_best"],
        "iou_mean_per_image_best": result["iou_mean_per_image_best"],
        "pixel_f1_max": result["pixel_f1_max"],
        "update_s": update_s, "update_cpu_s": update_cpu_s, "compute_s": compute_s,
        "generate_s": generate_s,
        "total_s": total_s, "rss_before_mib": rss_before,
        "peak_rss_before_pass_mib": peak_before, "peak_rss_mib": peak_after,
        "metric_numpy_peak_mib": numpy_peak,
        "torch_threads": torch.get_num_threads(),
    }


def sklearn_comparison(num_images: int, every: int) -> Dict[str, float]:
    """sklearn roc_auc_score vs the streaming AUROC on the pixels of every ``every``-th batch."""
    from sklearn.metrics import roc_auc_score

    from anoseg.metrics import SegmentationMetrics

    torch.set_num_threads(1)
    metrics = SegmentationMetrics()
    score_parts, label_parts = [], []
    for maps, masks in batches(num_images, every):
        metrics.update(maps, masks)
        score_parts.append(maps.numpy().reshape(-1))
        label_parts.append(masks.numpy().reshape(-1))
    streaming_auroc = metrics.compute()["pixel_auroc"]
    scores, labels = np.concatenate(score_parts), np.concatenate(label_parts)
    del score_parts, label_parts
    start = time.perf_counter()
    sklearn_auroc = float(roc_auc_score(labels, scores))
    sklearn_s = time.perf_counter() - start
    return {"n_pixels": int(scores.size), "sklearn_auroc": sklearn_auroc,
            "streaming_auroc": streaming_auroc, "sklearn_s": sklearn_s,
            "abs_difference": abs(sklearn_auroc - streaming_auroc),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_child(mode: str, num_images: int, every: int) -> Dict[str, float]:
    """Runs ``mode`` in a fresh Python process and returns its JSON report."""
    completed = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--num-images", str(num_images),
         "--sklearn-every", str(every)], check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=1725)
    parser.add_argument("--sklearn-every", type=int, default=4,
                        help="sklearn on every k-th batch (1 = all pixels, ~6 GB RAM); 0 = skip")
    parser.add_argument("--child", choices=["stream", "sklearn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "stream":
        print(json.dumps(streaming_pass(args.num_images)))
        return
    if args.child == "sklearn":
        print(json.dumps(sklearn_comparison(args.num_images, args.sklearn_every)))
        return

    stream = run_child("stream", args.num_images, args.sklearn_every)
    print(f"streaming pass: {stream['n_images']} images, {stream['n_pixels'] / 1e6:.1f} M pixels, "
          f"{stream['n_defective']} defective, {stream['n_regions']} regions, "
          f"torch threads {stream['torch_threads']}")
    print(f"  SegmentationMetrics.update total {stream['update_s']:.2f} s (CPU time of the thread "
          f"{stream['update_cpu_s']:.2f} s: on a busy machine the wall time is higher), compute() "
          f"{stream['compute_s']:.2f} s (synthetic data generation {stream['generate_s']:.2f} s "
          f"more; loop wall time {stream['total_s']:.2f} s)")
    rss_increase = stream["peak_rss_mib"] - stream["rss_before_mib"]
    print(f"  RSS before the pass {stream['rss_before_mib']:.0f} MiB, peak RSS (ru_maxrss) "
          f"{stream['peak_rss_mib']:.0f} MiB -> increase {rss_increase:.0f} MiB "
          f"(generation of each batch included); peak numpy memory of the metric (tracemalloc) "
          f"{stream['metric_numpy_peak_mib']:.0f} MiB")
    print("  " + ", ".join(f"{key} {stream[key]:.4f}" for key in (
        "pixel_auroc", "image_auroc", "aupro", "iou_pooled_best", "iou_mean_per_image_best",
        "pixel_f1_max")))
    if args.sklearn_every <= 0:
        return
    reference = run_child("sklearn", args.num_images, args.sklearn_every)
    subset = "all batches" if args.sklearn_every == 1 else f"every {args.sklearn_every}th batch"
    print(f"sklearn.metrics.roc_auc_score on {reference['n_pixels'] / 1e6:.1f} M pixels "
          f"({subset}): {reference['sklearn_s']:.2f} s, process peak RSS "
          f"{reference['peak_rss_mib']:.0f} MiB")
    print(f"  sklearn AUROC {reference['sklearn_auroc']:.6f}, streaming AUROC on the same pixels "
          f"{reference['streaming_auroc']:.6f}, |difference| {reference['abs_difference']:.2e}")


if __name__ == "__main__":
    main()

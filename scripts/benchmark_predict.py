"""Time and peak memory of ``anoseg-predict`` on large images (issue 14).

Trains a one-step model of the recipe's shape on a few generated images (the weights do not
matter for time and memory), writes one generated image per ``--sizes`` side, then runs
``anoseg-predict`` (the library call behind it, with maps written at the input's own size) on
each image, for each geometry in ``--modes``, each in a fresh process so that its peak RSS is
its own. Prints a Markdown table: seconds and peak RSS (MiB) per run.

    OMP_NUM_THREADS=1 python scripts/benchmark_predict.py --output-dir runs/bench_predict
    python scripts/benchmark_predict.py --sizes 1024 --modes tiling --tile-scale 0.5 ...

Modes: ``stretch`` and ``keep_aspect`` (the image resized to ``--image-size``, the map resized
back to the image's size) and ``tiling`` (``data.tiling`` at ``--tile-scale``: a sliding
window of ``--image-size`` tiles over the image, windows in batches of ``--batch-size``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

MODES = {
    "stretch": [],
    "keep_aspect": ["data.resize=keep_aspect"],
    "tiling": ["data.tiling.enabled=true"],
}


def _smooth_image(path: Path, side: int, seed: int) -> None:
    """A ``side x side`` RGB image: a smooth random field (cheap to write and read)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((9, 9, 3)) * 255).astype(np.uint8)
    Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(path)


def _make_data(root: Path) -> None:
    for folder, count in (("train/good", 4), ("test/good", 1)):
        (root / "gen" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _smooth_image(root / "gen" / folder / f"{i:03d}.png", 256, i)


def _train(run: Path, data: Path, overrides) -> None:
    from anoseg.config import load_config
    from anoseg.training import train

    if (run / "checkpoints" / "last.pt").is_file():
        return
    cfg = load_config(None, list(overrides) + [
        f"data.root={data}", "data.category=gen", "data.num_workers=0",
        "data.holdout_fraction=0", "train.steps=1", "train.batch_size=2",
        "train.device=cpu", "train.precision=fp32", "train.channels_last=false"])
    train(cfg, run, progress=False)


def _child(args: argparse.Namespace) -> None:
    """One prediction in this process; prints its seconds and peak RSS as JSON."""
    from anoseg.predict import predict_run

    start = time.perf_counter()
    predict_run(args.run, [args.image], args.out, threshold=0.5, image_threshold=0.0,
                device="cpu", progress=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/bench_predict")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--tile-scale", type=float, default=1.0)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--map-skips", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    output = Path(args.output_dir)
    _make_data(output / "data")
    images = {}
    for side in args.sizes:
        images[side] = output / f"image_{side}.png"
        if not images[side].is_file():
            _smooth_image(images[side], side, side)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"OMP_NUM_THREADS={threads}; model width {args.width}, map_skips {args.map_skips}, "
          f"image_size {args.image_size}, tiling scale {args.tile_scale}, batch "
          f"{args.batch_size}\n")
    print("| mode | image | seconds | peak RSS (MiB) |\n|---|---|---|---|")
    for mode in args.modes:
        run = output / f"run_{mode}"
        _train(run, output / "data", [f"data.image_size={args.image_size}",
                                      f"model.width={args.width}",
                                      f"model.map_skips={args.map_skips}",
                                      f"data.tiling.scale={args.tile_scale}", *MODES[mode]])
        for side, image in images.items():
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--run", str(run), "--image", str(image),
                 "--out", str(output / f"pred_{mode}_{side}"),
                 "--batch-size", str(args.batch_size)],
                check=True, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {mode} | {side}x{side} | {result['seconds']:.1f} | "
                  f"{result['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

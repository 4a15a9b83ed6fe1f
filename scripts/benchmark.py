"""Speed of the AnoSeg training step and of inference, with achieved FLOP/s.

Prints, for each device (CPU, and CUDA when present), image size and precision: seconds per
training step, training images/s, inference images/s, peak memory, and the FLOP/s of the
training step as a fraction of a matrix-multiply peak measured in the same run.

    python scripts/benchmark.py                       # CPU: 128 and 256, width 1.0, batch 16
    python scripts/benchmark.py --sizes 128 --widths 0.25 1.0 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from anoseg.config import load_config
from anoseg.data.training_data import synthetic_batch
from anoseg.inference import predict_anomaly_maps
from anoseg.runtime import resolve_precision
from anoseg.training import create_train_state, train_step


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def bench(device: torch.device, size: int, width: float, batch: int, precision: str,
          steps: int, channels_last: bool, compile_model: bool = False) -> dict:
    cfg = load_config(None, [f"data.image_size={size}", f"model.width={width}",
                             f"train.batch_size={batch}", f"train.precision={precision}",
                             f"train.channels_last={str(channels_last).lower()}",
                             f"train.compile={str(compile_model).lower()}"])
    amp_dtype = resolve_precision(precision, device)
    state = create_train_state(cfg, device)
    images = torch.rand(batch, 3, size, size)
    data = synthetic_batch(images, cfg.synthesis, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kwargs = dict(device=device, amp_dtype=amp_dtype, channels_last=channels_last)
    if compile_model:  # compile outside the FLOP counter (it cannot trace compiled graphs)
        for _ in range(2):
            train_step(state, data, cfg.train, **kwargs)
    with FlopCounterMode(display=False) as counter:
        train_step(state, data, cfg.train, **kwargs)
    flops = counter.get_total_flops()
    train_step(state, data, cfg.train, **kwargs)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(state, data, cfg.train, **kwargs)
    _sync(device)
    step_s = (time.perf_counter() - start) / steps
    predict_anomaly_maps(state.generator, images, batch_size=batch, amp_dtype=amp_dtype)
    start = time.perf_counter()
    for _ in range(max(steps // 2, 1)):
        predict_anomaly_maps(state.generator, images, batch_size=batch, amp_dtype=amp_dtype)
    _sync(device)
    infer_s = (time.perf_counter() - start) / max(steps // 2, 1)
    return {"step_s": step_s, "train_ips": batch / step_s, "infer_ips": batch / infer_s,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / step_s / 1e9,
            "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"channels_last={args.channels_last}, compile={args.compile}")
    for name in devices:
        device = torch.device(name)
        peaks = {p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16)
                 for p in args.precisions if p in ("fp32", "bf16")}
        for p, value in peaks.items():
            print(f"{name}: matmul peak {p}: {value / 1e9:.0f} GFLOP/s")
        print(f"{'device':6} {'size':>4} {'width':>5} {'prec':>4} {'s/step':>7} {'train img/s':>11} "
              f"{'infer img/s':>11} {'GFLOP/step':>10} {'GFLOP/s':>8} {'of peak':>7} {'peak MB':>8}")
        for size in args.sizes:
            for width in args.widths:
                for precision in args.precisions:
                    r = bench(device, size, width, args.batch, precision, args.steps,
                              args.channels_last, args.compile)
                    peak = peaks.get(precision if precision in peaks else "fp32")
                    frac = r["achieved_gflops"] * 1e9 / peak if peak else float("nan")
                    print(f"{name:6} {size:4d} {width:5.2f} {precision:>4} {r['step_s']:7.2f} "
                          f"{r['train_ips']:11.1f} {r['infer_ips']:11.1f} "
                          f"{r['gflop_per_step']:10.1f} {r['achieved_gflops']:8.1f} "
                          f"{frac:7.1%} {r['peak_mb']:8.0f}", flush=True)


if __name__ == "__main__":
    main()

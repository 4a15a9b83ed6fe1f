"""Speed of the AnoSeg training step and of inference, with achieved FLOP/s.

Two modes. The grid (default) prints, for each device (CPU, and CUDA when present), image size,
width and precision: seconds per training step, training images/s, inference images/s, peak
memory, and the FLOP/s of the training step as a fraction of a matrix-multiply peak measured in
the same run.

    python scripts/benchmark.py                       # CPU: 128 and 256, width 1.0, batch 16
    python scripts/benchmark.py --sizes 128 --widths 0.25 1.0 --precisions fp32 bf16

``--config`` takes one config's training step (e.g. the recipe, configs/cpu_unseen.yaml) and
prints, in one run, its seconds per step before and after each speed switch, one row per switch
added (``SWITCHES``): the rows take turns, ``--repeats`` rounds of ``--steps`` steps each, and the
median is printed, so a load on a shared machine slows every row alike (the range and the
process CPU seconds per step are printed too). With it: the achieved FLOP/s as a fraction of the
fp32 and bf16 matrix-multiply peaks measured in the same run, the data loader (its synthesis time
per batch, and how long the step waits on it with ``data.num_workers`` workers), and with
``--compile`` a torch.compile row (its compile time printed apart, measured with an empty
compile cache unless ``--warm-compile-cache``).

    python scripts/benchmark.py --config configs/cpu_unseen.yaml --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

from anoseg.config import AnoSegConfig, load_config
from anoseg.data.training_data import (StepSampler, SyntheticAnomalyDataset, make_train_loader,
                                       synthetic_batch)
from anoseg.engine import LossWindow
from anoseg.inference import predict_anomaly_maps
from anoseg.runtime import resolve_precision
from anoseg.training import create_train_state, set_learning_rates, train_step


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
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per measurement (grid: 3; --config: 5 per round)")
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--config", default=None,
                        help="the switch table of this config's training step (see above)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="--config: overrides, e.g. train.batch_size=8")
    parser.add_argument("--repeats", type=int, default=3, help="--config: rounds of the rows")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="--config --compile: keep torch.compile's usual cache")
    args = parser.parse_args()
    if args.config is not None:
        args.steps = args.steps or 5
        run_switches(args)
        return
    args.steps = args.steps or 3
    run_grid(args)


def run_grid(args: argparse.Namespace) -> None:
    """The default mode: the grid of devices, sizes, widths and precisions."""
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


# --------------------------------------------------------------------------- --config: the switches


SWITCHES = (
    ("before: EMA loop, losses read each step", dict(foreach_ema=False, read_losses=True)),
    ("+ foreach EMA", dict(foreach_ema=True, read_losses=True)),
    ("+ losses read at log lines = after (defaults)", dict(foreach_ema=True, read_losses=False)),
    ("+ fused Adam (train.adam=fused; not a default)",
     dict(foreach_ema=True, read_losses=False, adam="fused")),
)
"""The rows of ``--config``, each one more speed switch than the row above: ``foreach_ema`` and
``read_losses`` are :func:`anoseg.training.train_step`'s (the defaults give the same bits as
the first row), ``adam`` is ``train.adam`` (``fused`` rounds differently, so it is opt-in)."""

AFTER = 2
"""The row of the defaults (the data loader is measured with it)."""

COMPILE_ROW = ("+ torch.compile (train.compile=true; not a default)",
               dict(foreach_ema=True, read_losses=False, compile=True))


class SwitchRow:
    """One row: its own seeded networks (``cfg`` with the row's ``train.adam`` and
    ``train.compile``), stepped like the training loop steps them (learning rates set, losses
    read every ``train.log_every`` steps through :class:`anoseg.engine.LossWindow` when the
    step does not read them)."""

    def __init__(self, name: str, cfg: AnoSegConfig, switches: dict,
                 device: torch.device) -> None:
        self.name, self.device = name, device
        self.read_losses = switches["read_losses"]
        self.foreach_ema = switches["foreach_ema"]
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, adam=switches.get("adam", cfg.train.adam),
            compile=switches.get("compile", False)))
        self.amp_dtype = resolve_precision(self.cfg.train.precision, device)
        self.state = create_train_state(self.cfg, device)
        self.window = LossWindow()
        self.seconds: List[float] = []
        self.cpu_seconds: List[float] = []

    def step(self, batch: Dict[str, torch.Tensor]) -> None:
        set_learning_rates(self.state, self.cfg.train)
        step = self.state.step
        self.window.add(step, train_step(
            self.state, batch, self.cfg.train, device=self.device, amp_dtype=self.amp_dtype,
            channels_last=self.cfg.train.channels_last, read_losses=self.read_losses,
            foreach_ema=self.foreach_ema))
        if (step + 1) % self.cfg.train.log_every == 0:
            self.window.read()

    def time_steps(self, batch: Dict[str, torch.Tensor], steps: int) -> None:
        """``steps`` steps, their wall and process-CPU seconds per step appended."""
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(batch)
        self.window.read()
        _sync(self.device)
        self.seconds.append((time.perf_counter() - wall) / steps)
        self.cpu_seconds.append((time.process_time() - cpu) / steps)


def recipe_batch(cfg: AnoSegConfig, device: torch.device) -> Dict[str, torch.Tensor]:
    """One training batch of ``cfg``'s size and synthesis, made once (data loading is measured
    apart, :func:`loader_wait`)."""
    size, batch = cfg.data.image_size, cfg.train.batch_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    data = synthetic_batch(images, cfg.synthesis, seed=0,
                           keep_clean=cfg.train.rec_target == "clean")
    return {key: value.to(device) for key, value in data.items()}


def compile_warm_up(row: SwitchRow, batch: Dict[str, torch.Tensor]) -> List[float]:
    """The first three steps of a compiled row, each timed (the compilation happens there)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        row.step(batch)
        row.window.read()
        _sync(row.device)
        times.append(time.perf_counter() - start)
    return times


def loader_wait(cfg: AnoSegConfig, row: SwitchRow, steps: int, workers: int
                ) -> Dict[str, float]:
    """``row``'s training steps fed by the data loader of ``cfg`` with ``workers`` workers
    (synthesis of random images): the seconds per step they wait on the loader (with 0
    workers: the synthesis in this process), and their seconds per step with the data."""
    size, batch = cfg.data.image_size, cfg.train.batch_size
    images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    dataset = SyntheticAnomalyDataset(images, size, cfg.synthesis,
                                      keep_clean=cfg.train.rec_target == "clean")
    iterator = iter(make_train_loader(dataset, StepSampler(64, batch, seed=1), batch, workers))
    row.step(next(iterator))  # workers started, first batch made
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        data = next(iterator)
        waited += time.perf_counter() - tick
        row.step({key: value.to(row.device) for key, value in data.items()})
    row.window.read()
    _sync(row.device)
    return {"wait_s": waited / steps, "step_with_data_s": (time.perf_counter() - start) / steps}


def step_gflop(row: SwitchRow, batch: Dict[str, torch.Tensor]) -> float:
    """GFLOP of one training step (``torch.utils.flop_counter``, on an uncompiled row)."""
    with FlopCounterMode(display=False) as counter:
        row.step(batch)
        row.window.read()
    return counter.get_total_flops() / 1e9


def fresh_compile_cache() -> str:
    """Point torch.compile's caches at a new empty folder, so compile time is measured cold."""
    folder = tempfile.mkdtemp(prefix="anoseg-benchmark-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    return folder


def run_switches(args: argparse.Namespace) -> None:
    """``--config``: the switch table (see the module docstring).

    Long: the sequence of measurements (peaks, rows, round robin, compile, data, FLOPs) and
    the table read best in one place."""
    device = torch.device(args.devices[0] if args.devices else "cpu")
    cfg = load_config(args.config, list(args.set) + [f"train.device={device.type}"])
    if args.compile and not args.warm_compile_cache:
        print(f"torch.compile cache: {fresh_compile_cache()} (empty: compile time is cold)")
    amp_dtype = resolve_precision(cfg.train.precision, device)
    t = cfg.train
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; "
          f"{args.config} {' '.join(args.set)}: {cfg.data.image_size} px, width "
          f"{cfg.model.width}, map_skips {cfg.model.map_skips}, batch {t.batch_size}, precision "
          f"{t.precision} -> {amp_dtype or 'fp32'}, channels_last {t.channels_last}, EMA "
          f"{t.ema_decay}, seg_loss {t.seg_loss}, log_every {t.log_every}")
    peaks = {name: matmul_peak(device, dtype) / 1e9
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul peak (2048x2048, this run): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 "
          f"{peaks['bf16']:.0f} GFLOP/s")
    batch = recipe_batch(cfg, device)
    rows = [SwitchRow(name, cfg, switches, device) for name, switches in SWITCHES]
    gflop = step_gflop(rows[AFTER], batch)
    compile_times = None
    if args.compile:
        rows.append(SwitchRow(COMPILE_ROW[0], cfg, COMPILE_ROW[1], device))
        compile_times = compile_warm_up(rows[-1], batch)
    for row in rows:  # warm-up
        row.time_steps(batch, 1)
        row.seconds.clear(), row.cpu_seconds.clear()
    for round_ in range(args.repeats):  # round robin: a load on the machine hits every row
        for i in range(len(rows)):  # alike; each round starts one row later
            rows[(round_ + i) % len(rows)].time_steps(batch, args.steps)
    print_switch_table(rows, gflop, peaks)
    if compile_times is not None:
        steady = statistics.median(rows[-1].seconds)
        print(f"torch.compile: first three steps {', '.join(f'{s:.1f}' for s in compile_times)} "
              f"s; compile time about {sum(compile_times) - 3 * steady:.0f} s (not in s/step)")
    without = statistics.median(rows[AFTER].seconds)
    for workers in sorted({0, cfg.data.num_workers}):
        data = loader_wait(cfg, rows[AFTER], args.steps * args.repeats, workers)
        mark = " (the config's)" if workers == cfg.data.num_workers else ""
        print(f"data, {workers} loader workers{mark}: the 'after' step waited "
              f"{data['wait_s']:.3f} s per step on the loader; {data['step_with_data_s']:.3f} "
              f"s/step with the data ({without:.3f} without)")


def print_switch_table(rows: List[SwitchRow], gflop: float, peaks: Dict[str, float]) -> None:
    """Median s/step of each row (and its range over the rounds), CPU seconds per step,
    steps/s, speed-up over the first row, GFLOP/s and the fractions of the two peaks."""
    print(f"{'row':50} {'s/step':>7} {'(min-max)':>13} {'cpu s':>6} {'steps/s':>7} "
          f"{'vs before':>9} {'GFLOP/s':>8} {'of bf16':>7} {'of fp32':>7}   ({gflop:.1f} "
          f"GFLOP/step)")
    before = statistics.median(rows[0].seconds)
    for row in rows:
        step_s = statistics.median(row.seconds)
        achieved = gflop / step_s
        print(f"{row.name:50} {step_s:7.3f} {min(row.seconds):6.3f}-{max(row.seconds):6.3f} "
              f"{statistics.median(row.cpu_seconds):6.3f} {1 / step_s:7.2f} "
              f"{before / step_s:8.2f}x {achieved:8.1f} {achieved / peaks['bf16']:7.1%} "
              f"{achieved / peaks['fp32']:7.1%}", flush=True)


if __name__ == "__main__":
    main()

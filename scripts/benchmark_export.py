"""Inference speed of an exported model on the CPU: ONNX Runtime and TorchScript beside
PyTorch (anoseg.inference), images/s, same network, same batch, same thread count.

The network is built from a config (random weights: the speed does not depend on them) or
loaded from a run (a single generator, not an ensemble). The exported graphs hold only what
their outputs need, so the unused reconstruction decoder is gone from them; "PyTorch, map
decoder only" is the eager model without it, the fair comparison of runtimes. The outputs
are compared too (max map difference against anoseg.inference's).

    OMP_NUM_THREADS=1 python scripts/benchmark_export.py                 # cpu_real's network
    python scripts/benchmark_export.py --config configs/paper.yaml --batch 4 --repeats 2
    python scripts/benchmark_export.py --run runs/demo_texture

Needs ``pip install 'anoseg-torch[export]'`` for ONNX Runtime.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from anoseg.config import load_config
from anoseg.export import WRITERS, DeployedAnoSeg
from anoseg.extras import require_extra
from anoseg.inference import load_model, predict_anomaly_scores
from anoseg.metrics import image_scores
from anoseg.models.factory import build_generator

REPO = Path(__file__).resolve().parents[1]


def images_per_second(run: Callable[[], object], batch: int, repeats: int) -> float:
    run()  # warm-up (ONNX Runtime plans its memory on the first call)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu_real.yaml"),
                        help="config whose network is timed (default configs/cpu_real.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. model.width=1.0")
    parser.add_argument("--run", default=None,
                        help="time this run's network instead (a single run)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    require_extra("export", "scripts/benchmark_export.py")
    import onnxruntime as ort

    if args.run:
        model = load_model(args.run, "cpu")
        generator, cfg = model.generator, model.config
    else:
        cfg = load_config(args.config, args.overrides)
        torch.manual_seed(0)
        generator = build_generator(cfg).eval()
    size = cfg.data.image_size
    network = DeployedAnoSeg(generator, "max").eval()
    images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        onnx_path, ts_path = Path(folder) / "m.onnx", Path(folder) / "m.pt"
        WRITERS["onnx"](network, images[:2], {"outputs": ""}, onnx_path)
        WRITERS["torchscript"](network, images[:2], {"outputs": ""}, ts_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit: deprecated upstream
            scripted = torch.jit.load(str(ts_path))
        feed = {"images": images.numpy()}

        def pytorch():
            maps, logits = predict_anomaly_scores(generator, images, batch_size=args.batch)
            return maps, image_scores(logits, ["max"])["max"]

        map_only = copy.deepcopy(generator)
        map_only.reconstruction_decoder = None  # what the exported graphs keep (see docs)
        same_graph = DeployedAnoSeg(map_only, "max").eval()

        def pytorch_same_graph():
            with torch.no_grad():
                return same_graph(images)

        def torchscript():
            with torch.no_grad():
                return scripted(images)

        runners: Dict[str, Callable[[], object]] = {
            "PyTorch (anoseg.inference)": pytorch,
            "PyTorch, map decoder only": pytorch_same_graph,
            "TorchScript": torchscript,
            "ONNX Runtime": lambda: session.run(None, feed)}
        reference = pytorch()[0].numpy()
        print(f"network: {size}x{size}, width {cfg.model.width}, map_skips "
              f"{cfg.model.map_skips}; batch {args.batch}, {args.repeats} repeats; torch "
              f"{torch.__version__} and onnxruntime {ort.__version__}, {threads} thread(s)")
        print(f"{'runtime':28} {'img/s':>8} {'ms/img':>8} {'max map diff':>13}")
        # the same images, in turn, so a busy machine slows all of them alike
        for name, run in runners.items():
            speed = images_per_second(run, args.batch, args.repeats)
            out = run()
            got = out[0] if isinstance(out, (list, tuple)) else out
            got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
            print(f"{name:28} {speed:8.1f} {1000 / speed:8.1f} "
                  f"{float(np.abs(got - reference).max()):13.2g}", flush=True)


if __name__ == "__main__":
    main()

"""Where and how tensors run: the device, the autocast precision, and torchrun's processes.

Shared by training and inference (nothing here trains or loads a model).

Example:
    >>> device = resolve_device("cpu")
    >>> resolve_precision("fp32", device) is None
    True
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from anoseg.errors import ConfigError


def resolve_device(name: Union[None, str, torch.device] = "auto") -> torch.device:
    """``auto`` (or ``None``) picks CUDA, then MPS, then CPU; an explicit device that is absent
    is a :class:`ConfigError`."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use 'auto' "
                          "or 'cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device={name!r} but MPS is not available here")
    return device


_FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""x86 CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic; on aarch64 the flag is ``bf16``."""

SLOW_BF16_MESSAGE = ("train.precision='bf16' on a CPU without native bf16 (no AMX or AVX512-BF16 "
                     "in /proc/cpuinfo): PyTorch emulates it, measured 15x slower than fp32 on a "
                     "2-core AMD EPYC (docs/performance.md). Use train.precision=auto (bf16 only "
                     "where the CPU has it) or fp32.")


@functools.lru_cache(maxsize=1)
def _read_cpuinfo() -> str:
    """``/proc/cpuinfo`` once per process (empty where it does not exist)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_fast_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU does bf16 arithmetic natively (Intel AMX / AVX512-BF16, Arm BF16).

    Read from ``/proc/cpuinfo`` (``cpuinfo`` overrides it, for tests); ``False`` where that file
    does not exist (macOS, Windows): bf16 autocast is then not chosen automatically.
    """
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return any(f in flags for f in _FAST_BF16_FLAGS) or "bf16" in flags
    return False


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or ``None`` for plain fp32.

    ``auto``: bf16 (or fp16 without bf16 support) on CUDA; bf16 on a CPU with native bf16
    (:func:`cpu_has_fast_bf16`, 2-3x faster than fp32 there); fp32 elsewhere. An explicit
    ``bf16`` on a CPU without native bf16 is honoured with a warning (it is much slower).
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision='fp16' is for CUDA; on CPU use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(SLOW_BF16_MESSAGE, RuntimeWarning, stacklevel=2)
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32 (``None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A gradient scaler for fp16 autocast on CUDA; ``None`` otherwise (bf16 and fp32 need none)."""
    if device.type != "cuda":
        return None
    amp_dtype = resolve_precision(precision, device)
    return (torch.amp.GradScaler("cuda")
            if amp_dtype == torch.float16 and device.type == "cuda" else None)


# --------------------------------------------------------------------------- torchrun


@dataclass
class DistributedContext:
    """Where this process sits in a ``torchrun`` job (world size 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistributedContext:
    """Join the process group that ``torchrun`` set up (NCCL on CUDA, gloo on CPU).

    Without torchrun's environment variables this is a no-op returning world size 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistributedContext(rank, local_rank, world_size)


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one (a no-op otherwise).

    Every rank calls it once its work is done: a gloo process that exits with the group
    still open can abort at interpreter shutdown ("terminate called without an active
    exception"), failing the whole torchrun job after training succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(ctx: DistributedContext, device_name: str) -> torch.device:
    """This process's device: its own GPU under a CUDA torchrun job, else
    :func:`resolve_device`."""
    if ctx.enabled and torch.cuda.is_available() and device_name in ("auto", "cuda"):
        return torch.device("cuda", ctx.local_rank)
    return resolve_device(device_name)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over processes (a copy), or ``tensor`` itself when run alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def world_size() -> int:
    """Processes in the job (1 when run alone)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_max_flags(flags: list, device: torch.device) -> list:
    """Each boolean flag's maximum over processes (so every process acts alike)."""
    import torch.distributed as dist

    values = torch.tensor([float(f) for f in flags],
                          device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(f) for f in values.tolist()]


def barrier(ctx: DistributedContext) -> None:
    """Wait for every process of a torchrun job (a no-op when run alone)."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap_ddp(module: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """``module`` in DistributedDataParallel (batch norms synchronised with ``sync_batchnorm``)."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("train.sync_batchnorm=true needs CUDA (PyTorch's SyncBatchNorm "
                              "runs on GPUs only); set it to false for CPU runs")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The plain model inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile

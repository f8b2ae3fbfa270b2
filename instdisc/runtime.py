"""Where and how a stage runs: device choice, seeding, and torchrun/DDP process groups."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is available, else mps, else cpu.

    An explicitly requested accelerator that is absent is an error, not a silent CPU run.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {name!r} but CUDA is not available on this machine; "
                         "use device: auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device = {name!r} but MPS is not available on this machine")
    return device


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPUs with native bf16 matmul/conv


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX, from /proc/cpuinfo's flags;
    `cpuinfo` is its text, for tests). Elsewhere bf16 autocast on the CPU is emulated and slower
    than fp32, so False (also when /proc/cpuinfo cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`: the shuffle, identical on every rank, follows from it."""
    return (seed * 1_000_003 + epoch) % 2**63


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank `rank` in epoch `epoch`, set after the shuffle: augmentation and NCE
    noise then differ between ranks (the same draws on every rank would repeat the same crops
    and negatives world_size times per step) and are reproduced on resume (DESIGN.md)."""
    return (epoch_seed(seed, epoch) * 1_000_003 + 1 + rank) % 2**63


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_name != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    log.info("distributed: rank %d/%d (local rank %d)", rank, world_size, local_rank)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def inside_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process that torchrun started (it sets LOCAL_RANK and WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or "WORLD_SIZE" in env


def launch_command(module: str, args: Sequence[str], nproc_per_node: int, nnodes: int = 1,
                   rdzv_endpoint: str = "", environ: Mapping[str, str] | None = None
                   ) -> list[str] | None:
    """The torchrun command that runs `python -m <module> <args>` once per process, or None
    when this process should just run (one process per node, or already under torchrun).

    One machine: `--standalone` (a local rendezvous on a free port). Several: every machine
    runs the same command and they meet at the c10d rendezvous `rdzv_endpoint`
    (torchrun assigns the node ranks). torchrun itself is `python -m torch.distributed.run`
    of this interpreter, so the workers use the same environment.
    """
    if (nproc_per_node <= 1 and nnodes <= 1) or inside_torchrun(environ):
        return None
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={module}"]
    else:
        command.append("--standalone")
    return [*command, "-m", module, *args]


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

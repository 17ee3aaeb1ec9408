"""Multi-process evaluation and segmentation on ``torch.distributed``, started by ``torchrun``.

``torchrun --nproc-per-node N -m naclip eval ...`` (multi-node: torchrun's own ``--nnodes``, ``--node-rank``,
``--rdzv-endpoint`` / ``--master-addr`` flags) starts N copies of the command; each reads its place from the
environment variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
A plain ``python -m naclip ...`` (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) is a world of one and never touches
``torch.distributed``.

* Process group: ``nccl`` when the ranks run on CUDA (each rank on ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
* Work split: rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...`` of the full, deterministic item list
  (:meth:`Distributed.shard`), so every rank agrees on it without communicating and the shards differ in size
  by at most one.
* Results: integer counts are summed exactly with ``all_reduce`` (:meth:`Distributed.sum_int64`); small Python
  values (per-rank totals, a fatal error) are exchanged with ``all_gather_object``
  (:meth:`Distributed.gather`). Rank 0 prints and writes the results.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, TypeVar

import numpy as np

__all__ = ["Distributed", "DistributedError", "process_group", "world_from_env"]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """The torchrun environment is inconsistent, or the process group could not be set up; one-line message."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node), the device it
    runs on and the process-group backend (``None`` for a world of one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[str] = None
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints tables and summaries and writes result files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> List[T]:
        """This rank's items: ``items[rank::world_size]``."""
        return list(items[self.rank::self.world_size])

    def sum_int64(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``array`` (int64) over all ranks, exact; every rank gets it."""
        array = np.ascontiguousarray(array, dtype=np.int64)
        if not self.enabled:
            return array.copy()
        import torch
        import torch.distributed as dist

        # nccl reduces CUDA tensors only; gloo CPU ones.
        tensor = torch.from_numpy(array.copy()).to(self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def gather(self, value: Any) -> List[Any]:
        """``[value of rank 0, value of rank 1, ...]`` on every rank (small picklable values only)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def _env_int(name: str, default: Optional[int] = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise DistributedError(f"WORLD_SIZE is set but {name} is not: start multi-process runs with torchrun "
                                   "(torchrun --nproc-per-node N -m naclip ...)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def world_from_env(device: Optional[str] = None) -> Distributed:
    """Read the job layout torchrun put in the environment, and choose this rank's device and backend.

    ``device``: the ``--device`` option. ``None`` means CUDA when available, else the CPU. In a multi-process
    world a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per rank); an explicit index is
    refused there, because two ranks would share one GPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        return Distributed(device=device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None:
            raise DistributedError(f"--device {device}: with torchrun every rank uses cuda:LOCAL_RANK; pass "
                                   "--device cuda (or nothing)")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                                   "device(s): start at most that many processes per node")
        return Distributed(rank, world_size, local_rank, f"cuda:{local_rank}", "nccl")
    return Distributed(rank, world_size, local_rank, device, "gloo")


@contextlib.contextmanager
def process_group(device: Optional[str] = None) -> Iterator[Distributed]:
    """This process's :class:`Distributed`, with the process group initialised for the duration when the world
    has more than one process (``init_method="env://"``: torchrun's ``MASTER_ADDR`` / ``MASTER_PORT``).

    The group is destroyed on exit, also after an error, so a failing rank does not leave the others hanging in
    a later collective (they fail at theirs instead). A default group that already exists (a program that set up
    ``torch.distributed`` itself and calls ``naclip.cli.main`` several times) is used as it is and left alone.
    """
    world = world_from_env(device)
    if not world.enabled:
        yield world
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (world.rank, world.world_size):
            raise DistributedError(f"the existing process group has rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, the environment says {world.rank} of {world.world_size}")
        yield world
        return
    if world.backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(world.backend, init_method="env://", rank=world.rank, world_size=world.world_size)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the {world.backend} process group as rank {world.rank} of "
                               f"{world.world_size}: {' '.join(str(exc).split())}") from None
    try:
        yield world
    finally:
        dist.destroy_process_group()

"""Running a stage under ``torchrun``: the rank and world of this process, and which share of the work is its own.

Every stage entry point runs unchanged under ``torchrun --nproc_per_node N [--nnodes M ...] sdrpn <stage> ...``.
The work is cut into units (a stage's batches, or the attention store's chunks) numbered as a single process
numbers them; rank ``r`` of ``w`` takes the units ``u`` with ``u % w == r`` and writes each as its own part, and
rank 0 assembles the artifact from the parts in unit order. So the artifact is the single-process one, byte for
byte, at any world size, and a rerun after any rank died redoes only the missing units (with any world size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# a rank waits for the slowest one at the end of a stage: long teacher phases must not hit the default 30 min
TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: its rank, the world size and its rank on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        """Whether unit ``unit`` (a batch, a chunk) is this rank's work."""
        return unit % self.world == self.rank


def env_info() -> DistInfo:
    """Rank and world as ``torchrun`` sets them in the environment (before any process group exists)."""
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def dist_info() -> DistInfo:
    """Rank and world size of the current process group (0 / 1 when not distributed)."""
    # torch is imported where it is used: stages/common.py reads env_info() in every stage, and the light
    # ones (world, prepare, label) must not load torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def init_distributed() -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (nccl on GPUs, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl", timeout=TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return dist_info()


def all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (a no-op in a single process)."""
    if info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(info: DistInfo) -> None:
    """Leave the process group at the end of a stage: every rank waits for the others first."""
    if info.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

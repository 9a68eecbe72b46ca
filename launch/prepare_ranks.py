"""The ranks of a multi-node ``sagan prepare``: who launched it, and the two collectives it needs.

``trainer.runtime.distributed.init_runtime`` recognises the launcher (torchrun, mpiexec, SLURM, ...) as it does
for training. Started by MPI (mpiexec, or srun with --mpi=pmix|pmi2), the collectives go through
mpi4py; otherwise through torch.distributed (gloo). Ranks meet twice: after rank 0 planned the work,
and at the end, when rank 0 commits the manifest; in between each rank makes its own shards.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from data_pipeline.prepare import RankGroup
from trainer.runtime.distributed import Runtime, broadcast_object

# Ranks wait at the end for the slowest one; a rank that dies ends the job through its launcher.
COLLECTIVE_TIMEOUT_SECONDS = 12 * 3600
MPI_POLL_SECONDS = 0.05


class MpiRanks:
    def __init__(self, comm: Any):
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    def broadcast(self, value: Any) -> Any:
        self.wait_for_all()
        return self.comm.bcast(value, root=0)

    def gather(self, value: Any) -> list[Any] | None:
        self.wait_for_all()
        return self.comm.gather(value, root=0)

    def wait_for_all(self) -> None:
        """MPICH's collectives spin while they wait; a barrier polled with sleeps leaves the core of a
        rank that is early (a finished rank, or every rank while rank 0 plans) to the others."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(MPI_POLL_SECONDS)


class TorchDistributedRanks:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def broadcast(self, value: Any) -> Any:
        return broadcast_object(value)

    def gather(self, value: Any) -> list[Any] | None:
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out


def prepare_ranks(runtime: Runtime) -> RankGroup | None:
    """The rank group of this prepare, or None when it runs as one process."""
    if not runtime.distributed:
        return None
    if runtime.launcher in ("mpi", "slurm") and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() == runtime.world_size:
            return MpiRanks(MPI.COMM_WORLD)
    return TorchDistributedRanks(runtime.rank, runtime.world_size)

"""Process-group set-up and tear-down. The launcher's environment is read here and nowhere else.

Launchers, in the order they are recognised:

- ``torchrun`` (single- or multi-node, elastic): ``TORCHELASTIC_RUN_ID``, ``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, and
  ``TORCHELASTIC_RESTART_COUNT`` (how often the agent restarted its workers).
- ``deepspeed`` (its ``launch`` module or its MPI helper): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT`` and its own ``LOCAL_SIZE``. Without ``LOCAL_SIZE`` the same variables
  are taken as set by hand or by a job controller (launcher ``env``).
- ``mpiexec`` / ``srun`` with MPI (``PMI_RANK``, ``PMIX_RANK``, ``OMPI_COMM_WORLD_RANK``, or an ``srun``
  step of several tasks): rank and world size from ``MPI.COMM_WORLD``, the local rank from a
  shared-memory split of it, and the rendezvous address and a free port chosen by rank 0 and
  broadcast over MPI (``MASTER_ADDR``/``MASTER_PORT`` win when set). mpi4py is imported only then.
- none of these: one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.runtime import collectives

log = logging.getLogger("trainer")

MPI_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str  # single | torchrun | deepspeed | env | mpi | slurm
    local_world_size: int = 1  # processes of this job on this machine
    restart_count: int = 0  # torchrun: times the elastic agent restarted the workers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None = None  # None: init_process_group reads MASTER_ADDR/MASTER_PORT itself
    master_port: int | None = None
    restart_count: int = 0


def _launch_env() -> LaunchEnv:
    """Who this process is, from the environment the launcher left."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        launch = _from_rank_variables("torchrun", env.get("LOCAL_WORLD_SIZE"))
        return dataclasses.replace(launch, restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_rank_variables("deepspeed" if "LOCAL_SIZE" in env else "env", env.get("LOCAL_SIZE"))
    if any(name in env for name in MPI_RANK_VARIABLES):
        return _from_mpi("mpi")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return _from_slurm()
    return LaunchEnv("single", 0, 0, 1, 1)


def _from_rank_variables(launcher: str, local_world_size: str | None) -> LaunchEnv:
    env = os.environ
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world_size > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise RuntimeError(
            f"RANK={rank} and WORLD_SIZE={world_size} are set but MASTER_ADDR/MASTER_PORT are not: "
            "set both to rank 0's address and a free port, or start the job with torchrun"
        )
    local = int(local_world_size) if local_world_size else 1
    return LaunchEnv(launcher, rank, int(env.get("LOCAL_RANK", 0)), world_size, local)


def _from_mpi(launcher: str) -> LaunchEnv:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_world_size = node.Get_rank(), node.Get_size()
    node.Free()
    hosts = world.allgather(MPI.Get_processor_name())
    rendezvous: tuple[str, int] | str | None = None
    if world.Get_rank() == 0:
        try:
            rendezvous = (
                os.environ.get("MASTER_ADDR") or _address_facing(hosts),
                int(os.environ.get("MASTER_PORT") or _free_port()),
            )
        except OSError as err:  # said to every rank, so none waits for an address that will not come
            rendezvous = (
                f"rank 0 could not choose a rendezvous address ({err}): set MASTER_ADDR and MASTER_PORT"
            )
    rendezvous = world.bcast(rendezvous, root=0)
    if isinstance(rendezvous, str):
        raise RuntimeError(rendezvous)
    master_addr, master_port = rendezvous
    return LaunchEnv(
        launcher, world.Get_rank(), local_rank, world.Get_size(), local_world_size, master_addr, master_port
    )


def _address_facing(hosts: list[str]) -> str:
    """127.0.0.1 when every rank runs here, else this machine's address on the route to another rank's."""
    others = [host for host in hosts if host != hosts[0]]
    if not others:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(others[0]), 9))  # UDP: the route is chosen, nothing is sent
        return probe.getsockname()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _from_slurm() -> LaunchEnv:
    """An ``srun`` step: through MPI when srun wired MPI up (--mpi=pmix|pmi2), else from SLURM_* alone."""
    env = os.environ
    tasks = int(env["SLURM_NTASKS"])
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == tasks:
        return _from_mpi("slurm")
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise RuntimeError(
            f"srun started {tasks} tasks but MPI sees a world of {MPI.COMM_WORLD.Get_size()}: run srun with "
            "--mpi=pmix (or pmi2), or export MASTER_ADDR (the first node) and MASTER_PORT as launch/slurm_sbatch.sh does"
        )
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    return LaunchEnv(
        "slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), tasks, max(1, tasks // nodes)
    )


def init_runtime(device: str = "auto", timeout_seconds: int = 600) -> Runtime:
    """Join the job's process group (gloo on CPU, NCCL on CUDA) and say who this process is.

    ``timeout_seconds`` bounds every collective: a rank that stops answering makes the others fail
    with an error after that long instead of waiting forever.
    """
    launch = _launch_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device=cuda but {no_cuda_reason()}: use trainer.device=cpu or auto")
        # One index per rank on every launch path: the local rank, or 0 where each rank sees one GPU.
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        torch_device = torch.device("cuda", torch.cuda.current_device())
        use_fast_cuda_kernels()
    else:
        torch_device = torch.device("cpu")
        _share_cores(launch.local_world_size)
    if launch.world_size > 1 and not dist.is_initialized():
        _choose_gloo_interface()
        if launch.master_addr is not None:
            # One consistent picture for everything that reads the environment later (DeepSpeed does).
            os.environ.update(
                MASTER_ADDR=launch.master_addr,
                MASTER_PORT=str(launch.master_port),
                RANK=str(launch.rank),
                LOCAL_RANK=str(launch.local_rank),
                WORLD_SIZE=str(launch.world_size),
            )
        # A NCCL collective that fails or times out tears this rank down instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        collectives.enable()  # the stall watchdog's dumps name the collective a rank waits in
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_seconds)
        dist.init_process_group(
            backend,
            store=_store_of_this_attempt(launch, timeout),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
        log.info(
            "rank %d/%d (local %d/%d) via %s, %s on %s",
            launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.launcher,
            backend, torch_device,
        )  # fmt: skip
    return Runtime(
        launch.rank,
        launch.local_rank,
        launch.world_size,
        torch_device,
        launch.launcher,
        launch.local_world_size,
        launch.restart_count,
    )


def _store_of_this_attempt(launch: LaunchEnv, timeout: datetime.timedelta) -> dist.Store | None:
    """The job's store for this generation of workers; None: ``init_process_group`` makes it (env://).

    Under torchrun the workers share the elastic agent's TCPStore by default, and that store outlives
    a restart: torch (2.5 on) adds no per-attempt prefix to it (pytorch/pytorch#135712), so a
    restarted generation's groups read the dead generation's keys (gloo connects to their closed
    ports: "connectFullMesh failed ... Connection refused", or waits forever). Every group of the job
    is made from the default group's store, so one prefix by ``TORCHELASTIC_RESTART_COUNT`` scopes
    them all. A scope already used (an agent whose count disagrees: a node that joined later) is
    refused, naming the variable that avoids sharing, rather than left to hang.
    """
    if launch.launcher != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    scope = f"sagan/attempt_{launch.restart_count}"
    joined = agent_store.add(f"{scope}/joined", 1)
    if joined > launch.world_size:
        raise ConfigError(
            f"rank {launch.rank}: torchrun's shared store already holds restart attempt "
            f"{launch.restart_count} of this job (its agents disagree on TORCHELASTIC_RESTART_COUNT): "
            "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment"
        )
    return dist.PrefixStore(scope, agent_store)


def no_cuda_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False here, in words."""
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is empty"
    return (
        f"no CUDA device is visible (PyTorch built for CUDA {torch.version.cuda}: no NVIDIA driver or "
        "device, a driver older than that, or a container started without the NVIDIA runtime)"
    )


def use_fast_cuda_kernels() -> None:
    """cuDNN picks the fastest convolution algorithm for the step's fixed shapes, and fp32 matmuls and
    convolutions use TF32 tensor cores (10-bit mantissa products, fp32 accumulation), as a GAN at this
    scale trains with; bf16/fp16 autocast is unaffected."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _choose_gloo_interface() -> None:
    """gloo binds each group to the address the hostname resolves to unless ``GLOO_SOCKET_IFNAME`` names an
    interface; on many bare-metal nodes that is 127.0.1.1, which other nodes cannot reach. Take NCCL's
    interface when only ``NCCL_SOCKET_IFNAME`` is set, so every group of a rank uses one network."""
    nccl = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if "GLOO_SOCKET_IFNAME" not in os.environ and nccl and not nccl.startswith(("^", "=")):
        os.environ["GLOO_SOCKET_IFNAME"] = nccl.split(",")[0]


def broadcast_object(value: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``value`` (anything picklable) on every rank of ``group``; a collective."""
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def ensure_process_group(runtime: Runtime) -> None:
    """A process group even for one process, for libraries that need one (DeepSpeed's engines)."""
    if not dist.is_initialized():
        for name, value in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
            os.environ.setdefault(name, str(value))  # DeepSpeed reads them
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


NODE_VARIABLES = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")  # torchrun, DeepSpeed's launcher, SLURM
_NODE_GROUP: tuple[dist.ProcessGroup, list[int]] | None = None  # node_group(), made once per process


def node_key() -> str:
    """What tells this node from the job's others: the launcher's node rank where it sets one (two
    torchrun agents on one machine are two nodes), the host name and the network namespace (two
    "hosts" in namespaces of one machine are two nodes too)."""
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        namespace = 0
    launcher = next((f"{name}={os.environ[name]}" for name in NODE_VARIABLES if name in os.environ), "")
    return f"{socket.gethostname()}/{namespace}/{launcher}"


def node_group() -> tuple[dist.ProcessGroup, list[int]]:
    """A gloo group of this job's ranks on this machine, and their ranks (lowest first). A collective
    the first time (every rank must call it); the same group after."""
    global _NODE_GROUP
    if _NODE_GROUP is None:
        keys: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(keys, node_key())
        nodes = [[r for r, k in enumerate(keys) if k == key] for key in dict.fromkeys(keys)]
        group, _ = dist.new_subgroups_by_enumeration(nodes, backend="gloo")
        _NODE_GROUP = group, next(n for n in nodes if dist.get_rank() in n)
    return _NODE_GROUP


def _share_cores(local_world_size: int) -> None:
    """Split this machine's cores between its ranks unless the user chose (OMP_NUM_THREADS)."""
    if local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))


def shutdown(runtime: Runtime, exit_code: int = 0, *, together: bool | None = None) -> None:
    """Leave the job: cleanly after success, at once after a failure. Returns only after a success alone.

    Success (or ``together``: a stop every rank agreed on, such as a pre-emption, whatever the status):
    a barrier (no rank leaves while another still needs it), destroying the group, flushing, then
    ``os._exit`` — gloo sometimes aborts in interpreter teardown after a finished run, and skipping
    teardown avoids that. Failure: no barrier and no goodbye; the process exits at once, so its peers'
    next collective fails on the closed connection (or times out) and every launcher ends the job with
    a non-zero status. Under MPI, ``MPI_Abort`` takes the job down. One process that failed exits at
    once too, rather than in an interpreter teardown that waits for threads (an upload that hangs).
    """
    together = exit_code == 0 if together is None else together
    if dist.is_initialized() and together:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as err:  # a peer failed while we finished: the job did not succeed
            log.error("rank %d: the job failed while leaving the process group: %s", runtime.rank, err)
            exit_code, together = exit_code or 1, False
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    if runtime.launcher in ("mpi", "slurm") and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if together:
            MPI.Finalize()
        else:
            MPI.COMM_WORLD.Abort(exit_code)
    if runtime.distributed or exit_code:  # after a failure, no teardown that waits for a hung upload thread
        os._exit(exit_code)

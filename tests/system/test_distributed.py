"""Several processes on one CPU machine with gloo, started the way users start them.

The centrepiece: two DDP ranks of 16 images end a run with the parameters one process reaches on the
same 32 images — only if the gradients are averaged. Then the same run through the deepspeed
launcher (ZeRO 1, bf16), mpiexec and two torchrun agents (multi-node c10d on 127.0.0.1, surviving a
lost worker by restarting), DDP's per-rank invariants, and workers that die or stop answering, which
must end the job instead of hanging it.

Run as a module (``python -m tests.system.test_distributed``), it is the worker of
``test_ddp_keeps_ranks_in_step`` under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.support.datasets import digits_folder
from tests.support.paths import ROOT
from tests.support.ports import free_port

BIN = Path(sys.executable).parent
SAGAN = str(BIN / "sagan")
# Shared by every run on this machine: DeepSpeed compiles its CPU communication op once (about a minute).
EXTENSIONS = Path(
    os.environ.get("TORCH_EXTENSIONS_DIR") or Path(tempfile.gettempdir()) / "sagan-torch-extensions"
)
TIMEOUT = 600
COLLECTIVE_TIMEOUT = 15  # trainer.timeout_seconds where a test waits for it
HANG = 120  # a job that has not ended this long after a rank failed is hanging
GLOBAL_BATCH = 32
STEPS = 3
TINY = [
    "model.g_channels=8",
    "model.d_channels=8",
    "model.z_dim=32",
    "data.num_workers=0",
    "metrics.port=0",
    "trainer.log_interval=1",
    "trainer.sample_interval=100000",
]
# Convolution biases that feed a batch norm: their true gradient is zero (the norm subtracts the mean),
# so what they get is rounding noise, which Adam scales up to full-size steps of random sign.
BIASES_BEFORE_BATCH_NORM = re.compile(r"^blocks\.block\d+\.(conv1|conv2|shortcut)\.bias$")


def environment(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TORCH_EXTENSIONS_DIR": str(EXTENSIONS),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def start(command: list[str], **extra: str) -> subprocess.Popen:
    """A process in its own session, so that a timeout can end it and everything it started."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish within {timeout}s:\n{output[-3000:]}")
    return process.returncode, output


def run(command: list[str], **extra: str) -> str:
    code, output = finish(start(command, **extra))
    assert code == 0, f"{command} exited with {code}:\n{output[-5000:]}"
    return output


def train_args(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        "configs/smoke.yaml",
        f"data.url={data}",
        f"run.dir={run_dir}",
        f"trainer.global_batch_size={GLOBAL_BATCH}",
        f"trainer.max_steps={STEPS}",
        f"checkpoint.interval_steps={STEPS}",
        *TINY,
        *overrides,
    ]


def wait_for(path: Path, agents: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        for agent in agents:
            if agent.poll() is not None:
                pytest.fail(f"{agent.args} ended early: {agent.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear")
        time.sleep(0.5)


def worker_of(agent: subprocess.Popen) -> psutil.Process:
    (worker,) = [p for p in psutil.Process(agent.pid).children(recursive=True) if "train" in p.cmdline()]
    return worker


def final_state(run_dir: Path, step: int = STEPS) -> tuple[dict, dict]:
    from trainer.checkpoint.format import load_folder

    return load_folder(run_dir / "checkpoints" / f"step_{step}")


@pytest.fixture(scope="module")
def digits32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 digit images: one global batch is one epoch, so W=1 and W=2 see the same 32 images per step
    (not the session's ``digits_data``, whose 1,797 images make an epoch of many steps)."""
    source = digits_folder(tmp_path_factory.mktemp("digits32-source"), GLOBAL_BATCH)
    out = tmp_path_factory.mktemp("data") / "digits32"
    run([SAGAN, "prepare", "--source", f"imagefolder:{source}", "--out", str(out)])
    return out


# --- one process of 32 images == two DDP ranks of 16 ------------------------------------------------


@pytest.mark.slow
def test_two_ddp_ranks_end_where_one_process_ends(digits32, tmp_path):
    """Same seed, same 32 images and noise per step: one process (batch-norm statistics over groups of 16,
    as each rank computes them) and two torchrun ranks of 16 end with the same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([SAGAN, "train", *train_args(digits32, one, "trainer.bn_group_size=16")])
    output = run(["launch/torchrun_single_node.sh", *train_args(digits32, two)], NPROC_PER_NODE="2")
    assert "rank 1/2 (local 1/2) via torchrun, gloo on cpu" in output
    assert "Grad strides do not match bucket view strides" not in output  # DDP's warning on 1x1 weights

    # Logged per step: the all-rank mean loss and the norm of the averaged gradient, the same numbers as
    # one process's (a sum instead of a mean would double the norm; Adam alone would hardly notice).
    from trainer.observability.run_log import read_run_log

    log1, log2 = read_run_log(one).to_pydict(), read_run_log(two).to_pydict()
    assert log1["step"] == log2["step"] == list(range(1, STEPS + 1))
    for column in ("loss_d", "loss_g", "grad_norm_d", "grad_norm_g"):
        np.testing.assert_allclose(log2[column], log1[column], rtol=2e-3, err_msg=column)

    (state1, manifest1), (state2, manifest2) = final_state(one), final_state(two)
    assert (manifest1["world_size"], manifest2["world_size"]) == (1, 2)
    b1, b2 = state1["backend"], state2["backend"]
    g_names, d_names = parameter_names(manifest1)

    # D has no batch norm: every weight agrees to rounding. Had each rank stepped on its own half,
    # or on one rank's gradient, the weights would differ by about Adam's step, 1e-3 here.
    for name in d_names:
        torch.testing.assert_close(
            b2["D"][name], b1["D"][name], rtol=0, atol=5e-5, msg=lambda m, n=name: f"D {n}: {m}"
        )

    # G: the gradients that carry signal agree, so Adam's steps agree element for element, except where
    # a gradient is as small as the rounding difference between summing 32 images and 2x16.
    compared = [name for name in g_names if not BIASES_BEFORE_BATCH_NORM.match(name)]
    assert len(g_names) - len(compared) == 9  # 3 blocks x (conv1, conv2, shortcut)
    assert_rounding_noise_gradients(b1["opt_g"], g_names)
    diff = torch.cat([(b1["G"][n] - b2["G"][n]).abs().flatten() for n in compared])
    assert float((diff <= 1e-5).float().mean()) > 0.97, f"G differs by up to {float(diff.max())}"


def parameter_names(manifest: dict) -> tuple[list[str], list[str]]:
    """G's and D's parameter names in ``parameters()`` order (the optimizer state's order)."""
    from models.sagan import ModelConfig, build_models

    G, D = build_models(ModelConfig(**manifest["config"]["model"]), manifest["num_classes"])
    return [name for name, _ in G.named_parameters()], [name for name, _ in D.named_parameters()]


def assert_rounding_noise_gradients(opt_state: dict, names: list[str]) -> None:
    """Adam with beta1 = 0 keeps the last gradient as exp_avg: the skipped biases' is ~0."""
    gradients = {name: opt_state["state"][index]["exp_avg"] for index, name in enumerate(names)}
    largest = max(float(g.abs().max()) for g in gradients.values())
    for name, gradient in gradients.items():
        if BIASES_BEFORE_BATCH_NORM.match(name):
            assert float(gradient.abs().max()) < 1e-4 * largest, name


# --- the other launchers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepspeed_launcher_zero1_bf16(digits32, tmp_path):
    """`deepspeed --num_gpus 2 $(which sagan) train ...` on CPU: 2 ranks, two engines, full fp32 state."""
    run_dir = tmp_path / "ds"
    args = train_args(
        digits32, run_dir, "trainer.backend=deepspeed", "trainer.zero_stage=1", "trainer.precision=bf16"
    )
    output = run(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            SAGAN,
            "train",
            *args,
            "trainer.max_steps=2",
            "checkpoint.interval_steps=2",
        ]
    )
    assert "rank 1/2 (local 1/2) via deepspeed, gloo on cpu" in output
    state, manifest = final_state(run_dir, step=2)
    assert manifest["world_size"] == 2 and manifest["config"]["trainer"]["backend"] == "deepspeed"
    g_names, _ = parameter_names(manifest)
    backend = state["backend"]
    # Gathered from both ranks' ZeRO partitions: whole fp32 tensors, Adam's moments for every parameter.
    assert all(backend["G"][name].dtype == torch.float32 for name in g_names)
    assert sorted(backend["opt_g"]["state"]) == list(range(len(g_names)))
    for index, name in enumerate(g_names):
        moments = backend["opt_g"]["state"][index]
        assert moments["exp_avg_sq"].shape == backend["G"][name].shape
        assert float(moments["step"]) == 2.0
    assert float(sum(m["exp_avg_sq"].sum() for m in backend["opt_g"]["state"].values())) > 0


@pytest.mark.slow
def test_mpiexec_without_torchrun(digits32, tmp_path):
    """`mpiexec -n 2 sagan train ...`: rank, world size and rendezvous from MPI."""
    run_dir = tmp_path / "mpi"
    output = run(["launch/mpiexec.sh", *train_args(digits32, run_dir)], NPROCS="2")
    assert "rank 1/2 (local 1/2) via mpi, gloo on cpu" in output
    state, manifest = final_state(run_dir)
    assert manifest["world_size"] == 2 and state["step"] == STEPS


def two_nodes(job: str, max_restarts: int) -> dict[str, str]:
    """launch/torchrun_multi_node.sh's environment for one of two single-worker nodes on this machine."""
    return {
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "RDZV_ID": f"{job}-{os.getpid()}",
        "MAX_RESTARTS": str(max_restarts),
    }


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_survive_a_lost_worker(digits32, tmp_path):
    """Two torchrun agents, one worker each, meet at a c10d rendezvous on 127.0.0.1 (--nnodes=2). One
    worker is killed after a checkpoint: both agents restart their workers, which resume and finish."""
    run_dir = tmp_path / "nodes"
    node = two_nodes("test-nodes", max_restarts=1)
    steps = ["trainer.max_steps=12", "checkpoint.interval_steps=4"]
    agents = [
        start(["launch/torchrun_multi_node.sh", *train_args(digits32, run_dir, *steps)], **node)
        for _ in range(2)
    ]
    wait_for(run_dir / "checkpoints" / "LATEST", agents)  # the first checkpoint is committed
    worker_of(agents[1]).kill()
    results = [finish(agent) for agent in agents]
    for code, output in results:
        assert code == 0, output[-5000:]
    output = "".join(output for _, output in results)
    assert "rank 1/2 (local 0/1) via torchrun" in output
    assert re.search(r"resumed from \S+/step_(4|8) at step (4|8)", output), output[-5000:]
    state, manifest = final_state(run_dir, step=12)
    assert manifest["world_size"] == 2 and state["step"] == 12


# --- a failing rank ends the job ----------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_ends_the_job_on_every_node(digits32, tmp_path):
    """kill -9 of one node's worker: that agent fails, and the other node's worker, whose next collective
    finds the connection closed, fails at once too, instead of waiting for a peer that is gone."""
    run_dir = tmp_path / "killed"
    node = two_nodes("test-kill", max_restarts=0)
    args = ["launch/torchrun_multi_node.sh", *train_args(digits32, run_dir, "trainer.max_steps=1000000")]
    agents = [start(args, **node) for _ in range(2)]
    wait_for(run_dir / "log", agents)  # rank 0 logged a step: every rank is training
    worker_of(agents[1]).kill()
    results = [finish(agent, timeout=HANG) for agent in agents]
    assert [code != 0 for code, _ in results] == [True, True], results
    assert "exitcode  : -9" in results[1][1]
    assert re.search(r"rank \d failed", results[0][1]), results[0][1][-3000:]


@pytest.mark.slow
def test_stopped_worker_times_out_the_job(digits32, tmp_path):
    """A worker that stops answering (SIGSTOP) without dying: its peer's collective times out after
    trainer.timeout_seconds, that rank fails, and torchrun ends the job."""
    run_dir = tmp_path / "stopped"
    args = train_args(
        digits32, run_dir, "trainer.max_steps=1000000", f"trainer.timeout_seconds={COLLECTIVE_TIMEOUT}"
    )
    agent = start(["launch/torchrun_single_node.sh", *args], NPROC_PER_NODE="2", MAX_RESTARTS="0")
    wait_for(run_dir / "log", [agent])
    (stopped,) = [
        p for p in psutil.Process(agent.pid).children(recursive=True) if p.environ().get("RANK") == "1"
    ]
    stopped.suspend()
    code, output = finish(agent, timeout=HANG)
    assert code != 0
    assert "rank 0 failed" in output and f"Timed out waiting {COLLECTIVE_TIMEOUT * 1000}ms" in output, output[
        -3000:
    ]


# --- DDP's per-rank invariants, checked inside a real 2-rank job ----------------------------------------


@pytest.mark.slow
def test_ddp_keeps_ranks_in_step(digits32, tmp_path):
    """Ranks start from different random weights; after DDP they hold bit-identical weights and spectral-norm
    vectors while their batch-norm statistics stay their own, and a NaN on one rank skips the step on both."""
    out = tmp_path / "ranks.json"
    # This module is the worker, run as a module from the repository root (cwd): ``tests`` is importable.
    run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", __name__, str(digits32), str(out)])
    ranks = json.loads(out.read_text())
    assert [r["weights_equal"] for r in ranks] == [True, True]
    assert [r["spectral_norm_vectors_equal"] for r in ranks] == [True, True]
    assert [r["batch_norm_statistics_equal"] for r in ranks] == [False, False]
    assert [r["poisoned_update"] for r in ranks] == [{"applied": False, "loss_is_nan": True}] * 2
    assert [r["d_weights_unchanged"] for r in ranks] == [True, True]
    assert [r["next_update_applied"] for r in ranks] == [True, True]
    assert [r["host_syncs_in_a_step"] for r in ranks] == [0, 0]  # the skip was decided on the device


def ddp_ranks_worker(data_url: str, out: str) -> None:
    import torch.distributed as dist

    from data_pipeline.stream import ShardStream
    from models.sagan import build_models
    from tests.support.host_syncs import HostSyncCounter
    from trainer.backends.ddp import DDPBackend
    from trainer.config import load_config
    from trainer.runtime.distributed import init_runtime, shutdown
    from trainer.trainer import noise

    cfg = load_config(ROOT / "configs/smoke.yaml", [f"data.url={data_url}", *TINY])
    runtime = init_runtime("cpu", 60)
    t, per_rank = cfg.trainer, GLOBAL_BATCH // runtime.world_size
    share = slice(runtime.rank * per_rank, (runtime.rank + 1) * per_rank)
    torch.manual_seed(runtime.rank)  # different weights, u and v on each rank: DDP must start them equal
    G, D = build_models(cfg.model, 10)
    backend = DDPBackend(G, D, t, runtime)
    stream = ShardStream(
        cfg.data, rank=runtime.rank, world_size=runtime.world_size, batch_size=per_rank, seed=0, resolution=32
    )
    batches = iter(stream)

    def step(index: int, poison: bool = False, counter: HostSyncCounter | None = None):
        images, labels = next(batches)
        real = images.float().div(127.5).sub(1) * (float("nan") if poison else 1.0)
        with counter or contextlib.nullcontext():  # the updates, not the data stream
            z, y = noise(t.seed, index, 0, GLOBAL_BATCH, cfg.model.z_dim, 10, share)
            d_update = backend.d_step(real, labels, z, y)
            z, y = noise(t.seed, index, 1, GLOBAL_BATCH, cfg.model.z_dim, 10, share)
            return d_update, backend.g_step(z, y)

    for index in range(STEPS):
        step(index)
    d_before = [p.detach().clone() for p in D.parameters()]
    poisoned, _ = step(STEPS, poison=runtime.rank == 1)
    d_unchanged = all(torch.equal(a, b) for a, b in zip(d_before, D.parameters()))
    counter = HostSyncCounter()
    next_update, _ = step(STEPS + 1, counter=counter)
    poisoned, next_update = poisoned.read(), next_update.read()

    def same_on_all_ranks(tensors: list[torch.Tensor]) -> bool:
        flat = torch.cat([tensor.detach().float().flatten() for tensor in tensors])
        gathered = [torch.empty_like(flat) for _ in range(runtime.world_size)]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    buffers = [(name, b) for net in (G, D) for name, b in net.named_buffers()]
    report = {
        "weights_equal": same_on_all_ranks([p for net in (G, D) for p in net.parameters()]),
        "spectral_norm_vectors_equal": same_on_all_ranks(
            [b for n, b in buffers if n.endswith(("._u", "._v"))]
        ),
        "batch_norm_statistics_equal": same_on_all_ranks([b for n, b in buffers if "running_" in n]),
        "poisoned_update": {"applied": poisoned.applied, "loss_is_nan": np.isnan(poisoned.loss).item()},
        "d_weights_unchanged": d_unchanged,
        "next_update_applied": next_update.applied,
        "host_syncs_in_a_step": counter.by_step[0],
    }
    reports = [None] * runtime.world_size
    dist.all_gather_object(reports, report)
    if runtime.is_main:
        Path(out).write_text(json.dumps(reports))
    shutdown(runtime, 0)


# --- in one process -----------------------------------------------------------------------------------


def test_launchers_are_told_apart_by_their_environment(monkeypatch):
    from trainer.runtime.distributed import LaunchEnv, _launch_env

    for name in [*os.environ]:
        if name.startswith(
            ("RANK", "LOCAL_", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "PMI", "PMIX", "OMPI_", "SLURM")
        ):
            monkeypatch.delenv(name)
    assert _launch_env() == LaunchEnv("single", 0, 0, 1, 1)
    ranks = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    for name, value in ranks.items():
        monkeypatch.setenv(name, value)
    assert _launch_env() == LaunchEnv("env", 3, 1, 4, 1)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's own variable
    assert _launch_env() == LaunchEnv("deepspeed", 3, 1, 4, 2)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _launch_env() == LaunchEnv("torchrun", 3, 1, 4, 2)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        _launch_env()


def test_one_process_never_imports_mpi4py():
    code = "import sys; from trainer.runtime.distributed import _launch_env; _launch_env(); print('mpi4py' in sys.modules)"
    clean = {
        k: v for k, v in environment().items() if not k.startswith(("PMI", "PMIX", "OMPI_", "SLURM", "RANK"))
    }
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_batch_norm_groups_compute_what_ranks_compute():
    """G over 8 samples in groups of 4 == two ranks' G over 4 each (same start), and one power iteration."""
    import copy

    from models.sagan import Generator
    from trainer.backends.base import BatchNormGroups

    torch.manual_seed(0)
    G = Generator(32, 10, z_dim=16, channels=8)
    z, y = torch.randn(8, 16), torch.arange(8) % 10
    rank0, rank1, whole = copy.deepcopy(G), copy.deepcopy(G), copy.deepcopy(G)
    grouped = BatchNormGroups(G, 4)(z, y)
    torch.testing.assert_close(
        grouped, torch.cat([rank0(z[:4], y[:4]), rank1(z[4:], y[4:])]), rtol=0, atol=1e-6
    )
    # One spectral-norm power iteration for both groups, as on each rank.
    ranks_u = dict(rank0.named_buffers())
    for name, u in G.named_buffers():
        if name.endswith("._u"):
            assert torch.equal(u, ranks_u[name]), name
    assert not torch.allclose(whole(z, y), grouped, atol=1e-3)  # statistics over all 8 differ


if __name__ == "__main__":
    ddp_ranks_worker(sys.argv[1], sys.argv[2])

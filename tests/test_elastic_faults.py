"""Ranks and nodes that fail under torchrun's elastic agent, with real processes and signals.

- A rank that fails (a resume error on rank 1) ends every rank promptly, each saying that rank's
  message, instead of leaving rank 0 in a collective until trainer.timeout_seconds.
- Ten kill -9s of a random rank at random moments of an elastic run (--max-restarts): the job
  finishes, every committed checkpoint loads, the resumed step never goes back.
"""

from __future__ import annotations

import random
import re
import signal
import time

import pytest
from faults import kill_rank, workers_of
from jobs import ROOT, SAGAN, TINY, TORCHRUN, error_lines, finish, free_port, run, start, wait_until

from trainer.checkpoint import Checkpointer
from trainer.run_log import read_run_log

pytestmark = pytest.mark.slow


def node_command(endpoint: str, job: str, nnodes: str, max_restarts: int, *train: str) -> list[str]:
    """One torchrun agent (one worker) of a multi-node c10d job, as launch/torchrun_multi_node.sh runs it."""
    return [
        TORCHRUN, f"--nnodes={nnodes}", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={job}", f"--max-restarts={max_restarts}", "--monitor-interval=0.5",
        "--rdzv-conf=last_call_timeout=1", "--no-python", SAGAN, "train", *train,
    ]  # fmt: skip


def test_a_resume_error_on_rank_1_ends_every_rank_promptly_with_its_message(digits_data, tmp_path):
    """Node-local checkpoints (a relative checkpoint.url): rank 0 finds step 2, rank 1's node has none.
    The collective timeout is the default 600 s; the job must end long before, on both nodes, each
    naming rank 1's problem."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    train = [
        str(ROOT / "configs/smoke.yaml"),
        *TINY[1:],
        f"data.url={digits_data}",
        "run.dir=run",
        "checkpoint.url=checkpoints",
        "trainer.global_batch_size=8",
    ]
    run([SAGAN, "train", *train, "trainer.max_steps=2"], cwd=node0)
    endpoint, job = f"127.0.0.1:{free_port()}", f"resume-{time.time_ns()}"
    command = node_command(endpoint, job, "2", 0, *train, "trainer.max_steps=6")
    agents = [start(command, cwd=node) for node in (node0, node1)]
    started = time.monotonic()
    results = [finish(agent, timeout=120) for agent in agents]
    seconds = time.monotonic() - started
    print(f"resume error on rank 1: both nodes ended {seconds:.0f}s after start (timeout_seconds=600)")
    cause = "rank 1 cannot read the checkpoint rank 0 resumes from"
    for code, output in results:
        assert code != 0
        lines = error_lines(output)
        assert len(lines) == 1 and cause in lines[0], output[-3000:]
    assert not any("Connection closed by peer" in line for _, o in results for line in error_lines(o))
    assert "trainer.checkpoint.CheckpointError: rank 1 cannot read" in results[1][1]  # torchrun's root cause


KILLS = 10
KILL_STEPS = 40


def test_ten_random_kill_9s_of_a_rank_and_the_elastic_job_still_finishes(digits_data, tmp_path):
    """torchrun --max-restarts: each time the job has made 1 to 3 steps of progress since the last kill,
    a random rank is killed (SIGKILL) a random fraction of a step later: inside a step, a collective,
    a checkpoint write. Every restart resumes from a committed checkpoint at or after the one before."""
    rng = random.Random(12)
    run_dir = tmp_path / "run"
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    command = [
        TORCHRUN, "--nnodes=1:2", "--nproc-per-node=2", f"--max-restarts={KILLS + 2}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=last_call_timeout=1", "--monitor-interval=0.5",
        "--no-python", SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir={run_dir}",
        "trainer.global_batch_size=8", f"trainer.max_steps={KILL_STEPS}", "checkpoint.interval_steps=1",
        "checkpoint.keep_last=1000", "trainer.timeout_seconds=30",
    ]  # fmt: skip
    job = start(command, log=tmp_path / "torchrun.log")
    killed = []
    try:
        progress = 0
        for _ in range(KILLS):
            target = progress + rng.randint(1, 3)
            wait_until(
                lambda t=target: (checkpoints.pointer() or 0) >= t, f"step {target}", [job], timeout=120
            )
            time.sleep(rng.uniform(0.0, 0.3))
            workers = workers_of(job.pid)
            rank = rng.choice(sorted(workers))
            killed.append((rank, checkpoints.pointer()))
            kill_rank(job.pid, rank, signal.SIGKILL)
            progress = checkpoints.pointer() or 0
            wait_until(
                lambda: len(workers_of(job.pid)) < 2 or job.poll() is not None, "the kill", [], timeout=30
            )
        code, output = finish(job, timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert code == 0, output[-5000:]
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", output)]
    print(f"{len(killed)} kills (rank, LATEST): {killed}; resumed at steps {resumed}")
    assert len(killed) == KILLS and len(resumed) >= KILLS
    assert resumed == sorted(resumed)  # monotonic across restarts
    assert all(at >= before for at, (_, before) in zip(resumed[::2], killed))
    committed = checkpoints.committed_steps()
    assert committed[-1] == KILL_STEPS and checkpoints.pointer() == KILL_STEPS
    for step in committed:  # every committed checkpoint loads, verified against its manifest
        state, manifest = checkpoints.load(step)
        assert state["step"] == manifest["step"] == step
    assert read_run_log(run_dir).column("step").to_pylist() == list(range(1, KILL_STEPS + 1))

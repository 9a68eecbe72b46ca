"""Ranks and nodes that fail under torchrun's elastic agent, with real processes and signals.

- A rank that fails (a resume error on rank 1) ends every rank promptly, each saying that rank's
  message, instead of leaving rank 0 in a collective until trainer.timeout_seconds.
- Ten kill -9s of a random rank at random moments of an elastic run (--max-restarts): the job
  finishes, every committed checkpoint loads, the resumed step never goes back.
- Two hosts in network namespaces (tests/support/netns.py), one torchrun agent each, c10d rendezvous
  across a veth link: a 2-node run completes; cutting one host's link mid-run shrinks the job to the
  other host (elastic, 1 to 2 nodes) within the collective timeout, and it resumes from its last
  checkpoint.
"""

from __future__ import annotations

import random
import re
import signal
import time

import pytest
import torch

from tests.support.faults import kill_rank, workers_of
from tests.support.jobs import (
    SAGAN,
    TINY,
    TORCHRUN,
    environment,
    error_lines,
    finish,
    output_of,
    run,
    start,
    wait_until,
)
from tests.support.netns import TwoHosts, unavailable
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.tools import missing_tool
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.format import load_folder
from trainer.observability.run_log import read_run_log

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
    assert (
        "trainer.checkpoint.format.CheckpointError: rank 1 cannot read" in results[1][1]
    )  # torchrun's root cause


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
            # the step can be committed by a save still in flight when the last kill landed, while the
            # ranks are being restarted: kill one of a running pair, not of a pair being replaced
            wait_until(lambda: len(workers_of(job.pid)) == 2, "two running ranks", [job], timeout=120)
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


COLLECTIVE_TIMEOUT = 12  # trainer.timeout_seconds in the namespace runs
RDZV_PORT = 29400  # inside the namespaces: nothing else listens there


@pytest.fixture
def two_hosts():
    reason = unavailable()
    if reason:
        missing_tool(reason)
    with TwoHosts() as hosts:
        yield hosts


def start_hosts(hosts: TwoHosts, job: str, run_dir, log_dir, *train: str) -> list:
    """One torchrun agent (one worker) per host, meeting at a c10d rendezvous on host 0."""
    agents = []
    for host in (0, 1):
        command = [
            TORCHRUN, "--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=3", "--monitor-interval=0.5",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts.addresses[0]}:{RDZV_PORT}", f"--rdzv-id={job}",
            f"--rdzv-conf=is_host={host == 0},last_call_timeout=2,join_timeout=30,keep_alive_interval=1",
            f"--local-addr={hosts.addresses[host]}", "--no-python", SAGAN, "train", *train,
            f"run.dir={run_dir}", f"trainer.timeout_seconds={COLLECTIVE_TIMEOUT}",
        ]  # fmt: skip
        env = environment({"GLOO_SOCKET_IFNAME": hosts.links[host]})
        agents.append(hosts.start(host, command, env=env, log=log_dir / f"host{host}.log", cwd=ROOT))
    return agents


def test_two_hosts_in_namespaces_train_together_and_survive_a_cut_link(two_hosts, digits_data, tmp_path):
    train = [*TINY, f"data.url={digits_data}", "trainer.global_batch_size=8"]
    # A 2-node run completes.
    agents = start_hosts(
        two_hosts, "together", tmp_path / "together", tmp_path, *train, "trainer.max_steps=2"
    )
    results = [finish(agent, timeout=240) for agent in agents]
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    state, manifest = load_folder(tmp_path / "together" / "checkpoints" / "step_2")
    assert manifest["world_size"] == 2 and state["step"] == 2
    assert "rank 1/2 (local 0/1) via torchrun" in "".join(output for _, output in results)

    # Host 1's link goes down mid-run: host 0 carries on alone from the last checkpoint.
    run_dir = tmp_path / "cut"
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    agents = start_hosts(
        two_hosts, "cut", run_dir, tmp_path, *train, "trainer.max_steps=8", "checkpoint.interval_steps=2"
    )
    wait_until(lambda: (checkpoints.pointer() or 0) >= 4, "the checkpoint of step 4", agents, timeout=240)
    two_hosts.cut(1)
    cut_at, latest_at_cut = time.monotonic(), checkpoints.pointer()
    code, output = finish(agents[0], timeout=300)
    assert code == 0, output[-5000:]
    state, manifest = checkpoints.load(8)
    assert manifest["world_size"] == 1 and state["step"] == 8  # shrunk to the host that kept its link
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert resumed and resumed[-1] >= latest_at_cut, (resumed, latest_at_cut)
    detected = re.search(r"(Timed out|Connection|timed out|lost the job's store)", output)
    assert detected, output[-4000:]
    # The cut-off host's worker ended (its collectives timed out too); its agent, whose rendezvous store
    # is on the other side of the cut, is torchrun's to end (the namespaces' teardown kills it).
    wait_until(lambda: not workers_of(agents[1].pid), "the end of host 1's worker", [], timeout=60)
    cut_off = output_of(agents[1])
    assert re.search(
        rf"sagan train: error: rank \d: Timed out waiting {COLLECTIVE_TIMEOUT * 1000}ms", cut_off
    ), cut_off[-3000:]
    print(
        f"cut link: host 0 resumed at step {resumed[-1]} (LATEST at the cut: {latest_at_cut}) and finished "
        f"{time.monotonic() - cut_at:.0f}s after the cut; host 1's worker ended, its agent "
        f"{'exited ' + str(agents[1].returncode) if agents[1].poll() is not None else 'still waits for its store'}"
    )


def test_ranks_failing_together_each_say_the_first_failure_and_rank_0_need_not_wait(tmp_path):
    """Rank 0 and rank 1 fail at the same collective (the resume error above): both publish. Rank 1,
    finding rank 0's notice, acknowledges it, so rank 0 (whose process may host the store) has nothing to
    wait for once it has said its error; and rank 0 waits only in stop(), after run_on_ranks has printed.
    The CI failure this guards: rank 0 waited for readers before printing, its peer's agent left, and its
    own agent killed it silently."""
    import torch.distributed as dist

    from trainer.runtime.coordination import FailureNotice
    from trainer.runtime.distributed import Runtime

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    notices = []
    for rank, store in enumerate((server, client)):
        notice = FailureNotice(Runtime(rank, rank, 1, torch.device("cpu"), "torchrun"))  # alone: no watchdog
        notice.runtime = Runtime(rank, rank, 2, torch.device("cpu"), "torchrun")
        notice.store, notice.key = store, "sagan/failure/test/0"
        notices.append(notice)
    cause = "rank 1 cannot read the checkpoint rank 0 resumes from (no state.pt)"
    assert notices[0].publish(cause, 2) == (f"rank 0: {cause}", 2)
    assert notices[1].publish(cause, 2) == (f"rank 0: {cause}", 2)
    assert server.add("sagan/failure/test/0/read", 0) == 1  # rank 1 has read it
    assert notices[0]._hosting_notice and not notices[1]._hosting_notice
    notices[1].stop()
    notices[0].stop()
    assert not notices[0]._hosting_notice

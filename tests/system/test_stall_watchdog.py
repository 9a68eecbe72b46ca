"""A rank that stops making progress without dying (frozen with SIGSTOP, as a GPU fault or a hung
storage call leaves it): the others' stall watchdog dumps their stacks naming it as behind and the
collective they wait in, and then either restarts the job from the last checkpoint
(trainer.on_stall=restart, torchrun --max-restarts) or keeps waiting with the dump there (dump). A data
worker blocked in a storage read that never returns shows in its rank's dump. ``sagan stacks`` asks a
healthy job for every rank's dump without stopping it. Real torchrun, real signals, a real proxy.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.support.faults import Rule, kill_rank, workers_of
from tests.support.jobs import SAGAN, TINY, TORCHRUN, finish, kill_session, run, start, wait_until
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.observability.run_log import read_run_log
from trainer.runtime.watchdog import STALL_EXIT_STATUS

pytestmark = pytest.mark.slow

STEPS = 300
STALL_SECONDS = 5
MARGIN = 30  # beat check, dump, upload, polling: well under this


def two_rank_job(tmp_path, digits_data, on_stall: str):
    run_dir = tmp_path / "run"
    command = [
        TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.5",
        "--no-python", SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir={run_dir}",
        "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}", "checkpoint.interval_steps=5",
        "trainer.timeout_seconds=120", f"trainer.stall_seconds={STALL_SECONDS}", f"trainer.on_stall={on_stall}",
    ]  # fmt: skip
    return run_dir, start(command, log=tmp_path / "torchrun.log")


def freeze_rank_1_after_a_checkpoint(job, checkpoints: Checkpointer) -> tuple[int, float]:
    wait_until(lambda: (checkpoints.pointer() or 0) >= 10, "a checkpoint at step 10", [job], timeout=180)
    wait_until(lambda: len(workers_of(job.pid)) == 2, "two running ranks", [job], timeout=60)
    kill_rank(job.pid, 1, signal.SIGSTOP)
    return checkpoints.pointer() or 0, time.monotonic()


def rank_0_dump(run_dir) -> str:
    dumps = sorted((run_dir / "diagnostics").glob("step_*/rank_0.txt"))
    return dumps[-1].read_text() if dumps else ""


def test_a_frozen_rank_is_named_in_rank_0s_dump_and_the_job_restarts_and_finishes(digits_data, tmp_path):
    run_dir, job = two_rank_job(tmp_path, digits_data, "restart")
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    try:
        frozen_at, frozen = freeze_rank_1_after_a_checkpoint(job, checkpoints)
        wait_until(lambda: "behind: rank 1" in rank_0_dump(run_dir), "rank 0's dump", [job], timeout=120)
        seconds_to_dump = time.monotonic() - frozen
        code, output = finish(job, timeout=280)
    finally:
        kill_session(job)
    print(f"rank 0's dump {seconds_to_dump:.1f} s after rank 1 froze (stall_seconds={STALL_SECONDS})")
    assert seconds_to_dump < STALL_SECONDS + MARGIN
    dump = rank_0_dump(run_dir)
    assert "behind: rank 1 (not running, last at step" in dump
    assert "in _train" in dump  # the main thread's stack, in the training loop
    # rank 0 waits in a collective that rank 1 never entered: the flight recorder names it
    assert re.search(r"^in collective: gloo:\w+ #\d+ on ", dump, re.MULTILINE), dump[:3000]
    assert list((run_dir / "diagnostics").glob("step_*/rank_0-collectives.json"))
    assert re.search(
        r"rank 1 has made no progress for \d+ s at step \d+ \(in .+: not running\); "
        r"rank 0 waits in gloo:\w+ #\d+ .*; stacks in ",
        output,
    ), output[-3000:]
    assert f"status {STALL_EXIT_STATUS}" in output
    assert code == 0, output[-5000:]
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert resumed and min(resumed) >= frozen_at
    assert checkpoints.pointer() == STEPS
    assert read_run_log(run_dir).column("step").to_pylist() == list(range(1, STEPS + 1))


def test_with_on_stall_dump_the_dump_is_there_and_the_job_keeps_waiting(digits_data, tmp_path):
    run_dir, job = two_rank_job(tmp_path, digits_data, "dump")
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    try:
        freeze_rank_1_after_a_checkpoint(job, checkpoints)
        wait_until(lambda: "behind: rank 1" in rank_0_dump(run_dir), "rank 0's dump", [job], timeout=120)
        time.sleep(STALL_SECONDS * 2)  # long past the stall: still there, waiting
        assert job.poll() is None
        assert len(workers_of(job.pid)) == 2
    finally:
        kill_session(job)
    assert "rank 1 (not running" in rank_0_dump(run_dir)


def test_sigusr1_to_one_rank_of_a_healthy_job_dumps_it_naming_no_one_and_the_job_finishes(
    digits_data, tmp_path
):
    run_dir, job = two_rank_job(tmp_path, digits_data, "restart")
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    try:
        wait_until(lambda: (checkpoints.pointer() or 0) >= 10, "a checkpoint at step 10", [job], timeout=180)
        kill_rank(job.pid, 1, signal.SIGUSR1)
        dumps = run_dir / "diagnostics"
        wait_until(lambda: list(dumps.glob("step_*/rank_1.txt")), "rank 1's dump", [job], timeout=60)
        code, output = finish(job, timeout=240)
    finally:
        kill_session(job)
    assert code == 0, output[-5000:]
    (dump,) = dumps.glob("step_*/rank_*.txt")  # rank 1's alone
    text = dump.read_text()
    assert text.startswith("rank 1 of 2, pid ") and "behind: none known" in text, text[:600]
    assert '"running": true' in text and "in _train" in text
    assert "resumed from" not in output and checkpoints.pointer() == STEPS


def test_a_data_worker_blocked_in_a_storage_read_shows_in_its_ranks_dump(
    moto_server, s3_bucket, fault_proxy, digits_data, tmp_path
):
    """The dataset in S3 behind the fault proxy; after a checkpoint every GET hangs (the proxy holds
    the request): the reader in the DataLoader worker waits in its socket, the rank waits for a batch."""
    client = moto_server.client()
    for path in digits_data.iterdir():
        client.upload_file(str(path), s3_bucket, f"digits/{path.name}")
    run_dir = tmp_path / "run"
    command = [
        SAGAN, "train", *TINY, f"data.url=s3://{s3_bucket}/digits", f"run.dir={run_dir}", "data.num_workers=1",
        "trainer.global_batch_size=8", "trainer.max_steps=100000", "checkpoint.interval_steps=5",
        f"trainer.stall_seconds={STALL_SECONDS}", "trainer.on_stall=dump",
    ]  # fmt: skip
    job = start(command, {"AWS_ENDPOINT_URL": fault_proxy.endpoint}, log=tmp_path / "train.log")
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    try:
        wait_until(lambda: (checkpoints.pointer() or 0) >= 5, "a checkpoint at step 5", [job], timeout=180)
        fault_proxy.add(Rule("delay", methods=("GET",), times=None, seconds=600))
        wait_until(
            lambda: "stacks of data worker" in rank_0_dump(run_dir),
            "a dump with the worker",
            [job],
            timeout=120,
        )
        assert job.poll() is None  # under dump, it keeps waiting
    finally:
        kill_session(job)
    dump = rank_0_dump(run_dir)
    rank, _, worker = dump.partition("stacks of data worker 0, pid ")
    assert "phase data: the next batch" in rank and "in _train" in rank
    assert "data_pipeline/stream/reader.py" in worker and "in read_shard" in worker, worker[:3000]
    assert "socket.py" in worker or "ssl.py" in worker  # waiting in the connection, not somewhere else


def test_sagan_stacks_dumps_every_rank_of_a_running_job_which_finishes_as_usual(digits_data, tmp_path):
    run_dir, job = two_rank_job(tmp_path, digits_data, "restart")
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    try:
        wait_until(lambda: (checkpoints.pointer() or 0) >= 10, "a checkpoint at step 10", [job], timeout=180)
        out = run([SAGAN, "stacks", str(run_dir), "--wait", "60"])
        code, output = finish(job, timeout=240)
    finally:
        kill_session(job)
    assert code == 0, output[-5000:]
    assert re.match(rf"stacks of 2 of 2 ranks in {run_dir}/diagnostics/request_\S+/\n", out), out
    dumps = sorted(run_dir.glob("diagnostics/request_*/rank_*.txt"))
    assert [d.name for d in dumps] == ["rank_0.txt", "rank_1.txt"]
    for rank, dump in enumerate(dumps):
        text = dump.read_text()
        assert text.startswith(f"rank {rank} of 2, pid ") and ": asked for (" in text.splitlines()[0]
        assert "in _train" in text and f"rank {rank}: {dump}" in out
    assert "resumed from" not in output and checkpoints.pointer() == STEPS

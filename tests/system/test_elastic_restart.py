"""The README's direct form with restarts, as a new user runs it: ``torchrun --standalone --max-restarts``
with torchrun's default environment (the agent's rendezvous store shared with the workers, no
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``). A worker killed with SIGKILL after the first checkpoint: the
restarted workers form their groups in a store scope of their own attempt (not the dead generation's
keys), resume from the checkpoint and finish.
"""

from __future__ import annotations

import re
import signal

import pytest
import torch.distributed as dist

from tests.support.faults import kill_rank, workers_of
from tests.support.jobs import SAGAN, TINY, TORCHRUN, error_lines, finish, start, wait_until
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.observability.run_log import read_run_log

pytestmark = pytest.mark.slow

STEPS = 12
SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}  # torchrun's default: the agent's store shared


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_standalone_torchrun_job_restarts_after_a_kill_9_with_the_agent_store_shared(
    storage, digits_data, tmp_path, request
):
    run_dir = tmp_path / "run"
    url, env = str(run_dir / "checkpoints"), dict(SHARED_STORE)
    if storage == "s3":  # the form: checkpoint.url=s3://...
        url = f"s3://{request.getfixturevalue('s3_bucket')}/run/checkpoints"
        env.update(request.getfixturevalue("moto_server").env)
    checkpoints = Checkpointer(url)
    command = [
        TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=3", "--monitor-interval=0.5",
        "--no-python", SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir={run_dir}",
        f"checkpoint.url={url}", "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}",
        "checkpoint.interval_steps=3", "trainer.timeout_seconds=60",
    ]  # fmt: skip
    job = start(command, env, log=tmp_path / "torchrun.log")
    try:
        wait_until(lambda: (checkpoints.pointer() or 0) >= 3, "the first checkpoint", [job], timeout=180)
        wait_until(lambda: len(workers_of(job.pid)) == 2, "two running ranks", [job], timeout=60)
        killed_at = checkpoints.pointer()
        kill_rank(job.pid, 1, signal.SIGKILL)
        code, output = finish(job, timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert code == 0, output[-5000:]
    assert "Connection refused" not in output
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert resumed and min(resumed) >= killed_at, (resumed, killed_at)
    assert checkpoints.pointer() == STEPS
    assert read_run_log(run_dir).column("step").to_pylist() == list(range(1, STEPS + 1))


def test_a_worker_whose_attempt_the_shared_store_already_holds_refuses_in_one_line(tmp_path):
    """Agents that disagree on the restart count (a node that joined later) would meet the dead
    generation's keys: the worker refuses at start, naming the variable that avoids sharing."""
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    agent_store.add("sagan/attempt_0/joined", 2)  # generation 0 of a 2-rank job joined before
    worker_env = {
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(agent_store.port),
    }
    command = [SAGAN, "train", *TINY, f"data.url={tmp_path / 'unused'}", f"run.dir={tmp_path / 'run'}"]
    code, output = finish(start(command, worker_env), timeout=60)
    assert code == 2, output
    assert error_lines(output) == [
        "sagan train: error: rank 1: torchrun's shared store already holds restart attempt 0 of this job "
        "(its agents disagree on TORCHELASTIC_RESTART_COUNT): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
        "torchrun's environment"
    ]

"""Pre-emption and slow checkpoints through real processes and signals.

SIGTERM or SIGINT mid-run: every rank finishes the same step, the checkpoint of that step is
committed, the job exits within trainer.preemption_grace_seconds with 128 + the signal number, and a
restart continues from that step. A checkpoint upload slower than the collective timeout
(trainer.timeout_seconds) does not end the job: the other ranks wait for it in short collectives.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.support.faults import Rule, signal_job, workers_of
from tests.support.jobs import SAGAN, TINY, TORCHRUN, error_lines, finish, run, start, wait_until
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.format import load_folder
from trainer.observability.run_log import read_run_log

pytestmark = pytest.mark.slow

GRACE = 20


def args(data, run_dir, *extra: str) -> list[str]:
    return [
        *TINY, f"data.url={data}", f"run.dir={run_dir}", "trainer.global_batch_size=8", "trainer.max_steps=100000",
        "checkpoint.interval_steps=100000", f"trainer.preemption_grace_seconds={GRACE}", *extra,
    ]  # fmt: skip


def stopped_at(output: str, name: str) -> int:
    found = re.search(rf"sagan train: stopped by {name} at step (\d+); checkpoint \S+ is committed", output)
    assert found, output[-4000:]
    return int(found.group(1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_checkpoints_the_step_reached_and_a_restart_continues(sig, digits_data, tmp_path):
    run_dir = tmp_path / "run"
    # Two DataLoader workers: the signal reaches the whole process group, as from SLURM or a terminal.
    job = start([SAGAN, "train", *args(digits_data, run_dir, "data.num_workers=2")], log=tmp_path / "job.log")
    wait_until(lambda: (run_dir / "log").is_dir(), "a logged step", [job])
    signal_job(job, sig)
    sent = time.monotonic()
    code, output = finish(job, timeout=GRACE + 60)
    seconds = time.monotonic() - sent
    step = stopped_at(output, sig.name)
    print(f"{sig.name}: exit {code} after {seconds:.1f}s (grace {GRACE}s) at step {step}")
    assert code == 128 + sig and seconds < GRACE
    assert "Traceback" not in output and not error_lines(output)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "LATEST").read_text() == f"step_{step}"
    assert load_folder(checkpoints / f"step_{step}")[0]["step"] == step
    assert read_run_log(run_dir).column("step").to_pylist() == list(range(1, step + 1))

    if sig == signal.SIGINT:
        return  # the restart is the same after either signal
    output = run([SAGAN, "train", *args(digits_data, run_dir, f"trainer.max_steps={step + 2}")])
    assert f"resumed from {checkpoints / f'step_{step}'} at step {step}" in output
    assert read_run_log(run_dir).column("step").to_pylist() == list(range(1, step + 3))


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(digits_data, tmp_path):
    """Kubernetes signals the container's first process, torchrun, which forwards SIGTERM to its workers:
    both ranks agree on the step, the checkpoint holds both ranks' state, the agent exits within the
    grace period."""
    run_dir = tmp_path / "run"
    command = [
        TORCHRUN, "--standalone", "--nproc-per-node=2", "--no-python", SAGAN, "train", *args(digits_data, run_dir),
    ]  # fmt: skip
    job = start(command, log=tmp_path / "job.log")
    wait_until(lambda: (run_dir / "log").is_dir() and len(workers_of(job.pid)) == 2, "a logged step", [job])
    job.send_signal(signal.SIGTERM)  # the agent only
    sent = time.monotonic()
    code, output = finish(job, timeout=GRACE + 60)
    seconds = time.monotonic() - sent
    step = stopped_at(output, "SIGTERM")
    print(f"torchrun SIGTERM: agent exit {code} after {seconds:.1f}s at step {step}")
    assert code != 0 and seconds < GRACE
    assert (
        output.count("stopping at step") == 2 and len(set(re.findall(r"stopping at step (\d+)", output))) == 1
    )
    state, manifest = load_folder(run_dir / "checkpoints" / f"step_{step}")
    assert state["step"] == step and manifest["world_size"] == 2 and len(state["rng"]) == 2
    assert not error_lines(output)


def test_a_checkpoint_not_committed_within_the_grace_period_ends_the_run_keeping_the_previous(
    digits_data, fault_proxy, moto_server, s3_bucket, tmp_path
):
    """The upload of the pre-emption checkpoint hangs: the run exits when the grace period ends, says so
    in one line, and LATEST still names the checkpoint before."""
    url = f"s3://{s3_bucket}/run/checkpoints"
    run_dir = tmp_path / "run"
    env = {**moto_server.env, "AWS_ENDPOINT_URL": fault_proxy.endpoint}
    grace = 6
    command = [SAGAN, "train", *args(digits_data, run_dir, f"checkpoint.url={url}", "checkpoint.interval_steps=2",
               f"trainer.preemption_grace_seconds={grace}")]  # fmt: skip
    job = start(command, env, log=tmp_path / "job.log")
    wait_until(lambda: Checkpointer(url).pointer() == 2, "the checkpoint of step 2", [job])
    hang = fault_proxy.add(Rule("delay", match=b"/state.pt", methods=("PUT",), seconds=120))
    signal_job(job, signal.SIGTERM)
    sent = time.monotonic()
    code, output = finish(job, timeout=grace + 60)
    seconds = time.monotonic() - sent
    print(f"hung upload: exit {code} after {seconds:.1f}s (grace {grace}s)")
    assert hang.times == 0 and code not in (0, 143) and seconds < grace + 2
    assert len(error_lines(output)) == 1, output[-3000:]
    (line,) = error_lines(output)
    late = re.search(
        rf"checkpoint step_(\d+) was not committed to {url} within trainer.preemption_grace_seconds={grace}",
        line,
    )
    assert late, line
    fault_proxy.reset()
    step, state, _ = Checkpointer(url).load_latest()
    assert 2 <= step < int(late.group(1)) and state["step"] == step


def test_a_checkpoint_upload_slower_than_the_collective_timeout_does_not_end_the_job(
    digits_data, fault_proxy, moto_server, s3_bucket, tmp_path
):
    """Rank 0 uploads for longer than trainer.timeout_seconds, twice (a save while the previous one is
    still written, and the final one); rank 1 meanwhile waits in collectives that each last a second."""
    url = f"s3://{s3_bucket}/run/checkpoints"
    timeout = 8
    slow = fault_proxy.add(Rule("delay", match=b"/state.pt", methods=("PUT",), seconds=timeout + 3, times=2))
    env = {**moto_server.env, "AWS_ENDPOINT_URL": fault_proxy.endpoint}
    command = [
        TORCHRUN, "--standalone", "--nproc-per-node=2", "--no-python", SAGAN, "train",
        *args(digits_data, tmp_path / "run", f"checkpoint.url={url}", "trainer.max_steps=4", "checkpoint.interval_steps=2",
              f"trainer.timeout_seconds={timeout}"),
    ]  # fmt: skip
    code, output = finish(start(command, env), timeout=240)
    assert code == 0, output[-4000:]
    assert slow.times == 0  # both uploads were held back longer than the timeout
    fault_proxy.reset()
    assert Checkpointer(url).committed_steps() == [2, 4]


def test_grace_period_is_a_positive_config_key():
    from trainer.config import ConfigError, load_config

    assert load_config(None, ["trainer.preemption_grace_seconds=2.5"]).trainer.preemption_grace_seconds == 2.5
    with pytest.raises(ConfigError, match=r"^trainer.preemption_grace_seconds=0.0 must be positive"):
        load_config(None, ["trainer.preemption_grace_seconds=0"])

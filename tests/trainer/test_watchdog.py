"""The stall watchdog's parts that need no second rank: SIGUSR1 to a healthy run (a real process, a
real signal) dumps every thread's stack and changes nothing; who is named as behind; the config keys."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from tests.support.jobs import SAGAN, TINY, finish, kill_session, start, wait_until
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.config import ConfigError, load_config
from trainer.runtime.watchdog import ranks_behind

STEPS = 120


def train_command(data, run_dir) -> list[str]:
    return [
        SAGAN, "train", *TINY, f"data.url={data}", f"run.dir={run_dir}", "trainer.global_batch_size=8",
        f"trainer.max_steps={STEPS}", "checkpoint.interval_steps=40", "trainer.stall_seconds=600",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigusr1_to_a_healthy_run_dumps_its_stacks_and_the_run_ends_the_same(digits_data, tmp_path):
    quiet_dir, signalled_dir = tmp_path / "quiet", tmp_path / "signalled"
    quiet = start(train_command(digits_data, quiet_dir), log=tmp_path / "quiet.log")
    code, output = finish(quiet)
    assert code == 0, output[-4000:]

    job = start(train_command(digits_data, signalled_dir), log=tmp_path / "signalled.log")
    checkpoints = Checkpointer(str(signalled_dir / "checkpoints"))
    try:
        wait_until(
            lambda: (checkpoints.pointer() or 0) >= 40, "the checkpoint at step 40", [job], timeout=120
        )
        sent = time.monotonic()
        job.send_signal(signal.SIGUSR1)
        wait_until(
            lambda: list(signalled_dir.glob("diagnostics/step_*/rank_0.txt")), "a dump", [job], timeout=60
        )
        latency = time.monotonic() - sent
        code, output = finish(job)
    finally:
        kill_session(job)
    print(f"SIGUSR1 to dump on storage: {latency:.2f} s")
    assert code == 0, output[-4000:]
    (dump,) = signalled_dir.glob("diagnostics/step_*/rank_0.txt")
    text = dump.read_text()
    assert text.startswith("rank 0 of 1, pid ") and ": SIGUSR1\n" in text.splitlines()[0] + "\n"
    assert "in _train" in text and "in _watch" in text  # the loop's thread and the watchdog's own
    assert 40 <= int(dump.parent.name.removeprefix("step_")) < STEPS
    final = f"checkpoints/step_{STEPS}/state.pt"
    assert (signalled_dir / final).read_bytes() == (quiet_dir / final).read_bytes()


def test_the_ranks_behind_are_the_frozen_the_silent_and_the_late():
    progress = {
        0: {"step": 10, "phase": "step", "running": True},
        1: {"step": 10, "phase": "step", "running": False},
        3: {"step": 9, "phase": "checkpoint", "running": True, "moved": False},
        4: {"step": 9, "phase": "step", "running": True, "moved": True},  # a step behind for a moment
    }
    behind = ranks_behind(progress, world_size=5)
    assert [(rank, why) for rank, why, _ in behind] == [
        (1, "not running"),
        (2, "no progress published"),
        (3, "others at step 10"),
    ]
    assert ranks_behind({0: {"step": 5, "phase": "step", "running": True}}, world_size=1) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.on_stall=wait", "trainer.on_stall='wait' is not one of auto, dump, restart"),
        ("trainer.stall_seconds=-1", "trainer.stall_seconds=-1.0 must not be negative"),
    ],
)
def test_the_stall_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("configs/smoke.yaml", ["data.url=unused", override])


def test_checkpoint_evaluation_and_the_first_step_get_the_collective_timeout_more():
    from trainer.runtime.distributed import Runtime
    from trainer.runtime.watchdog import StallWatchdog

    runtime = Runtime(0, 0, 1, torch.device("cpu"), "single")
    watchdog = StallWatchdog(runtime, "unused", stall_seconds=5, on_stall="dump", long_phase_seconds=60)
    assert watchdog.deadline_seconds() == 65  # the first step: compilation, first reads
    watchdog.mark_step(1)
    assert watchdog.deadline_seconds() == 5
    for name in ("checkpoint", "evaluation"):
        with watchdog.phase(name):
            assert watchdog.deadline_seconds() == 65
        assert watchdog.deadline_seconds() == 5
    automatic = StallWatchdog(runtime, "unused", on_stall="dump", long_phase_seconds=60)
    assert automatic.deadline_seconds() is None  # no step timed yet: no deadline to miss


def test_on_stall_auto_restarts_only_under_an_elastic_launcher(monkeypatch):
    from trainer.runtime.watchdog import default_on_stall

    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    assert default_on_stall() == "dump"
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert default_on_stall() == "dump"
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert default_on_stall() == "restart"


def test_the_parts_of_a_step_are_named_and_keep_the_steps_deadline():
    from trainer.runtime.distributed import Runtime
    from trainer.runtime.watchdog import StallWatchdog
    from trainer.trainer import D_STEP, G_STEP

    runtime = Runtime(0, 0, 1, torch.device("cpu"), "single")
    watchdog = StallWatchdog(runtime, "unused", stall_seconds=5, on_stall="dump", long_phase_seconds=60)
    watchdog.mark_step(1)
    for where in ("data: the next batch", D_STEP, G_STEP):
        watchdog.at(where)
        assert watchdog.deadline_seconds() == 5
    with watchdog.phase("checkpoint"):
        assert watchdog.deadline_seconds() == 65
    assert watchdog._phase == G_STEP  # back where it was


OUT_OF_MEMORY_IN_STEP_3 = """
import sys, torch
from trainer.backends.base import GANBackend
real_d_step, calls = GANBackend.d_step, []
def d_step(self, *args):
    calls.append(1)
    if len(calls) == 3:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
        )
    return real_d_step(self, *args)
GANBackend.d_step = d_step
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_out_of_memory_in_a_step_leaves_the_step_the_batch_and_the_stacks_and_one_line(digits_data, tmp_path):
    """The caching allocator's contract on CUDA: torch.OutOfMemoryError from inside the step. Here the
    third D step raises it as CUDA's allocator would; the snapshot itself is CUDA's (tests/system/test_cuda.py)."""
    import sys

    run_dir = tmp_path / "run"
    command = [sys.executable, "-c", OUT_OF_MEMORY_IN_STEP_3, "train", *train_command(digits_data, run_dir)[2:],
               "checkpoint.interval_steps=2"]  # fmt: skip
    code, output = finish(start(command))
    assert code == 2, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("sagan train: error:")]
    dump = run_dir / "diagnostics" / "step_3" / "rank_0.txt"
    assert line == (
        "sagan train: error: cpu ran out of memory in step 3 with batches of shape [8, 3, 32, 32] per rank: "
        f"lower trainer.global_batch_size (or use more GPUs); the memory snapshot and stacks are in {dump}"
    )
    assert "Traceback" not in output
    text = dump.read_text()
    assert text.startswith("rank 0 of 1, pid ") and "out of memory on cpu" in text.splitlines()[0]
    assert "in step 3, phase D step: " in text and "batch of shape [8, 3, 32, 32] per rank" in text
    assert "memory snapshot: none (the allocator's snapshot is CUDA's; this ran on cpu)" in text
    assert "Tried to allocate 20.00 GiB" in text and "in d_step" in text  # the error's own traceback
    assert "in _watch" in text  # every thread's stack
    assert not (run_dir / "checkpoints" / "step_3").exists()


def test_sagan_stacks_where_no_job_runs_is_one_line_and_leaves_no_request(tmp_path, capsys):
    from launch.cli import main

    assert main(["stacks", str(tmp_path), "--wait", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sagan stacks: error: no rank of a job writing to {tmp_path} answered within 1 s (rank 0 looks for "
        f"requests every 5 s): is a run with run.dir={tmp_path} running?"
    )
    assert not (tmp_path / "diagnostics" / "request.json").exists()  # a job started later must not answer it

"""Checkpoint storage: atomic commit, verification and fallback, async save, retries, retention, safety."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.storage import LocalStore
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.format import CheckpointError, load_folder
from trainer.checkpoint.resume import refuse_other_model, resolve
from trainer.config import MetricsConfig
from trainer.observability.metrics import Metrics
from trainer.runtime.distributed import Runtime

SAGAN = str(Path(sys.executable).with_name("sagan"))


def state_of(step: int, numel: int = 1000) -> dict:
    return {"step": step, "weights": torch.full((numel,), float(step)), "nested": {"ints": [step, step + 1]}}


def metrics() -> Metrics:
    return Metrics(
        MetricsConfig(port=0),
        Runtime(0, 0, 1, torch.device("cpu"), "single"),
        backend="ddp",
        precision="fp32",
    )


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_save_commits_files_manifest_and_latest(tmp_path):
    m = metrics()
    ckpt = Checkpointer(str(tmp_path), keep_last=3, metrics=m)
    ckpt.save(7, state_of(7), {"config": {"model": {"z_dim": 16}}, "num_classes": 10})
    ckpt.wait()
    assert (tmp_path / "LATEST").read_text() == "step_7"
    manifest = json.loads((tmp_path / "step_7" / "manifest.json").read_text())
    payload = (tmp_path / "step_7" / "state.pt").read_bytes()
    assert manifest["files"]["state.pt"] == {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
    }
    assert manifest["step"] == 7 and manifest["num_classes"] == 10 and manifest["fid"] is None
    step, state, loaded_manifest = ckpt.load_latest()
    assert step == 7 and loaded_manifest == manifest
    assert torch.equal(state["weights"], torch.full((1000,), 7.0)) and state["nested"]["ints"] == [7, 8]
    assert sample(m, "sagan_checkpoint_seconds", phase="write") > 0
    assert abs(sample(m, "sagan_checkpoint_last_success_timestamp_seconds") - time.time()) < 60
    assert sample(m, "sagan_checkpoint_failures_total") == 0


def test_the_snapshot_is_taken_before_save_returns(tmp_path):
    """Training goes on changing its tensors in place while the write runs: the checkpoint holds the
    values at the time of the save, and the second save waits for the first."""
    ckpt = Checkpointer(str(tmp_path), keep_last=5)
    live = state_of(1, numel=2_000_000)
    ckpt.save(1, live)
    live["weights"].add_(100.0)
    live["nested"]["ints"].append(99)
    live["step"] = 2
    ckpt.save(2, live)
    live["weights"].add_(100.0)
    ckpt.wait()
    assert ckpt.committed_steps() == [1, 2]
    first, second = ckpt.load(1)[0], ckpt.load(2)[0]
    assert first["weights"].unique().tolist() == [1.0] and first["nested"]["ints"] == [1, 2]
    assert second["weights"].unique().tolist() == [101.0] and second["step"] == 2


def test_module_and_optimizer_state_round_trip_and_other_objects_are_refused_at_save(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.9))
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, {"net": net.state_dict(), "opt": opt.state_dict()})
    ckpt.wait()
    state = ckpt.load(1)[0]
    assert state["net"]._metadata == net.state_dict()._metadata  # module versions survive the snapshot
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh_opt = torch.optim.Adam(fresh.parameters())
    fresh.load_state_dict(state["net"])
    fresh_opt.load_state_dict(state["opt"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    assert fresh_opt.param_groups[0]["betas"] == (0.0, 0.9)
    with pytest.raises(
        CheckpointError, match=r"^checkpoint state\['extra'\]\[0\] is a complex; a checkpoint holds"
    ):
        ckpt.save(2, {"step": 2, "extra": [1 + 2j]})
    assert ckpt.committed_steps() == [1]


def test_keep_last_k_plus_best_fid(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=2)
    fids = {1: 30.0, 2: 12.5, 3: 25.0, 4: None, 5: 40.0, 6: None}
    for step, fid in fids.items():
        ckpt.save(step, state_of(step), fid=fid)
    ckpt.wait()
    assert ckpt.committed_steps() == [2, 5, 6]  # the last two, and step 2 with the lowest FID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_2", "step_5", "step_6"]
    # A new best replaces the old one; a later checkpoint without FID does not.
    ckpt.save(7, state_of(7), fid=3.0)
    ckpt.save(8, state_of(8))
    ckpt.save(9, state_of(9))
    ckpt.wait()
    assert ckpt.committed_steps() == [7, 8, 9]
    # Read back from the manifests by a fresh checkpointer (nothing cached): step 7 survives as best.
    fresh = Checkpointer(str(tmp_path), keep_last=1)
    fresh.save(10, state_of(10))
    fresh.wait()
    assert fresh.committed_steps() == [7, 10]


class FailingDeletes(LocalStore):
    """A real local folder whose deletions under one prefix fail while ``broken`` is set."""

    def __init__(self, root: Path, prefix: str):
        super().__init__(root)
        self.prefix, self.broken = prefix, True

    def delete(self, names):
        names = list(names)
        if self.broken and any(n.startswith(self.prefix) for n in names):
            raise DataError(f"cannot delete {self.prefix}: device busy")
        super().delete(names)


def test_purge_survives_a_failed_deletion(tmp_path, caplog):
    store = FailingDeletes(tmp_path, "step_1/")
    ckpt = Checkpointer(str(tmp_path), keep_last=1, store=store)
    store.broken = False
    ckpt.save(1, state_of(1))
    ckpt.wait()
    store.broken = True
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for step in (2, 3):
            ckpt.save(step, state_of(step))
        ckpt.wait()
    assert "could not delete old checkpoint step_1 (cannot delete step_1/: device busy)" in caplog.text
    assert ckpt.committed_steps() == [1, 3]  # step_1 stayed whole, step_2 was still purged
    assert ckpt.load(1)[0]["step"] == 1
    store.broken = False
    ckpt.save(4, state_of(4))
    ckpt.wait()
    assert ckpt.committed_steps() == [4] and not (tmp_path / "step_1").exists()


def test_failed_writes_are_counted_logged_and_retried(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    m = metrics()
    ckpt = Checkpointer(str(blocker / "checkpoints"), metrics=m, max_attempts=6, retry_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ckpt.save(3, state_of(3))
        deadline = time.monotonic() + 60
        while not sample(m, "sagan_checkpoint_failures_total") and time.monotonic() < deadline:
            time.sleep(0.02)
        blocker.unlink()  # the storage comes back while the save is being retried
        ckpt.wait()
    assert sample(m, "sagan_checkpoint_failures_total") >= 1
    assert "checkpoint step_3: attempt 1 of 6 failed" in caplog.text
    assert ckpt.load_latest()[0] == 3
    assert sample(m, "sagan_checkpoint_last_success_timestamp_seconds") > 0


def test_a_save_that_keeps_failing_is_raised_by_wait_not_dropped(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    m = metrics()
    ckpt = Checkpointer(str(blocker / "checkpoints"), metrics=m, max_attempts=2, retry_seconds=0.01)
    with caplog.at_level(logging.ERROR, logger="trainer"):
        ckpt.save(5, state_of(5))
        with pytest.raises(CheckpointError) as raised:
            ckpt.wait()
    message = str(raised.value)
    assert message.startswith("checkpoint step_5 could not be written to ") and "after 2 attempts" in message
    assert "\n" not in message and message in caplog.text
    assert sample(m, "sagan_checkpoint_failures_total") == 2
    assert sample(m, "sagan_checkpoint_last_success_timestamp_seconds") == 0


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_or_missing_newest_falls_back_to_the_previous(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), keep_last=5)
    for step in (2, 4, 6):
        ckpt.save(step, state_of(step))
    ckpt.wait()
    corrupt(tmp_path / "step_6" / "state.pt")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        step, state, _ = ckpt.load_latest()
    assert step == 4 and state["step"] == 4
    assert "step_6/state.pt does not match the sha256 in its manifest" in caplog.text
    assert "falling back to checkpoint step_4: the newer step_6 is unusable" in caplog.text

    (tmp_path / "step_4" / "state.pt").unlink()  # half-deleted by hand
    assert ckpt.load_latest()[0] == 2
    for name in ("step_2/state.pt", "step_4/manifest.json", "step_6/manifest.json"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint at .*: repair or remove them"):
        ckpt.load_latest()


def test_latest_pointing_nowhere_and_uncommitted_folders_are_ignored(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=5)
    ckpt.save(3, state_of(3))
    ckpt.wait()
    (tmp_path / "step_9").mkdir()
    (tmp_path / "step_9" / "state.pt").write_bytes(b"half a write")  # no manifest: never committed
    assert ckpt.load_latest()[0] == 3
    (tmp_path / "LATEST").write_text("step_12")  # names a checkpoint that is gone
    assert ckpt.load_latest()[0] == 3
    (tmp_path / "LATEST").write_text("garbage")
    assert ckpt.load_latest()[0] == 3
    assert Checkpointer(str(tmp_path / "empty")).load_latest() is None


class Payload:
    """Creates a file when unpickled: the code a checkpoint must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickled_checkpoint(folder: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"step": 5, "G_ema": {"w": torch.ones(2)}, "payload": Payload(marker)}, buffer)
    payload = buffer.getvalue()
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(payload)
    manifest = {
        "step": 5,
        "files": {"state.pt": {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder.parent / "LATEST").write_text(folder.name)


def test_a_pickled_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoints = tmp_path / "run" / "checkpoints"
    plant_pickled_checkpoint(checkpoints / "step_5", marker)
    with pytest.raises(CheckpointError) as raised:
        Checkpointer(str(checkpoints)).load_latest()
    assert "step_5/state.pt was refused, not loaded: it holds pickled objects other than tensors" in str(
        raised.value
    )
    assert "os.system" in str(raised.value) or "posix.system" in str(raised.value)
    # Through the command line: one line, exit 2, nothing executed.
    result = subprocess.run(
        [SAGAN, "sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "grid.png")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sagan sample: error: ")]
    assert len(errors) == 1 and "was refused, not loaded" in errors[0], result.stderr
    assert not marker.exists()
    assert not (tmp_path / "grid.png").exists()


def test_bad_urls_are_one_line_errors(tmp_path):
    for url, message in (
        ("ftp://host/checkpoints", "unsupported URL scheme in 'ftp://host/checkpoints'"),
        ("s3:///checkpoints", "no bucket in 's3:///checkpoints'"),
    ):
        with pytest.raises(CheckpointError, match=message) as raised:
            Checkpointer(url)
        assert "\n" not in str(raised.value)
    with pytest.raises(CheckpointError, match="no checkpoint found at"):
        load_folder(resolve(tmp_path / "nothing-here"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        CheckpointError, match=r"checkpoint.url=.*a-file/checkpoints: cannot create the folder"
    ):
        Checkpointer(str(tmp_path / "a-file" / "checkpoints")).check()


def test_another_model_config_is_refused_naming_the_setting():
    manifest = {
        "config": {"model": {"g_channels": 8, "z_dim": 16, "attention_impl": "math"}},
        "num_classes": 10,
    }
    refuse_other_model(manifest, {"g_channels": 8, "z_dim": 16, "attention_impl": "sdpa"}, 10, "step_4")
    with pytest.raises(
        CheckpointError, match=r"^step_4 was trained with model.g_channels=8, this run has 16: "
    ):
        refuse_other_model(manifest, {"g_channels": 16, "z_dim": 16}, 10, "step_4")
    with pytest.raises(CheckpointError, match="trained on 10 classes, this run has 3"):
        refuse_other_model(manifest, {"g_channels": 8, "z_dim": 16}, 3, "step_4")


# --------------------------------------------------------------------------------------------------
# SIGKILL at random moments of repeated saves


def save_forever(url: str, first_step: int) -> None:
    torch.set_num_threads(1)  # a forked child: no OpenMP pool inherited mid-state
    ckpt = Checkpointer(url, keep_last=2)
    step = first_step
    while True:
        ckpt.save(step, state_of(step, numel=500_000))
        step += 1


def kill_during_saves(url: str, trials: int, seed: int, max_delay: float) -> set[int]:
    """Start a saver, SIGKILL it after a random delay, check LATEST loads and is whole; repeat."""
    rng = random.Random(seed)
    fork = multiprocessing.get_context("fork")
    ckpt = Checkpointer(url, keep_last=2)
    ckpt.save(1, state_of(1, numel=500_000))
    ckpt.wait()
    seen, killed = set(), []
    for _ in range(trials):
        saver = fork.Process(target=save_forever, args=(url, ckpt.load_latest()[0] + 1), daemon=True)
        saver.start()
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        killed.append(saver.pid)
        step, state, manifest = ckpt.load_latest()
        assert state["step"] == manifest["step"] == step
        assert torch.equal(state["weights"], torch.full((500_000,), float(step)))
        seen.add(step)
    # The next save removes the temporary files the killed savers left behind.
    ckpt.save(max(seen) + 1, state_of(max(seen) + 1))
    ckpt.wait()
    left = [p.name for p in Path(tempfile.gettempdir()).glob("sagan-checkpoint-*.pt")]
    assert not [name for name in left if int(name.split("-")[2]) in killed]
    return seen


def test_sigkill_at_random_moments_of_a_save_never_breaks_latest(tmp_path):
    steps = kill_during_saves(str(tmp_path / "checkpoints"), trials=40, seed=5, max_delay=0.4)
    assert len(steps) > 1  # the saver made progress between kills: they landed mid-loop


def test_sigkill_during_saves_to_s3_never_breaks_latest(s3_bucket):
    steps = kill_during_saves(f"s3://{s3_bucket}/run/checkpoints", trials=8, seed=7, max_delay=1.0)
    assert len(steps) > 1


# --------------------------------------------------------------------------------------------------
# S3 (the moto server over HTTP)


def test_s3_save_purge_and_fallback(moto_server, s3_bucket):
    url = f"s3://{s3_bucket}/runs/a/checkpoints"
    ckpt = Checkpointer(url, keep_last=2)
    for step, fid in ((10, 20.0), (20, 30.0), (30, None), (40, None)):
        ckpt.save(step, state_of(step), {"world_size": 2}, fid=fid)
    ckpt.wait()
    s3 = moto_server.client()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [
        "runs/a/checkpoints/LATEST",
        *(f"runs/a/checkpoints/step_{s}/{f}" for s in (10, 30, 40) for f in ("manifest.json", "state.pt")),
    ]
    latest = s3.get_object(Bucket=s3_bucket, Key="runs/a/checkpoints/LATEST")["Body"].read()
    assert latest == b"step_40"
    s3.put_object(Bucket=s3_bucket, Key="runs/a/checkpoints/step_40/state.pt", Body=b"not what was written")
    step, state, manifest = Checkpointer(url).load_latest()
    assert step == 30 and state["step"] == 30 and manifest["world_size"] == 2
    # `sagan sample --checkpoint s3://.../runs/a` finds the checkpoints folder and LATEST in it.
    assert resolve(f"s3://{s3_bucket}/runs/a") == f"{url}/step_40"
    assert load_folder(f"{url}/step_30")[0]["step"] == 30


def test_missing_credentials_and_bucket_are_one_line_errors(moto_server, s3_bucket, monkeypatch):
    with pytest.raises(CheckpointError, match=r"S3 bucket 'no-such-bucket' does not exist") as raised:
        Checkpointer("s3://no-such-bucket/checkpoints").check()
    assert "\n" not in str(raised.value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(
        CheckpointError, match=r"no S3 credentials for s3://.*: set AWS_ACCESS_KEY_ID"
    ) as raised:
        Checkpointer(f"s3://{s3_bucket}/checkpoints").load_latest()
    assert "\n" not in str(raised.value)
    ckpt = Checkpointer(f"s3://{s3_bucket}/checkpoints", max_attempts=2, retry_seconds=0.01)
    ckpt.save(1, state_of(1))
    with pytest.raises(CheckpointError, match=r"checkpoint step_1 could not be written .* no S3 credentials"):
        ckpt.wait()

"""``sagan prepare`` in parallel: worker processes, ranks under mpiexec and torchrun, and a kill -9.

A plan makes each shard a pure function of its index, so every way of running it must write the
very bytes one process writes: the tests compare shard checksums (and read the samples back), not
just counts.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from tests.support.paths import ROOT
from tests.support.ports import free_port

BIN = Path(sys.executable).parent
TIMEOUT = 300
NUM_IMAGES = 45  # and one broken file, skipped alike by every rank
SHARD_SAMPLES = 4


def start(*command: str, cwd: Path = ROOT, **extra_env: str) -> subprocess.Popen:
    """A command (mpiexec, torchrun or sagan itself) from the venv, in its own session."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **extra_env,
    }
    return subprocess.Popen(
        [str(BIN / command[0]), *command[1:]],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, status: int = 0) -> str:
    """The output of a started command, which must end within TIMEOUT with ``status``."""
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish within {TIMEOUT}s:\n{output[-3000:]}")
    assert process.returncode == status, f"{process.args} exited with {process.returncode}:\n{output[-3000:]}"
    return output


def run_sagan(*command: str) -> str:
    return finish(start(*command))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of JPEGs and PNGs of assorted, mostly non-square sizes, and one broken file."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(7)
    for i in range(NUM_IMAGES):
        width, height = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = root / ["ant", "bee", "cat"][i % 3] / f"{i:03d}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def prepare_args(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prepare", "--source", f"imagefolder:{source}", "--out", str(out), "--image-size", "8",
        "--shard-samples", str(SHARD_SAMPLES), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ds"
    summary = prepare(
        f"imagefolder:{folder}", str(out), image_size=8, shard_samples=SHARD_SAMPLES, progress=False
    )
    assert (summary.num_samples, summary.num_skipped) == (NUM_IMAGES, 1)
    return out


def samples_of(url: Path) -> list[tuple[str, bytes, int]]:
    """(key, png bytes, class) of every sample, in manifest order, read by stock webdataset."""
    manifest = read_manifest(str(url))
    urls = [str(url / s.name) for s in manifest.shards]
    return [
        (s["__key__"], s["png"], int(s["cls"]))
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    ]


def assert_same_dataset(url: Path, reference: Path) -> None:
    ours, theirs = read_manifest(str(url)), read_manifest(str(reference))
    assert [(s.name, s.num_samples, s.sha256, s.class_counts) for s in ours.shards] == [
        (s.name, s.num_samples, s.sha256, s.class_counts) for s in theirs.shards
    ]
    assert (ours.classes, ours.plan, ours.num_samples) == (theirs.classes, theirs.plan, theirs.num_samples)
    assert samples_of(url) == samples_of(reference)
    assert sorted(p.name for p in url.iterdir()) == sorted(
        [*(s.name for s in ours.shards), "manifest.parquet"]
    )


def test_two_worker_processes_write_what_one_process_writes(folder, one_process, tmp_path):
    out = tmp_path / "two-workers"
    summary = prepare(
        f"imagefolder:{folder}",
        str(out),
        image_size=8,
        shard_samples=SHARD_SAMPLES,
        workers=2,
        progress=False,
    )
    assert (summary.num_samples, summary.num_skipped, summary.workers) == (NUM_IMAGES, 1, 2)
    assert_same_dataset(out, one_process)
    keys = [key for key, _, _ in samples_of(out)]
    assert len(keys) == len(set(keys)) == NUM_IMAGES
    assert Counter(c for _, _, c in samples_of(out)) == {0: 15, 1: 15, 2: 15}

    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(
        f"imagefolder:{folder}", str(out), image_size=8, shard_samples=SHARD_SAMPLES, progress=False
    )
    assert again.already_prepared and str(again).startswith("already prepared: 45 samples")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # nothing made or written again


@pytest.mark.slow
def test_two_ranks_under_mpiexec_write_what_one_process_writes(folder, one_process, tmp_path):
    out = tmp_path / "mpi"
    output = run_sagan("mpiexec", "-n", "2", "sagan", *prepare_args(folder, out, "--workers", "2"))
    assert "via mpi" in output and "(2 ranks x 2 workers)" in output
    assert output.count("prepared 45 samples") == 1  # said once, by rank 0
    assert_same_dataset(out, one_process)


@pytest.mark.slow
def test_two_ranks_under_torchrun_write_what_one_process_writes(folder, one_process, tmp_path):
    out = tmp_path / "torchrun"
    output = run_sagan(
        "torchrun", "--standalone", "--nproc_per_node=2", "--no-python", "sagan", *prepare_args(folder, out)
    )
    assert "via torchrun" in output and "(2 ranks x 1 worker)" in output
    assert_same_dataset(out, one_process)


@pytest.mark.slow
def test_two_ranks_started_as_srun_starts_them_write_what_one_process_writes(folder, one_process, tmp_path):
    """A SLURM step without MPI: srun starts every task with SLURM_PROCID, SLURM_NTASKS, ... and the
    batch script exports MASTER_ADDR and MASTER_PORT (launch/slurm_prepare.sh); here the two tasks are
    started by hand with that environment."""
    out = tmp_path / "slurm"
    port = free_port()
    tasks = [start("sagan", *prepare_args(folder, out), **srun_task(rank, port)) for rank in range(2)]
    outputs = [finish(task) for task in tasks]
    assert "rank 1/2 (local 1/2) via slurm" in outputs[1] and "(2 ranks x 1 worker)" in outputs[0]
    assert_same_dataset(out, one_process)


def srun_task(rank: int, port: int) -> dict[str, str]:
    """The environment of one of two tasks of a SLURM step without MPI, on one node."""
    return {
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }  # fmt: skip


@pytest.mark.slow
def test_ranks_writing_to_different_local_folders_commit_nothing(folder, tmp_path):
    """Node-local --out folders (here: a relative --out and a different working directory per rank):
    rank 0 finds the other rank's shards missing, every rank says so, and no manifest is written."""
    port = free_port()
    folders = [tmp_path / f"node{rank}" for rank in range(2)]
    tasks = []
    for rank, cwd in enumerate(folders):
        cwd.mkdir()
        tasks.append(start("sagan", *prepare_args(folder, Path("ds")), cwd=cwd, **srun_task(rank, port)))
    outputs = [finish(task, status=2) for task in tasks]
    assert all("shards the ranks made are not at ds" in output for output in outputs), outputs[0][-2000:]
    assert all("every rank must write to the same shared folder" in output for output in outputs)
    assert not any((cwd / "ds" / "manifest.parquet").exists() for cwd in folders)


@pytest.mark.slow
def test_a_prepare_killed_mid_way_resumes_with_every_sample_once(tmp_path):
    """kill -9 of the whole process group (the prepare and its workers) once a few shards are committed;
    the re-run keeps those shards as they are and writes each of the 1,797 digits exactly once."""
    out = tmp_path / "digits"
    args = ["prepare", "--source", "digits", "--out", str(out), "--image-size", "32", "--shard-samples", "30"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(BIN / "sagan"), *args, "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(list(out.glob("shard-*.json"))) < 3:
            assert process.poll() is None, "the prepare ended before it could be killed"
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "manifest.parquet").exists(), "the prepare finished before it was killed"
    committed = {p.with_suffix(".tar").name for p in out.glob("shard-*.json")}
    before = {name: (out / name).stat().st_mtime_ns for name in committed}
    assert 3 <= len(committed) < 60

    output = run_sagan("sagan", *args)  # one process now: the plan does not depend on it
    assert f"reused {len(committed)} shards committed by an interrupted run" in output
    manifest = read_manifest(str(out))
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == before  # not made again
    keys, labels = [], []
    for shard in manifest.shards:
        with tarfile.open(out / shard.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys += sorted(name.split(".")[0] for name in members if name.endswith(".png"))
        labels += [int(members[name]) for name in sorted(members) if name.endswith(".cls")]
    assert sorted(keys) == [f"{i:06d}" for i in range(1797)]  # every sample, exactly once
    assert np.bincount(labels).tolist() == np.bincount(_digit_labels()).tolist()
    with tarfile.open(out / manifest.shards[0].name) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(tar.getmembers()[0]).read()))
        assert image.size == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(s.name for s in manifest.shards), "manifest.parquet"]
    )


def _digit_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target

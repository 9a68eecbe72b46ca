"""Credentials never show: not in logs, metrics, the config saved with checkpoints, the run log or
error messages, whether they are wrong, carried in a URL, or right. (Untrusted checkpoints cannot run
code: tests/trainer/test_checkpoint.py::test_a_pickled_payload_is_refused_without_running_it.)"""

from __future__ import annotations

import os
import re
import secrets
import urllib.request

import pytest

from tests.support.jobs import SAGAN, TINY, error_lines, finish, start, wait_until
from tests.support.moto import moto_command, start_moto
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

KEY_ID = "AKIACANARY" + secrets.token_hex(5).upper()
SECRET = "canary/" + secrets.token_urlsafe(30)


def canary_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def assert_no_credentials(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for value in (KEY_ID, SECRET, SECRET.split("/", 1)[1]):
        assert value.encode() not in data, f"a credential appears in {where}"


@pytest.fixture(scope="module")
def authenticating_s3(tmp_path_factory):
    """A second moto server that checks credentials (moto's IAM knows no keys: every key is wrong)."""
    started = start_moto(
        moto_command(),
        tmp_path_factory.mktemp("moto-auth") / "moto.log",
        {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
    )
    assert started is not None
    process, endpoint = started
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


def test_wrong_credentials_and_urls_carrying_them_are_one_line_errors_that_show_none(
    authenticating_s3, digits_data, tmp_path
):
    train = [*TINY, f"data.url={digits_data}", f"run.dir={tmp_path / 'run'}"]
    cases = {
        "wrong credentials, checkpoints": (
            ["train", *train, "checkpoint.url=s3://bucket-a/checkpoints"], authenticating_s3, "denied (InvalidAccessKeyId)"
        ),
        "wrong credentials, prepare": (
            ["prepare", "--source", "digits", "--out", "s3://bucket-a/data"], authenticating_s3, "denied (InvalidAccessKeyId)"
        ),
        "credentials in data.url": (
            [*["train", *train], f"data.url=s3://{KEY_ID}:{SECRET}@bucket-a/data"], authenticating_s3, "carries credentials"
        ),
        "credentials in checkpoint.url": (
            ["train", *train, f"checkpoint.url=s3://{KEY_ID}:{SECRET}@bucket-a/c"], authenticating_s3, "carries credentials"
        ),
        "credentials in run.dir": (
            ["train", *TINY, f"data.url={digits_data}", f"run.dir=s3://{KEY_ID}:{SECRET}@bucket-a/r"], authenticating_s3,
            "carries credentials",
        ),
        "credentials in --out": (
            ["prepare", "--source", "digits", "--out", f"s3://{KEY_ID}:{SECRET}@bucket-a/d"], authenticating_s3,
            "carries credentials",
        ),
        "credentials in AWS_ENDPOINT_URL": (
            ["train", *train, "checkpoint.url=s3://bucket-a/c"],
            authenticating_s3.replace("http://", f"http://{KEY_ID}:{SECRET}@"),
            "(AWS_ENDPOINT_URL) carries credentials",
        ),
    }  # fmt: skip
    jobs = {
        case: start([SAGAN, *args], canary_env(endpoint), cwd=tmp_path)
        for case, (args, endpoint, _) in cases.items()
    }
    for case, (args, _, message) in cases.items():  # all at once: each only starts and refuses
        code, output = finish(jobs[case])
        assert code == 2, f"{case}: {output[-3000:]}"
        (line,) = error_lines(output, args[0])
        assert message in line and "Traceback" not in output, f"{case}: {output[-3000:]}"
        assert_no_credentials(f"the output of {case}", output)
        assert "***@" in line or "carries" not in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.parquet"))


def test_a_run_with_credentials_writes_them_nowhere(moto_server, digits_data, tmp_path):
    """Right credentials (moto's default server takes any): everything the run writes to the bucket,
    its output and its /metrics are searched for them."""
    bucket = moto_server.create_bucket()
    port = free_port()
    env = canary_env(moto_server.endpoint)
    command = [
        SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir=s3://{bucket}/run", "trainer.global_batch_size=8",
        "trainer.max_steps=12", "checkpoint.interval_steps=6", "trainer.sample_interval=6", f"metrics.port={port}",
    ]  # fmt: skip
    job = start(command, env, log=tmp_path / "job.log")

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError:
            return ""

    wait_until(
        lambda: re.search(r"^sagan_train_steps_total [1-9]", scrape(), re.M) is not None, "a step", [job]
    )
    metrics = scrape()
    code, output = finish(job)
    assert code == 0, output[-3000:]
    assert_no_credentials("/metrics", metrics)
    assert_no_credentials("the run's output", output)
    client = moto_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and any("/log/" in f"/{k}" for k in keys)
    for key in keys:  # checkpoints (state and the config in the manifest), run log, sample grids
        assert_no_credentials(key, client.get_object(Bucket=bucket, Key=key)["Body"].read())

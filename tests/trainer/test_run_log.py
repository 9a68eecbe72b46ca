"""The run log keeps its rows when the object store refuses a write, and writes them all later."""

import math
import uuid

from trainer.observability.run_log import RunLog, read_run_log


def test_rows_survive_a_store_that_refuses_writes_for_a_while(moto_server, s3_env):
    bucket = f"later-{uuid.uuid4().hex[:10]}"  # does not exist yet: every PUT fails (NoSuchBucket)
    log = RunLog(f"s3://{bucket}/run", flush_seconds=math.inf)
    for step in (1, 2):
        log.append({"step": step, "loss_d": float(step)})
    assert log.flush() is None and log.failures == 2 and len(log.rows) == 2  # the first row tried at once
    moto_server.client().create_bucket(Bucket=bucket)
    log.append({"step": 3, "loss_d": 3.0})
    assert log.flush() is not None and not log.rows
    rows = read_run_log(f"s3://{bucket}/run").to_pylist()
    assert [(r["step"], r["loss_d"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0)]

"""SaganRankStalled, end to end: Debian's ``prometheus`` scrapes a real two-rank torchrun job every second
and evaluates the shipped rules file. Rank 1 is frozen with SIGSTOP (as a GPU fault or a hung storage
call leaves it): its scrapes fail, so its series go stale, while rank 0 waits for it in a collective and
goes on serving /metrics. Once rank 0's last step is older than its watchdog's deadline
(``sagan_stall_deadline_seconds``, trainer.stall_seconds here) for the rule's minute, the alert fires
for rank 0's instance, labelled with its rank.
"""

from __future__ import annotations

import signal
import time
import urllib.parse

import pytest

from tests.support.faults import kill_rank, workers_of
from tests.support.jobs import SAGAN, TINY, TORCHRUN, environment, kill_session, output_of, start, wait_until
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.prometheus import get_json, start_prometheus, stop, tool, wait_ready

pytestmark = pytest.mark.slow

RULES = ROOT / "k8s" / "monitoring" / "sagan-alerts.rules.yaml"
ALERT = "SaganRankStalled"
STALL_SECONDS = 5
INTERVAL_SECONDS = 1  # Prometheus' scrape and rule evaluation
START_SECONDS = 120  # both ranks stepping, as Prometheus sees them, on a loaded 2-core machine
FIRE_SECONDS = 150  # the deadline, the rule's `for: 1m`, scrapes and evaluations: about 70 s


def query(prometheus: str, expr: str) -> list[dict]:
    answer = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def alerts(prometheus: str) -> list[dict]:
    """Prometheus' active alerts named ALERT (pending and firing)."""
    found = get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    return [a for a in found if a["labels"]["alertname"] == ALERT]


def the_rule(prometheus: str) -> dict:
    groups = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r["name"] == ALERT]
    return rule


def stepping(prometheus: str) -> set[str]:
    """The instances Prometheus has seen past step 10 with the watchdog's deadline, once the rule has run."""
    if the_rule(prometheus)["lastEvaluation"].startswith("0001-"):
        return set()
    deadline = query(prometheus, f"sagan_stall_deadline_seconds == {STALL_SECONDS}")
    stepped = query(
        prometheus, "sagan_train_step >= 10 and on (instance) sagan_last_step_timestamp_seconds > 0"
    )
    return {s["metric"]["instance"] for s in deadline} & {s["metric"]["instance"] for s in stepped}


def test_rank_stalled_fires_for_the_rank_that_waits_for_a_frozen_one(digits_data, tmp_path):
    prometheus = tool("prometheus")
    metrics_port = free_port(span=2)
    instances = [f"127.0.0.1:{metrics_port}", f"127.0.0.1:{metrics_port + 1}"]  # local ranks 0 and 1
    log, prometheus_log = tmp_path / "torchrun.log", tmp_path / "prometheus.log"
    # No checkpoint and no evaluation while it runs: in those phases the deadline is trainer.timeout_seconds
    # longer, and the freeze must not land in one. The collectives wait longer than this test does.
    job = start(
        [
            TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python", SAGAN, "train", *TINY,
            f"data.url={digits_data}", f"run.dir={tmp_path / 'run'}", f"metrics.port={metrics_port}",
            "trainer.global_batch_size=8", "trainer.max_steps=1000000", "checkpoint.interval_steps=1000000",
            "trainer.timeout_seconds=600", f"trainer.stall_seconds={STALL_SECONDS}", "trainer.on_stall=dump",
        ],
        log=log,
    )  # fmt: skip
    server = None
    started = time.monotonic()
    try:
        env = environment()
        server, url = start_prometheus(
            prometheus, tmp_path, instances, RULES, prometheus_log, env, INTERVAL_SECONDS
        )
        wait_ready(url, {"torchrun": job, "prometheus": server}, prometheus_log)
        # Both ranks step, Prometheus sees their deadline and last step, the rule evaluates cleanly.
        seen = "both ranks stepping, as Prometheus sees them"
        wait_until(lambda: stepping(url) == set(instances), seen, [job, server], timeout=START_SECONDS)
        wait_until(lambda: len(workers_of(job.pid)) == 2, "two running ranks", [job], timeout=60)
        rule = the_rule(url)
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        before = [a for a in alerts(url) if a["state"] == "firing"]
        assert not before, before

        kill_rank(job.pid, 1, signal.SIGSTOP)
        frozen = time.monotonic()
        pending_after = fired_after = None
        while fired_after is None:
            if job.poll() is not None:
                pytest.fail(f"the job ended ({job.returncode}) with rank 1 frozen:\n{output_of(job)[-4000:]}")
            if time.monotonic() - frozen > FIRE_SECONDS:
                pytest.fail(
                    f"{ALERT} not firing {FIRE_SECONDS}s after rank 1 froze: {alerts(url)}; "
                    f"ages: {query(url, 'time() - sagan_last_step_timestamp_seconds')}"
                )
            active = alerts(url)
            if active and pending_after is None:
                pending_after = time.monotonic() - frozen
            firing = [a for a in active if a["state"] == "firing"]
            if firing:
                fired_after = time.monotonic() - frozen
            time.sleep(0.5)
        up = {s["metric"]["instance"]: float(s["value"][1]) for s in query(url, 'up{job="sagan"}')}
        dumps = sorted((tmp_path / "run" / "diagnostics").glob("step_*/rank_0.txt"))
    finally:
        kill_session(job)
        job.wait(timeout=30)
        if server is not None:
            stop(server)
    print(
        f"{ALERT}: pending {pending_after:.1f} s and firing {fired_after:.1f} s after rank 1 froze "
        f"(stall_seconds={STALL_SECONDS}, for: 1m); {time.monotonic() - started:.0f} s in all"
    )
    (alert,) = firing  # rank 0's alone: frozen rank 1 is not scraped
    assert alert["labels"] == {
        "alertname": ALERT,
        "severity": "critical",
        "job": "sagan",
        "instance": instances[0],
        "rank": "0",
    }
    assert up == {instances[0]: 1.0, instances[1]: 0.0}
    description = alert["annotations"]["description"]
    assert description.startswith(f"Rank 0 of sagan ({instances[0]}) last completed a training step ")
    assert "<run.dir>/diagnostics/step_<N>/rank_<R>.txt" in description and "sagan stacks RUN" in description
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#saganrankstalled"
    assert 60 <= fired_after < FIRE_SECONDS
    # What the alert points at: rank 0's watchdog dumped its stacks at the deadline, naming rank 1.
    assert dumps and "behind: rank 1 (not running" in dumps[-1].read_text()

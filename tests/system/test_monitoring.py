"""The monitoring an operator relies on, checked against the real tools.

- The alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``), and
  every alert has a severity, a summary, a description and a runbook section.
- The Grafana dashboard provisions as well as imports: its data source is a template variable that
  every panel and query uses.
- Debian's ``prometheus`` scrapes a live two-rank ``torchrun`` job on 127.0.0.1, sees both ranks
  step, and evaluates every alert rule against it without an error; every metric a panel or an alert
  names is exposed by that job, and ``promtool check metrics`` accepts what the ranks serve.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.datasets import prepare_digits
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.prometheus import get_json, start_prometheus, stop, tool, wait_ready

MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "sagan-dashboard.json"
RULES = MONITORING / "sagan-alerts.rules.yaml"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
BIN = Path(sys.executable).parent
DATASOURCE_REFS = ("${datasource}", "$datasource")
START_SECONDS = 300  # the job's first steps on a loaded 2-core machine, Prometheus' first scrapes
SCRAPE_SECONDS = 1
# Families whose series appear only after an event this job does not have: a skipped sample, a GPU.
EVENT_ONLY = {
    "sagan_data_samples_skipped_total": "no sample of the job's clean dataset is skipped",
    "sagan_cuda_memory_allocated_bytes": "CPU only",
    "sagan_cuda_memory_reserved_bytes": "CPU only",
    "sagan_cuda_memory_max_allocated_bytes": "CPU only",
}
# FID is exported by the evaluation (evaluation/); required as soon as that module exists.
EVALUATION_METRICS = {"sagan_eval_fid"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
PROMQL_WORDS |= {"bool", "offset", "inf", "nan"}


# --------------------------------------------------------------------------------------------------
# Reading expressions


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query with $variables) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if word.lower() in PROMQL_WORDS or expr[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation being called
        names.add(word)
    return names


def test_metric_names_of_promql():
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(sagan_step_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"sagan_step_duration_seconds_bucket"}
    assert metric_names(
        'max by (job) (a_total) - max by(job) (b) > 3 * max by (job) (c{x="y{z}"}) and on (job) d offset 5m'
    ) == {"a_total", "b", "c", "d"}
    assert metric_names("time() - max(x > 0) / 1e-4 unless vector(1)") == {"x"}


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def named_metrics() -> set[str]:
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    return set().union(*(metric_names(e) for e in exprs))


# --------------------------------------------------------------------------------------------------
# Files


def test_promtool_checks_the_rules_and_their_unit_tests():
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    assert RULE_TESTS
    tested = subprocess.run(
        [promtool, "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    fired: dict[str, int] = {}
    silent: dict[str, int] = {}
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                counts = fired if check.get("exp_alerts") else silent
                counts[check["alertname"]] = counts.get(check["alertname"], 0) + 1
    names = {rule["alert"] for rule in alert_rules()}
    assert names == set(fired) and names == set(silent)


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_severity_annotations_and_a_runbook_section():
    anchors = {
        github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")
    }
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "SaganTrainingStalled",
        "SaganNonFiniteUpdates",
        "SaganCheckpointStale",
        "SaganDataStarvation",
        "SaganRankMissing",
        "SaganRestartsPilingUp",
        "SaganLossDivergence",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbook.md" and anchor in anchors, (rule["alert"], annotations["runbook_url"])


def test_the_dashboard_provisions_as_well_as_imports():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "pod"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] in DATASOURCE_REFS

    def uses_the_variable(ref) -> bool:
        return ref in DATASOURCE_REFS or (isinstance(ref, dict) and ref.get("uid") in DATASOURCE_REFS)

    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = set()
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        titles.add(panel["title"])
        assert uses_the_variable(panel["datasource"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert uses_the_variable(target["datasource"]), panel["title"]
            expr = target["expr"]
            assert 'job=~"$job"' in expr and 'pod=~"$pod"' in expr, (panel["title"], expr)
            for window in re.findall(r"\[([^\]]*)\]", expr):
                assert window == "$__rate_interval", (panel["title"], expr)
    assert {
        "Throughput",
        "Step time p50 / p95",
        "D and G loss",
        "Gradient norms",
        "Attention gamma per layer",
        "FID over time",
        "Data-wait fraction",
        "Skipped samples by reason",
        "S3 retries",
        "Checkpoint stall and write time",
        "Checkpoint age",
        "World size",
        "Restarts",
        "Memory",
    } <= titles
    assert "__inputs" not in dashboard or all(i.get("type") != "datasource" for i in dashboard["__inputs"])


# --------------------------------------------------------------------------------------------------
# A live two-rank job scraped by Prometheus


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@dataclass
class LiveJob:
    ports: list[int]  # the ranks' metrics ports: metrics.port + local_rank
    prometheus: str  # http://127.0.0.1:PORT
    job: subprocess.Popen
    server: subprocess.Popen
    log: Path

    def alive(self) -> None:
        for process, name in ((self.job, "torchrun"), (self.server, "prometheus")):
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{self.log.read_text()[-4000:]}")

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = get_json(url)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]


@pytest.fixture(scope="module")
def live_job(tmp_path_factory) -> LiveJob:
    prometheus = tool("prometheus")
    root = tmp_path_factory.mktemp("live")
    # Its own digits, not the session's digits_data: the job's evaluation caches its classifier and
    # reference features in the dataset folder.
    data = prepare_digits(root / "digits")
    metrics_port = free_port(span=2)
    ports = [metrics_port, metrics_port + 1]
    log = root / "processes.log"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    with open(log, "ab") as out:
        job = subprocess.Popen(
            [
                str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
                str(BIN / "sagan"), "train", "configs/smoke.yaml",
                f"data.url={data}", f"run.dir={root / 'run'}", f"metrics.port={metrics_port}",
                "trainer.max_steps=1000000", "trainer.log_interval=1", "trainer.sample_interval=1000000",
                "trainer.global_batch_size=8", "checkpoint.interval_steps=3", "checkpoint.keep_last=1",
                "model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "data.num_workers=0",
                # A small evaluation now and then, so the dashboard's FID panel has a series to show.
                "eval.metrics=[fid]", "eval.interval_steps=5", "eval.num_samples=64", "eval.num_reference=256",
                "eval.batch_size=64", "eval.classifier_epochs=1", "eval.classifier_width=4",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    targets = [f"127.0.0.1:{port}" for port in ports]
    server, url = start_prometheus(prometheus, root, targets, RULES, log, env, SCRAPE_SECONDS)
    live = LiveJob(ports, url, job, server, log)
    try:
        wait_ready(url, {"torchrun": job, "prometheus": server}, log)
        yield live
    finally:
        stop(job)
        stop(server)


def test_prometheus_sees_both_ranks_step(live_job):
    instances = {f"127.0.0.1:{port}" for port in live_job.ports}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    deadline = time.monotonic() + START_SECONDS
    while not (set(first) == instances and all(last[i] > first[i] for i in instances)):
        live_job.alive()
        if time.monotonic() > deadline:
            pytest.fail(
                f"within {START_SECONDS}s Prometheus saw sagan_train_steps_total first {first}, last {last} "
                f"for {sorted(instances)}:\n{live_job.log.read_text()[-4000:]}"
            )
        for series in live_job.query('sagan_train_steps_total{job="sagan"}'):
            instance, value = series["metric"]["instance"], float(series["value"][1])
            first.setdefault(instance, value)
            last[instance] = value
        time.sleep(SCRAPE_SECONDS)
    assert set(last) == instances
    ranks = {s["metric"]["rank"] for s in live_job.query('sagan_rank_info{job="sagan"}')}
    assert ranks == {"0", "1"}
    assert {float(s["value"][1]) for s in live_job.query('sagan_world_size{job="sagan"}')} == {2.0}


def test_prometheus_evaluates_every_alert_rule_against_the_job(live_job):
    """Each rule runs on real series without an error (no many-to-many match, no bad function use)."""
    names = {rule["alert"] for rule in alert_rules()}
    deadline = time.monotonic() + START_SECONDS
    while True:
        live_job.alive()
        rules = [
            r for g in get_json(f"{live_job.prometheus}/api/v1/rules")["data"]["groups"] for r in g["rules"]
        ]
        evaluated = {r["name"]: r for r in rules if not r["lastEvaluation"].startswith("0001-")}
        # Rules are evaluated once the series they read exist: wait for a checkpoint to be committed.
        ready = live_job.query('sagan_checkpoint_last_success_step{job="sagan"} > 0')
        if set(evaluated) == names and ready:
            time.sleep(2 * SCRAPE_SECONDS)  # one more evaluation with the checkpoint's series
            break
        if time.monotonic() > deadline:
            pytest.fail(f"rules evaluated within {START_SECONDS}s: {sorted(evaluated)}, checkpoint: {ready}")
        time.sleep(SCRAPE_SECONDS)
    rules = [r for g in get_json(f"{live_job.prometheus}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == names
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), (rule["name"], rule.get("lastError"))
    # The expressions the alerts compare produce values for this job: they select what it exports.
    assert live_job.query("count by (job) (sagan_rank_info) == max by (job) (sagan_world_size)")
    # SaganCheckpointStale's comparison, false at some evaluation of the last 30 s (the alert needs it true
    # for 5 minutes): at one instant the ranks' scrapes, up to a scrape interval apart, can put the newest
    # step more than three intervals of these fast steps past the checkpoint gauge.
    age = live_job.query(
        "min_over_time((max by (job) (sagan_train_step) - max by (job) (sagan_checkpoint_last_success_step))"
        f"[30s:{SCRAPE_SECONDS}s]) <= 3 * max by (job) (sagan_checkpoint_interval_steps)"
    )
    assert [s["metric"]["job"] for s in age] == ["sagan"]


def exposition(live_job) -> list[str]:
    return [scrape_text(port) for port in live_job.ports]


def declared_and_present(texts: list[str]) -> tuple[set[str], set[str]]:
    """Sample names each family declares (by its type) and the sample names with a value."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    declared, present = set(), set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            declared |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
            present |= {sample.name for sample in family.samples}
    return declared, present


def test_every_metric_of_the_dashboard_and_the_alerts_is_exposed_by_the_job(live_job):
    wanted = named_metrics()
    assert {"sagan_train_steps_total", "sagan_step_duration_seconds_bucket", "sagan_world_size"} <= wanted
    if importlib.util.find_spec("evaluation") is None:
        wanted -= EVALUATION_METRICS
    deadline = time.monotonic() + START_SECONDS
    while True:
        live_job.alive()
        try:
            declared, present = declared_and_present(exposition(live_job))
        except OSError:  # the ranks are still starting
            declared, present = set(), set()
        missing = wanted - declared
        without_samples = wanted - present - set(EVENT_ONLY)
        if not missing and not without_samples:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"not exposed: {sorted(missing)}; exposed without samples: {sorted(without_samples)}")
        time.sleep(SCRAPE_SECONDS)


def test_promtool_accepts_what_every_rank_serves(live_job):
    promtool = tool("promtool")
    deadline = time.monotonic() + START_SECONDS
    texts: list[str] = []
    while not texts:
        live_job.alive()
        try:
            texts = exposition(live_job)
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not serve /metrics within {START_SECONDS}s")
            time.sleep(SCRAPE_SECONDS)
    for port, text in zip(live_job.ports, texts):
        assert "sagan_train_steps_total" in text
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert checked.returncode == 0, f"port {port}: {checked.stdout}{checked.stderr}"

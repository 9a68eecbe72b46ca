"""The dashboard's per-rank last-step age, evaluated by Prometheus's own engine (promtool): the panel's
query, as shipped, gives each rank's seconds since its last step, labelled by rank, so the rank stuck
for two minutes stands out beside one that stepped a moment ago."""

from __future__ import annotations

import json
import shutil
import subprocess

import yaml

from tests.support.paths import ROOT
from tests.support.tools import missing_tool

DASHBOARD = ROOT / "k8s/monitoring/sagan-dashboard.json"
TITLE = "Seconds since each rank's last step"


def series(name: str, instance: str, values: str, **labels: str) -> dict[str, str]:
    matchers = ", ".join(
        f'{k}="{v}"' for k, v in {"job": "j", "pod": "p", "instance": instance, **labels}.items()
    )
    return {"series": f"{name}{{{matchers}}}", "values": values}


def test_the_last_step_age_panel_names_the_rank_that_stopped(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool is not installed: apt-get install prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p.get("title") == TITLE]
    (target,) = panel["targets"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "s" and "{{rank}}" in target["legendFormat"]
    expr = target["expr"].replace("$job", "j").replace("$pod", "p")
    info = {"local_rank": "0", "backend": "ddp", "precision": "fp32", "device": "cpu"}
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # rank 0 steps every minute; rank 1 stopped after its step at t=60 s
                    series("sagan_last_step_timestamp_seconds", "h:9400", "0 60 120 180"),
                    series("sagan_last_step_timestamp_seconds", "h:9401", "0 60 60 60"),
                    series("sagan_rank_info", "h:9400", "1 1 1 1", rank="0", **info),
                    series("sagan_rank_info", "h:9401", "1 1 1 1", rank="1", **info),
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": '{job="j", pod="p", instance="h:9400", rank="0"}', "value": 0},
                            {"labels": '{job="j", pod="p", instance="h:9401", rank="1"}', "value": 120},
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "panel.test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

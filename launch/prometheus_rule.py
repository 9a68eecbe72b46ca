"""The alert rules as a prometheus-operator ``PrometheusRule``, generated from the Prometheus rules file.

``k8s/monitoring/sagan-alerts.rules.yaml`` is the one source: a plain Prometheus rules file that
promtool checks and tests. Kustomize cannot put a file into a custom resource's ``spec``, so this module
renders ``k8s/monitoring/prometheusrule.yaml`` from it (``make k8s-manifests``, i.e.
``python -m launch.prometheus_rule``); the rendering is deterministic, and a test fails when the committed
file is not byte-for-byte what the rules file renders to.

    python -m launch.prometheus_rule            # (re)write k8s/monitoring/prometheusrule.yaml
    python -m launch.prometheus_rule --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.errors import first_line
from launch.manifest_yaml import dump_all

MONITORING_DIR = Path(__file__).resolve().parent.parent / "k8s" / "monitoring"
RULES_FILE = MONITORING_DIR / "sagan-alerts.rules.yaml"
PROMETHEUS_RULE_FILE = MONITORING_DIR / "prometheusrule.yaml"
RULE_NAME = "sagan-alerts"


class RulesFileError(ValueError):
    """The rules file is missing or is not a Prometheus rules file (``groups:`` at the top)."""


def read_groups(rules_file: Path) -> list[dict[str, Any]]:
    try:
        tree = yaml.safe_load(rules_file.read_text())
    except OSError as err:
        raise RulesFileError(f"cannot read the rules file {rules_file}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise RulesFileError(f"{rules_file} is not valid YAML: {first_line(err)}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("groups"), list) or not tree["groups"]:
        raise RulesFileError(
            f"{rules_file} is not a Prometheus rules file: it needs a non-empty `groups:` list"
        )
    return tree["groups"]


def prometheus_rule(groups: list[dict[str, Any]], source_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": RULE_NAME,
            "labels": {"app.kubernetes.io/name": "sagan"},
            "annotations": {"sagan/generated-from": source_name},
        },
        "spec": {"groups": groups},
    }


def render(rules_file: Path = RULES_FILE) -> str:
    """The PrometheusRule manifest for ``rules_file``, as committed (a header line, then YAML)."""
    rule = prometheus_rule(read_groups(rules_file), rules_file.name)
    body = dump_all([rule])
    return (
        f"# Generated from {rules_file.name} by `make k8s-manifests` (python -m launch.prometheus_rule).\n"
        "# Do not edit: change the rules file and regenerate.\n" + body
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.prometheus_rule", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rules", type=Path, default=RULES_FILE, help="the Prometheus rules file")
    parser.add_argument("--out", type=Path, default=PROMETHEUS_RULE_FILE, help="the PrometheusRule manifest")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not what --rules renders to")
    args = parser.parse_args(argv)
    try:
        text = render(args.rules)
    except RulesFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date with {args.rules}: run `make k8s-manifests`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

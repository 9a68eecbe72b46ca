"""Where things are: the repository root, its run configs, and the tests' committed data."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
CONFIGS = ROOT / "configs"
FIXTURES = ROOT / "tests" / "fixtures"  # datasets and checkpoints written by older code
SCHEMAS = ROOT / "tests" / "schemas"  # the CRDs the k8s manifests are validated against

"""The benchmark entry point runs, saves JSON and rewrites only its own section of the docs (no timings checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.paths import ROOT


def test_entry_point_writes_json_and_replaces_its_doc_section(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(
        "# Performance\n\nkept\n\n<!-- bench:attention -->\nold table\n<!-- /bench:attention -->\n\nalso kept\n"
    )
    command = [sys.executable, "-m", "benchmarks", "attention", "--quick", "--threads", "1",
               "--results", str(tmp_path / "results"), "--doc", str(doc)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    saved = json.loads((tmp_path / "results" / "attention.json").read_text())
    assert saved["name"] == "attention" and set(saved["data"]["sizes"]) == {"8", "16"}
    assert saved["machine"].startswith("CPU ") and "bf16 instructions" in saved["machine"]
    text = doc.read_text()
    assert text.startswith("# Performance\n\nkept\n") and text.endswith("also kept\n")
    assert "old table" not in text and text.count("<!-- bench:attention -->") == 1
    section = text.split("<!-- bench:attention -->")[1].split("<!-- /bench:attention -->")[0]
    assert "`python -m benchmarks attention --quick" in section
    assert "| 16×16 | 256 | fused | flash_attention |" in section
    assert "| 16×16 | 256 | math | softmax(QKᵀ)V |" in section


def test_a_quick_run_leaves_the_committed_results_and_tables_alone_unless_asked(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is run from the checkout, not installed
    from benchmarks import report
    from benchmarks.__main__ import QUICK_RESULTS, parse_args

    full = parse_args(["step"])
    assert (full.results, full.doc, full.no_doc) == (report.RESULTS, report.DOC, False)
    quick = parse_args(["step", "--quick"])
    assert quick.results == QUICK_RESULTS and quick.no_doc and QUICK_RESULTS != report.RESULTS
    asked = parse_args(["--quick", "--results", "out", "--doc", "doc.md"])
    assert (asked.results, asked.doc, asked.no_doc) == (Path("out"), Path("doc.md"), False)


def test_the_gpu_check_runs_every_stage_on_the_cpu_at_tiny_sizes(tmp_path):
    """``python -m benchmarks gpu --quick --device cpu``: versions, the CUDA suite (every test skipped
    here, with its reason), and the step table of every contender, so the device check works when a GPU
    is lent."""
    command = [sys.executable, "-m", "benchmarks", "gpu", "--quick", "--device", "cpu", "--threads", "1",
               "--results", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    suite = saved["data"]["suite"]
    assert suite["exit_status"] == 0 and "skipped" in suite["summary"], suite
    assert "SKIPPED" in result.stdout and "no CUDA device" in result.stdout  # each with its reason
    steps = saved["data"]["steps"]
    assert set(steps) == {
        "reference-style, fp32", "ours, fp32 (TF32)", "ours, bf16 autocast", "ours, fp16 autocast",
        "ours, bf16 autocast, compiled",
    }  # fmt: skip
    assert all(step["launches"] > 0 and len(step["wall"]) == 2 for step in steps.values())
    assert saved["data"]["model_flops"] > 0 and saved["data"]["versions"]["torch"] == torch.__version__
    assert [row[0] for row in saved["tables"][0]["rows"]] == list(steps)

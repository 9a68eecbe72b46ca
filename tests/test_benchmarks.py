"""The benchmark entry point runs, saves JSON and rewrites only its own section of the docs (no timings checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

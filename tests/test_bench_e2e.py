"""benchmarks/bench_e2e.py --tiny: the whole end-to-end benchmark (both sides in subprocesses) gives every figure."""

from __future__ import annotations

import json

from benchmarks.bench_e2e import main

METHODS = ["baseline", "am1", "fastface-am1"]


def test_tiny_run_reports_every_figure(tmp_path):
    out = tmp_path / "e2e.json"
    main(["--tiny", "--repeats", "1", "--threads", "1", "--methods", ",".join(METHODS), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["sides"] == ["ours", "official"]
    summary = result["summary"]
    for m in METHODS:
        row = summary["methods"][m]
        for side in ("ours", "official"):
            assert row[side]["min"] > 0 and row[side]["median"] >= row[side]["min"]
        assert row["ours/official"]["min"] > 0
        assert row["official"]["evals"] == 12
    assert summary["methods"]["am1"]["ours"]["evals"] == 4  # AM1 alone: one branch per step
    assert summary["methods"]["fastface-am1"]["ours"]["evals"] == 10
    for side in ("ours", "official"):
        assert summary["peak_rss"][side]["min"] > 100e6 and summary["load_s"][side]["min"] > 0
    table = out.with_suffix(".md").read_text()
    assert all(m in table for m in METHODS) and "peak RSS" in table

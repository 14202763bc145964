"""benchmarks/bench_e2e.py --tiny: the whole end-to-end benchmark (both sides in subprocesses) gives every figure."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.bench_e2e import main, markdown, parse_args, ratio_pairs, summarise

METHODS = ["baseline", "am1", "fastface-am1"]


def test_tiny_run_reports_every_figure(tmp_path):
    out = tmp_path / "e2e.json"
    main(["--tiny", "--repeats", "1", "--threads", "1", "--methods", ",".join(METHODS), "--out", str(out),
          "--weights", str(tmp_path / "weights"), "--sides", "ours,official,ours-fused"])
    result = json.loads(out.read_text())
    assert result["sides"] == ["ours", "official", "ours-fused"]
    summary = result["summary"]
    for m in METHODS:
        row = summary["methods"][m]
        for side in result["sides"]:
            assert row[side]["min"] > 0 and row[side]["median"] >= row[side]["min"]
        assert row["ours/official"]["min"] > 0 and row["ours-fused/official"]["min"] > 0
        assert row["official"]["evals"] == 12 and row["ours-fused"]["evals"] == row["ours"]["evals"]
    assert summary["methods"]["am1"]["ours"]["evals"] == 4  # AM1 alone: one branch per step
    assert summary["methods"]["fastface-am1"]["ours"]["evals"] == 10
    for side in result["sides"]:
        assert summary["peak_rss"][side]["min"] > 100e6 and summary["load_s"][side]["min"] > 0
    table = out.with_suffix(".md").read_text()
    assert all(m in table for m in METHODS) and "peak RSS" in table


def test_weights_folder_is_written_once_and_reused(tmp_path):
    from benchmarks.bench_e2e import write_weights

    files = write_weights(tmp_path, tiny=True, dtype=torch.float32)
    stamp = {k: v.stat().st_mtime_ns for k, v in files.items()}
    again = write_weights(tmp_path, tiny=True, dtype=torch.float32)
    assert again == files and {k: v.stat().st_mtime_ns for k, v in again.items()} == stamp
    with pytest.raises(SystemExit, match="another --weights folder"):
        write_weights(tmp_path, tiny=True, dtype=torch.float16)


def test_sides_are_checked():
    assert parse_args(["--sides", "ours,ours-compiled"]).sides == ["ours", "ours-compiled"]
    for bad in ("ours,theirs", "ours,ours", ","):
        with pytest.raises(SystemExit):
            parse_args(["--sides", bad])


def _round(seconds: float, evals: float) -> dict:
    return {"seconds": {"am1": seconds}, "evals": {"am1": evals}, "peak_rss": 1e9, "load_s": 1.0}


def test_compiled_over_eager_without_the_official_side():
    """Ratios are taken per round between the sides present: compiled / eager alone needs no official run."""
    runs = {"ours": [_round(2.0, 4), _round(4.0, 4), _round(3.0, 4)],
            "ours-compiled": [_round(1.0, 4), _round(3.0, 4), _round(2.7, 4)]}
    assert ratio_pairs(list(runs)) == [("ours-compiled", "ours")]
    row = summarise(runs, ["am1"])["methods"]["am1"]
    assert row["ours-compiled/ours"] == {"min": 0.5, "median": 0.75}
    assert row["ours"] == {"min": 2.0, "median": 3.0, "evals": 4}
    table = markdown({"sides": list(runs), "summary": summarise(runs, ["am1"])})
    assert "| am1 | 2.000 / 3.000 | 1.000 / 2.700 | 0.50 / 0.75 | 4 / 4 |" in table
    assert ratio_pairs(["ours", "official", "ours-compiled"]) == [
        ("ours", "official"), ("ours-compiled", "official"), ("ours-compiled", "ours")]

"""A real 2-process torchrun (gloo, CPU) of the sweep command gathers one table equal to the single-process one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnx  # noqa: F401
import insightface  # noqa: F401
import transformers  # noqa: F401
import matplotlib  # noqa: F401

from eval_fakes import write_aesthetic, write_diversebench, write_tiny_clip  # noqa: E402
from onnx_face_models import make_pack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMED = {"time_s", "time_s_std"}  # wall-clock columns, different in every run


def _without_times(records):
    return [{k: v for k, v in r.items() if k not in TIMED} for r in records]


def test_torchrun_two_ranks_gather_the_single_process_table(tmp_path):
    from benchmarks.eval import main

    make_pack(tmp_path / "insightface", "buffalo_l", seed=0)
    write_tiny_clip(tmp_path / "clip")
    write_aesthetic(tmp_path / "ae.pth", dim=16)
    bench = write_diversebench(tmp_path / "bench", ["ann", "bob", "cid"],
                               ["a photo of a person in a park", "a person reading in a library"],
                               ["anime-style drawing; person in a classroom", "oil painting; person on a boat"])
    common = ["--data", str(bench), "--presets", "hyper,lightning", "--methods", "baseline,fastface-am1",
              "--ip-scales", "0.5,0.8", "--generator", "eval_fakes:factory", "--metrics", "id,clip,ae,fcs",
              "--insightface-root", str(tmp_path / "insightface"), "--clip", str(tmp_path / "clip"),
              "--aesthetic", str(tmp_path / "ae.pth"), "--max-prompts", "1", "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "benchmarks.eval", *common, "--out", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):  # 48 tasks, 24 per rank
        assert f"[rank {rank}] INFO benchmarks.eval: 3 identities x 2 prompts x 8 configurations = 48 images; " \
               "this rank: 24 on cpu" in proc.stderr

    single, dist = (json.loads((tmp_path / d / "table.json").read_text()) for d in ("single", "dist"))
    assert len(single) == 2 * 2 * 2 * 3  # presets x methods x ip scales x (realistic, stylistic, all)
    assert _without_times(dist) == _without_times(single)
    assert all(t["time_s"] is not None for t in dist)
    rows = {}
    for d in ("single", "dist"):
        with (tmp_path / d / "rows.csv").open() as f:
            rows[d] = _without_times(list(csv.DictReader(f)))
    assert rows["dist"] == rows["single"] and len(rows["dist"]) == 2 * 2 * 2 * 3 * 2
    # each rank generated its own share; the images are the same pixels as the single-process ones
    for r in rows["dist"]:
        a, b = (np.asarray(Image.open(tmp_path / d / r["image"])) for d in ("single", "dist"))
        assert np.array_equal(a, b)
    assert json.loads((tmp_path / "dist" / "run.json").read_text())["world_size"] == 2

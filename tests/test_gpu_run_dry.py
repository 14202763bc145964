"""benchmarks/gpu_run.py --dry-run: every section of the GPU script runs on the CPU with tiny configs."""

from __future__ import annotations

import json

from benchmarks.gpu_run import METHODS, main


def test_dry_run_runs_every_section(tmp_path):
    result = main(["--dry-run", "--out", str(tmp_path), "--methods", "baseline,fastface-am1"])
    saved = json.loads((tmp_path / "gpu_run.json").read_text())
    assert saved["sections"].keys() == result["sections"].keys()
    sections = result["sections"]
    errors = {k: v["error"] for k, v in sections.items() if "error" in v}
    assert not errors, errors
    parity = sections["parity"]["result"]
    assert parity["fp32"]["rel_err"] < 1e-5 and parity["fp16"]["rel_err"] < 1e-2 and parity["bf16"]["rel_err"] < 5e-2
    for name in ("unet_eager", "unet_compiled"):
        r = sections[name]["result"]
        assert r["ours_s"]["min"] > 0 and r["diffusers_s"]["min"] > 0 and r["ratio_ours_over_diffusers"] > 0
    images = sections["images"]["result"]
    assert images["ours"]["fastface-am1"]["evals"] == 10 and images["official"]["fastface-am1"]["evals"] == 12
    assert set(images["ratio_ours_over_official"]) == {"baseline", "fastface-am1"}
    assert sections["images_compiled"]["result"]["baseline"]["seconds"]["min"] > 0
    assert sections["offload"]["result"]["baseline"]["seconds"]["min"] > 0  # Pipeline.from_pretrained(offload=True)
    unfused = sections["images_unfused"]["result"]  # fuse_adapter_lora=False: same evaluations
    assert {m: r["evals"] for m, r in unfused.items()} == {m: r["evals"] for m, r in images["ours"].items()}
    md = (tmp_path / "gpu_run.md").read_text()
    assert all(f"## {name}" in md for name in sections)
    assert set(METHODS) >= {"baseline", "am1", "fastface-am1"}

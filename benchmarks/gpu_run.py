"""The GPU run: parity, UNet speed, image speed and memory at the real SDXL shapes, no download needed.

    pip install torch==2.13.0 && pip install -e ".[test]"     # diffusers/transformers/peft: the reference side
    python -m benchmarks.gpu_run --out gpu_results            # one H100/H200-class GPU, ~5-8 min
    python -m benchmarks.gpu_run --dry-run --out /tmp/dry     # CPU, tiny configs, the same code paths (CI)

Random weights at the real shapes stand in for the released ones (speed and memory do not depend on the values).
Sections, in order (each is timed and recorded; a failing section records its error and the run goes on; once
``--budget-s`` is spent the remaining sections are skipped and marked so):

1. ``parity``: our UNet vs diffusers' ``UNet2DConditionModel`` on the same weights, fp16 and bf16, at a 1024²
   latent: max |ours - ref| / max |ref|, with fp32 for scale.
2. ``unet_eager``: one UNet forward (batch 3, the official per-step batch), ours vs diffusers, fp16.
3. ``images``: seconds per 1024² image per method, ours (adapter LoRA fused, the GPU default) vs the
   official-equivalent pipeline (:mod:`benchmarks.bench_e2e`), fp16, and peak VRAM per method.
4. ``images_unfused``: our pipeline with the adapter's LoRA unfused (``fuse_adapter_lora=False``, as diffusers' PEFT
   layers run it): seconds and peak VRAM per method (the default on a GPU, fused, writes the LoRA into the
   projections in place and keeps the originals in host memory, so both should need the same VRAM).
5. ``offload``: peak VRAM per method with our pipeline's ``offload`` option (when the Pipeline has one).
6. ``unet_compiled``: the UNet forward compiled (``torch.compile``, ``mode="reduce-overhead"``: CUDA graphs),
   ours vs diffusers.
7. ``images_compiled``: our pipeline with its UNet compiled (``compile=``, i.e. ``fastface.compile_unet``), seconds
   per image for fastface-am1 and am1 (each method's first image compiles for its branch sets).

Writes ``gpu_run.json`` and ``gpu_run.md`` (one table per section) into ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.bench_e2e import image_fn, load_ours, write_weights
from benchmarks.bench_unet import call_ours, call_ref, make_inputs, make_models
from fastface.models.unet import get_unet_config

METHODS = ("baseline", "dcg", "am1", "fastface-am1", "fastface-am2")


class Run:
    """Settings of a run: real (GPU) or dry (CPU, tiny configs, compile with the eager backend)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else args.device
        # dry run: the tiny UNet with one transformer block per level (compiles in seconds)
        self.unet_config = get_unet_config("tiny").replace(depth=(0, 1, 1), layers_per_block=1) if self.dry else "sdxl"
        self.latent = 8 if self.dry else 128  # 1024 px for SDXL
        self.size = 64 if self.dry else 1024
        self.repeats = 1 if self.dry else args.repeats
        self.compile_kw = {"backend": "eager"} if self.dry else {"mode": "reduce-overhead"}
        self.pipeline_compile_kw = {"backend": "eager"} if self.dry else {}
        self.methods = list(args.methods.split(",")) if args.methods else list(METHODS)
        self.budget_s = args.budget_s
        self.start = time.perf_counter()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> tuple[dict[str, float], object]:
    """Seconds per call (min and median of ``repeats`` calls after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"min": min(times), "median": statistics.median(times)}, out


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    """Peak allocated accelerator memory in GB since the last reset (None on the CPU)."""
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def _free(*objs) -> None:
    del objs
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ sections


def section_parity(run: Run, _files) -> dict:
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        cfg, ref, ours = make_models(run.unet_config, dtype, run.device)
        inp = make_inputs(cfg, 1, run.latent, dtype, run.device)
        with torch.inference_mode():
            a, b = call_ours(ours, inp).float(), call_ref(ref, inp).float()
        out[name] = {"rel_err": float((a - b).abs().max() / b.abs().max()), "bit_identical": bool(torch.equal(a, b))}
        _free(ref, ours, a, b)
    return out


def _unet_speed(run: Run, compile_kw: dict | None) -> dict:
    dtype = torch.float32 if run.dry else torch.float16
    cfg, ref, ours = make_models(run.unet_config, dtype, run.device)
    inp = make_inputs(cfg, 3, run.latent, dtype, run.device)
    fo, fr = ours, ref
    if compile_kw is not None:
        fo, fr = torch.compile(ours, **compile_kw), torch.compile(ref, **compile_kw)
    out = {}
    with torch.inference_mode():
        t = time.perf_counter()
        call_ours(fo, inp)  # first call: compiles when compiling
        call_ref(fr, inp)
        out["first_call_s"] = time.perf_counter() - t
        out["ours_s"] = _timed(lambda: call_ours(fo, inp), run.device, run.repeats)[0]
        out["diffusers_s"] = _timed(lambda: call_ref(fr, inp), run.device, run.repeats)[0]
    out["ratio_ours_over_diffusers"] = out["ours_s"]["median"] / out["diffusers_s"]["median"]
    _free(ref, ours, fo, fr)
    return out


def section_unet_eager(run: Run, _files) -> dict:
    return _unet_speed(run, None)


def section_unet_compiled(run: Run, _files) -> dict:
    torch._dynamo.reset()
    return {"compile": run.compile_kw, **_unet_speed(run, run.compile_kw)}


def _namespace(run: Run) -> argparse.Namespace:
    return argparse.Namespace(dtype="fp32" if run.dry else "fp16", device=run.device, steps=4, size=run.size)


def _images(run: Run, files, side: str, setup=None, methods: list[str] | None = None) -> dict:
    ns = _namespace(run)
    out = {}
    with torch.inference_mode():
        fn = image_fn(side, files, ns, run.dry) if setup is None else setup(ns)
        for method in methods or run.methods:
            _reset_peak(run.device)
            seconds, (_, evals) = _timed(lambda: fn(method), run.device, run.repeats)
            out[method] = {"seconds": seconds, "evals": evals, "peak_vram_gb": _peak(run.device)}
    _free(fn)
    return out


def section_images(run: Run, files) -> dict:
    ours = _images(run, files, "ours-fused")  # the GPU default, forced so that the CPU dry run takes the same path
    official = _images(run, files, "official")
    ratio = {m: ours[m]["seconds"]["median"] / official[m]["seconds"]["median"] for m in run.methods}
    return {"ours": ours, "official": official, "ratio_ours_over_official": ratio}


def section_images_unfused(run: Run, files) -> dict:
    return _images(run, files, "ours-unfused")


def section_offload(run: Run, files) -> dict:
    from fastface.pipeline import Pipeline

    if "offload" not in inspect.signature(Pipeline.from_pretrained).parameters:
        return {"skipped": "Pipeline.from_pretrained has no offload option yet"}

    def setup(ns):
        from fastface.selfcheck import tiny_face

        from benchmarks.bench_pipeline import PROMPT

        pipe = Pipeline.from_pretrained("hyper", "faceid-plusv2", steps=4, base=files["base"], weights=files["lora"],
                                        adapter_file=files["adapter"], image_encoder=files["image_encoder"],
                                        dtype=torch.float32 if run.dry else torch.float16, device=run.device,
                                        offload=True)
        face = tiny_face(crop_size=56 if run.dry else 224)

        def fn(method):
            gen = pipe(PROMPT, face=face, method=method, seed=0, height=run.size, width=run.size)
            return gen.pixels, gen.unet_evaluations

        return fn

    return _images(run, files, "ours", setup)


def section_images_compiled(run: Run, files) -> dict:
    torch._dynamo.reset()

    def setup(ns):
        from fastface.selfcheck import tiny_face

        from benchmarks.bench_pipeline import PROMPT

        pipe = load_ours(files, torch.float32 if run.dry else torch.float16, run.device, 4,
                         compile=run.pipeline_compile_kw or True)
        face = tiny_face(crop_size=56 if run.dry else 224)

        def fn(method):
            gen = pipe(PROMPT, face=face, method=method, seed=0, height=run.size, width=run.size)
            return gen.pixels, gen.unet_evaluations

        return fn

    # one method in the dry run (one compile of the tiny UNet); on the GPU the two headline FastFace figures
    methods = run.methods[:1] if run.dry else [m for m in ("fastface-am1", "am1") if m in run.methods] or None
    return {"compile": run.pipeline_compile_kw, **_images(run, files, "ours", setup, methods)}


SECTIONS = {
    "parity": section_parity,
    "unet_eager": section_unet_eager,
    "images": section_images,
    "images_unfused": section_images_unfused,
    "offload": section_offload,
    "unet_compiled": section_unet_compiled,
    "images_compiled": section_images_compiled,
}


IMAGE_SECTIONS = ("images", "images_unfused", "offload", "images_compiled")  # need the written weights

# ------------------------------------------------------------------------------------------------ report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and set(v) == {"min", "median"}:
        return f"{v['min']:.4g} / {v['median']:.4g}"
    return str(v)


def markdown(result: dict) -> str:
    lines = [f"# GPU run ({result['env']['device_name']}, torch {result['env']['torch']}, "
             f"dry run: {result['env']['dry_run']})", ""]
    for name, sec in result["sections"].items():
        lines += [f"## {name} ({sec.get('seconds', 0):.1f} s)", ""]
        if "error" in sec or "skipped" in sec:
            lines += [f"**{'error' if 'error' in sec else 'skipped'}**: {sec.get('error') or sec.get('skipped')}", ""]
            continue
        data = sec["result"]
        if name in IMAGE_SECTIONS:
            rows = data.get("ours", data)
            lines += ["| method | ours s/img (min / med) | evals | peak VRAM GB | official s/img | ours/official |",
                      "|---|---|---|---|---|---|"]
            for m, r in rows.items():
                if not isinstance(r, dict) or "seconds" not in r:
                    continue
                off = data.get("official", {}).get(m)
                ratio = data.get("ratio_ours_over_official", {}).get(m)
                lines.append(f"| {m} | {_fmt(r['seconds'])} | {r['evals']} | {_fmt(r['peak_vram_gb'])} | "
                             f"{_fmt(off['seconds']) if off else '-'} | {_fmt(ratio) if ratio else '-'} |")
        else:
            lines += ["| figure | value |", "|---|---|"]
            for k, v in data.items():
                if isinstance(v, dict) and set(v) != {"min", "median"}:
                    lines += [f"| {k}.{k2} | {_fmt(v2)} |" for k2, v2 in v.items()]
                else:
                    lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_run.json and gpu_run.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny configs: check the script (CI)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(METHODS)})")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining sections after this")
    ap.add_argument("--workdir", default=None, help="where to write the random weights (~7 GB fp16)")
    args = ap.parse_args(argv)
    run = Run(args)
    if not run.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --dry-run for the CPU check")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"env": {"dry_run": run.dry, "torch": torch.__version__, "python": platform.python_version(),
                      "device_name": torch.cuda.get_device_name() if not run.dry else platform.processor() or "cpu",
                      "methods": run.methods, "repeats": run.repeats}, "sections": {}}
    wanted = [s for s in args.sections.split(",") if s]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        files = None
        if set(IMAGE_SECTIONS) & set(wanted):
            t = time.perf_counter()
            files = write_weights(Path(tmp), run.dry, torch.float32 if run.dry else torch.float16)
            result["env"]["write_weights_s"] = time.perf_counter() - t
        for name in wanted:
            if name not in SECTIONS:
                result["sections"][name] = {"error": f"unknown section; known: {list(SECTIONS)}"}
                continue
            if time.perf_counter() - run.start > run.budget_s:
                result["sections"][name] = {"skipped": f"time budget of {run.budget_s:.0f} s spent"}
                continue
            t = time.perf_counter()
            try:
                result["sections"][name] = {"result": SECTIONS[name](run, files)}
                if "skipped" in result["sections"][name]["result"]:
                    result["sections"][name] = result["sections"][name]["result"]
            except Exception as exc:  # noqa: BLE001 (record and go on: one failure must not lose the rest)
                result["sections"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc()[-3000:]}
            result["sections"][name]["seconds"] = time.perf_counter() - t
            (out_dir / "gpu_run.json").write_text(json.dumps(result, indent=1))  # partial results survive a kill
    result["env"]["total_s"] = time.perf_counter() - run.start
    (out_dir / "gpu_run.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gpu_run.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

"""End-to-end benchmark (run by hand): time per image and peak memory, ours vs the official-equivalent pipeline.

    python -m benchmarks.bench_e2e --tiny                           # quick check on tiny weights (seconds)
    python -m benchmarks.bench_e2e --threads 2 --size 256           # real SDXL shapes, random weights (heavy)
    python -m benchmarks.bench_e2e --compile --methods baseline,am1,fastface-am1 --out e2e.json

Both sides load the same files, written here with random weights in the real layouts and at the real SDXL shapes
(a diffusers SDXL folder with both text encoders, UNet and VAE; a Hyper-style kohya LoRA; IP-Adapter
FaceID-Plus-v2; the CLIP ViT-H/14 image encoder) or, with ``--tiny``, :func:`fastface.selfcheck.write_tiny_weights`.
"ours" is :class:`fastface.Pipeline`; "official" is the official FastFace code's pipeline as
:mod:`benchmarks.bench_pipeline` builds it (diffusers ``StableDiffusionXLPipeline``, ``load_ip_adapter``, one
UNet call per step over the three-branch batch: 12 UNet evaluations per 4-step image, without AM, so its AM times
are a lower bound; its FaceID LoRA is diffusers' PEFT adapter ``faceid_0``, computed beside each projection).
``--compile`` adds our pipeline with its UNet compiled (``compile=True``, i.e. ``fastface.compile_unet``). The
adapter's own LoRA: ``ours`` uses the pipeline's default for the device (unfused on the CPU, fused on an accelerator);
``ours-unfused`` forces it computed beside each projection, as diffusers does (``fuse_adapter_lora=False``), and
``ours-fused`` forces ``W + ΔW`` precomputed in place (``fuse_adapter_lora=True``), which keeps ``W`` in host memory
for an exact ``lora_scale`` change or ``remove()``: one more host copy of every attention projection (SDXL: ~1.9 GB
fp16, ~3.8 GB fp32), none on an accelerator.

Each side runs in its own subprocess (peak RSS = the kernel's VmHWM of that process): it loads, makes one warm-up
image per method, then times one image per method. The sides alternate over ``--repeats`` rounds; the table shows
min and median seconds per image and of the per-round ratios. Prompt encoding, identity encoding (CLIP on a
given face crop; face detection is not timed) and VAE decoding are included on both sides.

Real shapes are slow on a small CPU (one round of both sides at 256 px: ~10-15 min on 2 cores), so ``--weights DIR``
keeps the written weights for later runs, ``--sides`` picks which sides run (e.g. ``ours,ours-compiled`` for the
compiled-vs-eager ratio alone), each finished side is logged as it ends, and ``--out`` is rewritten after every round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_pipeline import PROMPT, reference, reference_generate
from benchmarks.bench_unet import peak_rss

log = logging.getLogger(__name__)
SIDES = ("ours", "official")
# Our pipeline's variants: its UNet compiled (compile=True); the adapter's LoRA forced unfused (computed beside each
# projection, as diffusers' PEFT layers do) or fused (precomputed into the weights); "ours" is the device default.
VARIANTS = {"ours": {}, "ours-compiled": {"compile": True}, "ours-unfused": {"fuse_adapter_lora": False},
            "ours-fused": {"fuse_adapter_lora": True}}
ALL_SIDES = (*SIDES, "ours-compiled", "ours-unfused", "ours-fused")
DEFAULT_METHODS = ("baseline", "am1", "fastface-am1")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARD_BYTES = 2 << 30  # the UNet file is written in shards so writing never holds it whole


# ------------------------------------------------------------------------------------------------ weights


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random weights that keep activations finite through deep stacks: fan-in scaled matrices, unit norms."""
    if len(shape) >= 2:
        return (torch.randn(shape, generator=gen) * math.prod(shape[1:]) ** -0.5).to(dtype)
    if name.endswith("bias"):
        return (torch.randn(shape, generator=gen) * 0.01).to(dtype)
    base = 1.0 if name.endswith("weight") else 0.0  # norm weights around 1; other vectors (class embedding) N(0, 1)
    return (base + torch.randn(shape, generator=gen) * (0.05 if base else 1.0)).to(dtype)


def _write_module(module: torch.nn.Module, path: Path, gen: torch.Generator, dtype: torch.dtype) -> None:
    """Random weights for the (meta-built) module's state dict, in one file or in shards with a diffusers index."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in module.state_dict().items():
        current[name] = _random_tensor(name, t.shape, gen, dtype if t.is_floating_point() else t.dtype)
        size += current[name].numel() * current[name].element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            save_file(current, str(path.with_name(f"{path.stem}-{len(shards):05d}.safetensors")))
            current, size = {}, 0
    if not shards:
        save_file(current, str(path))
        return
    shards.append(current)
    save_file(current, str(path.with_name(f"{path.stem}-{len(shards):05d}.safetensors")))
    weight_map = {k: f"{path.stem}-{i + 1:05d}.safetensors" for i, s in enumerate(shards) for k in s}
    path.with_name(f"{path.name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_sdxl_random_weights(root: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Path]:
    """Random weights at the real SDXL / FaceID-Plus-v2 / CLIP-H shapes in the released file layouts."""
    from fastface.adapters.faceid import FaceIDProjConfig, build_projection
    from fastface.models.clip_vision import CLIPVisionEncoder, get_clip_vision_config
    from fastface.models.text import TEXT_CONFIGS, CLIPTextEncoder
    from fastface.models.tokenizer import EOS_TOKEN, write_vocab_folder
    from fastface.models.unet import UNet, get_unet_config
    from fastface.models.vae import VAE_CONFIGS, AutoencoderKL
    from fastface.adapters.faceid_adapter import _ip_adapter_weights as _ip_adapter
    from fastface.selfcheck import _kohya_lora, _text_config_json, _vae_config_json
    from fastface.tiny import save_safetensors as _save
    from fastface.tiny import write_json as _json

    gen = torch.Generator().manual_seed(seed)
    base = root / "sdxl-random"
    ucfg, vcfg = get_unet_config("sdxl"), get_clip_vision_config("vit-h-14")
    with torch.device("meta"):
        unet = UNet(ucfg)
        parts = {
            "text_encoder/model": CLIPTextEncoder(TEXT_CONFIGS["clip-l"]),
            "text_encoder_2/model": CLIPTextEncoder(TEXT_CONFIGS["bigg"]),
            "vae/diffusion_pytorch_model": AutoencoderKL(VAE_CONFIGS["sdxl"]),
            "unet/diffusion_pytorch_model": unet,
        }
        encoder = CLIPVisionEncoder(vcfg)
        projection = build_projection(FaceIDProjConfig(plus=True, clip_dim=vcfg.hidden_size))
    _json(base / "unet" / "config.json", ucfg.to_diffusers_config())
    for name, key in (("text_encoder", "clip-l"), ("text_encoder_2", "bigg")):
        _json(base / name / "config.json", _text_config_json(TEXT_CONFIGS[key]))
    _json(base / "vae" / "config.json", _vae_config_json(VAE_CONFIGS["sdxl"]))
    _json(base / "model_index.json", {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True})
    write_vocab_folder(base / "tokenizer", pad_token=EOS_TOKEN)
    write_vocab_folder(base / "tokenizer_2", pad_token="!")
    for rel, module in parts.items():
        _write_module(module, base / f"{rel}.safetensors", gen, dtype)
    lora = root / "Hyper-SDXL-4steps-lora.safetensors"
    _save(_kohya_lora(unet, gen), lora)
    image_encoder = root / "image_encoder"
    hf_names = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "patch_size": "patch_size",
                "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "image_size": "image_size",
                "hidden_act": "hidden_act", "projection_dim": "projection_dim", "layer_norm_eps": "layer_norm_eps"}
    _json(image_encoder / "config.json", {"architectures": ["CLIPVisionModelWithProjection"],
                                          **{k: getattr(vcfg, v) for k, v in hf_names.items()}})
    _write_module(encoder, image_encoder / "model.safetensors", gen, dtype)
    proj = {k: _random_tensor(k, v.shape, gen, dtype) for k, v in projection.state_dict().items()}
    ip = {k: v.to(dtype) for k, v in _ip_adapter(unet, ucfg.context_dim, gen).items()}
    adapter = root / "ip-adapter-faceid-plusv2_sdxl.safetensors"
    _save({**{f"image_proj.{k}": v for k, v in proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip.items()}}, adapter)
    return dict(base=base, lora=lora, adapter=adapter, image_encoder=image_encoder)


def write_weights(root: Path, tiny: bool, dtype: torch.dtype) -> dict[str, Path]:
    """Write the weights under ``root``, or reuse what an earlier run wrote there with the same settings."""
    marker = root / "bench_e2e_weights.json"
    settings = {"tiny": tiny, "dtype": str(dtype)}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["settings"] == settings:
            log.info("reusing the weights in %s", root)
            return {k: Path(v) for k, v in done["files"].items()}
        raise SystemExit(f"{root} holds weights written with {done['settings']}, not {settings}: "
                         "pass another --weights folder or delete that one")
    if tiny:
        from fastface.selfcheck import write_tiny_weights

        w = write_tiny_weights(root)
        files = dict(base=w.base, lora=w.lora, adapter=w.adapter, image_encoder=w.image_encoder)
    else:
        files = write_sdxl_random_weights(root, dtype)
    marker.write_text(json.dumps({"settings": settings, "files": {k: str(v) for k, v in files.items()}}))
    return files


# ------------------------------------------------------------------------------------------------ one side


def load_ours(files: dict[str, Path], dtype: torch.dtype, device: str, steps: int, **kw):
    from fastface.pipeline import Pipeline

    return Pipeline.from_pretrained("hyper", "faceid-plusv2", steps=steps, base=files["base"], weights=files["lora"],
                                    adapter_file=files["adapter"], image_encoder=files["image_encoder"], dtype=dtype,
                                    device=device, **kw)


def image_fn(side: str, files: dict[str, Path], args: argparse.Namespace, tiny: bool):
    """A function ``method -> (image, UNet evaluations)`` for one side, models loaded."""
    from fastface.presets import resolve_method
    from fastface.selfcheck import tiny_face

    dtype, face = DTYPES[args.dtype], tiny_face(crop_size=56 if tiny else 224)
    if side == "official":
        pipe, vision = reference(files, dtype, args.device)

        def run(method: str):
            dcg, _ = resolve_method(method, "hyper", adapter="faceid-plusv2")
            return reference_generate(pipe, vision, face, dcg, args.steps, args.size, 0), 3 * args.steps

        return run
    pipe = load_ours(files, dtype, args.device, args.steps, **VARIANTS[side])

    def run(method: str):
        gen = pipe(PROMPT, face=face, method=method, seed=0, height=args.size, width=args.size)
        return gen.pixels, gen.unet_evaluations

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_side(side: str, files: dict[str, Path], args: argparse.Namespace, tiny: bool) -> dict:
    """Load, warm up each method once, time one image per method; seconds, evaluations and peak RSS."""
    t0 = time.perf_counter()
    run = image_fn(side, files, args, tiny)
    out = {"side": side, "load_s": time.perf_counter() - t0, "seconds": {}, "evals": {}}
    with torch.inference_mode():
        for method in args.methods:
            run(method)
        for method in args.methods:
            _sync(args.device)
            t = time.perf_counter()
            image, evals = run(method)
            _sync(args.device)
            out["seconds"][method] = time.perf_counter() - t
            out["evals"][method] = evals
            if not bool(torch.isfinite(image).all()):
                raise RuntimeError(f"{side} {method}: non-finite image")
    out["peak_rss"] = peak_rss()
    return out


def _child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    files = {k: Path(v) for k, v in json.loads(args.files).items()}
    print(json.dumps(run_side(args.child, files, args, args.tiny)))


# ------------------------------------------------------------------------------------------------ driver


def _spawn(side: str, files: dict[str, Path], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--child", side, "--files",
           json.dumps({k: str(v) for k, v in files.items()}), "--methods", ",".join(args.methods),
           "--size", str(args.size), "--steps", str(args.steps), "--dtype", args.dtype, "--device", args.device]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{side} subprocess failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs)}


def ratio_pairs(sides: list[str]) -> list[tuple[str, str]]:
    """The (side, baseline side) pairs whose per-round time ratios the table reports."""
    pairs = [(s, "official") for s in sides if s != "official" and "official" in sides]
    return pairs + ([("ours-compiled", "ours")] if {"ours", "ours-compiled"} <= set(sides) else [])


def summarise(runs: dict[str, list[dict]], methods: list[str]) -> dict:
    """Per method: seconds per image (min / median) of each side, ratios between sides per round."""
    table = {}
    for m in methods:
        row = {}
        for side, results in runs.items():
            row[side] = {**_stats([r["seconds"][m] for r in results]), "evals": results[0]["evals"][m]}
        for side, base in ratio_pairs(list(runs)):
            row[f"{side}/{base}"] = _stats([a["seconds"][m] / b["seconds"][m] for a, b in zip(runs[side], runs[base])])
        table[m] = row
    memory = {side: _stats([r["peak_rss"] for r in results]) for side, results in runs.items()}
    return {"methods": table, "peak_rss": memory,
            "load_s": {side: _stats([r["load_s"] for r in results]) for side, results in runs.items()}}


def markdown(result: dict) -> str:
    sides, pairs = result["sides"], [f"{a}/{b}" for a, b in ratio_pairs(result["sides"])]
    head = "| method | " + " | ".join(f"{s} s/img (min / med)" for s in sides)
    head += "".join(f" | {p} (min / med)" for p in pairs) + " | UNet evals (" + " / ".join(sides) + ") |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, row in result["summary"]["methods"].items():
        cells = [f"{row[s]['min']:.3f} / {row[s]['median']:.3f}" for s in sides]
        cells += [f"{row[p]['min']:.2f} / {row[p]['median']:.2f}" for p in pairs]
        cells.append(" / ".join(f"{row[s]['evals']:g}" for s in sides))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    rss = result["summary"]["peak_rss"]
    lines.append("")
    lines.append("peak RSS (GB, min / med): " + ", ".join(
        f"{s} {rss[s]['min'] / 1e9:.2f} / {rss[s]['median'] / 1e9:.2f}" for s in result["sides"]))
    return "\n".join(lines)


def _result(args: argparse.Namespace, sides: list[str], runs: dict[str, list[dict]], write_s: float) -> dict:
    return {
        "config": {"tiny": args.tiny, "size": args.size, "steps": args.steps, "dtype": args.dtype,
                   "device": args.device, "threads": args.threads or torch.get_num_threads(),
                   "repeats": args.repeats, "methods": args.methods, "write_weights_s": write_s,
                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__},
        "sides": sides, "runs": runs, "summary": summarise(runs, args.methods),
    }


def _write_result(result: dict, out: str | None) -> str:
    table = markdown(result)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        path.with_suffix(".md").write_text(table + "\n")
    return table


def _measure(args: argparse.Namespace, sides: list[str], files: dict[str, Path], write_s: float) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate the order between rounds
            runs[side].append(_spawn(side, files, args))
            log.info("round %d/%d %s: %s s/img, peak RSS %.2f GB", r + 1, args.repeats, side,
                     {m: round(t, 2) for m, t in runs[side][-1]["seconds"].items()}, runs[side][-1]["peak_rss"] / 1e9)
            if all(runs.values()):  # a partial result (whole rounds only) after every side
                done = min(len(v) for v in runs.values())
                _write_result(_result(args, sides, {s: v[:done] for s, v in runs.items()}, write_s), args.out)
    return _result(args, sides, runs, write_s)


def run_benchmark(args: argparse.Namespace) -> dict:
    sides = args.sides or [*SIDES, *(["ours-compiled"] if args.compile else [])]
    # --weights: a kept folder; otherwise a temporary one, removed at the end
    folder = contextlib.nullcontext(args.weights) if args.weights else tempfile.TemporaryDirectory(dir=args.workdir)
    with folder as root:
        t = time.perf_counter()
        files = write_weights(Path(root), args.tiny, DTYPES[args.dtype])
        return _measure(args, sides, files, time.perf_counter() - t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny weights (quick check of the whole benchmark)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method presets")
    ap.add_argument("--size", type=int, default=None, help="image size in px (default 256; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each side's process")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (>= 3 for min / median)")
    ap.add_argument("--compile", action="store_true", help="also time our pipeline with a compiled UNet")
    ap.add_argument("--sides", default=None,
                    help=f"comma-separated sides to run, of {', '.join(ALL_SIDES)} (default: ours,official "
                         "and ours-compiled with --compile)")
    ap.add_argument("--workdir", default=None, help="where to write the random weights (real shapes: ~18 GB fp32)")
    ap.add_argument("--weights", default=None,
                    help="a folder that keeps the random weights: written there once, reused by later runs")
    ap.add_argument("--out", default=None, help="write the JSON result here (and a .md table beside it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--files", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.sides = [s for s in args.sides.split(",") if s] if args.sides else None
    unknown = sorted(set(args.sides or ()) - set(ALL_SIDES))
    if unknown or (args.sides is not None and len(args.sides) != len(set(args.sides))) or args.sides == []:
        ap.error(f"--sides: give distinct names out of {', '.join(ALL_SIDES)} (got {unknown or args.sides})")
    if args.size is None:
        args.size = 64 if args.tiny else 256
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        _child(args)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = run_benchmark(args)
    print(_write_result(result, args.out))
    return result


if __name__ == "__main__":
    main()

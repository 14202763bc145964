"""UNet benchmark (run by hand): parity and speed vs diffusers at real SDXL shapes, and load time / peak memory.

    python -m benchmarks.bench_unet                      # parity + speed at a 32x32 latent, then the load test
    python -m benchmarks.bench_unet --config tiny --skip-load   # quick smoke run
    python -m benchmarks.bench_unet --skip-speed --load-file /path/unet_folder_or_file

Prints (a) the relative max error max|ours - ref| / max|ref| against diffusers' UNet2DConditionModel, same random
weights; (b) forward time ours / diffusers (same weights, threads and process; median of interleaved repeats);
(c) load time and peak resident memory of a ~5.1 GB fp16 UNet safetensors file, ours and diffusers', each in a fresh
subprocess (peak RSS from the kernel's VmHWM; getrusage also shown), as a multiple of the file size (goal: ours <= 1.2x).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastface.models.unet import UNet, UNetConfig, get_unet_config
from fastface.models.unet_loading import load_unet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_models(config_name: str | UNetConfig, dtype: torch.dtype, device: str):
    """diffusers' UNet with random weights, and ours sharing the very same tensors (no second copy)."""
    from diffusers import UNet2DConditionModel

    cfg = get_unet_config(config_name) if isinstance(config_name, str) else config_name
    torch.manual_seed(0)
    with torch.device(device):
        ref = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers_config().items() if k != "_class_name"})
    ref = ref.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), assign=True)
    return cfg, ref, ours.eval().requires_grad_(False)


def make_inputs(cfg, batch: int, latent: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(batch, 1)
    return {
        "x": torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype),
        "context": torch.randn(batch, 77, cfg.context_dim, generator=g).to(device, dtype),
        "text_embeds": torch.randn(batch, cfg.pooled_dim, generator=g).to(device, dtype),
        "time_ids": ids.to(device, dtype),
        "t": torch.full((batch,), 499, device=device),
    }


def call_ours(model, inp):
    return model(inp["x"], inp["t"], inp["context"], inp["text_embeds"], inp["time_ids"])


def call_ref(model, inp):
    cond = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    return model(inp["x"], inp["t"], inp["context"], added_cond_kwargs=cond).sample


def parity_and_speed(args) -> None:
    dtype, device = DTYPES[args.dtype], args.device
    t0 = time.perf_counter()
    cfg, ref, ours = make_models(args.config, dtype, device)
    print(f"built {args.config} UNet ({sum(p.numel() for p in ours.parameters()) / 1e9:.3f} B params, {args.dtype}, "
          f"{device}, {torch.get_num_threads()} threads) in {time.perf_counter() - t0:.1f} s")
    inp = make_inputs(cfg, args.batch, args.latent, dtype, device)
    with torch.inference_mode():
        a, b = call_ours(ours, inp), call_ref(ref, inp)
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        print(f"(a) parity at {args.latent}x{args.latent} latent, batch {args.batch}: "
              f"max|ours-ref|/max|ref| = {err:.3e} (bit-identical: {torch.equal(a, b)})")
        if args.skip_speed:
            return
        times = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            order = (("ours", call_ours, ours), ("diffusers", call_ref, ref))
            for name, fn, model in order if len(times["ours"]) % 2 == 0 else order[::-1]:  # alternate who goes first
                _sync(device)
                t = time.perf_counter()
                fn(model, inp)
                _sync(device)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    print(f"(b) forward, median of {args.repeats}: ours {med['ours'] * 1e3:.1f} ms, diffusers "
          f"{med['diffusers'] * 1e3:.1f} ms, ratio ours/diffusers = {med['ours'] / med['diffusers']:.3f} "
          f"(per-round ratios: min {min(ratios):.3f}, median {statistics.median(ratios):.3f})")
    print("    all runs (s): " + "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in times.items()))


# ------------------------------------------------------------------------------------------------ load test


def write_random_fp16_folder(folder: Path, config_name: str) -> Path:
    """A diffusers UNet folder (config.json + fp16 safetensors) with random weights at the config's real shapes."""
    from safetensors.torch import save_file

    cfg = get_unet_config(config_name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file(sd, path)
    return path


def peak_rss() -> int:
    """Peak resident memory of this process in bytes.

    getrusage's ru_maxrss survives exec (a child started by a big parent inherits the parent's size at fork), so
    the kernel's per-address-space high-water mark VmHWM is preferred where /proc exists.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_load_child(which: str, folder: str) -> None:
    """Runs in a fresh subprocess: import, then load, and report time and peak RSS (bytes) as JSON."""
    if which == "diffusers":
        from diffusers import UNet2DConditionModel
    base = peak_rss()
    t = time.perf_counter()
    if which == "ours":
        model = load_unet(folder, dtype=torch.float16)
    else:
        model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16)
    ready = time.perf_counter() - t
    # touch every 4 KiB page of every weight, so memory-mapped weights are paged in as by a first forward
    with torch.no_grad():
        total = sum(float(p.reshape(-1)[:: 4096 // p.element_size()].float().sum()) for p in model.parameters())
    elapsed = time.perf_counter() - t
    peak = peak_rss()
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ready_s": ready, "time_s": elapsed, "peak_rss": peak, "base_rss": base, "rusage_maxrss": rusage, "check": total}))


def load_test(args) -> None:
    tmp = None
    if args.load_file:
        folder = Path(args.load_file)
        if folder.is_file():
            folder = folder.parent
        if not folder.exists():  # create it there and keep it for later runs
            write_random_fp16_folder(folder, args.config)
    else:
        tmp = tempfile.TemporaryDirectory(dir=args.workdir)
        folder = Path(tmp.name) / "unet"
        t = time.perf_counter()
        write_random_fp16_folder(folder, args.config)
        print(f"wrote a random fp16 {args.config} UNet in {time.perf_counter() - t:.1f} s")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"(c) load of {folder} ({size / 1e9:.2f} GB fp16), each in a fresh process:")
    try:
        for which in ("ours", "diffusers"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure-load", which, str(folder)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"    {which:9s}: returned in {r['ready_s']:6.2f} s, all pages in memory after {r['time_s']:6.2f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB = "
                  f"{r['peak_rss'] / size:.2f}x file ({(r['peak_rss'] - r['base_rss']) / size:.2f}x above the "
                  f"{r['base_rss'] / 1e9:.2f} GB after imports; getrusage ru_maxrss {r['rusage_maxrss'] / 1e9:.2f} GB)")
    finally:
        if tmp is not None:
            tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="sdxl", help="UNet config name (sdxl = real shapes, tiny = smoke test)")
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-speed", action="store_true", help="parity only")
    p.add_argument("--skip-parity", action="store_true", help="no parity/speed (load test only)")
    p.add_argument("--skip-load", action="store_true", help="no load-time / peak-memory test")
    p.add_argument("--load-file", help="fp16 diffusers UNet folder for the load test (written there and kept if absent)")
    p.add_argument("--workdir", default=None, help="where to write the temporary random fp16 file")
    p.add_argument("--measure-load", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_load:
        measure_load_child(*args.measure_load)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_parity:
        parity_and_speed(args)
    if not args.skip_load:
        load_test(args)


if __name__ == "__main__":
    main()

"""PuLID benchmark (run by hand): full-size files load, and the cost of the identity branch per UNet call.

    python -m benchmarks.bench_pulid                  # writes random full-size pulid_v1.bin / pulid_v1.1.safetensors
                                                      # to a temp folder (~2.6 GB), loads them, counts FLOPs on meta
    python -m benchmarks.bench_pulid --flops-only     # meta device only (no files, no memory)
    python -m benchmarks.bench_pulid --device cuda --dtype fp16   # + wall-clock UNet timings at 1024x768

(1) Random weights at the released shapes (SDXL: IDEncoder / IDFormer + 70 ``id_to_k``/``id_to_v`` pairs) are saved in
the released layouts (v1: flat torch pickle, fp32; v1.1: safetensors, fp16), their parameter counts are checked against
the sizes of the published files (395,673,600 and 492,185,600 parameters), and they are loaded with
``PuLID.from_file`` and installed in an SDXL UNet built on the meta device.
(2) Matmul FLOPs (torch FlopCounterMode, meta device) of one SDXL UNet call at 1024x768 (latent 128x96, batch 1), plain
vs with PuLID v1 (10 tokens, fidelity: num_zero 8, ORTHO_v2) and v1.1 (32 tokens, num_zero 20, ORTHO_v2); and the
one-off cost per reference image of the EVA02-L tower and of the encoders. Element-wise work (softmax, the ortho
projections) is not in FLOP counts; the optional timings include it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from fastface.adapters.pulid import PULID_ENCODER_CONFIGS, PuLID, build_encoder
from fastface.models.eva_clip import EVAVisionTower
from fastface.models.unet import UNet, get_unet_config

RELEASED_PARAMS = {"v1": 395_673_600, "v1.1": 492_185_600}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_file_dict(version: str, unet: UNet, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A flat ``id_adapter.*`` + ``id_adapter_attn_layers.*`` dict with random values at the released shapes."""
    with torch.device("meta"):
        enc = build_encoder(PULID_ENCODER_CONFIGS[version])
    sd = {f"id_adapter.{k}": torch.empty(v.shape, dtype=dtype).normal_(0, 0.02) for k, v in enc.state_dict().items()}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        if i % 2:
            for kv in ("id_to_k", "id_to_v"):
                shape = (attn.to_k.out_features, attn.to_k.in_features)
                sd[f"id_adapter_attn_layers.{i}.{kv}.weight"] = torch.empty(shape, dtype=dtype).normal_(0, 0.02)
    return sd


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_call(unet: UNet, tokens: torch.Tensor | None, device: str, dtype: torch.dtype, h: int = 128, w: int = 96):
    cfg = unet.config
    x = torch.zeros(1, 4, h, w, device=device, dtype=dtype)
    ctx = torch.zeros(1, 77, cfg.context_dim, device=device, dtype=dtype)
    te = torch.zeros(1, cfg.pooled_dim, device=device, dtype=dtype)
    tid = torch.tensor([[1024.0, 768, 0, 0, 1024, 768]], device=device, dtype=dtype)
    return lambda: unet(x, 500, ctx, text_embeds=te, time_ids=tid, id_tokens=tokens, id_scale=0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flops-only", action="store_true", help="skip writing/loading the full-size files")
    ap.add_argument("--device", default=None, help="also time UNet calls on this device (e.g. cuda)")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    with torch.device("meta"):
        unet = UNet(get_unet_config("sdxl"))
    adapters = {}
    for version in ("v1", "v1.1"):
        if args.flops_only:
            with torch.device("meta"):
                sd = random_file_dict(version, unet, torch.float32)
            n = sum(v.numel() for v in sd.values())
            adapters[version] = None
        else:
            file_dtype = torch.float32 if version == "v1" else torch.float16
            t0 = time.perf_counter()
            sd = random_file_dict(version, unet, file_dtype)
            n = sum(v.numel() for v in sd.values())
            folder = Path(tempfile.mkdtemp(prefix="pulid_bench_"))
            path = folder / ("pulid_v1.bin" if version == "v1" else "pulid_v1.1.safetensors")
            torch.save(sd, path) if version == "v1" else save_file(sd, str(path))
            del sd
            t1 = time.perf_counter()
            adapter = PuLID.from_file(path)
            t2 = time.perf_counter()
            handle = adapter.install(unet)  # onto the meta UNet: checks every layer's shape
            handle.remove()
            print(f"{version}: wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {t1 - t0:.1f} s, "
                  f"loaded in {t2 - t1:.1f} s, installed/removed on the SDXL UNet (70 layers)")
            path.unlink()
            folder.rmdir()
            adapters[version] = adapter
        ok = "equals" if n == RELEASED_PARAMS[version] else "DIFFERS FROM"
        print(f"{version}: {n:,} parameters, {ok} the released file's {RELEASED_PARAMS[version]:,}")

    # FLOPs on meta
    base = count_flops(unet_call(unet, None, "meta", torch.float32))
    print(f"\nSDXL UNet call at 1024x768, batch 1: {base / 1e12:.3f} TFLOP (matmul/conv)")
    for version, mode in (("v1", "fidelity"), ("v1.1", "v1.1")):
        cfg = PULID_ENCODER_CONFIGS[version]
        with torch.device("meta"):
            sd = {k[len("id_adapter_attn_layers."):]: v for k, v in random_file_dict(version, unet, torch.float32).items()
                  if k.startswith("id_adapter_attn_layers.")}
            adapter = PuLID(build_encoder(cfg), {int(k.split(".")[0]): (sd[k], sd[k.replace("id_to_k", "id_to_v")])
                                                 for k in sd if "id_to_k" in k}, source="meta")  # fmt: skip
            handle = adapter.install(unet, mode=mode)
            tokens = torch.zeros(1, cfg.num_tokens, cfg.context_dim)
            with_id = count_flops(unet_call(unet, tokens, "meta", torch.float32))
            handle.remove()
            enc = count_flops(lambda: adapter.encoder(torch.zeros(1, cfg.id_dim), [torch.zeros(1, 577, 1024)] * 5))
        extra = with_id - base
        print(f"PuLID {version} ({cfg.num_tokens} tokens, mode {mode}): +{extra / 1e9:.2f} GFLOP per UNet call "
              f"({100 * extra / base:.2f}% of the UNet); encoder {enc / 1e9:.2f} GFLOP once per identity")
    with torch.device("meta"):
        eva = EVAVisionTower("eva02-l-14-336")
        eva_flops = count_flops(lambda: eva(torch.zeros(1, 3, 336, 336)))
    print(f"EVA02-CLIP-L-14-336 tower: {eva_flops / 1e9:.1f} GFLOP once per reference image")

    if args.device:
        dtype = DTYPES[args.dtype]
        real = unet.to_empty(device=args.device).to(dtype)
        for p in real.parameters():
            p.normal_(0, 0.02)
        rows = {}
        for version in ("v1", "v1.1"):
            adapter = adapters.get(version)
            if adapter is None:
                continue
            cfg = adapter.config
            tokens = torch.randn(1, cfg.num_tokens, cfg.context_dim, device=args.device)
            plain, withid = unet_call(real, None, args.device, dtype), None
            handle = adapter.install(real)
            withid = unet_call(real, tokens, args.device, dtype)
            times = {"plain": [], "pulid": []}
            for _ in range(args.repeats):
                for name, fn in (("plain", plain), ("pulid", withid)):
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t0)
            handle.remove()
            rows[version] = {k: statistics.median(v[1:]) for k, v in times.items()}
        for version, r in rows.items():
            print(f"{args.device} {args.dtype}: UNet {r['plain'] * 1e3:.1f} ms, with PuLID {version} "
                  f"{r['pulid'] * 1e3:.1f} ms (+{100 * (r['pulid'] / r['plain'] - 1):.1f}%)")


if __name__ == "__main__":
    main()

"""IP-Adapter FaceID benchmark (run by hand): cost of the identity branch and its LoRA vs a plain UNet forward.

    python -m benchmarks.bench_ip_adapter --device cuda --dtype fp16 --latent 128 --batch 3   # real 1024² shapes
    python -m benchmarks.bench_ip_adapter --config tiny --latent 16                           # quick smoke run

Random weights at the config's real shapes (SDXL by default: 140 attention layers, LoRA rank 128). Times, as the
median of repeats on the same inputs after a warm-up per mode, (a) the UNet alone, (b) + identity branch (to_k_ip/to_v_ip and
the explicit 4-token attention in every attn2), (c) + the rank-128 LoRA on q/k/v/out of all 140 layers, unfused
(the exact reference computation), (d) the same with the LoRA fused. Prints each overhead as a fraction of (a),
after the FLOP overheads counted exactly (torch FlopCounterMode) on the meta device, which runs on any machine:

    python -m benchmarks.bench_ip_adapter --flops-only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastface.adapters.ip_adapter import IPAdapterFaceID
from fastface.models.unet import UNet, get_unet_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def random_unet(config_name: str, dtype: torch.dtype, device: str) -> UNet:
    """Our UNet at the config's shapes with random weights made directly in ``dtype`` on ``device``."""
    with torch.device("meta"):
        unet = UNet(get_unet_config(config_name))
    unet = unet.to(dtype) if device == "meta" else unet.to_empty(device=device).to(dtype)
    if device == "meta":
        return unet.eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in unet.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif "norm" in name:
            p.fill_(1.0)
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(fan_in**-0.5))
    return unet.eval().requires_grad_(False)


def random_adapter(unet: UNet, plus: bool, rank: int, dtype: torch.dtype, device: str) -> IPAdapterFaceID:
    """An adapter in the original key layout, shaped after ``unet`` (token width = its context dim)."""
    g = None if device == "meta" else torch.Generator(device=device).manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        if g is None:
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(shape[-1] ** -0.5).to(dtype)

    c = unet.config.context_dim
    image_proj = {
        "proj.0.weight": rnd(1024, 512), "proj.0.bias": rnd(1024),
        "proj.2.weight": rnd(4 * c, 1024), "proj.2.bias": rnd(4 * c),
        "norm.weight": torch.ones(c, dtype=dtype, device=device), "norm.bias": rnd(c),
    }  # fmt: skip
    if plus:
        p = "perceiver_resampler."
        image_proj |= {p + "proj_in.weight": rnd(c, 1280), p + "proj_in.bias": rnd(c),
                       p + "proj_out.weight": rnd(c, c), p + "proj_out.bias": rnd(c),
                       p + "norm_out.weight": rnd(c), p + "norm_out.bias": rnd(c)}  # fmt: skip
        for layer in range(4):
            q = f"{p}layers.{layer}."
            image_proj |= {q + "0.norm1.weight": rnd(c), q + "0.norm1.bias": rnd(c), q + "0.norm2.weight": rnd(c),
                           q + "0.norm2.bias": rnd(c), q + "0.to_q.weight": rnd(c, c), q + "0.to_kv.weight": rnd(2 * c, c),
                           q + "0.to_out.weight": rnd(c, c), q + "1.0.weight": rnd(c), q + "1.0.bias": rnd(c),
                           q + "1.1.weight": rnd(4 * c, c), q + "1.3.weight": rnd(c, 4 * c)}  # fmt: skip
    ip_adapter = {}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        h, c_in = attn.to_q.out_features, attn.to_k.in_features
        if i % 2:
            ip_adapter[f"{i}.to_k_ip.weight"], ip_adapter[f"{i}.to_v_ip.weight"] = rnd(h, c), rnd(h, c)
        for slot, fan_in in (("to_q", h), ("to_k", c_in), ("to_v", c_in), ("to_out", h)):
            ip_adapter[f"{i}.{slot}_lora.down.weight"] = rnd(rank, fan_in)
            ip_adapter[f"{i}.{slot}_lora.up.weight"] = rnd(h, rank)
    return IPAdapterFaceID.from_state_dict(image_proj, ip_adapter, source="<random>", dtype=dtype, device=device)


def count_flops(args, variant: str) -> float:
    """FLOPs of one forward on the meta device (no memory, no compute): ``plain``, ``ident``, ``lora`` or ``fused``."""
    unet, adapter, inputs, tokens, scale = setup(args, torch.float32, "meta")
    handle = None if variant == "plain" else adapter.install(unet, lora=variant != "ident")
    if variant == "fused":
        handle.fuse_lora()
    with FlopCounterMode(display=False) as counter:
        if variant == "plain":
            unet(*inputs)
        else:
            unet(*inputs, id_tokens=tokens, id_scale=scale)
    return counter.get_total_flops()


def setup(args, dtype: torch.dtype, device: str):
    """UNet, adapter, inputs (x, t, context, text_embeds, time_ids), identity tokens and the [B] id scale."""
    unet = random_unet(args.config, dtype, device)
    adapter = random_adapter(unet, args.plus, args.rank, dtype, device)
    cfg, b = unet.config, args.batch

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(device, dtype)

    ti = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(b, 1).to(device, dtype)
    x = rnd(b, cfg.in_channels, args.latent, args.latent)
    inputs = (x, 499, rnd(b, 77, cfg.context_dim), rnd(b, cfg.pooled_dim), ti)
    with torch.inference_mode():
        tokens = adapter.encode(rnd(b, 512), rnd(b, 257, 1280) if args.plus else None)
    return unet, adapter, inputs, tokens, torch.full((b,), 0.8, device=device, dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="sdxl", help="UNet config name (sdxl = real shapes, tiny = smoke test)")
    p.add_argument("--latent", type=int, default=128, help="latent height = width (128 = 1024² images)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--plus", action="store_true", help="FaceID-Plus-v2 projection (encode timing only)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--flops-only", action="store_true", help="only count FLOPs (meta device; runs anywhere)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flops = {v: count_flops(args, v) for v in ("plain", "ident", "lora", "fused")}
    print(f"FLOPs per forward ({args.config}, latent {args.latent}², batch {args.batch}, counted on the meta device): "
          f"UNet {flops['plain'] / 1e12:.3f} T; identity branch "
          f"{100 * (flops['ident'] - flops['plain']) / flops['plain']:+.3f}%; + LoRA unfused "
          f"{100 * (flops['lora'] - flops['plain']) / flops['plain']:+.2f}%; + LoRA fused "
          f"{100 * (flops['fused'] - flops['plain']) / flops['plain']:+.3f}%")
    if args.flops_only:
        return

    dtype, device = DTYPES[args.dtype], args.device
    t0 = time.perf_counter()
    unet, adapter, inputs, tokens, scale = setup(args, dtype, device)
    print(f"built {args.config} UNet + {adapter.variant} adapter (rank {args.rank}) in {args.dtype} on {device} "
          f"in {time.perf_counter() - t0:.1f} s")
    with torch.inference_mode():
        modes = {"(a) UNet": None, "(b) + identity": "ident", "(c) + identity + LoRA unfused": "lora",
                 "(d) + identity + LoRA fused": "fused"}  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in modes}
        # Each mode is installed once (a fused LoRA is fused once, as in use), warmed up, then timed; newly
        # allocated fused weights would otherwise pay their first-touch page faults inside the timing.
        for name, mode in modes.items():
            handle = None if mode is None else adapter.install(unet, lora=mode != "ident")
            if mode == "fused":
                handle.fuse_lora()
            for rep in range(args.repeats + 1):  # the first run is a warm-up
                _sync(device)
                t = time.perf_counter()
                if mode is None:
                    unet(*inputs)
                else:
                    unet(*inputs, id_tokens=tokens, id_scale=scale)
                _sync(device)
                if rep:
                    times[name].append(time.perf_counter() - t)
            if handle is not None:
                handle.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["(a) UNet"]
    for name, m in med.items():
        extra = "" if name == "(a) UNet" else f"   overhead {100 * (m - base) / base:+.1f}% of (a)"
        print(f"{name:32s} {m * 1e3:9.1f} ms{extra}")


if __name__ == "__main__":
    main()

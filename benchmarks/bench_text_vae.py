"""Speed of SDXL prompt encoding and VAE decoding: fastface vs transformers/diffusers, real shapes, random weights.

Run by hand:  python -m benchmarks.bench_text_vae [--device cuda] [--dtype fp16] [--size 1024] [--batch 1]
Both sides use the very same weight tensors (ours are assigned from the reference modules' state dicts).
Prints median times and the ratio ours/reference (< 1 means fastface is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed_pair(ref_fn, our_fn, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of each, calls interleaved so that load from other processes hits both alike."""
    ref_fn(), our_fn()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ref_fn, times[0]), (our_fn, times[1])):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_text(device: str, dtype: torch.dtype, batch: int, repeats: int) -> None:
    import diffusers
    import transformers

    from fastface.models.text import SDXLTextConditioner, build_text_encoder
    from fastface.models.tokenizer import CLIPTokenizer, write_vocab_folder

    def hf(width, layers, heads, mlp, act, cls):
        cfg = transformers.CLIPTextConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=mlp, hidden_act=act, projection_dim=1280, eos_token_id=2)
        with torch.device(device):
            return cls(cfg).to(dtype).eval()

    te1 = hf(768, 12, 12, 3072, "quick_gelu", transformers.CLIPTextModel)
    te2 = hf(1280, 32, 20, 5120, "gelu", transformers.CLIPTextModelWithProjection)
    with tempfile.TemporaryDirectory() as tmp:
        tok1 = transformers.CLIPTokenizer.from_pretrained(write_vocab_folder(f"{tmp}/t1"))
        tok2 = transformers.CLIPTokenizer.from_pretrained(write_vocab_folder(f"{tmp}/t2", pad_token="!"))
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=None, scheduler=None, add_watermarker=False)
    ours = SDXLTextConditioner(
        CLIPTokenizer.bundled(), CLIPTokenizer.bundled(pad_token="!"),
        build_text_encoder("clip-l", te1.state_dict(), source="bench"),
        build_text_encoder("bigg", te2.state_dict(), source="bench"),
    )
    prompts = ["anime-style drawing; person in a high school classroom daydreaming, detailed, soft light"] * batch
    neg = "blurry, low quality, deformed"

    def ref_call():
        with torch.no_grad():
            pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=True, negative_prompt=neg)

    def our_call():
        ours.encode(prompts, neg)

    r, o = timed_pair(ref_call, our_call, device, repeats)
    got, ref = ours.encode(prompts, neg), None
    with torch.no_grad():
        ref = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=True, negative_prompt=neg)
    err = ((got.context.float() - ref[0].float()).abs().max() / ref[0].float().abs().max()).item()
    print(f"prompt encoding (B={batch}, with negative): reference {r * 1e3:.1f} ms, fastface {o * 1e3:.1f} ms, "
          f"ratio {o / r:.3f}  (context rel. err {err:.1e})")
    t0 = time.perf_counter()
    for i in range(200):
        ours.tokenizer_1.encode(f"prompt number {i}: a portrait photo of a person, 85mm, bokeh")
    print(f"tokenizer: {(time.perf_counter() - t0) / 200 * 1e6:.0f} us per new prompt")


def bench_vae(device: str, dtype: torch.dtype, size: int, batch: int, repeats: int) -> None:
    import diffusers

    from fastface.models.vae_loading import build_vae

    with torch.device(device):
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025,
        ).to(dtype).eval()
    ours = build_vae("sdxl-fp16-fix", ref.state_dict(), source="bench")
    z = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)

    def ref_call():
        with torch.no_grad():
            (ref.decode(z / 0.13025).sample / 2 + 0.5).clamp(0, 1)

    r, o = timed_pair(ref_call, lambda: ours.decode(z), device, repeats)
    print(f"VAE decode {size}x{size} (B={batch}): reference {r * 1e3:.0f} ms, fastface {o * 1e3:.0f} ms, ratio {o / r:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", choices=["text", "vae"], default=None)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    torch.manual_seed(0)
    print(f"device {args.device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.skip != "text":
        bench_text(args.device, dtype, args.batch, args.repeats)
    if args.skip != "vae":
        bench_vae(args.device, dtype, args.size, args.batch, args.repeats)


if __name__ == "__main__":
    main()

"""Pipeline benchmark (run by hand): time and UNet evaluations per image for each method, ours vs diffusers.

    python -m benchmarks.bench_pipeline                                   # tiny random weights, CPU smoke run
    python -m benchmarks.bench_pipeline --weights hub --device cuda --dtype fp16 --size 1024   # real weights

The reference is the same pipeline in diffusers as the official FastFace code runs it (fastface-official.md
Sec. 1 and 3): ``StableDiffusionXLPipeline`` parts, the Hyper LoRA fused, ``load_ip_adapter`` for FaceID-Plus-v2,
DDIM trailing, and one UNet call per step over the three-branch batch [(no text, no id), (no text, id),
(text, id)] for every method (the official implementation computes all three even when only (text, id) is used).
The reference loop here applies the DCG combination and rescale but not AM, so its times for the AM methods are a
lower bound (the ratios are conservative). Both sides include prompt encoding, identity encoding and VAE decoding.

``--weights tiny`` writes tiny random weights in the real layouts (:func:`fastface.selfcheck.write_tiny_weights`)
and both sides load them; ``--weights hub`` uses the preset's real files from the Hugging Face cache. The script
also checks that the reference's DCG image equals ours (``dcg`` row, max |diff| on the image).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastface.hub import resolve_file, resolve_folder
from fastface.pipeline import Pipeline
from fastface.presets import METHOD_PRESETS, get_adapter_preset, model_recipe, resolve_method
from fastface.selfcheck import tiny_face, write_tiny_weights

SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                      timestep_spacing="trailing")
PROMPT = "a photo of a person in a spacesuit"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _files(args: argparse.Namespace, tmp: str) -> dict[str, Path]:
    if args.weights == "tiny":
        w = write_tiny_weights(tmp)
        return dict(base=w.base, lora=w.lora, adapter=w.adapter, image_encoder=w.image_encoder)
    recipe, ad = model_recipe("hyper", args.steps), get_adapter_preset("faceid-plusv2")
    adapter = resolve_file(ad.weights)
    return dict(base=resolve_folder(recipe.base, required=("model_index.json",)), lora=resolve_file(recipe.weights),
                adapter=adapter, image_encoder=resolve_folder(ad.image_encoder[0]))


def reference(files: dict[str, Path], dtype: torch.dtype, device: str):
    """The diffusers pipeline with the Hyper LoRA fused and FaceID-Plus-v2 loaded, as the official code builds it."""
    import diffusers
    import transformers

    base = files["base"]
    parts = dict(
        unet=diffusers.UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype),
        vae=diffusers.AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype),
        text_encoder=transformers.CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=dtype),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2",
                                                                                torch_dtype=dtype),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(base / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
        scheduler=diffusers.DDIMScheduler.from_config(SDXL_SCHEDULER),
    )
    pipe = diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.load_lora_weights(str(files["lora"].parent), weight_name=files["lora"].name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.load_ip_adapter(str(files["adapter"].parent), subfolder="", weight_name=files["adapter"].name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    vision = transformers.CLIPVisionModelWithProjection.from_pretrained(files["image_encoder"], torch_dtype=dtype)
    return pipe.to(device), vision.to(device)


@torch.no_grad()
def reference_generate(pipe, vision, face, dcg, steps: int, size: int, seed: int) -> torch.Tensor:
    """The official-style DCG loop: one UNet call per step over the three branches; returns images in [0, 1]."""
    from fastface.models.clip_vision import clip_preprocess

    unet, device, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    pe, npe, pp, npp = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=True)  # zero negatives (no negative prompt)
    n = vision.config.image_size
    pixels = clip_preprocess(list(face.crops), size=n, crop_size=n).to(device, dtype)
    clip = vision(pixels, output_hidden_states=True).hidden_states[-2].mean(0, keepdim=True)
    null_clip = vision(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
    emb = torch.from_numpy(np.array(face.embedding, dtype=np.float32)).to(device, dtype).reshape(1, 1, 512)
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    proj.clip_embeds, proj.shortcut, proj.shortcut_scale = torch.cat([null_clip, clip, clip])[:, None], True, 1.0
    cond = dict(text_embeds=torch.cat([npp, npp, pp]), image_embeds=[torch.cat([torch.zeros_like(emb), emb, emb])],
                time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 3, device=device, dtype=dtype))
    ctx = torch.cat([npe, npe, pe])
    alphas, betas = dcg.coefficients(steps)
    sched = pipe.scheduler
    sched.set_timesteps(steps, device=device)
    g = torch.Generator("cpu").manual_seed(seed)
    x = (torch.randn(1, 4, size // 8, size // 8, generator=g) * sched.init_noise_sigma).to(device, dtype)
    for i, t in enumerate(sched.timesteps):
        eps = unet(sched.scale_model_input(torch.cat([x] * 3), t), t, ctx, added_cond_kwargs=cond).sample
        e_u, e_i, e_ti = eps.chunk(3)
        e = e_u + alphas[i] * (e_i - e_u) + betas[i] * (e_ti - e_i)
        if dcg.rescale:
            std = lambda v: v.std(dim=[1, 2, 3], keepdim=True)  # noqa: E731
            e = e * (dcg.rescale * (std(e_i) + std(e_ti)) / (2 * std(e)) + (1 - dcg.rescale))
        x = sched.step(e, t, x).prev_sample
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (image.float() / 2 + 0.5).clamp(0, 1).cpu()


def _time(fns, device: str, repeats: int) -> list[tuple[float, object]]:
    """Median seconds and last output of each function, the repeats interleaved (fair under a noisy machine)."""
    outs, times = [None] * len(fns), [[] for _ in fns]
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            outs[j] = fn()
            _sync(device)
            times[j].append(time.perf_counter() - t0)
    return [(statistics.median(t), o) for t, o in zip(times, outs)]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def common_arguments(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options the pipeline benchmarks share: weights, device, dtype, size, steps, repeats."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--weights", choices=("tiny", "hub"), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--size", type=int, default=64, help="image size in px (1024 for real SDXL)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def main() -> None:
    args = common_arguments(__doc__.split("\n")[0], repeats=3).parse_args()
    dtype = DTYPES[args.dtype]
    face = tiny_face(crop_size=56 if args.weights == "tiny" else 224)
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(args, tmp)
        ours = Pipeline.from_pretrained("hyper", "faceid-plusv2", steps=args.steps, base=files["base"],
                                        weights=files["lora"], adapter_file=files["adapter"],
                                        image_encoder=files["image_encoder"], dtype=dtype, device=args.device)
        ref, vision = reference(files, dtype, args.device)
        kw = dict(seed=0, height=args.size, width=args.size)
        ours(PROMPT, face=face, method="baseline", **kw)  # warm-up both
        dcg_paper, _ = resolve_method("dcg", "hyper")
        reference_generate(ref, vision, face, dcg_paper, args.steps, args.size, 0)
        print(f"device {args.device}, {args.dtype}, {args.weights} weights, {args.size} px, {args.steps} steps, "
              f"median of {args.repeats} interleaved repeats; time ratio = ref / ours")
        print(f"{'method':13s} {'ours s/img':>10s} {'evals':>6s} {'ref s/img':>10s} {'evals':>6s} "
              f"{'time ratio':>10s} {'eval ratio':>10s}  note")
        for method in METHOD_PRESETS:
            dcg, _ = resolve_method(method, "hyper", adapter="faceid-plusv2")
            (t_ours, gen), (t_ref, img) = _time(
                [lambda: ours(PROMPT, face=face, method=method, **kw),
                 lambda: reference_generate(ref, vision, face, dcg, args.steps, args.size, 0)],
                args.device, args.repeats,
            )
            ref_evals = 3 * args.steps
            note = ""
            if method == "dcg":
                note = f"max |ours - ref| image {float((gen.pixels - img).abs().max()):.1e}"
            elif "am" in method:
                note = "ref without AM (lower bound)"
            print(f"{method:13s} {t_ours:10.4f} {gen.unet_evaluations:6.0f} {t_ref:10.4f} {ref_evals:6d} "
                  f"{t_ref / t_ours:10.2f} {ref_evals / gen.unet_evaluations:10.2f}  {note}")


if __name__ == "__main__":
    main()

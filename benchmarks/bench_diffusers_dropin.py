"""Drop-in benchmark (run by hand): time per image of a diffusers pipeline with ``enable(pipe, method)`` against
the same pipeline running the official three-branch batch (3 UNet evaluations per step, 12 at 4 steps).

    python -m benchmarks.bench_diffusers_dropin                        # tiny random weights, CPU smoke run
    python -m benchmarks.bench_diffusers_dropin --weights hub --device cuda --dtype fp16 --size 1024

Both sides use one diffusers ``StableDiffusionXLPipeline`` built as the official FastFace code builds it (Hyper
LoRA fused, FaceID-Plus-v2 by ``load_ip_adapter``, DDIM trailing; :func:`benchmarks.bench_pipeline.reference`).
The drop-in side is the user's own ``pipe(prompt, ip_adapter_image_embeds=..., guidance_scale=0)`` under
``enable``; the reference is :func:`benchmarks.bench_pipeline.reference_generate`, one UNet call per step over
[(no text, no id), (no text, id), (text, id)] with the DCG combination but without AM (so for the AM methods
its times are a lower bound and the ratios conservative). Each side includes prompt encoding, the CLIP features of
the face crop and VAE decoding. Runs alternate between the two sides; min and median seconds are reported, and the
ratio of medians (reference / drop-in: above 1 means the drop-in is faster).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_pipeline import DTYPES, PROMPT, _files, _sync, _time, common_arguments, reference, reference_generate
from fastface.integrations.diffusers import enable
from fastface.models.clip_vision import clip_preprocess
from fastface.presets import METHOD_PRESETS, resolve_method
from fastface.selfcheck import tiny_face


@torch.no_grad()
def dropin_generate(pipe, vision, face, method: str, steps: int, size: int, seed: int) -> tuple[torch.Tensor, int]:
    """The user's pipe(...) call under enable(...); returns images in [0, 1] and UNet evaluations per image."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    n = vision.config.image_size
    pixels = clip_preprocess(list(face.crops), size=n, crop_size=n).to(device, dtype)
    clip = vision(pixels, output_hidden_states=True).hidden_states[-2].mean(0, keepdim=True)
    null_clip = vision(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    proj.clip_embeds, proj.shortcut, proj.shortcut_scale = clip[:, None], True, 1.0
    emb = torch.from_numpy(np.array(face.embedding, dtype=np.float32)).to(device, dtype).reshape(1, 1, 512)
    with enable(pipe, method, preset="hyper", null_clip_embeds=null_clip) as h:
        images = pipe(PROMPT, ip_adapter_image_embeds=[emb], num_inference_steps=steps, guidance_scale=0.0,
                      height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="pt").images
        return images.float().cpu(), h.branch_evaluations


def _logged(fn, device: str, log: list[float]):
    """``fn`` that appends its own seconds (synchronised) to ``log``: bench_pipeline's ``_time`` alternates the
    runs and reports medians only; the log gives min and median."""
    def run():
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        log.append(time.perf_counter() - t0)
        return out

    return run


def main(argv: list[str] | None = None) -> None:
    ap = common_arguments(__doc__.split("\n")[0], repeats=5)
    ap.add_argument("--methods", nargs="*", default=list(METHOD_PRESETS))
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    face = tiny_face(crop_size=56 if args.weights == "tiny" else 224)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, vision = reference(_files(args, tmp), dtype, args.device)
        pipe.set_progress_bar_config(disable=True)
        dropin_generate(pipe, vision, face, "baseline", args.steps, args.size, 0)  # warm-up both
        reference_generate(pipe, vision, face, resolve_method("dcg", "hyper")[0], args.steps, args.size, 0)
        print(f"device {args.device}, {args.dtype}, {args.weights} weights, {args.size} px, {args.steps} steps, "
              f"{args.repeats} alternating repeats; ratio = reference median / drop-in median")
        print(f"{'method':13s} {'drop-in min/med s':>18s} {'evals':>5s} {'3-branch min/med s':>19s} {'evals':>5s} "
              f"{'ratio':>6s}  note")
        for method in args.methods:
            dcg, _ = resolve_method(method, "hyper", adapter="faceid-plusv2")
            t_in, t_ref = [], []
            (_, (img, evals)), (_, ref_img) = _time(
                [_logged(lambda: dropin_generate(pipe, vision, face, method, args.steps, args.size, 0), args.device,
                         t_in),
                 _logged(lambda: reference_generate(pipe, vision, face, dcg, args.steps, args.size, 0), args.device,
                         t_ref)],
                args.device, args.repeats,
            )
            note = ""
            if method in ("baseline", "dcg"):
                note = f"max |drop-in - 3-branch| image {float((img - ref_img).abs().max()):.1e}"
            elif "am" in method:
                note = "3-branch without AM (lower bound)"
            med_in, med_ref = statistics.median(t_in), statistics.median(t_ref)
            print(f"{method:13s} {min(t_in):8.4f} / {med_in:7.4f} {evals:5d} {min(t_ref):8.4f} / {med_ref:8.4f} "
                  f"{3 * args.steps:5d} {med_ref / med_in:6.2f}  {note}")


if __name__ == "__main__":
    main()

"""The ``fastface`` command: ``fastface generate`` (face + prompt -> PNG), ``fastface embed``, ``fastface selfcheck``.

Exit codes: 0 success; 1 an internal error (with a traceback); 2 a bad option or value; 3 weights missing or
unreadable; 4 a face problem (no face found, unreadable photo or face file, no crop for FaceID-Plus-v2, an
embedding where PuLID needs a photo or a PuLID face file).
Every error other than 1 is reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_WEIGHTS, EXIT_FACE = 0, 1, 2, 3, 4
METHODS = ("baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2")
PRESETS = ("hyper", "lightning", "lcm", "turbo", "tcd")
ADAPTERS = ("faceid", "faceid-plusv2", "pulid", "pulid-v1.1")
PULID_MODES = ("fidelity", "style", "v1.1", "plain")

EPILOG = """\
exit codes: 0 ok, 2 bad option or value, 3 weights missing or unreadable, 4 face problem (no face found,
unreadable photo or face file), 1 internal error.

examples:
  fastface generate --preset hyper --adapter faceid-plusv2 --face me.jpg --prompt "a photo of a person as an
      astronaut" --download
  fastface generate --face me1.jpg --face me2.jpg --prompt "..." --method dcg --set alpha=1,2,2,1 --num-images 4
  fastface embed --face me.jpg -o me.safetensors    # then: fastface generate --face me.safetensors ...
  fastface generate --adapter pulid --face me.jpg --prompt "..." --download      # PuLID v1, fidelity mode
  fastface selfcheck
"""


class CLIError(Exception):
    """A user-facing failure: one line and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _value(text: str) -> Any:
    """A --set value: JSON (numbers, true/false, null, [lists]), a comma list of numbers, or a string."""
    low = text.strip().lower()
    if low in ("none", "null", "off"):
        return None
    if low in ("true", "false", "on", "yes", "no"):
        return low in ("true", "on", "yes")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            pass
    return text


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or ():
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(EXIT_USAGE, f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _value(val)
    return out


def _add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights (default: the Hugging Face cache; downloads only with --download)")
    g.add_argument("--download", action="store_true",
                   help="download missing weights into the Hugging Face cache (needs: pip install "
                   "'fastface[hub]'), and a missing insightface face-analysis pack into --face-root")
    g.add_argument("--cache-dir",
                   help="Hugging Face hub cache folder (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    g.add_argument("--base", help="diffusers SDXL folder or repo id (text encoders, VAE, UNet config and weights)")
    g.add_argument("--unet", help="local UNet folder or file replacing the preset's")
    g.add_argument("--weights", "--lora", dest="weights",
                   help="local distilled weights: the LoRA file (hyper, lcm, tcd) or the UNet file (lightning)")
    g.add_argument("--vae", help="VAE folder, file or repo id (e.g. madebyollin/sdxl-vae-fp16-fix)")
    g.add_argument("--adapter-file", help="local adapter file: IP-Adapter FaceID / FaceID-Plus-v2 (.bin or "
                   ".safetensors), or PuLID (pulid_v1.bin / pulid_v1.1.safetensors)")
    g.add_argument("--image-encoder", help="local CLIP ViT-H/14 image encoder folder (FaceID-Plus-v2)")
    _add_face_models(g)


def _add_face_models(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--face-root", help="insightface folder holding models/buffalo_l (PuLID: models/antelopev2 and "
                   "models/facexlib/parsing_bisenet.pth); default ~/.insightface; with --download a missing pack is "
                   "fetched from the insightface releases")
    g.add_argument("--eva", help="PuLID: local EVA02-CLIP-L-14-336 checkpoint (default: QuanSun/EVA-CLIP "
                   "EVA02_CLIP_L_336_psz14_s6B.pt from the Hugging Face cache); needed for photos only")
    g.add_argument("--face-parser", help="PuLID: local facexlib parsing_bisenet.pth (default: found in "
                   "FACE_ROOT/models/facexlib; with --download fetched from facexlib's GitHub release)")
    g.add_argument("--face-detector", help="PuLID: local facexlib detection_Resnet50_Final.pth (RetinaFace: aligns "
                   "photos as upstream; default: found in FACE_ROOT/models/facexlib, with --download fetched from "
                   "facexlib's GitHub release; if absent, insightface keypoints with a warning)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastface`` command."""
    parser = argparse.ArgumentParser(
        prog="fastface", description="Identity-preserving image generation on few-step SDXL (FastFace: DCG + AM).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastface {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser("generate", help="generate images of a person from face photo(s) and a prompt",
                         description="Generate images of the person in --face. Settings default to the preset's "
                         "and the paper's; every PNG carries all settings in its metadata ('fastface' text chunk).",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = gen.add_argument_group("what to generate")
    g.add_argument("--prompt", "-p", required=True, help="the text prompt")
    g.add_argument("--face", "-f", action="append", required=True, metavar="PATH",
                   help="a face photo, or a face file (.npy / .safetensors, see 'fastface embed'); repeat for "
                   "several photos of the same person (their embeddings are averaged; PuLID concatenates them)")
    g.add_argument("--negative-prompt", "-n", help="negative prompt (default: none, i.e. SDXL's zero null text)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    g.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    g.add_argument("--output", "-o", default="fastface.png",
                   help="output PNG (several images: NAME-0.png, NAME-1.png, ...); a folder gets fastface-SEED.png")
    g = gen.add_argument_group("model and method")
    g.add_argument("--preset", default="hyper", choices=PRESETS, help="distilled model recipe (default hyper)")
    g.add_argument("--adapter", default="faceid-plusv2", choices=ADAPTERS,
                   help="identity adapter (default faceid-plusv2); pulid = PuLID v1, pulid-v1.1 = PuLID v1.1")
    g.add_argument("--method", default="fastface-am1", choices=METHODS,
                   help="guidance/attention method (default fastface-am1)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="method_set",
                   help="override a method setting, e.g. alpha=1,1.5,1.5,1 beta=3 rescale=none p=1.3 s_up=1.45 "
                   "d=7.5,5,5,5 q=0.65 w=0.7 adain=false (repeatable)")
    g.add_argument("--guidance", type=float, help="baseline/am1/am2 guidance g (alpha = beta = g; preset default)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the preset's, 4)")
    g.add_argument("--sampler", help="override the preset's sampler (euler, euler_ancestral, ddim, lcm, tcd, dpmpp_2m)")
    g.add_argument("--sampler-param", action="append", metavar="KEY=VALUE", help="a sampler parameter, e.g. eta=0.3")
    g.add_argument("--height", type=int, help="image height (default: the preset's resolution)")
    g.add_argument("--width", type=int, help="image width (default: the preset's resolution)")
    g.add_argument("--ip-scale", type=float, help="identity attention weight (default 0.8; PuLID's id_scale)")
    g.add_argument("--lora-scale", type=float, help="weight of the adapter's LoRA (default 1.0; not PuLID)")
    g.add_argument("--s-scale", type=float, help="FaceID-Plus-v2 shortcut weight (default 1.0)")
    g.add_argument("--pulid-mode", choices=PULID_MODES,
                   help="PuLID zero tokens + projection: fidelity (8 + ORTHO_v2, v1 default), style (16 + ORTHO), "
                   "v1.1 (20 + ORTHO_v2, v1.1 default), plain")
    g.add_argument("--id-mix", action="store_true",
                   help="PuLID v1 with several photos: keep all 10 tokens of every photo (default: 5 for extra ones)")
    g = gen.add_argument_group("runtime")
    g.add_argument("--device", help="cuda, cuda:1, cpu, mps ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default fp16 on CUDA, fp32 elsewhere")
    g.add_argument("--batch-size", type=int, help="images per UNet batch (default: all at once)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", "-v", action="store_true", help="log what is loaded from where")
    _add_weights(gen)

    emb = sub.add_parser("embed", help="save a person's face embedding (+ aligned crops) as a face file",
                         description="Detect the face in each photo and save the identity as a .safetensors face "
                         "file that --face accepts: embedding [512] and aligned crops (FaceID adapters), or with "
                         "--adapter pulid / pulid-v1.1 PuLID's encoder inputs (id_cond and EVA hidden states).")
    emb.add_argument("--face", "-f", action="append", required=True, metavar="PATH", help="face photo (repeatable)")
    emb.add_argument("--output", "-o", required=True, help="output .safetensors file")
    emb.add_argument("--adapter", default="faceid-plusv2", choices=ADAPTERS,
                     help="the adapter the file is for: faceid / faceid-plusv2 (default; one format) or "
                     "pulid / pulid-v1.1 (one format)")
    g = emb.add_argument_group("face models")
    _add_face_models(g)
    g.add_argument("--download", action="store_true", help="download missing face models")
    g.add_argument("--cache-dir", help="Hugging Face hub cache folder (PuLID's EVA02-CLIP)")
    g.add_argument("--device", help="PuLID: device for BiSeNet and EVA (default: cuda if available)")

    chk = sub.add_parser("selfcheck", help="run the whole pipeline on tiny random weights (offline, seconds)",
                         description="Builds the pipeline from tiny random weights written on the fly and runs "
                         "every method once. Its images are NOT meaningful: it only proves the installation works.")
    chk.add_argument("--output", "-o", help="folder to save the (meaningless) selfcheck images in")
    chk.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastface")
    except PackageNotFoundError:
        return "unknown"


def _outputs(output: str, seeds: list[int]) -> list[Path]:
    out = Path(output)
    if out.is_dir() or output.endswith(("/", "\\")):
        return [out / f"fastface-{s}.png" for s in seeds]
    if out.suffix.lower() != ".png":
        raise CLIError(EXIT_USAGE, f"--output must be a .png file or a folder, got {output!r}")
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}.png") for i in range(len(seeds))]


def _reproduce(parser: argparse.ArgumentParser, ns: argparse.Namespace, seed: int, output: Path) -> str:
    """The `fastface generate` command that regenerates one image (its seed, one image)."""
    gen = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    sub = gen.choices["generate"]
    words = ["fastface", "generate"]
    skip = {"help", "seed", "num_images", "output", "no_progress", "verbose", "batch_size"}
    for action in sub._actions:
        if action.dest in skip or not action.option_strings:
            continue
        value = getattr(ns, action.dest)
        if value is None or value is False or value == action.default:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words + ["--seed", str(seed), "--output", str(output)])


def _generate(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    from fastface.pipeline import Pipeline
    from fastface.presets import get_adapter_preset, model_recipe, resolve_method

    options = _pairs(ns.method_set, "--set")
    if ns.guidance is not None:
        options["guidance"] = ns.guidance
    sampler_params = _pairs(ns.sampler_param, "--sampler-param") or None
    adapter = get_adapter_preset(ns.adapter)
    # Settings are checked before anything is loaded (ValueError -> exit 2).
    recipe = model_recipe(ns.preset, ns.steps, **({"weights": ns.weights} if ns.weights else {}))
    resolve_method(ns.method, recipe, adapter=adapter, **options)
    if ns.num_images < 1:
        raise CLIError(EXIT_USAGE, f"--num-images must be at least 1, got {ns.num_images}")
    _outputs(ns.output, [0] * ns.num_images)
    if adapter.variant != "pulid":
        for flag, value in (("--pulid-mode", ns.pulid_mode), ("--id-mix", ns.id_mix or None), ("--eva", ns.eva),
                            ("--face-parser", ns.face_parser), ("--face-detector", ns.face_detector)):
            if value is not None:
                raise CLIError(EXIT_USAGE, f"{flag} is a PuLID option; --adapter {ns.adapter} does not use it")
    else:
        for flag, value in (("--lora-scale", ns.lora_scale), ("--s-scale", ns.s_scale)):
            if value is not None:
                raise CLIError(EXIT_USAGE, f"{flag} is an IP-Adapter option; PuLID has no LoRA and no shortcut")
        if ns.id_mix and adapter.pulid_version != "v1":
            raise CLIError(EXIT_USAGE, "--id-mix is a PuLID v1 option (pulid-v1.1 encodes all photos together)")
    # The face first: a photo without a face fails before the generation weights are loaded.
    pulid_models: dict[str, Any] = {}
    face = _identity(ns, adapter, pulid_models)
    if adapter.variant == "faceid_plus" and not face.crops:
        raise CLIError(EXIT_FACE, f"{face.source}: FaceID-Plus-v2 needs the aligned face crop, which this face file "
                       "lacks; pass the photo, a face file from 'fastface embed', or use --adapter faceid")
    pipe = Pipeline.from_pretrained(
        ns.preset, ns.adapter, steps=ns.steps, dtype=ns.dtype, device=ns.device, download=ns.download,
        cache_dir=ns.cache_dir, base=ns.base, unet=ns.unet, weights=ns.weights, vae=ns.vae,
        adapter_file=ns.adapter_file, image_encoder=ns.image_encoder, face_root=ns.face_root,
        **({"eva": ns.eva, "face_parser": ns.face_parser, "face_detector": ns.face_detector}
           if adapter.variant == "pulid" else {}),
    )
    if pulid_models:  # recorded in the PNG metadata, and reused if the pipeline sees photos again
        pipe.set_pulid_preprocessor(pulid_models["preprocessor"], pulid_models["sources"])
    bar = None
    if not ns.no_progress:
        from tqdm import tqdm

        chunks = -(-ns.num_images // max(1, ns.batch_size or ns.num_images))
        bar = tqdm(total=(ns.steps or pipe.recipe.steps) * chunks, unit="step", desc="fastface", file=sys.stderr)
    try:
        out = pipe(ns.prompt, face, method=ns.method, steps=ns.steps, seed=ns.seed, ip_scale=ns.ip_scale,
                   lora_scale=ns.lora_scale, s_scale=ns.s_scale, num_images=ns.num_images,
                   negative_prompt=ns.negative_prompt, height=ns.height, width=ns.width, batch_size=ns.batch_size,
                   sampler=ns.sampler, sampler_params=sampler_params, pulid_mode=ns.pulid_mode, id_mix=ns.id_mix,
                   callback=(lambda i, t, x: bar.update(1)) if bar is not None else None, **options)
    finally:
        if bar is not None:
            bar.close()
    paths = _outputs(ns.output, out.seeds)
    for i, path in enumerate(paths):
        out.save(i, path, {"command": _reproduce(parser, ns, out.seeds[i], path)})
        print(path)
    return EXIT_OK


def _identity(ns: argparse.Namespace, adapter: Any, loaded: dict | None = None) -> Any:
    """The person of ``--face``: a FaceInfo, or for PuLID a PuLIDIdentity (photos go through BiSeNet + EVA here, so
    missing face models and faces fail before the generation weights are loaded). ``loaded`` receives PuLID's
    preprocessing and its files when photos needed them."""
    from fastface.models.loading import WeightFormatError
    from fastface.pipeline import _device, open_face_analyzer, prepare_identity
    from fastface.pipeline_pulid import open_pulid_preprocessor, prepare_pulid_identity

    loaded = {} if loaded is None else loaded

    def pulid_preprocessor():
        if "preprocessor" not in loaded:
            loaded["preprocessor"], loaded["sources"] = open_pulid_preprocessor(
                adapter, face_root=ns.face_root, eva=ns.eva, face_parser=ns.face_parser,
                face_detector=ns.face_detector, device=_device(ns.device), download=ns.download, cache_dir=ns.cache_dir,
            )
        return loaded["preprocessor"]

    try:
        if adapter.variant != "pulid":
            return prepare_identity(
                ns.face, lambda: open_face_analyzer(ns.face_root, adapter.face_pack, download=ns.download)
            )
        return prepare_pulid_identity(ns.face, pulid_preprocessor)
    except ValueError as exc:
        raise CLIError(EXIT_WEIGHTS if isinstance(exc, WeightFormatError) else EXIT_FACE, str(exc)) from exc


def _embed(ns: argparse.Namespace) -> int:
    from fastface.pipeline_loading import save_face_file
    from fastface.pipeline_pulid import save_pulid_face_file
    from fastface.presets import get_adapter_preset

    if not ns.output.endswith(".safetensors"):
        raise CLIError(EXIT_USAGE, f"--output must end with .safetensors, got {ns.output!r}")
    adapter = get_adapter_preset(ns.adapter)
    if adapter.variant != "pulid" and any(x is not None for x in (ns.eva, ns.face_parser, ns.face_detector)):
        raise CLIError(EXIT_USAGE, f"--eva, --face-parser and --face-detector are PuLID options; --adapter "
                       f"{ns.adapter} does not use them")
    face = _identity(ns, adapter)
    print(save_pulid_face_file(ns.output, face) if adapter.variant == "pulid" else save_face_file(ns.output, face))
    return EXIT_OK


def _selfcheck(ns: argparse.Namespace) -> int:
    from fastface.selfcheck import run_selfcheck

    print("fastface selfcheck: tiny random weights, offline. The images are NOT meaningful.", flush=True)
    return EXIT_OK if run_selfcheck(ns.output, device=ns.device, log=lambda s: print(s, flush=True)) else EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastface`` command; returns the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a bad option (2, message already printed)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if getattr(ns, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "generate":
            return _generate(parser, ns)
        if ns.command == "embed":
            return _embed(ns)
        return _selfcheck(ns)
    except CLIError as exc:
        return _fail(exc.code, str(exc))
    except ValueError as exc:
        from fastface.adapters.faces import ImageReadError, NoFaceError
        from fastface.models.loading import WeightFormatError

        if isinstance(exc, WeightFormatError):
            return _fail(EXIT_WEIGHTS, str(exc))
        if isinstance(exc, (NoFaceError, ImageReadError)):
            return _fail(EXIT_FACE, str(exc))
        return _fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted")


def _fail(code: int, message: str) -> int:
    print(f"fastface: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

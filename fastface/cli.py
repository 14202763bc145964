"""The ``fastface`` command: ``fastface generate`` (face + prompt -> PNG), ``fastface embed``, ``fastface doctor``
(every weight file a run needs, found or missing; ``--download`` gets them), ``fastface selfcheck``.

Exit codes: 0 success; 1 an internal error (with a traceback); 2 a bad option or value (also a device this machine
cannot use, an output path that cannot be written); 3 weights missing, unreadable or not weights at all; 4 a face
problem (no face found, unreadable photo or face file, a face input the adapter cannot use; a batch: some
identities failed); 5 the numbers became NaN/Inf while sampling; 130 interrupted. Every error other than 1 is
reported as one line on stderr.

``fastface generate`` never replaces an existing file unless ``--overwrite`` is given: it writes ``NAME-1.png``
(``-2`` ...) beside it and says so. With ``--prompts-file``, ``--faces-dir`` and ``--out-dir`` it runs a batch
(:mod:`fastface.batch`).

The choices of --preset, --adapter and --method come from the presets and the adapter registry; each registered
adapter's options are flags (``--lora-scale``) and ``--adapter-option KEY=VALUE``, listed in ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_WEIGHTS, EXIT_FACE, EXIT_NUMERIC = 0, 1, 2, 3, 4, 5

EPILOG = """\
exit codes: 0 ok; 2 bad option or value (also a --device this machine cannot use, an --output that cannot be
written); 3 weights missing, unreadable or not weights; 4 face problem (no face found, unreadable photo or face
file; a batch: some identities failed); 5 NaN/Inf while sampling (try --dtype bf16 or fp32); 130 interrupted;
1 internal error.

examples:
  fastface generate --preset hyper --adapter faceid-plusv2 --face me.jpg --prompt "a photo of a person as an
      astronaut" --download
  fastface generate --face me1.jpg --face me2.jpg --prompt "..." --method dcg --set alpha=1,2,2,1 --num-images 4
  fastface embed --face me.jpg -o me.safetensors    # then: fastface generate --face me.safetensors ...
  fastface generate --adapter NAME --adapter-option KEY=VALUE ...   # an adapter's options: see "adapter options"
  fastface generate --prompts-file prompts.txt --faces-dir people/ --out-dir out/ ...   # a batch, resumable
  torchrun --nproc_per_node=8 -m fastface generate --prompts-file ...  # the same batch over 8 GPUs
  fastface doctor --preset hyper --adapter faceid-plusv2 --download   # every file a run needs, in one go
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
                   "'fastface[hub]'), and missing face models into --face-root")
    g.add_argument("--cache-dir",
                   help="Hugging Face hub cache folder (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    g.add_argument("--base", help="diffusers SDXL folder or repo id (text encoders, VAE, UNet config and weights)")
    g.add_argument("--unet", help="local UNet folder or file replacing the preset's")
    g.add_argument("--weights", "--lora", dest="weights",
                   help="local distilled weights: the LoRA file (hyper, lcm, tcd) or the UNet file (lightning)")
    g.add_argument("--vae", help="VAE folder, file or repo id (e.g. madebyollin/sdxl-vae-fp16-fix)")
    g.add_argument("--adapter-file", help="local adapter file replacing the adapter preset's")
    _add_face_models(g)


def _adapter_flags() -> dict[str, tuple[Any, list[str]]]:
    """Every registered adapter option by CLI flag: (the option, the adapters having it)."""
    from fastface.adapters.registry import entries

    flags: dict[str, tuple[Any, list[str]]] = {}
    for entry in entries():
        for o in entry.adapter.options:
            flags.setdefault(o.cli_flag, (o, []))[1].append(entry.name)
    return flags


def _dest(flag: str) -> str:
    return "adapter_" + flag.lstrip("-").replace("-", "_")


def _add_face_models(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--face-root", help="insightface folder holding models/<pack> (each adapter's face-analysis "
                   "pack) and other face-model files; default ~/.insightface; with --download a missing pack is "
                   "fetched from the insightface releases")
    for flag, (o, names) in _adapter_flags().items():
        if o.load:
            g.add_argument(flag, dest=_dest(flag), metavar="PATH", help=f"{', '.join(names)}: {o.help}")


def _add_adapter_options(p: argparse.ArgumentParser) -> None:
    from fastface.adapters.registry import entries

    lines = [f"{e.name} ({e.adapter.family}): " + (", ".join(f"{o.name}" + (f"={'|'.join(o.choices)}" if o.choices
             else f" ({o.kind.__name__})") for o in e.adapter.call_options()) or "no options") for e in entries()]
    g = p.add_argument_group("adapter options", "each adapter's call options (by flag or --adapter-option): "
                             + "; ".join(lines))
    g.add_argument("--adapter-option", action="append", metavar="KEY=VALUE", dest="adapter_option",
                   help="an option of the adapter, e.g. lora_scale=0.8 or mode=style (repeatable)")
    for flag, (o, names) in _adapter_flags().items():
        if o.load:
            continue
        text = f"{', '.join(names)}: {o.help}"
        if o.kind is bool:
            g.add_argument(flag, dest=_dest(flag), action="store_true", default=None, help=text)
        elif o.choices:
            g.add_argument(flag, dest=_dest(flag), choices=o.choices, help=text)
        else:
            g.add_argument(flag, dest=_dest(flag), type=o.kind, metavar="VALUE", help=text)


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
    g.add_argument("--prompt", "-p", help="the text prompt (required, unless a batch: see below)")
    g.add_argument("--face", "-f", action="append", metavar="PATH",
                   help="a face photo, or a face file (.npy / .safetensors, see 'fastface embed'); repeat for "
                   "several photos of the same person (combined as the adapter does)")
    g.add_argument("--negative-prompt", "-n", help="negative prompt (default: none, i.e. SDXL's zero null text)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    g.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    g.add_argument("--output", "-o", default="fastface.png",
                   help="output PNG (several images: NAME-0.png, NAME-1.png, ...); a folder gets fastface-SEED.png; "
                   "an existing file is kept: the image goes to NAME-1.png (-2, ...) instead, unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (a batch: regenerate files made with other settings)")
    from fastface.adapters.registry import entries
    from fastface.presets import DEFAULT_METHOD, METHOD_PRESETS, MODEL_PRESETS

    adapters = {e.name: e.preset.description for e in entries()}
    g = gen.add_argument_group("model and method")
    g.add_argument("--preset", default="hyper", choices=list(MODEL_PRESETS),
                   help="distilled model recipe (default hyper)")
    g.add_argument("--adapter", default="faceid-plusv2", choices=list(adapters),
                   help="identity adapter (default faceid-plusv2): "
                   + "; ".join(f"{n} = {d}" for n, d in adapters.items()))
    g.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHOD_PRESETS),
                   help=f"guidance/attention method (default {DEFAULT_METHOD})")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="method_set",
                   help="override a method setting, e.g. alpha=1,1.5,1.5,1 beta=3 rescale=none p=1.3 s_up=1.45 "
                   "d=7.5,5,5,5 q=0.65 w=0.7 adain=false (repeatable)")
    g.add_argument("--guidance", type=float, help="baseline/am1/am2 guidance g (alpha = beta = g; preset default)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the preset's, 4)")
    g.add_argument("--sampler", help="override the preset's sampler (euler, euler_ancestral, ddim, lcm, tcd, dpmpp_2m)")
    g.add_argument("--sampler-param", action="append", metavar="KEY=VALUE", help="a sampler parameter, e.g. eta=0.3")
    g.add_argument("--height", type=int, help="image height (default: the preset's resolution)")
    g.add_argument("--width", type=int, help="image width (default: the preset's resolution)")
    g.add_argument("--ip-scale", type=float, help="identity attention weight (default: the adapter's, 0.8)")
    _add_adapter_options(gen)
    g = gen.add_argument_group("runtime")
    g.add_argument("--device", help="cuda, cuda:1, cpu, mps ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default fp16 on CUDA, fp32 elsewhere")
    g.add_argument("--batch-size", type=int, help="images per UNet batch (default: all at once)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first image compiles)")
    g.add_argument("--offload", action="store_true", help="keep on the device only the part in use (less memory)")
    lora = g.add_mutually_exclusive_group()
    lora.add_argument("--unfused-lora", action="store_true",
                      help="run the adapter's LoRA beside each projection, as diffusers does (the default on the CPU): "
                      "no host copy of the attention projections, as --fused-lora keeps (SDXL: ~1.9 GB in fp16)")
    lora.add_argument("--fused-lora", action="store_true",
                      help="precompute the adapter's LoRA into the attention projections (the default on an "
                      "accelerator): fewer FLOPs per step; the originals are kept in host memory")
    g.add_argument("--vae-tile", type=int, metavar="LATENTS", help="decode in tiles of this many latents per side "
                   "(0: never; default: tiles of 1024 px above 1024 px)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", "-v", action="store_true", help="log what is loaded from where")
    _add_weights(gen)
    from fastface.batch import add_batch_arguments

    add_batch_arguments(gen)  # --prompts-file --faces-dir --out-dir --summary --selfcheck-weights ...

    emb = sub.add_parser("embed", help="save a person's face identity as a face file",
                         description="Detect the face in each photo and save the identity as a .safetensors face "
                         "file that --face accepts, in the adapter's format (e.g. embedding [512] and aligned "
                         "crops for the FaceID adapters).")
    emb.add_argument("--face", "-f", action="append", required=True, metavar="PATH", help="face photo (repeatable)")
    emb.add_argument("--output", "-o", required=True, help="output .safetensors file")
    emb.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    emb.add_argument("--adapter", default="faceid-plusv2", choices=list(adapters),
                     help="the adapter the file is for (default faceid-plusv2)")
    g = emb.add_argument_group("face models")
    _add_face_models(g)
    g.add_argument("--download", action="store_true", help="download missing face models")
    g.add_argument("--cache-dir", help="Hugging Face hub cache folder (face models from the hub)")
    g.add_argument("--device", help="device for the face models (default: cuda if available)")

    doc = sub.add_parser("doctor", help="list every weight file a run needs, found or missing (--download: get them)",
                         description="Lists every file that `fastface generate` with these options needs (the "
                         "model parts, the adapter files and the face models photos need), where fastface looks for "
                         "each, found or missing, with sizes. Exit code 0 when all are found, 3 otherwise. With "
                         "--download every missing file is fetched in one go.")
    doc.add_argument("--preset", default="hyper", choices=list(MODEL_PRESETS), help="model recipe (default hyper)")
    doc.add_argument("--adapter", default="faceid-plusv2", choices=list(adapters),
                     help="identity adapter (default faceid-plusv2)")
    doc.add_argument("--steps", type=int, help="step count (hyper and lightning ship one file per count)")
    doc.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                     help="as for generate: fp16/bf16 prefer the fp16 files (default fp16 on CUDA, fp32 elsewhere)")
    doc.add_argument("--faces-only", action="store_true", help="only the face models that reading photos needs")
    doc.add_argument("--no-faces", action="store_true", help="not the face models (faces given as face files)")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.add_argument("--no-progress", action="store_true", help="no progress bar while downloading")
    _add_weights(doc)

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
    out = Path(output).expanduser()
    if out.is_dir() or output.endswith(("/", "\\")):
        return [out / f"fastface-{s}.png" for s in seeds]
    if out.suffix.lower() != ".png":
        raise CLIError(EXIT_USAGE, f"--output must be a .png file or a folder, got {output!r}")
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(seeds))]


def _check_writable(path: Path) -> None:
    """Refuse (exit 2) an output path that cannot be written: a folder, or under a file or a folder without write
    permission. Checked before anything loads; nothing is created."""
    if path.is_dir():
        raise CLIError(EXIT_USAGE, f"--output: {path} is a folder; give a .png file name, or end the folder name "
                       "with '/' to write fastface-SEED.png into it")
    folder = path.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CLIError(EXIT_USAGE, f"--output: cannot write {path}: {existing} is a file, not a folder; choose "
                       "another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(EXIT_USAGE, f"--output: cannot write {path}: no permission to write in {existing}; choose "
                       "another --output")


def _free_name(path: Path, taken: set[Path]) -> Path:
    """``path``, or when a file (or folder) is there already, the first free ``NAME-1.png``, ``NAME-2.png`` ..."""
    candidate, i = path, 0
    while candidate.exists() or candidate in taken:
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return candidate


def _reproduce(parser: argparse.ArgumentParser, ns: argparse.Namespace, seed: int, output: Path) -> str:
    """The `fastface generate` command that regenerates one image (its seed, one image)."""
    gen = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    sub = gen.choices["generate"]
    words = ["fastface", "generate"]
    # never --overwrite: re-running the stored command must not replace the image that stores it
    skip = {"help", "seed", "num_images", "output", "no_progress", "verbose", "batch_size", "overwrite"}
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


def _adapter_options(ns: argparse.Namespace, entry: Any, load: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The adapter options given on the command line ({keyword: value}, {keyword: how it was written}), checked
    to be this adapter's (CLIError otherwise)."""
    from fastface.adapters.registry import unknown_option_error

    given: dict[str, Any] = {}
    shown: dict[str, str] = {}
    for flag, (o, _) in _adapter_flags().items():
        value = getattr(ns, _dest(flag), None)
        if o.load == load and value is not None:
            given[o.name], shown[o.name] = value, flag
    if not load:
        for key, value in _pairs(getattr(ns, "adapter_option", None), "--adapter-option").items():
            given[key], shown[key] = value, key
    mine = {k for o in entry.adapter.options for k in o.keywords}
    for key in given:
        if key not in mine:
            raise CLIError(EXIT_USAGE, str(unknown_option_error(entry.name, key, shown[key])))
    return given, shown


def _option_error(exc: ValueError, shown: dict[str, str]) -> CLIError:
    from fastface.adapters.base import AdapterOptionError

    if isinstance(exc, AdapterOptionError) and exc.option in shown:
        return CLIError(EXIT_USAGE, f"{shown[exc.option]} {exc.reason}")
    return CLIError(EXIT_USAGE, str(exc))


def _method_options(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(method settings of --set and --guidance, sampler parameters of --sampler-param)."""
    options = _pairs(ns.method_set, "--set")
    if ns.guidance is not None:
        options["guidance"] = ns.guidance
    return options, _pairs(ns.sampler_param, "--sampler-param") or None


def _checked_adapter_options(ns: argparse.Namespace, entry: Any) -> tuple[dict[str, Any], dict[str, Any],
                                                                          dict[str, Any]]:
    """The adapter's (load options, call options as given, call options checked with defaults filled in); a bad
    one is a CLIError naming the flag as written. Needs no weights."""
    from fastface.adapters.registry import unknown_option_error

    files, _ = _adapter_options(ns, entry, load=True)
    call, shown = _adapter_options(ns, entry, load=False)
    try:
        resolved = entry.adapter.resolve_options(entry.preset, call,
                                                 lambda k: unknown_option_error(entry.name, k, shown.get(k)))
    except ValueError as exc:
        raise _option_error(exc, shown) from exc
    return files, call, resolved


def _generate(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    from fastface.adapters.registry import get_entry
    from fastface.batch import batch_mode, pipeline_from_args
    from fastface.devices import resolve_device
    from fastface.jobs import atomic_write
    from fastface.presets import model_recipe, resolve_method

    # Everything is checked before anything is read or loaded (ValueError -> exit 2): the device, the settings,
    # the adapter's options and the output paths.
    resolve_device(ns.device)
    options, sampler_params = _method_options(ns)
    batch = batch_mode(ns)  # a ValueError names a missing --prompt / --face for a single image
    entry = get_entry(ns.adapter)
    recipe = model_recipe(ns.preset, ns.steps, **({"weights": ns.weights} if ns.weights else {}))
    resolve_method(ns.method, recipe, adapter=entry.preset, **options)
    files, call, resolved = _checked_adapter_options(ns, entry)
    if batch:
        return _batch(ns, options, sampler_params, resolved, files)
    if ns.num_images < 1:
        raise CLIError(EXIT_USAGE, f"--num-images must be at least 1, got {ns.num_images}")
    if ns.seed is not None and ns.seed < 0:
        raise CLIError(EXIT_USAGE, f"--seed must be a non-negative integer, got {ns.seed}")
    seed = secrets.randbelow(2**31) if ns.seed is None else ns.seed  # drawn here: the output names are known now
    planned = _outputs(ns.output, [seed + i for i in range(ns.num_images)])
    for path in planned:
        _check_writable(path)
    if not getattr(ns, "selfcheck_weights", False):  # (tiny random weights are written on the fly)
        _check_files(ns, entry, files)  # every missing file named at once (or fetched with --download)
    # The face first: a photo without a face fails before the generation weights are loaded.
    preparer = _preparer(ns, entry, files)
    face = _identity(ns, preparer)
    pipe = pipeline_from_args(ns, ns.device, files)
    pipe.use_face_preparer(preparer)  # its face models are reused, its files recorded in the PNG metadata
    bar = None
    if not ns.no_progress:
        from tqdm import tqdm

        chunks = -(-ns.num_images // max(1, ns.batch_size or ns.num_images))
        bar = tqdm(total=(ns.steps or pipe.recipe.steps) * chunks, unit="step", desc="fastface", file=sys.stderr)
    try:
        out = pipe(ns.prompt, face, method=ns.method, steps=ns.steps, seed=seed, ip_scale=ns.ip_scale,
                   num_images=ns.num_images, negative_prompt=ns.negative_prompt, height=ns.height, width=ns.width,
                   batch_size=ns.batch_size, sampler=ns.sampler, sampler_params=sampler_params,
                   callback=(lambda i, t, x: bar.update(1)) if bar is not None else None, **call, **options)
    finally:
        if bar is not None:
            bar.close()
    taken: set[Path] = set()
    for i, wanted in enumerate(_outputs(ns.output, out.seeds)):
        path = wanted if ns.overwrite else _free_name(wanted, taken)
        taken.add(path)
        if path != wanted:
            print(f"fastface: {wanted} exists and is kept; writing {path} instead (--overwrite replaces it)",
                  file=sys.stderr)
        extra = {"command": _reproduce(parser, ns, out.seeds[i], path)}  # the name actually written
        atomic_write(path, lambda tmp, i=i, extra=extra: out.save(i, tmp, extra))
        print(path)
    return EXIT_OK


def _batch(ns: argparse.Namespace, options: dict[str, Any], sampler_params: dict[str, Any] | None,
           adapter_options: dict[str, Any], files: dict[str, Any]) -> int:
    """``fastface generate --prompts-file ... --faces-dir ... --out-dir ...``: :mod:`fastface.batch`."""
    from fastface.batch import run_batch_from_args

    result = run_batch_from_args(ns, method_options=options, sampler_params=sampler_params,
                                 adapter_options=adapter_options, adapter_files=files)
    _print_summary(result, ns.summary)
    return EXIT_FACE if result.failed else EXIT_OK


def _preparer(ns: argparse.Namespace, entry: Any, files: dict[str, Any]) -> Any:
    """The adapter's face preparation for the command's face models."""
    from fastface.adapters.base import FaceSettings
    from fastface.devices import resolve_device

    device = "cpu" if getattr(ns, "offload", False) else ns.device  # offload: face models wait on the CPU too
    faces = FaceSettings(ns.face_root, ns.download, ns.cache_dir, resolve_device(device), files)
    return entry.adapter.face_preparer(entry.preset, faces)


def _identity(ns: argparse.Namespace, preparer: Any) -> Any:
    """The person of ``--face``, prepared by the adapter (its face models load here, so missing models and faces
    fail before the generation weights are loaded)."""
    from fastface.models.loading import WeightFormatError

    try:
        return preparer.prepare(ns.face)
    except ValueError as exc:
        raise CLIError(EXIT_WEIGHTS if isinstance(exc, WeightFormatError) else EXIT_FACE, str(exc)) from exc


def _embed(ns: argparse.Namespace) -> int:
    from fastface.adapters.registry import get_entry

    if not ns.output.endswith(".safetensors"):
        raise CLIError(EXIT_USAGE, f"--output must end with .safetensors, got {ns.output!r}")
    if Path(ns.output).exists() and not ns.overwrite:
        raise CLIError(EXIT_USAGE, f"{ns.output} exists and is kept; give another --output, or --overwrite to "
                                   "replace it")
    entry = get_entry(ns.adapter)
    files, _ = _adapter_options(ns, entry, load=True)
    preparer = _preparer(ns, entry, files)
    print(preparer.save(ns.output, _identity(ns, preparer)))
    return EXIT_OK


def _doctor_flags(ns: argparse.Namespace, entry: Any) -> list[str]:
    """The weight options given on the command line, to repeat in the `fastface doctor` command of a message."""
    words: list[str] = []
    for dest in ("steps", "dtype", "cache_dir", "base", "unet", "weights", "vae", "adapter_file", "face_root"):
        if getattr(ns, dest, None) is not None:
            words += ["--" + dest.replace("_", "-"), str(getattr(ns, dest))]
    for o in entry.adapter.load_options():
        value = getattr(ns, _dest(o.cli_flag), None)
        if value is not None:
            words += [o.cli_flag, str(value)]
    return words


def _doctor_hint(ns: argparse.Namespace, faces_only: bool = False) -> Any:
    """How the CLI says to get missing files: the `fastface doctor ... --download` of the same options."""
    from fastface.adapters.registry import get_entry
    from fastface.needs import FixHint, doctor_command

    entry = get_entry(ns.adapter)
    return FixHint(doctor_command(getattr(ns, "preset", None), ns.adapter, _doctor_flags(ns, entry), faces_only),
                   cli=True)


def _run_needs(ns: argparse.Namespace, files: dict[str, Any], photos: bool, models: bool = True) -> list:
    import torch

    from fastface.components import LocalPaths
    from fastface.doctor import run_needs
    from fastface.devices import default_device
    from fastface.pipeline import parse_dtype

    # which files a run wants (fp16 or full precision) depends only on the device's kind; doctor may prepare files
    # for a device this machine does not have, so the name is parsed, not checked for availability
    device = getattr(ns, "device", None)
    try:
        kind = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as exc:
        raise CLIError(EXIT_USAGE, f"--device {device!r} is not a device name ({exc})") from None
    half = parse_dtype(ns.dtype, kind) != torch.float32
    paths = LocalPaths(ns.base, ns.unet, ns.weights, ns.vae, ns.adapter_file)
    return run_needs(ns.preset, ns.adapter, steps=ns.steps, half=half, paths=paths, adapter_files=files,
                     face_root=ns.face_root, photos=photos, models=models)


def _check_files(ns: argparse.Namespace, entry: Any, files: dict[str, Any]) -> None:
    """Before anything loads: every file `generate` needs (the face models only for photos) is found, or fetched
    in one go with --download; else one error naming them all and the `fastface doctor` command."""
    from fastface.needs import resolve_needs

    photos = any(Path(f).suffix.lower() not in (".npy", ".safetensors") for f in ns.face)
    resolve_needs(_run_needs(ns, files, photos), download=ns.download, cache_dir=ns.cache_dir, hint=_doctor_hint(ns))


def _doctor(ns: argparse.Namespace) -> int:
    from fastface.adapters.registry import get_entry
    from fastface.doctor import check, format_report, report_json

    if ns.faces_only and ns.no_faces:
        raise CLIError(EXIT_USAGE, "--faces-only and --no-faces exclude each other")
    entry = get_entry(ns.adapter)
    files, _ = _adapter_options(ns, entry, load=True)
    needs = _run_needs(ns, files, photos=not ns.no_faces, models=not ns.faces_only)
    found = check(needs, cache_dir=ns.cache_dir, download=ns.download, progress=not ns.no_progress)
    ok = all(f.found or f.need.optional for f in found)
    if ns.json:
        print(json.dumps(report_json(found, preset=None if ns.faces_only else ns.preset, adapter=ns.adapter,
                                     cache_dir=ns.cache_dir), indent=2))
    else:
        from fastface.hub import hub_cache_dir

        header = (f"fastface doctor: {'face models of' if ns.faces_only else f'preset {ns.preset} +'} adapter "
                  f"{ns.adapter}; Hugging Face cache {hub_cache_dir(ns.cache_dir)}")
        fix = "" if ok else ("Not fetched: see the reason under each missing part above."
                             if ns.download else f"Get them all: {_doctor_hint(ns, ns.faces_only).command}")
        print(format_report(found, header=header, fix=fix))
    return EXIT_OK if ok else EXIT_WEIGHTS


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
    under_torchrun = os.environ.get("WORLD_SIZE", "1") != "1"
    rank = f"[rank {os.environ.get('RANK', '?')}] " if under_torchrun else ""
    logging.basicConfig(level=logging.INFO if getattr(ns, "verbose", False) else logging.WARNING,
                        format=rank + "%(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "generate":
            return _generate(parser, ns)
        if ns.command == "embed":
            return _embed(ns)
        if ns.command == "doctor":
            return _doctor(ns)
        return _selfcheck(ns)
    except CLIError as exc:
        return _fail(exc.code, str(exc))
    except FloatingPointError as exc:  # the samplers' check of non-finite model outputs and latents
        return _fail(EXIT_NUMERIC, f"{exc}; no image was written")
    except ValueError as exc:
        from fastface.adapters.faces import ImageReadError, NoFaceError
        from fastface.models.loading import WeightFormatError

        from fastface.needs import MissingWeightsError

        if isinstance(exc, MissingWeightsError) and not exc.hint.cli:  # raised by the library: say it in flags
            exc = exc.with_hint(_doctor_hint(ns, faces_only=ns.command == "embed"))
        if isinstance(exc, WeightFormatError):
            return _fail(EXIT_WEIGHTS, str(exc))
        if isinstance(exc, (NoFaceError, ImageReadError)):
            return _fail(EXIT_FACE, str(exc))
        return _fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted (images already written are kept; a batch resumes when run again)")


def _print_summary(result: Any, summary: str | os.PathLike | None = None) -> None:
    """Rank 0: the per-rank and total lines on stdout (and the JSON of :func:`write_summary` in ``summary``);
    other ranks: their own line on stderr."""
    from fastface.batch import format_summary, write_summary

    if result.ranks is None:
        print(format_summary(result), file=sys.stderr, flush=True)
        return
    print(format_summary(result), flush=True)
    if summary:
        write_summary(result, summary)


def _fail(code: int, message: str) -> int:
    print(f"fastface: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

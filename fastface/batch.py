"""Batch generation: every prompt of a file for every identity of a folder, resumable, sharded over ``torchrun``.

::

    fastface generate --prompts-file prompts.txt --faces-dir faces/ --out-dir out/ --preset hyper --download
    torchrun --nproc_per_node=8 -m fastface.batch ...    # the same, sharded over 8 GPUs (or several machines)

``python -m fastface.batch ARGS`` is ``fastface generate ARGS`` (a module, for ``torchrun -m``).

* Prompts: one per line (stripped, lowercased, repeats dropped: :func:`fastface.eval.data.read_prompts`).
* Identities: each photo or face file (``.npy`` / ``.safetensors`` from ``fastface embed``) in ``--faces-dir`` is
  one person named by its file stem; each subfolder is one person (all its photos or face files, named by the
  folder).
* Output: ``OUT_DIR/<identity>/<prompt-slug>-<seed>.png`` with every setting in the PNG's ``fastface`` metadata,
  plus the batch request under its ``batch`` entry. The seed of an image is a hash of (identity, prompt, base
  ``--seed``) (:func:`fastface.eval.seeding.derive_seed`): the same images whatever the number of ranks, their
  order, or a resumption. Another ``--seed`` into the same folder adds new images beside the old ones.
* Resume: an image whose file exists and whose metadata records the same request (identity and its files,
  prompt, seed, model and generation settings) is skipped. An existing file that records anything else (or is
  not a fastface image) is refused before anything is generated, listing the files and what differs, unless
  ``--overwrite`` is given: then those files are regenerated. Files are written atomically, so an interrupted run
  leaves only whole images.
* Ranks: under ``torchrun`` (or any launcher setting ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) image ``i`` goes to
  rank ``i % WORLD_SIZE`` on ``cuda:LOCAL_RANK``; each rank shows its own progress bar; rank 0 gathers and prints
  the summary (generated / skipped / failed per rank and in total). An identity whose face cannot be read fails
  its images (counted and listed), the others go on.

The engine (ranks, sharding, atomic PNG writes, the per-rank loop) is :mod:`fastface.jobs`, shared with the
evaluation sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastface.eval.data import IMAGE_EXTENSIONS, Identity, identity_files, load_identities, read_prompts
from fastface.eval.seeding import SEED_RULE, derive_seed
from fastface.jobs import (
    RankSummary,
    atomic_write,
    join_ranks,
    prompt_slug,
    rank_device,
    rank_info,
    read_png_json,
    run_each,
    shard,
    total,
)
from fastface.devices import resolve_device
from fastface.threads import tiny_work

logger = logging.getLogger(__name__)

__all__ = [
    "FACE_EXTENSIONS", "BatchTask", "BatchResult", "BatchConflictError", "plan_batch", "run_batch",
    "add_batch_arguments", "is_batch", "batch_mode", "run_batch_from_args", "pipeline_from_args", "format_summary",
    "write_summary",
]

FACE_EXTENSIONS = (*IMAGE_EXTENSIONS, ".npy", ".safetensors")  # photos and face files
REQUEST_KEY = "batch"  # the entry of the PNG's ``fastface`` metadata that records the batch request
# Pipeline.from_pretrained arguments recorded in the request (what changes the images)
MODEL_FIELDS = ("base", "unet", "weights", "vae", "adapter_file")  # and the adapter's load options (its files)


class BatchConflictError(ValueError):
    """Existing output files record another request (or are not fastface images) and ``overwrite`` is off."""


class _FaceFailed(Exception):
    """An identity whose face cannot be read (its images fail; the batch goes on)."""


@dataclass(frozen=True)
class BatchTask:
    """Image ``index`` of a batch: ``prompt`` for ``identity`` with ``seed``, written to ``image`` (relative)."""

    index: int
    identity: Identity
    files: tuple[str, ...]  # the identity's files, relative to the faces folder
    prompt: str
    seed: int
    image: str


@dataclass
class BatchResult:
    """What a rank did (``mine``), and on rank 0 every rank's summary (``ranks``) and their ``total``."""

    mine: RankSummary
    ranks: list[RankSummary] | None = None
    total: RankSummary | None = None

    @property
    def failed(self) -> int:
        return (self.total or self.mine).count("failed")


def plan_batch(identities: Sequence[Identity], prompts: Sequence[str], base_seed: int = 0,
               faces_dir: str | os.PathLike | None = None) -> list[BatchTask]:
    """Every image of a batch, numbered identities outer, prompts inner (the order does not affect any image)."""
    root = Path(faces_dir).expanduser() if faces_dir is not None else None
    tasks = []
    for identity in identities:
        files = identity_files(identity.path, FACE_EXTENSIONS)
        rel = tuple(os.path.relpath(f, root) if root is not None else f.name for f in files)
        for prompt in prompts:
            seed = derive_seed(identity.name, prompt, base_seed)
            image = f"{identity.name}/{prompt_slug(prompt)}-{seed}.png"
            tasks.append(BatchTask(len(tasks), identity, tuple(Path(r).as_posix() for r in rel), prompt, seed, image))
    return tasks


def _request(task: BatchTask, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The request recorded in (and compared with) an image's metadata, as JSON would give it back."""
    req = {"identity": task.identity.name, "files": list(task.files), "prompt": task.prompt, "seed": task.seed,
           "seed_rule": SEED_RULE, "settings": dict(settings)}
    return json.loads(json.dumps(req, sort_keys=True, default=str))


def _differences(found: Any, wanted: Mapping[str, Any]) -> str:
    """What differs between a stored request and the wanted one, in a few words."""
    if not isinstance(found, dict):
        return "not a readable image of a fastface batch (no batch request in its metadata)"
    keys = [k for k in wanted if k != "settings" and found.get(k) != wanted[k]]
    s_found, s_wanted = found.get("settings") or {}, wanted["settings"]
    keys += [f"settings.{k}" for k in sorted(set(s_found) | set(s_wanted)) if s_found.get(k) != s_wanted.get(k)]
    if not keys:
        return "same request"
    hints = [_SETTING_HINTS[k] for k in keys if k in _SETTING_HINTS]
    return "made with another " + ", ".join(keys) + (f" ({'; '.join(hints)})" if hints else "")


# settings whose option is not named like the setting: how to make them match the stored images
_SETTING_HINTS = {
    "settings.unfused_lora": "the adapter LoRA was computed the other way: --fused-lora or --unfused-lora picks it "
    "(fused was the only way before it was recorded)",
}


def _existing(tasks: Sequence[BatchTask], out: Path, settings: Mapping[str, Any]) -> tuple[set[int], dict[int, str]]:
    """Indices of the finished tasks, and the conflicting ones with the reason (a folder in the way: an error)."""
    from fastface.pipeline import METADATA_KEY

    done, conflicts = set(), {}
    for task in tasks:
        path = out / task.image
        if path.is_dir():
            raise ValueError(f"{path}: a folder is where this image goes; move it away or choose another --out-dir")
        if path.exists():
            wanted = _request(task, settings)
            found = read_png_json(path, METADATA_KEY).get(REQUEST_KEY)
            if found == wanted:
                done.add(task.index)
            else:
                conflicts[task.index] = _differences(found, wanted)
    return done, conflicts


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: the output folder is a file; give a folder to --out-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"{out}: cannot write in the output folder ({exc.strerror or exc}); choose another "
                         "--out-dir") from None


def run_batch(
    tasks: Sequence[BatchTask],
    out_dir: str | os.PathLike,
    make_pipeline: Callable[[str], Any],
    *,
    faces_dir: str | os.PathLike,
    call_options: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    timeout_min: float = 240.0,
) -> BatchResult:
    """Generate this rank's share of ``tasks`` into ``out_dir``, skipping finished images; gather the summaries.

    ``make_pipeline(device)`` builds the :class:`fastface.Pipeline` (only if this rank has something to
    generate). ``call_options``: keyword arguments of each pipeline call (method, ip_scale, height, ...).
    ``settings``: what made the images besides the identity, prompt and seed (model, weights, dtype and the
    call options; default ``call_options``), recorded in every PNG and compared on resumption. Existing files
    recording another request raise :class:`BatchConflictError` before anything is generated unless
    ``overwrite``. A face that cannot be read fails its images (counted, listed); other errors stop the rank.
    """
    call_options = dict(call_options or {})
    settings = dict(call_options if settings is None else settings)
    out, faces_dir = Path(out_dir).expanduser(), Path(faces_dir).expanduser()
    info = rank_info()
    device = rank_device(device, info.local_rank)
    _check_out_dir(out)
    mine = shard(tasks, info.rank, info.world_size)
    done, conflicts = _existing(mine, out, settings)
    if conflicts and not overwrite:
        listed = [f"{out / t.image}: {conflicts[t.index]}" for t in mine if t.index in conflicts]
        more = f"; and {len(listed) - 3} more" if len(listed) > 3 else ""
        raise BatchConflictError(f"{len(conflicts)} existing file(s) in {out} were not made by this request, and "
                                 f"are kept: {'; '.join(listed[:3])}{more}. Give --overwrite to regenerate them, or "
                                 "another --out-dir")
    n_ids = len({t.identity.name for t in tasks})
    logger.info("rank %d/%d: %d identities x %d prompts = %d images; this rank: %d (%d done, %d to overwrite) on %s",
                info.rank, info.world_size, n_ids, len(tasks) // max(1, n_ids), len(tasks), len(mine), len(done),
                len(conflicts), device)

    ranks = join_ranks(device, timeout_min, info)
    pipe: list[Any] = []
    faces: dict[str, Any] = {}

    def face_of(task: BatchTask) -> Any:
        name = task.identity.name
        if name not in faces:
            try:
                faces[name] = pipe[0].identity([str(faces_dir / f) for f in task.files])
            except ValueError as exc:  # no face found, unreadable photo or face file
                faces[name] = _FaceFailed(f"identity {name!r}: {exc}")
        if isinstance(faces[name], _FaceFailed):
            raise faces[name]
        return faces[name]

    def one(task: BatchTask) -> str:
        if task.index in done:
            return "skipped"
        if not pipe:
            pipe.append(make_pipeline(device))
        gen = pipe[0](task.prompt, face=face_of(task), seed=task.seed, num_images=1, **call_options)
        request = _request(task, settings)
        atomic_write(out / task.image, lambda tmp: gen.save(0, tmp, {REQUEST_KEY: request}))
        return "generated"

    try:
        summary = run_each(mine, one, desc=f"rank {info.rank}/{info.world_size}", position=info.rank,
                           progress=progress, rank=info.rank, catch=(_FaceFailed,), name=lambda t: t.image)
        summary.counts = {k: summary.count(k) for k in ("generated", "skipped", "failed")}
        gathered = ranks.gather(summary)
    except BaseException:
        ranks.close(barrier=False)
        raise
    ranks.close()
    if gathered is None:
        return BatchResult(summary)
    return BatchResult(summary, gathered, total(gathered))


def format_summary(result: BatchResult) -> str:
    """The per-rank and total lines of a batch (rank 0), or this rank's line."""
    def line(label: str, s: RankSummary) -> str:
        return (f"{label}: {s.count('generated')} generated, {s.count('skipped')} skipped, {s.count('failed')} "
                f"failed ({s.seconds:.1f} s)")

    if result.ranks is None:
        return line(f"rank {result.mine.rank}", result.mine)
    lines = [line(f"rank {s.rank}", s) for s in result.ranks] if len(result.ranks) > 1 else []
    lines.append(line("total", result.total))
    lines += [f"failed: {name}: {reason}" for name, reason in result.total.failures]
    return "\n".join(lines)


def write_summary(result: BatchResult, path: str | os.PathLike) -> Path:
    """The summary of rank 0 as JSON (``ranks``: counts, failures and seconds of each rank; ``total``)."""
    def as_dict(s: RankSummary) -> dict[str, Any]:
        return {"rank": s.rank, **s.counts, "failures": [list(f) for f in s.failures], "seconds": s.seconds}

    data = {"ranks": [as_dict(s) for s in result.ranks or [result.mine]],
            "total": as_dict(result.total or result.mine)}
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"))


# ---- command line -------------------------------------------------------------------------------------------


def add_batch_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The batch options of ``fastface generate``: --prompts-file, --faces-dir, --out-dir, --overwrite (unless
    the parser has it), --summary, --selfcheck-weights, --dist-timeout-min."""
    g = parser.add_argument_group("batch (instead of --prompt/--face; resumable; shard with torchrun)") \
        if isinstance(parser, argparse.ArgumentParser) else parser
    g.add_argument("--prompts-file", metavar="FILE", help="a text file of prompts, one per line")
    g.add_argument("--faces-dir", metavar="DIR", help="one photo or face file per identity (named by the file "
                   "stem), or one subfolder of photos per identity")
    g.add_argument("--out-dir", metavar="DIR", help="output folder: OUT_DIR/<identity>/<prompt-slug>-<seed>.png; "
                   "images already there with the same settings are skipped (resume)")
    if "--overwrite" not in getattr(parser, "_option_string_actions", {}):
        g.add_argument("--overwrite", action="store_true",
                       help="regenerate existing files made with other settings (default: refuse and keep them)")
    g.add_argument("--summary", metavar="FILE", help="also write the summary (per rank and total) as JSON")
    g.add_argument("--selfcheck-weights", action="store_true",
                   help="use tiny RANDOM weights written on the fly (offline; images are NOT meaningful; for tests; "
                   "a single image too)")
    g.add_argument("--dist-timeout-min", type=float, default=240.0,
                   help="under torchrun: how long rank 0 waits for the other ranks (minutes)")


def is_batch(args: argparse.Namespace) -> bool:
    """True when any batch option is given (then --prompts-file, --faces-dir and --out-dir are all needed)."""
    return any(getattr(args, k, None) for k in ("prompts_file", "faces_dir", "out_dir"))


def batch_mode(args: argparse.Namespace) -> bool:
    """True for a batch (any batch option given); for a single image, checks that --prompt and --face are there
    (ValueError naming the missing ones otherwise)."""
    if is_batch(args):
        return True
    missing = [flag for flag, dest in (("--prompt", "prompt"), ("--face", "face")) if not getattr(args, dest, None)]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (or, for a batch: "
                         "--prompts-file, --faces-dir and --out-dir)")
    return False


def _selfcheck_pipeline(args: argparse.Namespace, device: str) -> Any:
    """The pipeline of the selfcheck's tiny random weights for ``args.adapter`` (any adapter that writes them)."""
    from fastface.pipeline import Pipeline
    from fastface.selfcheck import write_tiny_weights

    if args.preset not in ("hyper", "lightning"):
        raise ValueError(f"--selfcheck-weights has tiny weights for --preset hyper or lightning, not {args.preset}")
    tmp = tempfile.TemporaryDirectory(prefix="fastface-batch-selfcheck-")
    w = write_tiny_weights(tmp.name)
    run = {a.name: a for a in w.adapters}.get(args.adapter)
    if run is None:
        tmp.cleanup()
        raise ValueError(f"--selfcheck-weights has no tiny weights for --adapter {args.adapter}; adapters with tiny "
                         f"weights: {', '.join(a.name for a in w.adapters)}")
    pipe = Pipeline.from_pretrained(args.preset, args.adapter, base=w.base, steps=args.steps, dtype="fp32",
                                    device=device, fuse_adapter_lora=adapter_lora_choice(args),
                                    weights=w.lora if args.preset == "hyper" else w.unet_file, **run.load)
    pipe.__dict__["_tiny_weights_folder"] = tmp  # removed with the pipeline (an adapter may read its files later)
    return pipe


def adapter_lora_choice(args: argparse.Namespace) -> bool | None:
    """--fused-lora: True, --unfused-lora: False, neither: None (the pipeline's default for the device)."""
    if getattr(args, "fused_lora", False):
        return True
    return False if getattr(args, "unfused_lora", False) else None


def adapter_lora_fused(args: argparse.Namespace, device: str) -> bool:
    """Whether the batch's pipeline fuses the adapter's LoRA on ``device``."""
    import torch

    from fastface.pipeline import resolve_fuse_adapter_lora

    return resolve_fuse_adapter_lora(adapter_lora_choice(args), torch.device(device))


def pipeline_from_args(args: argparse.Namespace, device: str, files: Mapping[str, Any] | None = None) -> Any:
    """The pipeline of ``fastface generate``'s options on ``device``; ``files``: the adapter's load options (local
    files, by option name) as the CLI parsed them. Tiny random weights with --selfcheck-weights."""
    from fastface.pipeline import Pipeline

    if getattr(args, "selfcheck_weights", False):
        return _selfcheck_pipeline(args, device)
    return Pipeline.from_pretrained(
        args.preset, args.adapter, steps=args.steps, dtype=args.dtype, device=device, download=args.download,
        cache_dir=args.cache_dir, face_root=args.face_root, **{k: getattr(args, k) for k in MODEL_FIELDS},
        compile=getattr(args, "compile", False), offload=getattr(args, "offload", False),
        vae_tile=getattr(args, "vae_tile", None), fuse_adapter_lora=adapter_lora_choice(args),
        **dict(files or {}),
    )


def batch_settings(args: argparse.Namespace, call_options: Mapping[str, Any], device: str,
                   files: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What makes a batch's images (recorded in every PNG, compared on resumption): the model, its weights as
    given (and the adapter's files), the dtype actually used, the VAE tile size when given and an unfused adapter
    LoRA (they change the pixels, tiling visibly, the unfused LoRA by rounding; a tiled-by-default decode and a
    fused LoRA, the only choices before they were recorded, are left out so those batches still resume), and the
    call options. The device is not part of it (another GPU resumes)."""
    import torch

    from fastface.pipeline import parse_dtype

    dtype = "fp32" if getattr(args, "selfcheck_weights", False) else args.dtype
    return {"preset": args.preset, "adapter": args.adapter, "steps": args.steps,
            "selfcheck_weights": bool(getattr(args, "selfcheck_weights", False)),
            "dtype": str(parse_dtype(dtype, torch.device(device))).replace("torch.", ""),
            **{k: getattr(args, k, None) for k in MODEL_FIELDS}, "adapter_files": dict(files or {}),
            **({"vae_tile": args.vae_tile} if getattr(args, "vae_tile", None) is not None else {}),
            **({} if adapter_lora_fused(args, device) else {"unfused_lora": True}), **call_options}


def run_batch_from_args(
    args: argparse.Namespace,
    make_pipeline: Callable[[argparse.Namespace, str, Mapping[str, Any]], Any] = pipeline_from_args,
    method_options: Mapping[str, Any] | None = None,
    sampler_params: Mapping[str, Any] | None = None,
    adapter_options: Mapping[str, Any] | None = None,
    adapter_files: Mapping[str, Any] | None = None,
) -> BatchResult:
    """Run the batch that ``fastface generate``'s options describe (``args`` of its parser, which has the options of
    :func:`add_batch_arguments`). The rest comes parsed and checked by the CLI: ``method_options`` (``--set``,
    ``--guidance``), ``sampler_params`` (``--sampler-param``), the adapter's call options (``adapter_options``,
    by name, defaults filled in) and load options (``adapter_files``). Raises ValueError for bad options
    (nothing generated)."""
    missing = [f"--{k.replace('_', '-')}" for k in ("prompts_file", "faces_dir", "out_dir") if not getattr(args, k)]
    if missing:
        raise ValueError(f"a batch needs --prompts-file, --faces-dir and --out-dir; missing: {', '.join(missing)}")
    for flag, value in (("--prompt", getattr(args, "prompt", None)), ("--face", getattr(args, "face", None)),
                        ("--output", getattr(args, "output", None) if getattr(args, "output", None) != "fastface.png"
                         else None)):
        if value:
            raise ValueError(f"{flag} is for a single image; a batch takes --prompts-file, --faces-dir and --out-dir")
    if getattr(args, "num_images", 1) not in (None, 1):
        raise ValueError("--num-images is for a single --prompt; a batch makes one image per (identity, prompt) "
                         "and seed: run again with another --seed into the same --out-dir for more")
    base_seed = 0 if args.seed is None else args.seed
    if base_seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {base_seed}")
    device = rank_device(args.device, rank_info().local_rank)
    resolve_device(device)  # an unusable device fails before anything is read
    prompts = read_prompts(args.prompts_file)
    identities = load_identities(args.faces_dir, FACE_EXTENSIONS)
    tasks = plan_batch(identities, prompts, base_seed, args.faces_dir)
    selfcheck = getattr(args, "selfcheck_weights", False)
    files = dict(adapter_files or {})
    call = {"method": args.method, "steps": args.steps, "ip_scale": args.ip_scale,
            "negative_prompt": args.negative_prompt,
            "height": args.height or (64 if selfcheck else None), "width": args.width or (64 if selfcheck else None),
            "sampler": args.sampler, "sampler_params": dict(sampler_params) if sampler_params else None,
            **dict(adapter_options or {}), **dict(method_options or {})}
    with tiny_work() if selfcheck else contextlib.nullcontext():  # tiny models run fastest on one thread
        return run_batch(tasks, args.out_dir, lambda dev: make_pipeline(args, dev, files), faces_dir=args.faces_dir,
                         call_options=call, settings=batch_settings(args, call, device, files), device=device,
                         overwrite=args.overwrite, progress=False if args.no_progress else None,
                         timeout_min=args.dist_timeout_min)

"""The engine of ``python -m benchmarks.eval``: sweep configurations, tasks, resumable generation + scoring, generators.

A sweep is the product configurations (preset x adapter x method x ip scale x adapter LoRA scale) x identities
x prompts. Task ``i`` of that list (configurations outer, grouped so a rank loads each model once) goes to rank
``i % world_size``. Each task writes ``images/<config>/<identity>/<prompt-slug>.png`` (with its seed and
generation time in the PNG text chunk ``fastface_eval``) and a ``.json`` beside it with the metric row; a task
whose files exist is not redone (an interrupted run resumes where it stopped; changing ``--metrics`` recomputes
only the scores). The seed of a task depends only on (identity, prompt, base seed): see
:mod:`fastface.eval.seeding`.

A *generator* is any callable ``Request -> PIL.Image``; :func:`pipeline_generator` wraps
:class:`fastface.Pipeline`, :func:`selfcheck_generator` the same pipeline on tiny random weights (no downloads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fastface.eval.data import EvalItem, EvalSet, Identity
from fastface.eval.metrics import MetricSuite
from fastface.eval.seeding import SEED_RULE, derive_seed
from fastface.jobs import (  # noqa: F401 (prompt_slug, shard: part of this module's API)
    atomic_write,
    prompt_slug,
    read_png_json,
    run_each,
    save_png_json,
    shard,
)

logger = logging.getLogger(__name__)

PNG_KEY = "fastface_eval"


@dataclass(frozen=True)
class Config:
    """One generation setting of a sweep (``steps`` and ``lora_scale`` already resolved to numbers)."""

    preset: str
    adapter: str
    method: str
    ip_scale: float
    lora_scale: float
    steps: int

    @property
    def name(self) -> str:
        return (f"{self.preset}_{self.adapter}_{self.method}_ip{self.ip_scale:g}_lora{self.lora_scale:g}"
                f"_{self.steps}steps")

    @property
    def model_key(self) -> tuple[str, str, int, float]:
        """What needs a separate model load (a generator reloads when this changes)."""
        return (self.preset, self.adapter, self.steps, self.lora_scale)


def make_configs(presets: Sequence[str], adapters: Sequence[str], methods: Sequence[str],
                 ip_scales: Sequence[float], lora_scales: Sequence[float | None] = (None,),
                 steps: int | None = None, check: bool = True) -> list[Config]:
    """The product of the settings, validated against fastface's presets (``check``), in model-load order."""
    from fastface.presets import METHOD_PRESETS, get_model_preset

    out = []
    for preset in presets:
        n = steps if steps is not None else (get_model_preset(preset).default_steps if check else 4)
        for adapter in adapters:
            default_lora = adapter_lora_scale(adapter) if check else 1.0
            for lora in (lora_scales if default_lora is not None else [0.0]):  # no LoRA option: recorded as 0
                for method in methods:
                    if check and method not in METHOD_PRESETS:
                        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHOD_PRESETS)}")
                    for ip in ip_scales:
                        if not (isinstance(ip, (int, float)) and math.isfinite(ip) and ip >= 0):
                            raise ValueError(f"ip scales must be non-negative numbers, got {ip!r}")
                        out.append(Config(preset, adapter, method, float(ip),
                                          float(default_lora if lora is None else lora), int(n)))
    if len(set(out)) != len(out):
        raise ValueError("the sweep lists a configuration twice (repeated preset, method or scale)")
    return out


def adapter_lora_scale(adapter: str) -> float | None:
    """The default weight of an adapter's own LoRA (its ``lora_scale`` option), None when it has none."""
    from fastface.adapters.registry import get_entry

    entry = get_entry(adapter)
    option = next((o for o in entry.adapter.call_options() if o.name == "lora_scale"), None)
    return None if option is None else entry.adapter.default(entry.preset, option)


def lora_option(adapter: str, lora_scale: float) -> dict[str, float]:
    """The call option of a configuration's LoRA weight (none for an adapter without a LoRA option)."""
    return {} if adapter_lora_scale(adapter) is None else {"lora_scale": lora_scale}


@dataclass(frozen=True)
class Request:
    """What a generator is asked for: one image of ``identity`` for ``prompt`` with ``config`` and ``seed``."""

    config: Config
    identity: Identity
    prompt: str
    seed: int


Generator = Callable[[Request], Image.Image]


@dataclass(frozen=True)
class Task:
    """Task ``index`` of a sweep: one (config, identity, prompt) image, its seed and its output path (relative)."""

    index: int
    config: Config
    item: EvalItem
    seed: int
    image: str


def plan(eval_set: EvalSet, configs: Sequence[Config], base_seed: int = 0) -> list[Task]:
    """Every task of a sweep, numbered in a fixed order (configurations outer, then identities, then prompts)."""
    tasks = []
    for config in configs:
        for item in eval_set.items():
            rel = f"images/{config.name}/{item.identity.name}/{prompt_slug(item.prompt)}.png"
            seed = derive_seed(item.identity.name, item.prompt, base_seed)
            tasks.append(Task(len(tasks), config, item, seed, rel))
    return tasks


def base_row(task: Task) -> dict[str, Any]:
    """The identifying columns of a task's row."""
    c = task.config
    return {"index": task.index, "config": c.name, **asdict(c), "identity": task.item.identity.name,
            "prompt": task.item.prompt, "subset": task.item.subset, "seed": task.seed, "image": task.image}


def save_image(image: Image.Image, path: Path, meta: dict[str, Any]) -> None:
    """Save a PNG atomically (a killed run never leaves a truncated file) with ``meta`` as JSON in its text chunk."""
    save_png_json(image, path, PNG_KEY, meta)


def read_png_meta(path: Path) -> dict[str, Any]:
    """The ``fastface_eval`` JSON of a sweep PNG ({} if absent or unreadable)."""
    return read_png_json(path, PNG_KEY)


def _kept_scores(old: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The time and the requested metrics' values of a stored row (others blanked)."""
    from fastface.eval.metrics import ROW_KEYS

    wanted = {k for n in names for k in (("id", "face_found") if n == "id" else (n,))}
    return {"time_s": old.get("time_s"), **{k: (old.get(k) if k in wanted else None) for k in ROW_KEYS}}


def run_tasks(
    tasks: Sequence[Task],
    out: str | os.PathLike,
    generator: Generator | None,
    metrics: MetricSuite | None,
    *,
    progress: bool | None = None,
    desc: str = "eval",
    position: int = 0,
) -> list[dict[str, Any]]:
    """Generate (unless the PNG exists) and score (unless the row exists with these metrics) each task; the rows.

    ``generator`` None scores existing images only (missing ones are skipped with a warning).
    """
    out = Path(out)
    names = list(metrics.metrics) if metrics is not None else []
    rows = []

    def one(task: Task) -> str:
        png, side = out / task.image, (out / task.image).with_suffix(".json")
        row = base_row(task)
        if side.is_file():
            try:
                old = json.loads(side.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = {}
            if png.is_file() and old.get("seed") == task.seed and set(names) <= set(old.get("metrics", [])):
                rows.append({**row, **_kept_scores(old, names), "metrics": names})
                return "reused"
        outcome = "scored"
        if png.is_file():
            meta = read_png_meta(png)
            if meta.get("seed") != task.seed:
                raise ValueError(f"{png}: made with seed {meta.get('seed')}, but this sweep needs {task.seed} "
                                 "(another --seed in the same --out?); use a new output folder")
            time_s = meta.get("time_s")
            with Image.open(png) as im:
                image = im.convert("RGB")
        elif generator is None:
            logger.warning("%s: missing and generation is off; skipped", png)
            return "missing"
        else:
            req = Request(task.config, task.item.identity, task.item.prompt, task.seed)
            t0 = time.perf_counter()
            image = generator(req)
            time_s = time.perf_counter() - t0
            save_image(image, png, {**base_row(task), "time_s": time_s, "seed_rule": SEED_RULE})
            outcome = "generated"
        row["time_s"] = time_s
        if metrics is not None:
            row.update(metrics.score(image, task.item.prompt, task.item.identity.path))
        row["metrics"] = names
        atomic_write(side, lambda tmp, r=row: tmp.write_text(json.dumps(r, indent=1), encoding="utf-8"))
        rows.append(row)
        return outcome

    done = run_each(tasks, one, desc=desc, position=position, progress=progress)
    logger.info("%s: %d task(s): %d generated, %d reused", desc, len(tasks), done.count("generated"),
                done.count("reused"))
    return rows


# ---- generators --------------------------------------------------------------------------------------------


@dataclass
class GeneratorOptions:
    """What the built-in generators need from the command line (``extra`` for custom factories)."""

    device: str | None = None
    dtype: str | None = None
    download: bool = False
    cache_dir: str | None = None
    face_root: str | None = None
    warmup: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class PipelineGenerator:
    """Images from :class:`fastface.Pipeline` (one model loaded at a time; reference faces analysed once each).

    After each model load, ``warmup`` throw-away images are generated so that time per image excludes one-off
    costs (CUDA context, kernel selection). A non-default adapter LoRA scale runs unfused (the pipeline fuses
    only its default), which is slower: compare times only at equal LoRA scales.
    """

    def __init__(self, options: GeneratorOptions) -> None:
        self.options = options
        self._key: tuple | None = None
        self._pipe = None
        self._faces: dict[str, Any] = {}

    def _load(self, config: Config):
        import torch

        from fastface.pipeline import Pipeline

        self._pipe = None
        self._faces = {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        o = self.options
        # the device's default form of the adapter LoRA, unless the sweep varies its scale (then unfused: no re-fusing)
        fuse = None if config.lora_scale == (adapter_lora_scale(config.adapter) or 0.0) else False
        return Pipeline.from_pretrained(config.preset, adapter=config.adapter, steps=config.steps, dtype=o.dtype,
                                        device=o.device, download=o.download, cache_dir=o.cache_dir,
                                        face_root=o.face_root, fuse_adapter_lora=fuse)

    def _call(self, req: Request) -> Image.Image:
        key = str(req.identity.path)
        if key not in self._faces:
            self._faces[key] = self._pipe.identity(key)
        c = req.config
        out = self._pipe(req.prompt, face=self._faces[key], method=c.method, seed=req.seed, ip_scale=c.ip_scale,
                         num_images=1, **lora_option(c.adapter, c.lora_scale))
        return out.images[0]

    def __call__(self, req: Request) -> Image.Image:
        if req.config.model_key != self._key:
            self._pipe = self._load(req.config)
            self._key = req.config.model_key
            for _ in range(self.options.warmup):
                self._call(req)
        return self._call(req)


def pipeline_generator(options: GeneratorOptions) -> Generator:
    """The real generator: :class:`PipelineGenerator`."""
    return PipelineGenerator(options)


class SelfcheckGenerator(PipelineGenerator):
    """The pipeline on tiny random weights (:mod:`fastface.selfcheck`), 64x64 images, a random identity per name.

    It exercises the harness end to end without any download; its images and scores mean nothing.
    """

    size = 64

    def __init__(self, options: GeneratorOptions) -> None:
        super().__init__(options)
        from fastface.selfcheck import write_tiny_weights

        self._tmp = tempfile.TemporaryDirectory(prefix="fastface-eval-selfcheck-")
        self.weights = write_tiny_weights(self._tmp.name)

    def _tiny(self, adapter: str):
        return next((a for a in self.weights.adapters if a.name == adapter), None)

    def _load(self, config: Config):
        from fastface.pipeline import Pipeline

        tiny = self._tiny(config.adapter)
        if config.preset not in ("hyper", "lightning") or tiny is None:
            raise ValueError("the selfcheck generator has tiny weights for presets hyper and lightning with adapters "
                             f"{', '.join(a.name for a in self.weights.adapters)} only, not {config.preset} + "
                             f"{config.adapter}")
        w = self.weights
        weights = w.lora if config.preset == "hyper" else w.unet_file
        return Pipeline.from_pretrained(config.preset, config.adapter, base=w.base, weights=weights, dtype="fp32",
                                        device=self.options.device or "cpu", fuse_adapter_lora=False, **tiny.load)

    def _call(self, req: Request) -> Image.Image:
        seed = int(hashlib.sha256(req.identity.name.encode("utf-8")).hexdigest()[:8], 16)
        c = req.config
        face = self._tiny(c.adapter).face_for(seed)
        out = self._pipe(req.prompt, face=face, method=c.method, seed=req.seed, ip_scale=c.ip_scale,
                         height=self.size, width=self.size, **lora_option(c.adapter, c.lora_scale))
        return out.images[0]


def selfcheck_generator(options: GeneratorOptions) -> Generator:
    """The tiny-random-weights generator: :class:`SelfcheckGenerator`."""
    return SelfcheckGenerator(options)


def load_generator(spec: str, options: GeneratorOptions) -> Generator:
    """``pipeline``, ``selfcheck`` or ``module:factory`` (a callable taking :class:`GeneratorOptions` and returning
    a generator ``Request -> PIL.Image``)."""
    import importlib

    if spec == "pipeline":
        return pipeline_generator(options)
    if spec == "selfcheck":
        return selfcheck_generator(options)
    if ":" not in spec:
        raise ValueError(f"--generator must be 'pipeline', 'selfcheck' or 'module:factory', got {spec!r}")
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--generator {spec}: cannot import it ({exc})") from exc
    if not callable(factory):
        raise ValueError(f"--generator {spec}: {attr} is not callable")
    return factory(options)

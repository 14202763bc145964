"""Named recipes: distilled SDXL models, identity adapters, and the FastFace methods (paper Sec. 4 settings).

Three registries of frozen dataclasses:

* :data:`MODEL_PRESETS` ``hyper``, ``lightning``, ``lcm``, ``turbo``, ``tcd``: base repo, distilled weights per
  released step count, how they are applied, sampler, timestep spacing, resolution and baseline guidance
  (the official FastFace runs and the released model cards).
  :func:`model_recipe` resolves one for a step count into a :class:`ModelRecipe` that a pipeline runs.
* :data:`ADAPTER_PRESETS`: the presets of the registered adapters (:mod:`fastface.adapters.registry`; built in:
  ``faceid``, ``faceid-plusv2``, ``pulid``, ``pulid-v1.1``), each owned by its adapter module.
* :data:`METHOD_PRESETS` ``baseline``, ``dcg``, ``am1``, ``am2``, ``fastface-am1`` (the default), ``fastface-am2``;
  :func:`resolve_method` turns one into a ``(DCGConfig, AM config | None)`` pair for a model.

Every setting can be overridden by keyword (``dataclasses.replace`` plus validation); unknown names raise a
ValueError that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastface.adapters.base import AdapterPreset
from fastface.adapters.registry import entries, get_entry
from fastface.adapters.registry import presets as ADAPTER_PRESETS
from fastface.am import AM1Config, AM2Config
from fastface.dcg import DCG_CONFIGS, DCGConfig, StepSchedule
from fastface.hub import HubFile, HubFolder, WeightRef
from fastface.hub import check_ref as _check_source
from fastface.samplers import SAMPLERS, SPACINGS, timesteps
from fastface.steps import check_bool as _check_bool
from fastface.steps import check_int as _check_int
from fastface.steps import check_number as _check_number
from fastface.steps import known as _known

logger = logging.getLogger(__name__)

__all__ = [
    "SDXL_BASE",
    "SDXL_TURBO",
    "FP16_FIX_VAE",
    "Release",
    "ModelPreset",
    "ModelRecipe",
    "MODEL_PRESETS",
    "get_model_preset",
    "model_recipe",
    "AdapterPreset",
    "ADAPTER_PRESETS",
    "get_adapter_preset",
    "MethodPreset",
    "METHOD_PRESETS",
    "DEFAULT_METHOD",
    "baseline_dcg",
    "resolve_method",
]

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"  # the SDXL VAE fine-tuned not to overflow in fp16
HYPER_REPO = "ByteDance/Hyper-SD"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
LCM_REPO = "latent-consistency/lcm-lora-sdxl"
TCD_REPO = "h1t/TCD-SDXL-LoRA"

Apply = Literal["lora", "unet", "none"]
Params = tuple[tuple[str, object], ...]
AMConfig = AM1Config | AM2Config

_SAMPLER_FIXED = {"model", "x", "timesteps", "generator", "callback", "schedule"}
# Weight file stems of the diffusers component folders (fastface.models loaders look for these).
_COMPONENT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers


def _sampler_params(sampler: str, params: Mapping[str, object] | Params) -> Params:
    """Validate sampler keyword arguments against the sampler's signature; returns sorted (name, value) pairs."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; {_known('samplers', list(SAMPLERS))}")
    items = dict(params.items() if isinstance(params, Mapping) else params)
    sig = inspect.signature(SAMPLERS[sampler]).parameters
    allowed = [n for n, p in sig.items() if p.kind is p.KEYWORD_ONLY and n not in _SAMPLER_FIXED]
    bad = sorted(set(items) - set(allowed))
    if bad:
        raise ValueError(f"sampler {sampler!r} takes no parameter(s) {bad}; {_known('parameters', allowed)}")
    return tuple(sorted(items.items()))


def _check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; {_known('spacings', SPACINGS)}")
    return spacing


def _replace(obj, kind: str, overrides: Mapping[str, object]):
    """``dataclasses.replace`` with unknown names reported as a ValueError listing the known ones."""
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    bad = sorted(set(overrides) - set(names))
    if bad:
        raise ValueError(f"unknown {kind} setting(s) {bad}; {_known('settings', names)}")
    return dataclasses.replace(obj, **overrides)


def _is_local(ref: str | os.PathLike) -> bool:
    text = os.fspath(ref)
    return isinstance(ref, os.PathLike) or Path(os.path.expanduser(text)).exists() or text.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Release:
    """Distilled weights released for one step count (``steps=None``: usable at any step count).

    ``file`` None means the UNet folder is already distilled (SDXL-Turbo). ``sampler``/``sampler_params``/
    ``spacing`` override the preset's for this release (Hyper-SDXL's 1-step LoRA is sampled with TCD, eta 1).
    ``experimental`` releases are allowed with a logged warning that carries ``note``.
    """

    file: HubFile | str | os.PathLike | None
    steps: int | None = None
    sampler: str | None = None
    sampler_params: Params = ()
    spacing: str | None = None
    experimental: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        _check_source("Release.file", self.file)
        if self.steps is not None:
            _check_int("Release.steps", self.steps)
        if self.spacing is not None:
            _check_spacing(self.spacing)
        if self.sampler is not None:
            object.__setattr__(self, "sampler_params", _sampler_params(self.sampler, self.sampler_params))
        elif self.sampler_params:
            raise ValueError("Release.sampler_params needs Release.sampler (the parameters belong to a sampler)")
        _check_bool("Release.experimental", self.experimental)


@dataclass(frozen=True)
class ModelPreset:
    """A distilled SDXL recipe: where the weights are, how they are applied and how the model is sampled.

    * ``base``: repo id or local diffusers folder providing the text encoders, the VAE and the UNet config
      (and the UNet weights when ``apply`` is "lora").
    * ``unet``: repo id or folder whose ``unet/`` replaces the base UNet (SDXL-Turbo), else None.
    * ``apply``: "lora" (fuse the release file into the base UNet at ``lora_scale``), "unet" (the file is a full
      UNet state dict for the base UNet config), "none" (the UNet folder is already distilled).
    * ``releases``: the distilled weights per step count (:class:`Release`).
    * ``guidance``: the baseline guidance g (official: α = β = g; 1 = no CFG, LCM 1.5).
    * ``recommended_steps``: (lo, hi) outside which a step count logs a warning (presets usable at any count).
    * ``vae``: repo id/folder of a replacement VAE folder (e.g. :data:`FP16_FIX_VAE`), None = the base's.
    """

    name: str
    description: str
    apply: Apply
    releases: tuple[Release, ...]
    sampler: str
    sampler_params: Params = ()
    spacing: str = "trailing"
    base: str | os.PathLike = SDXL_BASE
    unet: str | os.PathLike | None = None
    lora_scale: float = 1.0
    default_steps: int = 4
    recommended_steps: tuple[int, int] = (1, 8)
    resolution: int = 1024
    guidance: float = 1.0
    vae: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"ModelPreset.name must be a non-empty string, got {self.name!r}")
        if self.apply not in ("lora", "unet", "none"):
            raise ValueError(f"ModelPreset.apply must be 'lora', 'unet' or 'none', got {self.apply!r}")
        _check_source("ModelPreset.base", self.base, optional=False)
        _check_source("ModelPreset.unet", self.unet)
        _check_source("ModelPreset.vae", self.vae)
        object.__setattr__(self, "releases", tuple(self.releases))
        if not self.releases or not all(isinstance(r, Release) for r in self.releases):
            raise ValueError(f"ModelPreset.releases must be a non-empty sequence of Release, got {self.releases!r}")
        counts = [r.steps for r in self.releases]
        if len(set(counts)) != len(counts):
            raise ValueError(f"ModelPreset.releases has duplicate step counts {counts}")
        for r in self.releases:
            if (r.file is None) != (self.apply == "none"):
                raise ValueError(
                    f"preset {self.name!r}: apply={self.apply!r} "
                    + ("takes no release file (the UNet folder is already distilled)" if self.apply == "none"
                       else f"needs a weight file in every release (steps={r.steps} has none)")
                )
        object.__setattr__(self, "sampler_params", _sampler_params(self.sampler, self.sampler_params))
        _check_spacing(self.spacing)
        _check_number("ModelPreset.lora_scale", self.lora_scale)
        _check_int("ModelPreset.default_steps", self.default_steps)
        lo, hi = self.recommended_steps
        if _check_int("recommended_steps[0]", lo) > _check_int("recommended_steps[1]", hi):
            raise ValueError(f"recommended_steps must be (lo, hi) with lo <= hi, got {self.recommended_steps}")
        if _check_int("ModelPreset.resolution", self.resolution, 8) % 8:
            raise ValueError(f"ModelPreset.resolution must be a multiple of 8 (the VAE factor), got {self.resolution}")
        _check_number("ModelPreset.guidance", self.guidance, 0.0)
        self.release(self.default_steps)  # the default must be runnable

    @property
    def released_steps(self) -> tuple[int, ...] | None:
        """The step counts with their own weights, or None when a release serves any step count."""
        if any(r.steps is None for r in self.releases):
            return None
        return tuple(sorted(r.steps for r in self.releases))  # type: ignore[type-var]

    def release(self, steps: int) -> Release:
        """The release for ``steps``; ValueError when the model has none for that count."""
        _check_int("steps", steps)
        for r in self.releases:
            if r.steps == steps:
                return r
        for r in self.releases:
            if r.steps is None:
                return r
        raise ValueError(
            f"preset {self.name!r} has distilled weights for {', '.join(map(str, self.released_steps or ()))} "
            f"steps only, not {steps}: each file is distilled for its step count. Use one of those, or pass "
            "weights=<file> to run another file at this step count."
        )


@dataclass(frozen=True)
class ModelRecipe:
    """A model preset resolved for one step count: everything a pipeline needs to load and sample the model."""

    preset: str
    steps: int
    apply: Apply
    weights: HubFile | str | os.PathLike | None
    sampler: str
    sampler_params: Params
    spacing: str
    base: str | os.PathLike = SDXL_BASE
    unet: str | os.PathLike | None = None
    lora_scale: float = 1.0
    resolution: int = 1024
    guidance: float = 1.0
    vae: str | os.PathLike | None = None
    note: str = ""

    def __post_init__(self) -> None:
        _check_int("steps", self.steps)
        if self.apply not in ("lora", "unet", "none"):
            raise ValueError(f"apply must be 'lora', 'unet' or 'none', got {self.apply!r}")
        _check_source("weights", self.weights)
        if (self.weights is None) != (self.apply == "none"):
            need = "takes no weights" if self.apply == "none" else "needs weights"
            raise ValueError(f"apply={self.apply!r} {need}")
        object.__setattr__(self, "sampler_params", _sampler_params(self.sampler, self.sampler_params))
        _check_spacing(self.spacing)
        _check_source("base", self.base, optional=False)
        _check_source("unet", self.unet)
        _check_source("vae", self.vae)
        _check_number("lora_scale", self.lora_scale)
        if _check_int("resolution", self.resolution, 8) % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE factor), got {self.resolution}")
        _check_number("guidance", self.guidance, 0.0)
        self.timesteps  # noqa: B018  (validates steps against the spacing)

    @property
    def params(self) -> dict[str, object]:
        """The sampler's keyword arguments."""
        return dict(self.sampler_params)

    @property
    def sampler_fn(self):
        """The sampler function from :data:`fastface.samplers.SAMPLERS`."""
        return SAMPLERS[self.sampler]

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The discrete timesteps of the run (highest noise first)."""
        return tuple(int(t) for t in timesteps(self.steps, self.spacing))

    def sources(self, variant: str | None = None) -> dict[str, WeightRef]:
        """Where each part comes from: ``unet``, ``text_encoder``, ``text_encoder_2``, ``vae`` folders, ``weights``.

        Repo folders are :class:`HubFolder` with the files they must hold (``variant`` "fp16" selects the
        ``*.fp16.safetensors`` files) and the download patterns; local folders are paths. The UNet folder of an
        ``apply="unet"`` recipe only supplies config.json (its weights come from ``weights``).
        """
        out: dict[str, WeightRef] = {}
        unet_root = self.unet if self.unet is not None else self.base
        out["unet"] = _component(unet_root, "unet", variant, config_only=self.apply == "unet")
        for name in ("text_encoder", "text_encoder_2"):
            out[name] = _component(self.base, name, variant)
        if self.vae is None:
            out["vae"] = _component(self.base, "vae", variant)
        elif _is_local(self.vae):
            out["vae"] = Path(os.path.expanduser(os.fspath(self.vae)))
        else:
            files = ("config.json", "diffusion_pytorch_model.safetensors")
            out["vae"] = HubFolder(os.fspath(self.vae), required=files, allow_patterns=files)
        if self.weights is not None:
            w = self.weights
            out["weights"] = w if isinstance(w, HubFile) else Path(os.path.expanduser(os.fspath(w)))
        return out


def _component(root: str | os.PathLike, name: str, variant: str | None, config_only: bool = False) -> WeightRef:
    if _is_local(root):
        return Path(os.path.expanduser(os.fspath(root))) / name
    mid = f".{variant}" if variant else ""
    files = ("config.json",) if config_only else ("config.json", f"{_COMPONENT_STEMS[name]}{mid}.safetensors")
    return HubFolder(os.fspath(root), name, required=files, allow_patterns=tuple(f"{name}/{f}" for f in files))


def _hyper(n: int) -> HubFile:
    return HubFile(HYPER_REPO, f"Hyper-SDXL-{n}step{'s' if n > 1 else ''}-lora.safetensors")


MODEL_PRESETS: dict[str, ModelPreset] = {
    # Hyper-SD (Ren et al. 2024): SDXL base + the N-step LoRA fused at 1.0, DDIM trailing (FastFace official code).
    "hyper": ModelPreset(
        name="hyper",
        description="SDXL base + Hyper-SDXL N-step LoRA (1/2/4/8), DDIM with trailing timesteps",
        apply="lora",
        releases=(
            # The 1-step LoRA is Hyper-SD's unified LoRA; its card samples it with TCD, eta 1.0. At one step
            # TCD (eta 1) and DDIM trailing give the same update from t = 999.
            Release(_hyper(1), 1, sampler="tcd", sampler_params=(("eta", 1.0),), spacing="lcm"),
            Release(_hyper(2), 2),
            Release(_hyper(4), 4),
            Release(_hyper(8), 8),
        ),
        sampler="ddim",
        sampler_params=(("eta", 0.0),),
        spacing="trailing",
    ),
    # SDXL-Lightning (Lin et al. 2024): full distilled UNets on the SDXL base config, Euler trailing.
    "lightning": ModelPreset(
        name="lightning",
        description="SDXL-Lightning N-step UNet (2/4/8; experimental 1-step x0), Euler with trailing timesteps",
        apply="unet",
        releases=(
            Release(
                HubFile(LIGHTNING_REPO, "sdxl_lightning_1step_unet_x0.safetensors"), 1,
                sampler="euler", sampler_params=(("prediction", "sample"),), experimental=True,
                note="SDXL-Lightning's 1-step UNet is experimental and predicts x0 (prediction='sample')",
            ),
            *(Release(HubFile(LIGHTNING_REPO, f"sdxl_lightning_{n}step_unet.safetensors"), n) for n in (2, 4, 8)),
        ),
        sampler="euler",
        spacing="trailing",
    ),
    # LCM-LoRA (Luo et al. 2023) fused at 1.0; LCM multistep sampling; the official baseline is CFG 1.5.
    "lcm": ModelPreset(
        name="lcm",
        description="SDXL base + LCM-LoRA, LCM sampler; baseline guidance 1.5",
        apply="lora",
        releases=(Release(HubFile(LCM_REPO, "pytorch_lora_weights.safetensors")),),
        sampler="lcm",
        spacing="lcm",
        recommended_steps=(2, 8),
        guidance=1.5,
    ),
    # SDXL-Turbo (ADD, Sauer et al. 2023): its own UNet with the SDXL base text encoders and VAE, as the
    # official code loads it; Euler ancestral with trailing timesteps (its scheduler_config), 512 px.
    "turbo": ModelPreset(
        name="turbo",
        description="SDXL-Turbo UNet + SDXL base text encoders/VAE, Euler ancestral trailing, 512 px",
        apply="none",
        releases=(Release(None),),
        sampler="euler_ancestral",
        spacing="trailing",
        unet=SDXL_TURBO,
        recommended_steps=(1, 4),
        resolution=512,
    ),
    # TCD (Zheng et al. 2024): LoRA fused at 1.0, TCD sampler with gamma (eta) 0.3 as its card.
    "tcd": ModelPreset(
        name="tcd",
        description="SDXL base + TCD LoRA, TCD sampler (eta 0.3)",
        apply="lora",
        releases=(Release(HubFile(TCD_REPO, "pytorch_lora_weights.safetensors")),),
        sampler="tcd",
        sampler_params=(("eta", 0.3),),
        spacing="lcm",
        recommended_steps=(2, 8),
    ),
}


def get_model_preset(name: str | ModelPreset, **overrides: object) -> ModelPreset:
    """A model preset by name (or as given), with validated overrides of its fields."""
    if isinstance(name, ModelPreset):
        preset = name
    elif name in MODEL_PRESETS:
        preset = MODEL_PRESETS[name]
    else:
        raise ValueError(f"unknown model preset {name!r}; {_known('presets', list(MODEL_PRESETS))}")
    if "sampler" in overrides and "sampler_params" not in overrides:
        overrides = {**overrides, "sampler_params": ()}  # parameters belong to the old sampler
    return _replace(preset, "model preset", overrides) if overrides else preset


def model_recipe(preset: str | ModelPreset, steps: int | None = None, **overrides: object) -> ModelRecipe:
    """Resolve a model preset for ``steps`` (default: the preset's) into a :class:`ModelRecipe`.

    ``overrides`` replace recipe fields (``weights``, ``sampler``, ``sampler_params``, ``spacing``, ``base``,
    ``unet``, ``vae``, ``lora_scale``, ``resolution``, ``guidance``, ``apply``). A step count without released
    weights is a ValueError unless ``weights`` is overridden; outside ``recommended_steps``, or with an
    experimental release, a warning is logged. A new ``sampler`` without ``sampler_params`` uses its defaults;
    ``sampler_params`` may be a dict.
    """
    p = get_model_preset(preset)
    steps = p.default_steps if steps is None else _check_int("steps", steps)
    # An explicit weights file replaces the release, so any step count goes (the file is the caller's choice).
    rel = Release(None) if "weights" in overrides else p.release(steps)
    if rel.experimental:
        logger.warning("%s at %d step(s): %s", p.name, steps, rel.note or "experimental release")
    lo, hi = p.recommended_steps
    if p.released_steps is None and not lo <= steps <= hi:
        logger.warning("%s is meant for %d-%d steps; %d may give poor images", p.name, lo, hi, steps)
    sampler = rel.sampler or p.sampler
    fields = dict(
        preset=p.name,
        steps=steps,
        apply=p.apply,
        weights=rel.file,
        sampler=sampler,
        sampler_params=rel.sampler_params if rel.sampler else p.sampler_params,
        spacing=rel.spacing or p.spacing,
        base=p.base,
        unet=p.unet,
        lora_scale=p.lora_scale,
        resolution=p.resolution,
        guidance=p.guidance,
        vae=p.vae,
        note=rel.note,
    )
    fixed = {"preset", "steps", "note"}
    bad = sorted(set(overrides) - (set(fields) - fixed))
    if bad:
        raise ValueError(f"unknown model setting(s) {bad}; {_known('settings', sorted(set(fields) - fixed))}")
    if "sampler" in overrides and "sampler_params" not in overrides:
        overrides = {**overrides, "sampler_params": ()}
    if "weights" in overrides and "apply" not in overrides and overrides["weights"] is not None and p.apply == "none":
        raise ValueError(
            f"preset {p.name!r} has no distilled weights file to replace; also pass apply='lora' or 'unet'"
        )
    fields.update(overrides)
    return ModelRecipe(**fields)


# ----------------------------------------------------------------------------------------------------------------
# Adapters


def get_adapter_preset(name: str | AdapterPreset, **overrides: object) -> AdapterPreset:
    """An adapter preset by name (or as given), with validated overrides of its fields (:meth:`AdapterPreset.replace`).

    Presets belong to their adapters (:mod:`fastface.adapters.registry`); :data:`ADAPTER_PRESETS` lists them.
    """
    entry = get_entry(name)
    preset = entry.preset
    fields = {f.name for f in dataclasses.fields(preset) if f.init}
    bad = sorted(set(overrides) - fields)
    if bad:
        owners = sorted({e.adapter.family for e in entries() for f in dataclasses.fields(e.preset) if f.name in bad})
        whose = f" ({', '.join(bad)}: these are {' / '.join(owners)} settings)" if owners else ""
        raise ValueError(f"unknown adapter preset setting(s) {bad}; {_known('settings', fields)}; {preset.name!r} is "
                         f"an {entry.adapter.family} preset{whose}")
    return preset.replace(**overrides) if overrides else preset


# ----------------------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class MethodPreset:
    """A guidance + attention method. ``dcg`` None means the model's baseline guidance (:func:`baseline_dcg`)."""

    name: str
    description: str
    dcg: DCGConfig | None = None
    am: AMConfig | None = None


METHOD_PRESETS: dict[str, MethodPreset] = {
    "baseline": MethodPreset("baseline", "the model's own guidance (alpha = beta = g), no AM"),
    "dcg": MethodPreset("dcg", "decoupled CFG (paper Eq. 3-5): alpha [1,1.5,1.5,1], beta [1,3,3,1], rescale 0.75",
                        dcg=DCG_CONFIGS["paper"]),
    "am1": MethodPreset(
        "am1", "AM1 scale-power (p 1.3, s_up 1.45, s_down 1.55) with baseline guidance", am=AM1Config()
    ),
    # The official AM-only softmask config runs without AdaIN; it keeps the three-branch batch (AM2 couples them).
    "am2": MethodPreset("am2", "AM2 scheduled softmask (no AdaIN, as the official AM-only config) with baseline "
                        "guidance", am=AM2Config(adain=False)),
    "fastface-am1": MethodPreset(
        "fastface-am1", "FastFace: DCG + AM1 (the default)", DCG_CONFIGS["paper"], AM1Config()
    ),
    "fastface-am2": MethodPreset("fastface-am2", "FastFace: DCG + AM2 with AdaIN (w 0.7)", DCG_CONFIGS["paper"],
                                 AM2Config()),
}

DEFAULT_METHOD = "fastface-am1"


def baseline_dcg(guidance: float) -> DCGConfig:
    """The official baseline/AM-only guidance as a DCG config: α = β = g at every step, no rescale.

    g = 1 is the conditional prediction eps(text, id) alone; g = 1.5 (LCM) is plain CFG with a zero-text,
    zero-id null: eps(∅,∅) + 1.5 (eps(text,id) − eps(∅,∅)).
    """
    g = _check_number("guidance", guidance, 0.0)
    return DCGConfig(alpha=StepSchedule.constant(g), beta=StepSchedule.constant(g), rescale=None)


def _schedule(name: str, value: object, current: StepSchedule) -> StepSchedule:
    """A schedule override: a StepSchedule; a number (the peak of a 'paper' rule, the value of a 'constant' one,
    else a constant); or a per-step list (a 'custom' schedule)."""
    if isinstance(value, StepSchedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if current.rule == "paper":
            return StepSchedule.paper(value)
        return StepSchedule.constant(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return StepSchedule.custom(value)
    raise ValueError(f"{name} must be a StepSchedule, a number or a per-step list of numbers, got {value!r}")


_SCHEDULE_FIELDS = {"alpha", "beta", "d", "s", "q", "w"}
_BOOL_FIELDS = {"adain", "invert_first"}


def _coerce(obj, name: str, value: object) -> object:
    if name in _SCHEDULE_FIELDS:
        return _schedule(name, value, getattr(obj, name))
    if name in _BOOL_FIELDS:
        return _check_bool(name, value)
    return value  # the config's own validation checks the rest


def _guidance_of(model: str | ModelPreset | ModelRecipe | float | None) -> float:
    if isinstance(model, (ModelPreset, ModelRecipe)):
        return model.guidance
    if isinstance(model, str):
        return get_model_preset(model).guidance
    if model is None:
        return 1.0
    return _check_number("guidance", model, 0.0)


def resolve_method(
    name: str | MethodPreset,
    model: str | ModelPreset | ModelRecipe | float | None = None,
    *,
    adapter: str | AdapterPreset | None = None,
    **overrides: object,
) -> tuple[DCGConfig, AMConfig | None]:
    """The (DCG config, AM config or None) of a method for a model, with validated overrides.

    ``model`` supplies the baseline guidance g (a preset/recipe, its name, a number; None = 1) used by the
    methods without DCG (baseline, am1, am2: α = β = g, no rescale, official semantics). The DCG config is
    never None: with g = 1 it is the conditional prediction alone. ``adapter`` sets AM2's first-token
    inversion (on for FaceID-Plus-v2 only). ``overrides``: ``guidance`` (baseline methods), the DCGConfig fields
    (``variant``, ``alpha``, ``beta``, ``rescale``) and the AM config's fields (AM1: ``p``, ``s_up``, ``s_down``,
    ``clamp``; AM2: ``d``, ``s``, ``q``, ``w``, ``adain``, ``invert_first``, ``clamp``). Schedules take a
    :class:`StepSchedule`, a number or a per-step list (see :func:`_schedule`).
    """
    if isinstance(name, MethodPreset):
        method = name
    elif name in METHOD_PRESETS:
        method = METHOD_PRESETS[name]
    else:
        raise ValueError(f"unknown method {name!r}; {_known('methods', list(METHOD_PRESETS))}")
    overrides = dict(overrides)
    guidance = _guidance_of(model)
    if "guidance" in overrides:
        if method.dcg is not None:
            raise ValueError(
                f"method {method.name!r} uses DCG, whose coefficients are alpha/beta; 'guidance' (alpha = beta = g) "
                "applies to baseline, am1 and am2"
            )
        guidance = overrides.pop("guidance")
    try:
        dcg = method.dcg if method.dcg is not None else baseline_dcg(guidance)
        am = method.am
        if am is not None and "invert_first" in {f.name for f in dataclasses.fields(am)} and adapter is not None:
            if "invert_first" not in overrides:
                am = dataclasses.replace(am, invert_first=get_adapter_preset(adapter).invert_first_token)
        dcg_names = {f.name for f in dataclasses.fields(DCGConfig)}
        am_names = {f.name for f in dataclasses.fields(am)} if am is not None else set()
        known = dcg_names | am_names | ({"guidance"} if method.dcg is None else set())
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(
                f"unknown setting(s) {bad} for method {method.name!r}; {_known('settings', sorted(known))}"
                + ("" if am is not None else " (this method has no AM)")
            )
        dcg_over = {k: _coerce(dcg, k, v) for k, v in overrides.items() if k in dcg_names}
        am_over = {k: _coerce(am, k, v) for k, v in overrides.items() if k in am_names}
        if dcg_over:
            dcg = dataclasses.replace(dcg, **dcg_over)
        if am_over:
            am = dataclasses.replace(am, **am_over)
    except ValueError as exc:
        raise ValueError(f"method {method.name!r}: {exc}") from None
    return dcg, am

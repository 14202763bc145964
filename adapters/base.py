"""The identity-adapter contract: what the pipeline, the CLI and selfcheck ask of an adapter, and nothing more.

An adapter is one class (:class:`IdentityAdapter`) plus one or more presets (:class:`AdapterPreset`: its files and
defaults), registered by name (:func:`fastface.adapters.registry.register`). The class

* lists its weight files (:meth:`IdentityAdapter.files`) and loads them (:meth:`IdentityAdapter.load`), and lists
  the face-model files photos need (:meth:`IdentityAdapter.face_needs`, for ``fastface doctor``);
* installs its identity branch in a UNet (:meth:`IdentityAdapter.install`, returning an :class:`InstallHandle`
  whose ``remove()`` restores the UNet exactly);
* turns face inputs (photos, face files, precomputed embeddings) into an identity (:class:`FacePreparer`, so the
  CLI can check faces before any generation weight is loaded);
* gives the identity tokens and the null identity DCG needs (:meth:`IdentityAdapter.tokens`), and names the
  modules that takes (:meth:`IdentityAdapter.offload_modules`, for offloading);
* declares its call options as data (:class:`AdapterOption`: the CLI lists them and parses ``--adapter-option``),
  validates them (:meth:`IdentityAdapter.resolve_options`) and applies them for one call
  (:meth:`IdentityAdapter.configure`);
* says what it records in the PNG metadata (:meth:`IdentityAdapter.describe`, :meth:`IdentityAdapter.metadata`).

An adapter in one file (tests/test_toy_adapter.py is a complete one)::

    @dataclass(frozen=True)
    class MyPreset(AdapterPreset):
        gain: float = 1.0                                       # defaults live in the preset

    class MyAdapter(IdentityAdapter):
        family, preset_type = "Mine", MyPreset
        options = (AdapterOption("gain", "multiplies the tokens", float, "gain"),)   # CLI: --gain, --adapter-option

        @classmethod
        def load(cls, preset, files, *, dtype, device, faces): ...        # files["adapter"]: the resolved file
        @classmethod
        def face_preparer(cls, preset, faces): ...                        # a FacePreparer: prepare(face), save()
        def install(self, unet, *, fuse=True): ...                        # InstallHandle(self, [(attn, branch, {})])
        def tokens(self, identity, options, dtype): ...                   # (tokens [1, K, C], null id [1, K', C])
        def describe(self, identity): ...                                  # the PNG's "face" entry

    register(MyPreset(name="mine", description="...", weights="mine.safetensors"), MyAdapter)
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fastface.models.loading import WeightFormatError
from fastface.needs import Need, pack_need
from fastface.steps import check_bool, check_int, check_number, check_scale

__all__ = [
    "AdapterOption", "AdapterOptionError", "AdapterPreset", "FaceSettings", "FacePreparer", "IdentityAdapter",
    "InstallHandle", "attention_layers_for", "tensor_shape",
]

PathLike = str | os.PathLike


class AdapterOptionError(ValueError):
    """A bad adapter option: ``option`` (its keyword name) and ``reason`` (the rest of the sentence)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


@dataclass(frozen=True)
class AdapterOption:
    """One option of an adapter, declared as data.

    ``kind``: ``float`` (a non-negative weight), ``bool``, ``str`` (one of ``choices``) or ``Path`` (a local file).
    ``default``: the value when not given; a ``str`` naming a preset field takes that field's value.
    ``aliases``: other keyword names accepted (older names). ``flag``: the CLI's named flag (default
    ``--name-with-dashes``). ``load``: given when the pipeline is loaded (files), not per call.
    """

    name: str
    help: str
    kind: type = float
    default: Any = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    flag: str | None = None
    load: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def keywords(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def parse(self, value: Any) -> Any:
        """The checked value (AdapterOptionError naming this option otherwise)."""
        try:
            if self.kind is float:
                return check_scale(self.name, value)
            if self.kind is bool:
                return check_bool(self.name, value)
            if self.kind is int:
                return check_int(self.name, value, 0)
        except ValueError as exc:
            raise AdapterOptionError(self.name, str(exc).split(" ", 1)[1]) from None
        if self.kind is Path:
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise AdapterOptionError(self.name, f"must be a file path, got {value!r}")
            return value
        if self.choices and value not in self.choices:
            raise AdapterOptionError(self.name, f"must be one of {', '.join(self.choices)}, got {value!r}")
        if not isinstance(value, str):
            raise AdapterOptionError(self.name, f"must be a string, got {value!r}")
        return value


@dataclass(frozen=True)
class AdapterPreset:
    """An adapter's files and defaults under one name. Subclasses add the adapter's own fields.

    ``weights``: the adapter file (a :class:`~fastface.hub.HubFile`, repo id or local path). ``ip_scale``: the
    identity attention weight. ``face_pack``/``det_size``: the insightface pack and its detector size.
    ``invert_first_token``: AM2 inverts identity token 0 (a background token, FaceID-Plus-v2 only).
    """

    name: str
    description: str
    weights: Any
    ip_scale: float = 0.8
    face_pack: str = "buffalo_l"
    det_size: int = 640
    invert_first_token: bool = False

    def __post_init__(self) -> None:
        if self.weights is None or (isinstance(self.weights, str) and not self.weights):
            raise ValueError(f"{type(self).__name__}.weights must name the adapter file, got {self.weights!r}")
        check_bool(f"{type(self).__name__}.invert_first_token", self.invert_first_token)
        check_number(f"{type(self).__name__}.ip_scale", self.ip_scale, 0.0)
        if not self.face_pack or not isinstance(self.face_pack, str):
            raise ValueError(f"{type(self).__name__}.face_pack must name an insightface pack, got {self.face_pack!r}")
        if check_int(f"{type(self).__name__}.det_size", self.det_size, 32) % 32:
            raise ValueError(f"{type(self).__name__}.det_size must be a multiple of 32, got {self.det_size}")

    def replace(self, **changes: Any) -> AdapterPreset:
        """A copy with validated changes; an unknown name is a ValueError listing the known ones."""
        names = [f.name for f in dataclasses.fields(self) if f.init]
        bad = sorted(set(changes) - set(names))
        if bad:
            raise ValueError(f"unknown adapter preset setting(s) {bad} for {self.name!r}; known settings: "
                             f"{', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FaceSettings:
    """Where an adapter finds its face models: the insightface ``face_root``, downloads allowed, the Hugging Face
    cache, the device, and the load options (local files) given by the user."""

    face_root: PathLike | None = None
    download: bool = False
    cache_dir: PathLike | None = None
    device: torch.device = torch.device("cpu")
    files: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(os.fspath(self.face_root or "~/.insightface")))


class FacePreparer(ABC):
    """Face inputs -> one person's identity, loading the face models on first need. ``sources``: the files used
    (recorded in the PNG metadata)."""

    sources: dict[str, str]

    @abstractmethod
    def prepare(self, face: Any) -> Any:
        """One person's identity from photo(s), face file(s), precomputed embeddings (a list: one person)."""

    @abstractmethod
    def save(self, path: PathLike, identity: Any) -> Path:
        """Write ``identity`` as a face file that :meth:`prepare` reads back."""


class InstallHandle:
    """An adapter installed in a UNet: the identity branches set on attention layers and the submodules swapped in,
    with an exact ``remove()`` (also on context exit; a swapped-in module's ``restore_base()``, if it has one, runs
    before the original goes back). Adapters subclass it for their own runtime switches."""

    def __init__(self, adapter: Any, plan: Iterable[tuple[nn.Module, nn.Module | None, Mapping[str, nn.Module]]]):
        """``plan``: (attention layer, identity branch or None, {slot: new module}) per layer; slots are attribute
        names of the layer (``to_q``) or ``to_out.0``."""
        self.adapter = adapter
        self._installed: list[tuple[nn.Module, nn.Module | None, dict[str, tuple[nn.Module, nn.Module]]]] = []
        for attn, ip, swaps in plan:
            swapped = {}
            for slot, new in swaps.items():
                swapped[slot] = (_get_slot(attn, slot), new)
                _set_slot(attn, slot, new)
            if ip is not None:
                attn.ip = ip
            self._installed.append((attn, ip, swapped))

    @property
    def installed(self) -> bool:
        return bool(self._installed)

    @property
    def branches(self) -> list[nn.Module]:
        """The installed identity branches, in layer order."""
        return [ip for _, ip, _ in self._installed if ip is not None]

    @property
    def swapped(self) -> list[nn.Module]:
        """The modules swapped into the layers (e.g. LoRA wrappers), in layer order."""
        return [new for _, _, swapped in self._installed for _, new in swapped.values()]

    def remove(self) -> None:
        """Put the original modules back (bit-identical outputs); safe to call twice."""
        for attn, ip, swapped in reversed(self._installed):
            for slot, (_old, new) in swapped.items():
                if _get_slot(attn, slot) is not new:
                    raise RuntimeError(
                        f"cannot remove the adapter: '{slot}' of an attention layer was replaced after installation; "
                        "remove adapters in the reverse order of installation"
                    )
            if ip is not None and attn.ip is not ip:
                raise RuntimeError("cannot remove the adapter: the identity branch was replaced after installation")
        for attn, ip, swapped in reversed(self._installed):
            for slot, (old, new) in swapped.items():
                restore = getattr(new, "restore_base", None)  # e.g. a fused LoRA copies the original weight back
                if callable(restore):
                    restore()
                _set_slot(attn, slot, old)
            if ip is not None:
                attn.ip = None
        self._installed = []

    def __enter__(self) -> InstallHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _get_slot(attn: nn.Module, slot: str) -> nn.Module:
    return attn.to_out[0] if slot == "to_out.0" else getattr(attn, slot)


def _set_slot(attn: nn.Module, slot: str, module: nn.Module) -> None:
    if slot == "to_out.0":
        attn.to_out[0] = module
    else:
        setattr(attn, slot, module)


def attention_layers_for(unet: nn.Module, num_layers: int, source: object, what: str = "the adapter"):
    """The UNet's attention layers in checkpoint order as ``(index, name, layer)``, checked to match an adapter file
    (count; self-attention at even, cross-attention at odd indices) and to hold no identity branch yet."""
    layers = list(unet.attention_layers())
    if len(layers) != num_layers:
        raise WeightFormatError(
            f"{source}: the adapter has {num_layers} attention layers but the UNet has {len(layers)}; "
            "the adapter is for a different base model (SDXL has 140, SD1.5 has 32)"
        )
    taken = [name for name, attn in layers if getattr(attn, "ip", None) is not None]
    if taken:
        raise ValueError(
            f"'{taken[0]}' (and {len(taken) - 1} more) already has an identity branch installed; remove the "
            "other adapter first (handle.remove())"
        )
    for i, (name, _) in enumerate(layers):
        if name.endswith("attn1" if i % 2 else "attn2"):
            raise WeightFormatError(
                f"{source}: layer {i} of the UNet is '{name}', but {what} expects a "
                f"{'cross' if i % 2 else 'self'}-attention layer there; the UNet's layer order is not the "
                "checkpoint order (down_blocks, up_blocks, mid_block; attn1 then attn2)"
            )
    return [(i, name, attn) for i, (name, attn) in enumerate(layers)]


def tensor_shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int, where: str) -> tuple[int, ...]:
    """The shape of ``sd[key]``, checked to exist and have ``ndim`` axes; ``where`` names the file part in errors
    (e.g. ``"model.bin: 'image_proj'"``)."""
    if key not in sd:
        raise WeightFormatError(f"{where} lacks the key '{key}'; the file is incomplete or not this adapter")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise WeightFormatError(f"{where} '{key}' has shape {shape}, expected a {ndim}-d tensor")
    return shape


class IdentityAdapter(ABC):
    """A loaded identity adapter as the pipeline uses it (see the module docstring for the contract).

    Class attributes: ``family`` (a readable name for messages, e.g. "IP-Adapter"), ``preset_type`` (its preset
    class), ``options`` (its :class:`AdapterOption` s, call and load options). Instances hold ``preset``,
    ``sources`` (files used, for the PNG metadata), ``preparer`` (the :class:`FacePreparer`) and ``model`` (the
    loaded weights object, e.g. :class:`~fastface.adapters.ip_adapter.IPAdapterFaceID`).
    """

    family: ClassVar[str] = "identity adapter"
    preset_type: ClassVar[type[AdapterPreset]] = AdapterPreset
    options: ClassVar[tuple[AdapterOption, ...]] = ()

    def __init__(self, preset: AdapterPreset, preparer: FacePreparer, sources: Mapping[str, str]) -> None:
        self.preset = preset
        self.preparer = preparer
        self.sources = dict(sources)
        self.model: Any = None

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def files(cls, preset: AdapterPreset, adapter_file: PathLike | None, given: Mapping[str, Any]) -> dict[str, Any]:
        """The weight references to resolve before loading (name -> a reference or a tuple of alternatives):
        ``adapter`` by default (``adapter_file`` replaces the preset's); ``given``: the user's load options."""
        return {"adapter": adapter_file if adapter_file is not None else preset.weights}

    @classmethod
    @abstractmethod
    def load(
        cls, preset: AdapterPreset, files: Mapping[str, Path], *, dtype: torch.dtype, device: torch.device,
        faces: FaceSettings,
    ) -> IdentityAdapter:
        """Load the adapter from the resolved ``files`` (weights in ``dtype`` on ``device``)."""

    @classmethod
    def face_needs(cls, preset: AdapterPreset, faces: FaceSettings) -> list[Need]:
        """The face-model files that reading face *photos* needs (face files and embeddings need none), as
        :class:`~fastface.needs.Need` s: ``fastface doctor`` lists them and the CLI checks them with the rest.
        Default: the preset's insightface pack under ``faces.face_root``."""
        return [pack_need(faces.face_root, preset.face_pack)]

    @classmethod
    @abstractmethod
    def face_preparer(cls, preset: AdapterPreset, faces: FaceSettings) -> FacePreparer:
        """The face-input preparation of this adapter (its face models load on first need)."""

    @classmethod
    def write_tiny(cls, root: Path, unet: nn.Module, gen: torch.Generator, seed: int) -> list:
        """Tiny random weights of this adapter for ``unet`` (the tiny UNet) under ``root``, for the selfcheck:
        a list of :class:`fastface.tiny.TinyAdapter` (default none: the selfcheck skips the adapter)."""
        return []

    def use_preparer(self, preparer: FacePreparer) -> None:
        """Use an already opened face preparation (its files go into the metadata)."""
        self.preparer = preparer
        self.sources.update(preparer.sources)

    # -- options ------------------------------------------------------------------------------------------------

    @classmethod
    def call_options(cls) -> tuple[AdapterOption, ...]:
        return tuple(o for o in cls.options if not o.load)

    @classmethod
    def load_options(cls) -> tuple[AdapterOption, ...]:
        return tuple(o for o in cls.options if o.load)

    @classmethod
    def default(cls, preset: AdapterPreset, option: AdapterOption) -> Any:
        """An option's default: its ``default``, or the preset field that ``default`` names."""
        d = option.default
        return getattr(preset, d) if isinstance(d, str) and hasattr(preset, d) else d

    @classmethod
    def resolve_options(
        cls, preset: AdapterPreset, given: Mapping[str, Any], unknown: Callable[[str], Exception]
    ) -> dict[str, Any]:
        """Every call option's checked value (defaults filled in), by its name; aliases accepted, None = default.
        ``unknown(keyword)`` makes the error for a name this adapter does not have. Needs no loaded weights, so
        the CLI checks options before loading anything."""
        by_keyword = {k: o for o in cls.call_options() for k in o.keywords}
        out: dict[str, Any] = {}
        for key, value in given.items():
            if key not in by_keyword:
                raise unknown(key)
            if value is not None:
                out[by_keyword[key].name] = by_keyword[key].parse(value)
        for o in cls.call_options():
            if o.name not in out:
                out[o.name] = o.parse(cls.default(preset, o))
        cls.check_options(preset, out)
        return out

    @classmethod
    def not_an_option(cls, keyword: str) -> str | None:
        """The rest of the sentence "KEYWORD ..." saying why another adapter's option does not apply here, when
        there is more to say than the generic message; default None."""
        return None

    @classmethod
    def check_options(cls, preset: AdapterPreset, options: Mapping[str, Any]) -> None:  # noqa: B027
        """Check options against each other and the preset (AdapterOptionError); default nothing."""

    # -- use ----------------------------------------------------------------------------------------------------

    @abstractmethod
    def install(self, unet: nn.Module) -> InstallHandle:
        """Install the identity branch (and any LoRA) in ``unet``; the handle's ``remove()`` restores it exactly."""

    def prepare(self, face: Any) -> Any:
        """One person's identity (see :class:`FacePreparer`)."""
        return self.preparer.prepare(face)

    @abstractmethod
    def tokens(self, identity: Any, options: Mapping[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(identity tokens [1, K, C], null identity tokens [1, K', C]) for the UNet; ``dtype``: the UNet's."""

    def offload_modules(self) -> list[nn.Module]:
        """The torch modules :meth:`prepare` and :meth:`tokens` run (face models loaded on first use count once
        loaded): a pipeline with ``offload=True`` keeps them on the accelerator only while it prepares an identity.
        Default: ``model`` when it is a module; an adapter with other modules (an image encoder, face models)
        lists them all."""
        return [self.model] if isinstance(self.model, nn.Module) else []

    def configure(self, handle: InstallHandle, options: Mapping[str, Any]) -> Callable[[], None]:
        """Apply a call's options to the installed adapter; returns what undoes the call-only part (default none)."""
        return lambda: None

    @abstractmethod
    def describe(self, identity: Any) -> dict[str, Any]:
        """The PNG metadata's ``face`` entry: source and a hash of the identity, never the identity itself."""

    def metadata(self, identity: Any, options: Mapping[str, Any], tokens: torch.Tensor, handle: InstallHandle):
        """Settings entries this adapter adds to the PNG metadata (default: its call options)."""
        return dict(options)

"""The adapter registry: one entry per adapter name (a preset + the class that implements it).

::

    from fastface.adapters.registry import register
    register(MyPreset(name="mine", description="...", weights="/path/mine.safetensors"), MyAdapter)
    pipe = fastface.Pipeline.from_pretrained("hyper", adapter="mine")      # or: fastface generate --adapter mine

The built-in adapters (faceid, faceid-plusv2, pulid, pulid-v1.1) register themselves when their modules are
imported; this module imports them (in a fixed order) on the first lookup or registration, by name, so it
depends on none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .base import AdapterOption, AdapterOptionError, AdapterPreset, IdentityAdapter

__all__ = ["AdapterEntry", "register", "unregister", "get_entry", "adapter_names", "entries", "presets",
           "option_owners", "unknown_option_error"]

_BUILTIN_MODULES = ("fastface.adapters.faceid_adapter", "fastface.adapters.pulid_adapter")
_REGISTRY: dict[str, AdapterEntry] = {}
_loaded = False


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter: its ``preset`` (files and defaults) and ``adapter`` class (the contract)."""

    preset: AdapterPreset
    adapter: type[IdentityAdapter]

    @property
    def name(self) -> str:
        return self.preset.name


def _builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def register(preset: AdapterPreset, adapter: type[IdentityAdapter], *, replace: bool = False) -> AdapterEntry:
    """Register ``adapter`` under ``preset.name``; the pipeline, CLI and selfcheck then offer it by that name.

    The built-in adapters are registered first, in a fixed order, whatever module is imported first.
    """
    _builtins()
    if not isinstance(preset, AdapterPreset):
        raise TypeError(f"register() takes an AdapterPreset, got {type(preset).__name__}")
    if not (isinstance(adapter, type) and issubclass(adapter, IdentityAdapter)):
        raise TypeError(f"register() takes an IdentityAdapter subclass, got {adapter!r}")
    if not isinstance(preset, adapter.preset_type):
        raise TypeError(f"adapter {adapter.__name__} takes {adapter.preset_type.__name__} presets, got "
                        f"{type(preset).__name__}")
    if preset.name in _REGISTRY and not replace:
        raise ValueError(f"an adapter named {preset.name!r} is registered already (pass replace=True to replace it)")
    entry = AdapterEntry(preset, adapter)
    _REGISTRY[preset.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a registered adapter (tests, plugins that unload)."""
    _REGISTRY.pop(name, None)


def get_entry(name: str | AdapterPreset) -> AdapterEntry:
    """The entry of an adapter name, or of a preset (its class found by the preset's type)."""
    _builtins()
    if isinstance(name, AdapterPreset):
        for entry in _REGISTRY.values():
            if type(name) is type(entry.preset):
                return AdapterEntry(name, entry.adapter)
        raise ValueError(f"no registered adapter takes presets of type {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter preset {name!r}; known adapters: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _ordered() -> list[AdapterEntry]:
    """The entries with the built-in adapters first, in the order of ``_BUILTIN_MODULES``, then the others as
    registered: the same order whichever adapter module a program imports first (the order decides, for
    example, in which order ``selfcheck`` draws each adapter's tiny random weights)."""
    _builtins()
    rank = {module: i for i, module in enumerate(_BUILTIN_MODULES)}
    return sorted(_REGISTRY.values(), key=lambda e: rank.get(e.adapter.__module__, len(rank)))


def adapter_names() -> list[str]:
    return [entry.name for entry in _ordered()]


def entries() -> list[AdapterEntry]:
    return _ordered()


class _Presets(Mapping):
    """The registered presets by name, a live read-only view."""

    def __getitem__(self, name: str) -> AdapterPreset:
        _builtins()
        return _REGISTRY[name].preset

    def __iter__(self) -> Iterator[str]:
        _builtins()
        return iter(adapter_names())

    def __len__(self) -> int:
        _builtins()
        return len(_REGISTRY)


presets: Mapping[str, AdapterPreset] = _Presets()


def option_owners(keyword: str) -> dict[str, AdapterOption]:
    """{adapter family: option} of every registered adapter having an option (or alias) named ``keyword``."""
    out: dict[str, AdapterOption] = {}
    for entry in entries():
        for o in entry.adapter.options:
            if keyword in o.keywords:
                out.setdefault(entry.adapter.family, o)
    return out


def unknown_option_error(adapter: str, keyword: str, shown: str | None = None) -> ValueError:
    """The error for an option that adapter ``adapter`` does not have (``shown``: how the user wrote it)."""
    entry = get_entry(adapter)
    owners = sorted(option_owners(keyword))
    hint = entry.adapter.not_an_option(keyword)
    if hint:
        return AdapterOptionError(shown or keyword, hint)
    mine = ", ".join(o.name for o in entry.adapter.options) or "none"
    if owners:
        return AdapterOptionError(shown or keyword, f"is a {' / '.join(owners)} option; adapter {adapter!r} does not "
                                  f"use it (its options: {mine})")
    return AdapterOptionError(shown or keyword, f"is not an option of adapter {adapter!r} (its options: {mine})")

"""``fastface doctor``: every file a run needs, where fastface looks for it, found or missing (and sizes); with
``download`` everything missing is fetched in one go.

The list is the one loading uses (:func:`fastface.components.source_needs` and the adapter's
:meth:`~fastface.adapters.base.IdentityAdapter.face_needs`), so what doctor reports found is what a run finds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastface.adapters.base import FaceSettings
from fastface.adapters.registry import get_entry
from fastface.components import LocalPaths, source_needs
from fastface.hub import hub_cache_dir
from fastface.needs import Located, Need, fetch, locate
from fastface.presets import model_recipe

__all__ = ["run_needs", "check", "format_report", "report_json", "human_size"]


def run_needs(
    preset: str,
    adapter: str,
    *,
    steps: int | None = None,
    half: bool = False,
    paths: LocalPaths = LocalPaths(),
    adapter_files: Mapping[str, Any] | None = None,
    face_root: str | os.PathLike | None = None,
    photos: bool = True,
    models: bool = True,
) -> list[Need]:
    """Every file a run of ``preset`` + ``adapter`` needs: the generation parts (``models``) and the face models
    that reading photos needs (``photos``). The same lists the pipeline and the face preparation resolve."""
    entry = get_entry(adapter)
    out: list[Need] = []
    if models:
        overrides = {"weights": Path(os.path.expanduser(os.fspath(paths.weights)))} if paths.weights else {}
        recipe = model_recipe(preset, steps, **overrides)
        out += source_needs(recipe, entry, paths, adapter_files, half=half)
    if photos:
        out += entry.adapter.face_needs(entry.preset, FaceSettings(face_root, files=dict(adapter_files or {})))
    return out


def check(
    needs: Sequence[Need], *, cache_dir: str | os.PathLike | None = None, download: bool = False, progress: bool = True
) -> list[Located]:
    """Locate every need; with ``download`` fetch every missing one (one progress bar over the files, each
    download with its own), then report them all."""
    found = [locate(n, cache_dir) for n in needs]
    missing = [i for i, f in enumerate(found) if not f.found]
    if download and missing:
        from tqdm import tqdm

        with tqdm(total=len(missing), unit="part", desc="fastface doctor: fetching", disable=not progress) as bar:
            for i in missing:
                bar.set_postfix_str(found[i].need.name)
                found[i] = fetch(found[i].need, cache_dir)
                bar.update(1)
    return found


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _state(f: Located) -> str:
    if f.found:
        return "found"
    return "optional, missing" if f.need.optional else "MISSING"


def _shown(p: Path, base: Path) -> str:
    """A file as listed under its part: relative to where the part was found."""
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)


def format_report(found: Sequence[Located], *, header: str = "", fix: str = "") -> str:
    """The text report: one block per part (state, name, size, where found or looked for, why not downloaded),
    its files below it, and a last line saying what to do."""
    lines = [header] if header else []
    for f in found:
        n = f.need
        lines.append(f"{_state(f):<17} {n.name:<15} {human_size(f.size) if f.found else '':>9}  {n.what}")
        if f.found:
            lines.append(f"{'':<19}at {f.path}")
            if len(f.files) > 1:
                lines += [f"{'':<21}{_shown(p, f.path):<42} {human_size(s):>9}" for p, s in f.files]
        else:
            lines.append(f"{'':<19}looked in {' | '.join(f.looked)}")
            lacking = [p.name for p, s in f.files if s is None]
            if len(f.files) > 1 and lacking:
                lines.append(f"{'':<19}lacking {', '.join(lacking)}")
            if f.problem:
                lines.append(f"{'':<19}{f.problem}")
            if n.flag:
                lines.append(f"{'':<19}a local copy: {n.flag}")
    need = [f for f in found if not f.found and not f.need.optional]
    total = sum(f.size for f in found if f.found)
    lines.append("")
    if need:
        lines.append(f"{len(need)} of {len(found)} parts missing ({human_size(total)} found). {fix}".rstrip())
    else:
        opt = sum(not f.found for f in found)
        lines.append(f"all {len(found) - opt} {'required ' if opt else ''}parts found ({human_size(total)})"
                     + (f"; {opt} optional part(s) missing" if opt else "") + ".")
    return "\n".join(lines)


def report_json(found: Sequence[Located], **context: Any) -> dict[str, Any]:
    """The report as JSON-ready data: ``ok`` and one entry per part with its files."""
    return {
        **context,
        "ok": all(f.found or f.need.optional for f in found),
        "cache_dir": str(hub_cache_dir(context.get("cache_dir"))),
        "parts": [
            {"name": f.need.name, "what": f.need.what, "found": f.found, "optional": f.need.optional,
             "for_photos": f.need.for_photos, "path": None if f.path is None else str(f.path),
             "looked_in": list(f.looked), "size": f.size if f.found else None, "problem": f.problem or None,
             "local_copy_flag": f.need.flag or None, "local_copy_keyword": f.need.keyword or None,
             "files": [{"path": str(p), "size": s, "found": s is not None} for p, s in f.files]}
            for f in found
        ],
    }

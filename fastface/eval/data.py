"""Evaluation data: the DiverseBench layout (FastFace paper, App. B) or any folder of faces plus a prompt file.

DiverseBench (``evaluation_ds_v2`` in the official zip)::

    <root>/id_photos/*.png          one reference photo per identity (54); the identity name is the file stem
    <root>/prompts_nostyle.txt      80 realistic prompts, one per line
    <root>/prompts_style.txt        40 stylistic prompts "<style>; person <location> <action>"
    <root>/prompts.txt              all 120 (used only when the two files above are missing)

Prompts are stripped and lowercased, as the official loader does. Realistic vs stylistic is decided by the
official rule: a prompt is stylistic iff it contains ``;`` (whichever file it came from). The evaluation set is
the full product identities x prompts (4320 realistic + 2160 stylistic pairs), as in the official code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "STYLE_SEPARATOR",
    "Subset",
    "Identity",
    "EvalItem",
    "EvalSet",
    "is_stylistic",
    "style_part",
    "subset_of",
    "normalize_prompt",
    "read_prompts",
    "load_diversebench",
    "load_face_folder",
    "load_eval_set",
    "load_identities",
    "identity_files",
]

STYLE_SEPARATOR = ";"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Subset = Literal["full", "realistic", "stylistic"]
_SUBSETS = ("full", "realistic", "stylistic")


def is_stylistic(prompt: str) -> bool:
    """True for a stylistic prompt (it contains ``;``), the official subset rule."""
    return STYLE_SEPARATOR in prompt


def subset_of(prompt: str) -> Literal["realistic", "stylistic"]:
    """``"stylistic"`` if the prompt contains ``;``, else ``"realistic"``."""
    return "stylistic" if is_stylistic(prompt) else "realistic"


def style_part(prompt: str) -> str | None:
    """The style description of a stylistic prompt (the text before the first ``;``, stripped); None if realistic.

    It is the text the face-crop CLIP score (FCS) compares the face with.
    """
    if not is_stylistic(prompt):
        return None
    return prompt.split(STYLE_SEPARATOR, 1)[0].strip()


def normalize_prompt(prompt: str) -> str:
    """Strip and lowercase a prompt (the official loader's normalisation)."""
    return prompt.strip().lower()


@dataclass(frozen=True)
class Identity:
    """One reference person: ``name`` (the file stem, unique in a set) and the ``path`` of the photo."""

    name: str
    path: Path


@dataclass(frozen=True)
class EvalItem:
    """One (identity, prompt) pair of an evaluation set."""

    identity: Identity
    prompt: str

    @property
    def subset(self) -> Literal["realistic", "stylistic"]:
        return subset_of(self.prompt)


@dataclass(frozen=True)
class EvalSet:
    """Identities and prompts; the evaluation items are their full product (identities outer, prompts inner)."""

    name: str
    identities: tuple[Identity, ...]
    prompts: tuple[str, ...]

    def items(self) -> list[EvalItem]:
        """Every (identity, prompt) pair, in a fixed order (identities by name, prompts in file order)."""
        return [EvalItem(i, p) for i in self.identities for p in self.prompts]

    def __len__(self) -> int:
        return len(self.identities) * len(self.prompts)

    def subset(self, which: Subset) -> EvalSet:
        """Only the realistic or stylistic prompts (``"full"``: unchanged)."""
        _check_subset(which)
        if which == "full":
            return self
        return replace(self, prompts=tuple(p for p in self.prompts if subset_of(p) == which))

    def limit(self, identities: int | None = None, prompts_per_subset: int | None = None) -> EvalSet:
        """The first ``identities`` identities and the first ``prompts_per_subset`` prompts of each subset (for
        quick runs); None keeps all."""
        ids = self.identities if identities is None else self.identities[: _positive("identities", identities)]
        prompts = self.prompts
        if prompts_per_subset is not None:
            n = _positive("prompts_per_subset", prompts_per_subset)
            real = [p for p in prompts if not is_stylistic(p)][:n]
            style = [p for p in prompts if is_stylistic(p)][:n]
            keep = set(real) | set(style)
            prompts = tuple(p for p in prompts if p in keep)
        return replace(self, identities=ids, prompts=prompts)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_subset(which: str) -> None:
    if which not in _SUBSETS:
        raise ValueError(f"subset must be one of {_SUBSETS}, got {which!r}")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line: stripped, lowercased, empty lines skipped, repeats dropped (warned)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such prompt file (one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from exc
    prompts = _unique((normalize_prompt(line) for line in lines if line.strip()), str(path))
    if not prompts:
        raise ValueError(f"{path}: the prompt file holds no prompts")
    return prompts


def _unique(prompts: Iterable[str], source: str) -> list[str]:
    seen: dict[str, None] = {}
    for p in prompts:
        if p in seen:
            logger.warning("%s: prompt %r appears more than once; it is evaluated once", source, p)
        seen.setdefault(p, None)
    return list(seen)


def _identities(folder: Path, extensions: Sequence[str], subfolders: bool = False) -> tuple[Identity, ...]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of identity photos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if subfolders:  # a subfolder holding at least one such file is one identity (several photos of one person)
        files = sorted([*files, *(p for p in folder.iterdir() if p.is_dir() and identity_files(p, extensions))])
    if not files:
        raise ValueError(f"{folder}: no identity photos ({', '.join(extensions)}) found"
                         + (" (neither as files nor in subfolders)" if subfolders else ""))
    names: dict[str, Path] = {}
    for f in files:
        name = f.name if f.is_dir() else f.stem
        if name in names:
            raise ValueError(
                f"{folder}: two photos share the identity name {name!r} ({names[name].name}, {f.name}); "
                "the file stem names the identity, so rename one "
                + ("(several photos of one person go in one subfolder)" if subfolders
                   else "(several photos of one person are not supported here)")
            )
        names[name] = f
    return tuple(Identity(n, p) for n, p in names.items())


def identity_files(path: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The files of one identity: ``[path]`` for a file, else the files of folder ``path`` with one of the
    ``extensions``, sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    exts = tuple(e.lower() for e in extensions)
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in exts) if path.is_dir() else []


def load_identities(
    folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, subfolders: bool = True
) -> tuple[Identity, ...]:
    """The identities of a folder, sorted by name: each file with one of the ``extensions`` is one identity named
    by its stem, and (``subfolders``) each subfolder holding such files is one identity named by the folder (all
    its files are that person). A name given twice is an error."""
    return _identities(Path(folder).expanduser(), tuple(e.lower() for e in extensions), subfolders)


def load_diversebench(root: str | os.PathLike, subset: Subset = "full") -> EvalSet:
    """The DiverseBench set from a folder in the official layout (see the module doc)."""
    _check_subset(subset)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root}: no such DiverseBench folder")
    identities = _identities(root / "id_photos", (".png",))
    real, style, combined = (root / n for n in ("prompts_nostyle.txt", "prompts_style.txt", "prompts.txt"))
    if real.is_file() or style.is_file():
        missing = [p.name for p in (real, style) if not p.is_file()]
        if missing and subset == "full":
            raise ValueError(
                f"{root}: {missing[0]} is missing (the full set needs prompts_nostyle.txt and prompts_style.txt)"
            )
        prompts = [p for f in (real, style) if f.is_file() for p in read_prompts(f)]
    elif combined.is_file():
        prompts = read_prompts(combined)
    else:
        raise ValueError(
            f"{root}: no prompt files (prompts_nostyle.txt, prompts_style.txt or prompts.txt). Is this the "
            "DiverseBench folder (the 'evaluation_ds_v2' content of the official zip)?"
        )
    for name, path in (("prompts_nostyle.txt", real), ("prompts_style.txt", style)):
        if path.is_file():
            wrong = [p for p in read_prompts(path) if is_stylistic(p) != (name == "prompts_style.txt")]
            if wrong:
                logger.warning("%s: %d prompt(s) are classified by the ';' rule, not by the file: %r",
                               path, len(wrong), wrong[:3])
    out = EvalSet(root.name, identities, tuple(_unique(prompts, str(root)))).subset(subset)
    if not out.prompts:
        raise ValueError(f"{root}: no {subset} prompts")
    return out


def load_face_folder(
    faces: str | os.PathLike, prompts: str | os.PathLike, subset: Subset = "full",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> EvalSet:
    """An evaluation set from any folder of face photos (one per identity, named by file stem) and a prompt file."""
    _check_subset(subset)
    faces = Path(faces).expanduser()
    out = EvalSet(faces.name, _identities(faces, tuple(e.lower() for e in extensions)),
                  tuple(read_prompts(prompts))).subset(subset)
    if not out.prompts:
        raise ValueError(f"{prompts}: no {subset} prompts")
    return out


def load_eval_set(
    data: str | os.PathLike, prompts: str | os.PathLike | None = None, subset: Subset = "full"
) -> EvalSet:
    """DiverseBench if ``data`` has an ``id_photos/`` folder and no ``prompts`` file is given; else a face folder
    with the ``prompts`` file."""
    data = Path(data).expanduser()
    if prompts is None:
        if (data / "id_photos").is_dir():
            return load_diversebench(data, subset)
        raise ValueError(
            f"{data}: not a DiverseBench folder (no id_photos/); for a plain folder of faces also give a prompt file"
        )
    return load_face_folder(data, prompts, subset)

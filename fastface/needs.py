"""What a run needs and where each file is looked for: one list, used by loading, the CLI and ``fastface doctor``.

A :class:`Need` is one part of a run (the UNet folder, the distilled LoRA, the adapter file, an insightface pack,
a facexlib file ...) with its sources in order of preference: a Hugging Face file or folder
(:class:`~fastface.hub.HubFile` / :class:`~fastface.hub.HubFolder`, found in the cache), a local path the user
gave, an insightface pack (:class:`InsightfacePack`) or a release file (:class:`UrlFile`). :func:`locate` finds a
need without network; :func:`fetch` downloads its first downloadable source (only when asked); :func:`resolve_needs`
locates every need first, fetches what is missing in one go when allowed, and raises one
:class:`MissingWeightsError` naming **every** part still missing and the one command that gets them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastface import hub
from fastface.hub import HubFile, HubFolder, WeightNotFoundError

__all__ = ["Need", "Located", "InsightfacePack", "UrlFile", "MissingWeightsError", "FixHint", "locate", "fetch",
           "resolve_needs", "pack_need", "faces_hint", "doctor_command"]


@dataclass(frozen=True)
class InsightfacePack:
    """insightface's face-analysis pack ``pack`` under ``root`` (``root/models/<pack>/*.onnx``)."""

    root: Path
    pack: str

    @property
    def folder(self) -> Path:
        return self.root / "models" / self.pack

    @property
    def url(self) -> str:
        return hub.insightface_pack_url(self.pack)

    def __str__(self) -> str:
        return f"insightface pack {self.pack} ({self.folder})"


@dataclass(frozen=True)
class UrlFile:
    """A release file (not on the Hugging Face hub) looked for as ``name`` in ``folders`` (downloads go to the first)."""

    name: str
    url: str | None
    folders: tuple[Path, ...]

    def __str__(self) -> str:
        return f"{self.name} ({self.url or 'no download URL'})"


Source = HubFile | HubFolder | Path | InsightfacePack | UrlFile


@dataclass(frozen=True)
class Need:
    """One part of a run. ``name``: its key (``unet``, ``adapter``, ``face_pack`` ...); ``what``: a readable name;
    ``sources``: where it may be, first preferred (a missing need is downloaded from the first downloadable one);
    ``keyword``/``flag``: the library keyword and CLI flag that give a local copy instead; ``optional``: the run
    works without it (with a warning); ``for_photos``: needed only to read face photos."""

    name: str
    what: str
    sources: tuple[Source, ...]
    keyword: str = ""
    flag: str = ""
    optional: bool = False
    for_photos: bool = False


@dataclass(frozen=True)
class Located:
    """A need looked up: ``path`` (None when missing), ``files`` ((path, size in bytes or None if missing) of every
    file behind it), ``looked`` (where it was looked for), ``problem`` (why a download did not happen or failed)."""

    need: Need
    path: Path | None
    files: tuple[tuple[Path, int | None], ...] = ()
    looked: tuple[str, ...] = ()
    problem: str = ""

    @property
    def found(self) -> bool:
        return self.path is not None

    @property
    def size(self) -> int:
        return sum(s or 0 for _, s in self.files)


def pack_need(root: str | os.PathLike | None, pack: str) -> Need:
    """The need of an insightface face-analysis pack under ``root`` (default ``~/.insightface``)."""
    base = Path(os.path.expanduser(os.fspath(root or "~/.insightface")))
    return Need("face_pack", f"insightface model pack '{pack}'", (InsightfacePack(base, pack),),
                "face_root", "--face-root", for_photos=True)


# ----------------------------------------------------------------------------------------------------------------
# Looking up


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size if p.is_file() else None
    except OSError:
        return None


def _locate_source(src: Source, cache_dir) -> tuple[Path | None, tuple[tuple[Path, int | None], ...], str]:
    """(the path or None, the files behind it, where it was looked for)."""
    if isinstance(src, HubFile):
        found = hub.find_in_cache(src.repo_id, src.path_in_repo, src.revision, cache_dir)
        where = f"{hub.repo_cache_folder(src.repo_id, cache_dir)}/snapshots/*/{src.path_in_repo}"
        if found is None:
            return None, ((Path(where), None),), where
        return found, ((found, _size(found)),), where
    if isinstance(src, HubFolder):
        need = tuple(hub._join(src.subfolder, r) for r in src.required) or ((src.subfolder,) if src.subfolder else ())
        snap = hub.find_snapshot(src.repo_id, src.revision, need, cache_dir)
        snaps = hub.repo_cache_folder(src.repo_id, cache_dir) / "snapshots"
        where = f"{snaps}/*" + (f"/{src.subfolder}" if src.subfolder else "")
        if snap is None:
            chosen = hub.find_snapshot(src.repo_id, src.revision, (), cache_dir)  # to tell which files lack
            files = tuple((p, _size(p)) for p in ((chosen or snaps / "*") / r for r in need))
            return None, files, where
        folder = snap / src.subfolder if src.subfolder else snap
        return folder, tuple((snap / r, _size(snap / r)) for r in need), where
    if isinstance(src, InsightfacePack):
        folder = hub.find_pack_folder(src.root, src.pack)
        if folder is not None:
            return src.root, tuple((p, _size(p)) for p in sorted(folder.glob("*.onnx"))), f"{src.folder}/*.onnx"
        return None, ((src.folder, None),), f"{src.folder}/*.onnx"
    if isinstance(src, UrlFile):
        for folder in src.folders:
            if (folder / src.name).is_file():
                p = folder / src.name
                return p, ((p, _size(p)),), " or ".join(str(f) for f in src.folders)
        return None, ((src.folders[0] / src.name, None),), " or ".join(str(f) for f in src.folders)
    p = Path(os.path.expanduser(os.fspath(src)))
    if p.is_dir():
        return p, tuple((f, _size(f)) for f in sorted(p.rglob("*")) if f.is_file()), str(p)
    if p.is_file():
        return p, ((p, _size(p)),), str(p)
    return None, ((p, None),), str(p)


def locate(need: Need, cache_dir: str | os.PathLike | None = None) -> Located:
    """Find ``need`` in its sources (first present wins); no network."""
    looked: list[str] = []
    first_files: tuple = ()
    for src in need.sources:
        path, files, where = _locate_source(src, cache_dir)
        if where not in looked:
            looked.append(where)
        if path is not None:
            return Located(need, path, files, tuple(looked))
        first_files = first_files or files
    return Located(need, None, first_files, tuple(looked))


# ----------------------------------------------------------------------------------------------------------------
# Downloading


def _downloadable(need: Need) -> Source | None:
    return next((s for s in need.sources if not isinstance(s, Path) and not (isinstance(s, UrlFile) and not s.url)),
                None)


def fetch(need: Need, cache_dir: str | os.PathLike | None = None) -> Located:
    """Download ``need`` from its first downloadable source, then look it up again. A failure is reported in
    ``problem`` (and leaves nothing half-made behind: see :mod:`fastface.hub`), never raised."""
    src = _downloadable(need)
    if src is None:  # a local path the user gave: nothing to download
        return locate(need, cache_dir)
    blocker = hub.download_blocker(True, hub_extra=isinstance(src, (HubFile, HubFolder)))
    if blocker is None:
        try:
            if isinstance(src, HubFile):
                hub.download_hub_file(src, cache_dir)
            elif isinstance(src, HubFolder):
                hub.download_hub_folder(src, cache_dir)
            elif isinstance(src, InsightfacePack):
                hub.download_insightface_pack(src.root, src.pack)
            else:
                hub.download_url_file(src.url, src.folders[0] / src.name)
        except Exception as exc:  # network, auth, archive problems: reported with the need
            blocker = f"the download failed ({type(exc).__name__}: {exc})"
    got = locate(need, cache_dir)
    if got.found or blocker:
        return Located(need, got.path, got.files, got.looked, "" if got.found else blocker)
    return Located(need, None, got.files, got.looked, "the download finished but the files are not where expected")


# ----------------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class FixHint:
    """How to phrase the fix: ``command`` is the one command that fetches everything (``fastface doctor ...
    --download``); ``cli`` True for the CLI's flags, False for the library's keyword names."""

    command: str
    cli: bool = False


def manual_step(src: Source, cache_dir: str | os.PathLike | None = None) -> str:
    """How to get one source by hand."""
    if isinstance(src, HubFile):
        return f"`{hub.download_command(src.repo_id, [src.path_in_repo], revision=src.revision, cache_dir=cache_dir)}`"
    if isinstance(src, HubFolder):
        return f"`{hub.download_command(src.repo_id, include=src.allow_patterns, revision=src.revision, cache_dir=cache_dir)}`"
    if isinstance(src, InsightfacePack):
        return f"unzip {src.url} into {src.folder}"
    if isinstance(src, UrlFile):
        return f"download {src.url} into {src.folders[0]}" if src.url else f"put {src.name} into {src.folders[0]}"
    return f"check the path {src}"


def describe_missing(found: Located, cli: bool, cache_dir=None) -> str:
    """One line about a missing need: what, where it was looked for, why not downloaded, how to give it."""
    n = found.need
    if all(isinstance(s, Path) for s in n.sources):  # a file the user named
        return f"{found.looked[0]}: no such {n.what} (given by {n.flag if cli else n.keyword + '='})"
    lacking = [p for p, s in found.files if s is None]
    text = ("for face photos: " if n.for_photos else "") + f"{n.what} not found (looked in {' | '.join(found.looked)}"
    if lacking and len(found.files) > 1:
        text += f"; lacking {', '.join(p.name for p in lacking)}"
    text += ")"
    if found.problem:
        text += f"; {found.problem}"
    src = _downloadable(n)
    if src is not None:
        text += f"; by hand: {manual_step(src, cache_dir)}"
    given = n.flag if cli else (f"{n.keyword}=" + (f" (CLI: {n.flag})" if n.flag else "") if n.keyword else "")
    if given:
        text += f"; or give a local copy with {given}"
    return text


class MissingWeightsError(WeightNotFoundError):
    """Weight files a run needs are missing: ``missing`` lists every one (:class:`Located`); the message names them
    all and the one command that fetches them (``fastface doctor ... --download``)."""

    def __init__(self, missing: Sequence[Located], hint: FixHint, cache_dir=None) -> None:
        self.missing, self.hint, self.cache_dir = list(missing), hint, cache_dir
        super().__init__(self.message(hint.cli))

    def message(self, cli: bool) -> str:
        """The message in the CLI's words (flags) or the library's (keyword names)."""
        parts = [f"[{i + 1}] {describe_missing(m, cli, self.cache_dir)}" for i, m in enumerate(self.missing)]
        failed = any(m.problem.startswith("the download failed") for m in self.missing)
        n = len(self.missing)
        head = f"{n} weight file{'s' if n > 1 else ''} this run needs {'are' if n > 1 else 'is'} missing: "
        blocked = [m.problem for m in self.missing if m.problem and not m.problem.startswith("the download failed")]
        if failed:
            tail = (f"The download failed (see above): check the network connection (or a proxy / HF_TOKEN), then "
                    f"run `{self.hint.command}` again, or get the files by hand as listed.")
        elif blocked:
            tail = f"{blocked[0].rstrip('.')}: fix that, then run `{self.hint.command}`."
        else:
            allow = "" if cli else " (or pass download=True)"
            tail = f"To get them all at once: `{self.hint.command}`{allow}."
        return head + " ".join(parts) + " " + tail

    def with_hint(self, hint: FixHint) -> MissingWeightsError:
        """The same error phrased for another audience (the CLI rephrases the library's)."""
        return MissingWeightsError(self.missing, hint, self.cache_dir)


def doctor_command(preset: str | None, adapter: str | None, extra: Iterable[str] = (), faces_only: bool = False) -> str:
    """``fastface doctor --preset P --adapter A ... --download``."""
    import shlex

    words = ["fastface", "doctor"]
    if preset and not faces_only:
        words += ["--preset", preset]
    if adapter:
        words += ["--adapter", adapter]
    if faces_only:
        words.append("--faces-only")
    return shlex.join([*words, *extra, "--download"])


def faces_hint(adapter: str | None, face_root: str | os.PathLike | None) -> FixHint:
    """The fix of missing face models: ``fastface doctor --adapter A --faces-only [--face-root R] --download``."""
    extra = ["--face-root", os.fspath(face_root)] if face_root is not None else []
    return FixHint(doctor_command(None, adapter, extra, faces_only=True))


def resolve_needs(
    needs: Sequence[Need],
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    hint: FixHint | None = None,
    also: Sequence[Need] = (),
) -> dict[str, Path | None]:
    """Every need's path (None for a missing optional one), looked up first, then the missing ones downloaded in
    one go when ``download``; raises one :class:`MissingWeightsError` naming every required need still missing.
    ``also``: needs of a later step (the face models photos need), never fetched here and no error on their own,
    but named in the error too when it is raised, so that one error lists everything missing."""
    found = [locate(n, cache_dir) for n in needs]
    if download:
        found = [f if f.found else fetch(f.need, cache_dir) for f in found]
    missing = [f for f in found if not f.found and not f.need.optional]
    if missing:
        later = [f for f in (locate(n, cache_dir) for n in also) if not f.found and not f.need.optional]
        raise MissingWeightsError(missing + later, hint or FixHint(doctor_command(None, None)), cache_dir)
    return {f.need.name: f.path for f in found}

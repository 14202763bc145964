"""Finding weight files: local paths, the standard Hugging Face cache, and (opt-in) downloads into that cache.

A weight reference is either a local path (file or folder) or a Hugging Face repo id with a path inside the repo
(:class:`HubFile`, :class:`HubFolder`). Files already in the Hugging Face cache are found by reading its layout
directly, without ``huggingface_hub``::

    <cache>/models--{org}--{name}/refs/{revision}            the commit a branch/tag points to ("main" by default)
    <cache>/models--{org}--{name}/snapshots/{commit}/{path}  the files (links to blobs/)

``<cache>`` is ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (huggingface_hub's own rule), read at call
time. With the default revision, a file missing from the snapshot ``refs/main`` names (or with no ``refs/main``)
is taken from another snapshot that has it, newest first, and the choice is logged; an explicit ``revision``
(a branch, tag or 40-hex commit) is never replaced by another snapshot.

Network access happens only when the caller passes ``download=True`` (the CLI's ``--download``), the optional
``hub`` extra (``huggingface_hub``) is installed, and ``HF_HUB_OFFLINE`` is not set; the file then goes into the
same cache through ``huggingface_hub.hf_hub_download`` / ``snapshot_download``. Files outside the hub (insightface's
face-analysis packs, facexlib's release files) are fetched into a temporary file or folder beside their place and
renamed into it when complete. A failed download of any kind leaves nothing behind: no partial file, no empty
folder it created (:class:`_Tidy`).

Anything missing raises :class:`WeightNotFoundError`, a subclass of both
:class:`fastface.models.loading.WeightFormatError` (so every weight problem is caught by one ``except``) and
:class:`FileNotFoundError`. Its message names the repo, the file, the cache folder searched and how to get it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastface.models.loading import WeightFormatError

logger = logging.getLogger(__name__)

__all__ = [
    "WeightNotFoundError",
    "HubFile",
    "HubFolder",
    "WeightRef",
    "hub_cache_dir",
    "is_offline",
    "download_blocker",
    "repo_cache_folder",
    "find_snapshot",
    "find_in_cache",
    "download_command",
    "resolve_file",
    "resolve_folder",
    "resolve",
    "resolve_first",
    "download_insightface_pack",
    "download_hub_file",
    "download_hub_folder",
    "download_url_file",
    "insightface_pack_url",
    "find_pack_folder",
    "facexlib_folders",
    "check_ref",
]

_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_RE = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
INSTALL_HINT = "pip install 'fastface[hub]'"
_INSTALL_HINT = INSTALL_HINT
# insightface's own release URL of its face-analysis packs when its package cannot tell (insightface 2.x: model-zoo).
INSIGHTFACE_PACK_URL = "https://github.com/deepinsight/insightface/releases/download/model-zoo/{name}.zip"


class WeightNotFoundError(WeightFormatError, FileNotFoundError):
    """A weight file or folder is neither at the given local path nor in the Hugging Face cache (nor downloadable)."""


# ----------------------------------------------------------------------------------------------------------------
# References


def _check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ValueError(
            f"{repo_id!r} is not a Hugging Face repo id; expected 'org/name' (letters, digits, '.', '_', '-'), "
            "or pass a local path"
        )
    return repo_id


def _check_rel(path: str, what: str) -> str:
    p = path.strip("/")
    if not p or any(part in ("", ".", "..") for part in p.split("/")) or "\\" in p:
        raise ValueError(f"{what} {path!r} must be a relative path inside the repo, like 'unet/config.json'")
    return p


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face model repo: ``repo_id``, ``filename``, optional ``subfolder`` and ``revision``."""

    repo_id: str
    filename: str
    subfolder: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        _check_repo_id(self.repo_id)
        _check_rel(self.filename, "filename")
        if self.subfolder is not None:
            _check_rel(self.subfolder, "subfolder")

    @property
    def path_in_repo(self) -> str:
        return _join(self.subfolder, self.filename)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}/{self.path_in_repo}"


@dataclass(frozen=True)
class HubFolder:
    """A folder of a Hugging Face model repo (the whole snapshot when ``subfolder`` is None).

    ``required``: paths relative to the folder that must be present (a snapshot lacking one is not used);
    ``allow_patterns``: what a download fetches (relative to the repo root, ``fnmatch`` style; None = everything).
    """

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None
    required: tuple[str, ...] = ()
    allow_patterns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_repo_id(self.repo_id)
        if self.subfolder is not None:
            _check_rel(self.subfolder, "subfolder")
        object.__setattr__(self, "required", tuple(_check_rel(r, "required path") for r in self.required))
        if self.allow_patterns is not None:
            object.__setattr__(self, "allow_patterns", tuple(self.allow_patterns))

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


WeightRef = HubFile | HubFolder | str | os.PathLike


def _join(subfolder: str | None, path: str) -> str:
    return f"{subfolder.strip('/')}/{path.strip('/')}" if subfolder else path.strip("/")


# ----------------------------------------------------------------------------------------------------------------
# The cache layout


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder: ``cache_dir`` if given, else the environment's (see the module doc)."""
    if cache_dir is not None:
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(cache_dir))))
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(os.path.expanduser(env[var])))
    if env.get("HF_HOME"):
        home = env["HF_HOME"]
    else:
        home = os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids network access."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def repo_cache_folder(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a model repo: ``<cache>/models--{org}--{name}``."""
    return hub_cache_dir(cache_dir) / ("models--" + _check_repo_id(repo_id).replace("/", "--"))


def _present(root: Path, rel: str) -> bool:
    return (root / rel).exists()  # False for a link to a missing blob (an interrupted download)


def _broken(root: Path, rel: str) -> bool:
    p = root / rel
    return p.is_symlink() and not p.exists()


def _snapshot_of(repo_dir: Path, revision: str) -> tuple[Path | None, str]:
    """The snapshot a revision names, and a description for messages."""
    snaps = repo_dir / "snapshots"
    if _COMMIT_RE.match(revision):
        return snaps / revision, f"commit {revision}"
    ref = repo_dir / "refs" / revision
    if not ref.is_file():
        return None, f"no refs/{revision}"
    commit = ref.read_text().strip()
    if not _COMMIT_RE.match(commit):
        return None, f"refs/{revision} holds {commit[:60]!r}, not a commit hash"
    return snaps / commit, f"refs/{revision} -> {commit}"


def _all_snapshots(repo_dir: Path) -> list[Path]:
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return []
    found = [p for p in snaps.iterdir() if p.is_dir()]
    return sorted(found, key=lambda p: (-p.stat().st_mtime, p.name))  # newest first, then by name


def find_snapshot(
    repo_id: str,
    revision: str | None = None,
    required: Iterable[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Path | None:
    """The cached snapshot folder of ``repo_id`` holding every ``required`` path, or None. No network, no extra package.

    ``revision`` None means "main" with the fallback to other snapshots described in the module doc.
    """
    repo_dir = repo_cache_folder(repo_id, cache_dir)
    required = tuple(_check_rel(r, "required path") for r in required)
    chosen, why = _snapshot_of(repo_dir, revision or "main")
    if chosen is not None and chosen.is_dir() and all(_present(chosen, r) for r in required):
        return chosen
    if revision is not None:
        return None
    for snap in _all_snapshots(repo_dir):
        if snap != chosen and all(_present(snap, r) for r in required):
            logger.info(
                "%s: using cached snapshot %s (%s%s)", repo_id, snap.name, why,
                "" if chosen is None or not chosen.is_dir() else f", which lacks {', '.join(required)}",
            )
            return snap
    return None


def find_in_cache(
    repo_id: str,
    path_in_repo: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path | None:
    """The cached file ``path_in_repo`` of ``repo_id`` (see :func:`find_snapshot`), or None."""
    rel = _check_rel(path_in_repo, "path")
    snap = find_snapshot(repo_id, revision, (rel,), cache_dir)
    return None if snap is None else snap / rel


# ----------------------------------------------------------------------------------------------------------------
# Messages


def download_command(
    repo_id: str,
    paths: Sequence[str] = (),
    *,
    revision: str | None = None,
    include: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """The ``hf download`` command (``huggingface-cli download`` before huggingface_hub 1.0) that fetches the files."""
    parts = ["hf", "download", repo_id, *paths]
    if include:
        parts += ["--include", *(f'"{p}"' for p in include)]
    if revision:
        parts += ["--revision", revision]
    if cache_dir is not None:
        parts += ["--cache-dir", str(hub_cache_dir(cache_dir))]
    return " ".join(parts)


def _state_of_cache(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> str:
    repo_dir = repo_cache_folder(repo_id, cache_dir)
    if not repo_dir.is_dir():
        return f"{repo_dir} does not exist"
    _, why = _snapshot_of(repo_dir, revision or "main")
    snaps = [p.name[:12] for p in _all_snapshots(repo_dir)]
    return f"searched {repo_dir / 'snapshots'}: {why}; snapshots: {snaps or 'none'}"


def _missing(
    what: str,
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    command: str,
    reason: str | None,
    local_hint: str,
    broken: Sequence[str] = (),
) -> WeightNotFoundError:
    rev = revision or "main"
    lines = [
        f"{repo_id}: {what} (revision {rev}) is not in the Hugging Face cache {hub_cache_dir(cache_dir)} "
        f"({_state_of_cache(repo_id, revision, cache_dir)})."
    ]
    if broken:
        lines.append(f"Broken cache links (an interrupted download?): {', '.join(broken)}; download them again.")
    if reason:
        lines.append(reason)
    if reason and reason.startswith("The download failed"):
        allow = "check the network connection and try again"
    elif reason:
        allow = "fix that and allow downloads again"
    else:
        allow = f"install the hub extra ({INSTALL_HINT}) and allow downloads (download=True, or the CLI's --download)"
    lines.append(
        f"To get it: run `{command}` (`huggingface-cli download` with huggingface_hub < 1.0); "
        f"or {allow}; or pass {local_hint} instead."
    )
    return WeightNotFoundError(" ".join(lines))


def download_blocker(download: bool, hub_extra: bool = True) -> str | None:
    """Why no download is attempted (None when one may be); ``hub_extra``: the download needs ``huggingface_hub``."""
    if not download:
        return None
    if is_offline():
        return "Downloads were allowed but HF_HUB_OFFLINE is set, so the network was not used."
    if not hub_extra:
        return None
    try:
        import huggingface_hub  # noqa: F401  (the optional `hub` extra)
    except ImportError:
        return f"Downloads were allowed but huggingface_hub is not installed ({_INSTALL_HINT})."
    return None


# ----------------------------------------------------------------------------------------------------------------
# Resolving


def _local(ref: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(ref)))


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or os.path.isabs(ref) or not _REPO_RE.match(ref)


def resolve_file(
    ref: str | os.PathLike | HubFile,
    filename: str | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Path:
    """The local path of a weight file.

    ``ref`` is a :class:`HubFile`, a local file, a local folder (with ``filename``, under ``subfolder``), or a repo id
    (with ``filename``). A repo file is looked up in the cache, then downloaded into it if ``download`` is True.
    """
    if isinstance(ref, HubFile):
        if filename is not None or subfolder is not None or revision is not None:
            raise ValueError("pass filename/subfolder/revision inside the HubFile, not beside it")
        return _hub_file(ref, cache_dir, download)
    path = _local(ref)
    text = os.fspath(ref)
    if filename is None:
        if path.is_file():
            return path
        if path.is_dir():
            raise WeightFormatError(f"{path} is a folder; give the file name inside it (filename=...)")
        if not _looks_local(text):
            raise WeightNotFoundError(
                f"{text}: no such local file; if this is the Hugging Face repo {text!r}, also give the file name "
                "inside it (filename=...)"
            )
        raise WeightNotFoundError(f"{path}: no such file")
    if path.is_dir():
        target = path / _join(subfolder, _check_rel(filename, "filename"))
        if target.is_file():
            return target
        holds = sorted(p.name for p in target.parent.iterdir()) if target.parent.is_dir() else []
        raise WeightNotFoundError(f"{target}: no such file; {target.parent} holds {holds or 'nothing'}")
    if path.is_file():
        raise WeightFormatError(f"{path} is a file; give no filename, or give the folder that holds {filename}")
    if _looks_local(text):
        raise WeightNotFoundError(f"{path}: no such local folder (looking for {_join(subfolder, filename)} in it)")
    return _hub_file(HubFile(text, filename, subfolder, revision), cache_dir, download)


def _try_download(download: bool, fetch: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fetch(), None)`` when a download may be tried and succeeds; ``(None, why not)`` otherwise (network, auth
    or a missing entry all become that one reason)."""
    reason = download_blocker(download)
    if not download or reason is not None:
        return None, reason
    try:
        return fetch(), None
    except Exception as exc:
        return None, f"The download failed: {type(exc).__name__}: {exc}"


def _hub_file(ref: HubFile, cache_dir: str | os.PathLike | None, download: bool) -> Path:
    rel = ref.path_in_repo
    found = find_in_cache(ref.repo_id, rel, ref.revision, cache_dir)
    if found is not None:
        return found
    got, reason = _try_download(download, lambda: download_hub_file(ref, cache_dir))
    if got is not None:
        if Path(got).is_file():
            return Path(got)
        reason = f"The download returned {got}, which is not a file."
    repo_dir = repo_cache_folder(ref.repo_id, cache_dir)
    snaps = _all_snapshots(repo_dir)
    broken = [str(s / rel) for s in snaps if _broken(s, rel)]
    command = download_command(ref.repo_id, [rel], revision=ref.revision, cache_dir=cache_dir)
    raise _missing(
        f"file '{rel}'", ref.repo_id, ref.revision, cache_dir, command, reason, "the local path of the file", broken
    )


def resolve_folder(
    ref: str | os.PathLike | HubFolder,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    required: Sequence[str] = (),
    allow_patterns: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Path:
    """The local path of a model folder, e.g. a diffusers repo with ``unet/``, ``text_encoder/``, ``vae/`` ...

    ``ref`` is a :class:`HubFolder`, a local folder, or a repo id. ``required`` paths (relative to the folder)
    must exist; for a repo they choose the cached snapshot. A download (``download=True``) fetches
    ``allow_patterns`` (repo-relative; None = the whole repo) with ``huggingface_hub.snapshot_download``.
    """
    if isinstance(ref, HubFolder):
        if subfolder is not None or revision is not None or required or allow_patterns is not None:
            raise ValueError("pass subfolder/revision/required/allow_patterns inside the HubFolder, not beside it")
        return _hub_folder(ref, cache_dir, download)
    path = _local(ref)
    text = os.fspath(ref)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        missing = [r for r in required if not _present(folder, _check_rel(r, "required path"))]
        if not folder.is_dir() or missing:
            holds = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise WeightNotFoundError(
                f"{folder}: " + (f"missing {missing}" if folder.is_dir() else "no such folder")
                + f"; it holds {holds or 'nothing'}"
            )
        return folder
    if path.exists():
        raise WeightFormatError(f"{path} is a file; a model folder was expected")
    if _looks_local(text):
        raise WeightNotFoundError(f"{path}: no such local folder")
    patterns = None if allow_patterns is None else tuple(allow_patterns)
    hub = HubFolder(text, subfolder, revision, tuple(required), patterns)
    return _hub_folder(hub, cache_dir, download)


def _hub_folder(ref: HubFolder, cache_dir: str | os.PathLike | None, download: bool) -> Path:
    need = tuple(_join(ref.subfolder, r) for r in ref.required) or ((ref.subfolder,) if ref.subfolder else ())
    snap = find_snapshot(ref.repo_id, ref.revision, need, cache_dir)
    if snap is not None:
        return snap / ref.subfolder if ref.subfolder else snap
    got, reason = _try_download(download, lambda: download_hub_folder(ref, cache_dir))
    if got is not None:
        lacking = [r for r in need if not _present(got, r)]
        if got.is_dir() and not lacking:
            return got / ref.subfolder if ref.subfolder else got
        reason = f"The downloaded snapshot {got} lacks {lacking} (check allow_patterns {ref.allow_patterns})."
    what = f"folder '{ref.subfolder or '.'}'" + (f" with {list(ref.required)}" if ref.required else "")
    command = download_command(
        ref.repo_id, include=ref.allow_patterns or None, revision=ref.revision, cache_dir=cache_dir
    )
    raise _missing(what, ref.repo_id, ref.revision, cache_dir, command, reason, "the local path of the folder")


def resolve(
    ref: WeightRef, *, cache_dir: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """Resolve a :class:`HubFile` / :class:`HubFolder` / local path (file or folder) to a local path."""
    if isinstance(ref, HubFolder):
        return _hub_folder(ref, cache_dir, download)
    if isinstance(ref, HubFile):
        return _hub_file(ref, cache_dir, download)
    path = _local(ref)
    if path.exists():
        return path
    raise WeightNotFoundError(
        f"{path}: no such local file or folder"
        + ("" if _looks_local(os.fspath(ref)) else "; to name a Hugging Face repo use HubFile/HubFolder")
    )


def resolve_first(
    candidates: Sequence[WeightRef], *, cache_dir: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """The first candidate already available (local or cached); else download the first one, if allowed.

    For equivalent sources, e.g. the CLIP image encoder from two repos. The error lists every candidate.
    """
    if not candidates:
        raise ValueError("resolve_first needs at least one candidate")
    errors = []
    for c in candidates:
        try:
            return resolve(c, cache_dir=cache_dir, download=False)
        except WeightNotFoundError as exc:
            errors.append(exc)
    if download:
        return resolve(candidates[0], cache_dir=cache_dir, download=True)
    if len(errors) == 1:
        raise errors[0]
    listed = " | ".join(f"[{i + 1}] {e}" for i, e in enumerate(errors))
    raise WeightNotFoundError(f"none of {len(candidates)} equivalent sources is available: {listed}") from errors[0]


# ----------------------------------------------------------------------------------------------------------------
# Weight files outside the Hugging Face hub: insightface packs and GitHub release assets


def insightface_pack_url(pack: str) -> str:
    """The URL insightface itself downloads face-analysis ``pack`` from (asked of the installed insightface, whose
    release tag changed between versions; :data:`INSIGHTFACE_PACK_URL` when it cannot tell)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # insightface 0.7 imports albumentations (no network)
    try:
        from insightface.utils import storage
    except Exception:  # not installed or not importable: the known URL
        return INSIGHTFACE_PACK_URL.format(name=pack)
    if hasattr(storage, "model_zoo_download_url"):
        return storage.model_zoo_download_url(f"{pack}.zip")
    base = getattr(storage, "BASE_REPO_URL", None)
    return f"{base.rstrip('/')}/{pack}.zip" if base else INSIGHTFACE_PACK_URL.format(name=pack)


def find_pack_folder(root: str | os.PathLike, pack: str) -> Path | None:
    """The folder of the ``.onnx`` files of insightface pack ``pack`` under ``root`` (``root/models/<pack>``, or
    ``root/models/<pack>/<pack>`` as unzipping ``antelopev2.zip`` in place gives), or None. No network."""
    folder = Path(os.path.expanduser(os.fspath(root))) / "models" / pack
    for candidate in (folder, folder / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    return None


def _tree(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.is_dir() else set()


class _Tidy:
    """Undo what a failed download created under ``folders``: folders that did not exist are removed with their
    parents that did not exist either; in folders that did, the new files and folders are removed."""

    def __init__(self, *folders: Path) -> None:
        self.before = {f: (_tree(f) if f.exists() else None) for f in folders}
        self.new_dirs: list[Path] = []
        for f in folders:
            p = f
            while not p.exists() and p != p.parent:
                self.new_dirs.append(p)
                p = p.parent

    def undo(self) -> None:
        import shutil

        for folder, before in self.before.items():
            if before is None:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for p in sorted(_tree(folder) - before, key=lambda q: -len(q.parts)):  # deepest first
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        for d in sorted(set(self.new_dirs), key=lambda q: -len(q.parts)):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: something else put files there


def _hub_tidy(repo_id: str, cache_dir: str | os.PathLike | None) -> _Tidy:
    cache = hub_cache_dir(cache_dir)
    name = repo_cache_folder(repo_id, cache_dir).name
    return _Tidy(cache / name, cache / ".locks" / name)


def download_hub_file(ref: HubFile, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download one repo file into the Hugging Face cache (``huggingface_hub``, its progress bar); a failed download
    leaves the cache as it was (no partial blob, no empty repo folder) and raises."""
    import huggingface_hub

    logger.info("downloading %s into %s", ref, hub_cache_dir(cache_dir))
    tidy = _hub_tidy(ref.repo_id, cache_dir)
    try:
        return Path(huggingface_hub.hf_hub_download(
            ref.repo_id, ref.filename, subfolder=ref.subfolder, revision=ref.revision,
            cache_dir=str(hub_cache_dir(cache_dir)),
        ))
    except BaseException:
        tidy.undo()
        raise


def download_hub_folder(ref: HubFolder, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download a repo folder's ``allow_patterns`` into the Hugging Face cache (``snapshot_download``); a failed
    download leaves the cache as it was and raises. Returns the snapshot folder."""
    import huggingface_hub

    logger.info("downloading %s into %s", ref, hub_cache_dir(cache_dir))
    tidy = _hub_tidy(ref.repo_id, cache_dir)
    try:
        return Path(huggingface_hub.snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=str(hub_cache_dir(cache_dir)),
            allow_patterns=None if ref.allow_patterns is None else list(ref.allow_patterns),
        ))
    except BaseException:
        tidy.undo()
        raise


def download_url_file(url: str, dest: Path) -> Path:
    """Fetch ``url`` into ``dest`` (through a temporary file in the same folder, renamed when complete); a failed
    download leaves no file and no folder it created."""
    tidy = _Tidy(dest.parent)
    logger.warning("downloading %s into %s", url, dest)
    try:
        _download_url(url, dest)
    except BaseException:
        tidy.undo()
        raise
    return dest


def download_insightface_pack(root: str | os.PathLike, pack: str) -> Path:
    """Fetch insightface's face-analysis ``pack`` into ``root/models/<pack>`` from the URL insightface uses
    (:func:`insightface_pack_url`). The archive is fetched and unpacked in a temporary folder beside it and renamed
    into place when complete: a failed download leaves no partial pack and no ``models`` folder it created."""
    import shutil
    import tempfile
    import zipfile

    root = Path(os.path.expanduser(os.fspath(root)))
    models, url = root / "models", insightface_pack_url(pack)
    folder = models / pack
    tidy = _Tidy(models)
    logger.warning("downloading the insightface face-analysis pack %r from %s into %s", pack, url, folder)
    tmp: Path | None = None
    try:
        models.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{pack}-", suffix=".part", dir=models))
        _download_url(url, tmp / f"{pack}.zip")
        try:
            with zipfile.ZipFile(tmp / f"{pack}.zip") as zf:
                zf.extractall(tmp / "unzipped")
        except zipfile.BadZipFile as exc:
            raise WeightFormatError(f"{url}: the download is not a zip archive ({exc})") from exc
        inner = tmp / "unzipped"
        if [p.name for p in inner.iterdir()] == [pack] and (inner / pack).is_dir():
            inner = inner / pack  # antelopev2.zip holds antelopev2/*.onnx
        if not any(inner.rglob("*.onnx")):
            raise WeightFormatError(f"{url}: the archive holds no .onnx model")
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # an empty folder left by an earlier, interrupted download
        inner.replace(folder)
    except BaseException:
        tidy.undo()
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _facexlib_weights_dir() -> Path | None:
    """facexlib's own download folder (``<site-packages>/facexlib/weights``), found without importing facexlib."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("facexlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "weights"


def _download_url(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` through a temporary file renamed when complete (no partial file is left
    behind), with a progress bar on a terminal. The only network access of fastface outside ``huggingface_hub``."""
    import tempfile
    import urllib.request

    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}", suffix=".part", delete=False) as tmp:
        part = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310  (a fixed https URL)
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                    while chunk := response.read(1 << 20):
                        tmp.write(chunk)
                        bar.update(len(chunk))
        except BaseException:
            tmp.close()
            part.unlink(missing_ok=True)
            raise
    part.replace(dest)


def facexlib_folders(folder: Path) -> list[Path]:
    """Where facexlib weight files are looked for: ``folder`` (downloads go there), then facexlib's own folder."""
    return [folder] + [d for d in (_facexlib_weights_dir(),) if d is not None]


def check_ref(name: str, value: object, optional: bool = True) -> None:
    """``value`` must be a weight reference (repo id, local path, HubFile, HubFolder); None only if ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike, HubFile, HubFolder)) or (isinstance(value, str) and not value):
        raise ValueError(f"{name} must be a repo id, a local path, a HubFile or a HubFolder, got {value!r}")

"""What a file really is, from its first bytes: weights (safetensors, PyTorch zip or pickle) or something else.

A weight file that fails to load is often not a weight file at all: a Git LFS pointer left by ``git clone``
without ``git lfs``, the HTML page of a download link, a ``config.json`` or index saved under the weights' name,
an archive, an empty file from an interrupted download. :func:`identify` names these from the file's head (and,
for safetensors and zips, its declared size), so the loaders can say what the file is and what to do, instead
of reporting a damaged pickle.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileKind", "identify"]

_HEAD = 4096
_JSON_LIMIT = 16 * 2**20  # read at most this much to confirm a JSON file
_REDOWNLOAD = "download it again (an interrupted download leaves such files)"


@dataclass(frozen=True)
class FileKind:
    """The kind of a file: ``kind`` is one of the names below; ``what`` and ``fix`` are message parts.

    Weights: ``"safetensors"``, ``"torch-zip"`` (``torch.save``'s default format), ``"pickle"`` (legacy
    ``torch.save`` or any pickle). Damaged weights: ``"truncated"``. Not weights: ``"empty"``, ``"lfs-pointer"``,
    ``"html"``, ``"json"``, ``"zip"`` (an archive of another kind), ``"archive"`` (gzip, tar, 7z, ...), ``"text"``.
    ``"unknown"``: binary data of no known kind (the loader's own error applies).
    """

    kind: str
    what: str = ""
    fix: str = ""

    @property
    def is_weights(self) -> bool:
        return self.kind in ("safetensors", "torch-zip", "pickle", "unknown")

    def message(self, path: str | os.PathLike, prefix: str = "") -> str:
        """``"<path>: [prefix: ]this is <what>, not a weight file: <fix>."`` (for kinds that are not weights)."""
        lead = f"{path}: {prefix}: " if prefix else f"{path}: "
        if self.kind == "truncated":
            return f"{lead}{self.what}; {self.fix}."
        return f"{lead}this is {self.what}, not a weight file: {self.fix}."


def identify(path: str | os.PathLike) -> FileKind:
    """The kind of the file at ``path`` from its first bytes (reads a few KB; JSON files up to 16 MB)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if size == 0:
        return FileKind("empty", "an empty file (0 bytes)", _REDOWNLOAD)
    if head.startswith(b"version https://git-lfs"):
        return _lfs_pointer(head)
    safetensors = _safetensors(path, head, size)
    if safetensors is not None:
        return safetensors
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip(path)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2..5 (torch.save's legacy format)
        return FileKind("pickle")
    archive = _archive(head)
    if archive:
        return FileKind("archive", f"a {archive} archive", "extract it first and point fastface at the weight file inside")
    text = _text(head)
    if text is None:
        return FileKind("unknown")
    stripped = text.lstrip("\ufeff \t\r\n").lower()
    if stripped.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in stripped[:1024]:
        return FileKind(
            "html",
            "an HTML page (a web page saved in place of the file: a login, error or file-viewer page)",
            "download the file itself, not its web page (on Hugging Face use the '/resolve/' link, not '/blob/')",
        )
    if stripped.startswith(("{", "[")):
        parsed = _json(path, size)
        if parsed is not None:
            return _json_kind(parsed)
    first = " ".join(text.split())[:60]
    return FileKind("text", f"a text file (it starts with {first!r})", "point fastface at the weight file itself")


def _lfs_pointer(head: bytes) -> FileKind:
    real = ""
    for line in head.decode("utf-8", "replace").splitlines():
        if line.startswith("size "):
            real = f" (the real file has {line[5:].strip()} bytes)"
    return FileKind(
        "lfs-pointer",
        f"a Git LFS pointer{real}",
        "the weights were not fetched; run `git lfs install && git lfs pull` in the cloned repository, or "
        "download the file itself",
    )


def _safetensors(path: Path, head: bytes, size: int) -> FileKind | None:
    """A safetensors file: 8-byte little-endian header length n, then n bytes of JSON header, then the data."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n > 100 * 2**20:  # not a plausible header length: a text file that happens to have '{' at byte 8
        return None
    if 8 + n > size:
        return FileKind("truncated", f"truncated safetensors file ({size} bytes; its header alone needs {8 + n})",
                        _REDOWNLOAD)
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        return FileKind("unknown")  # safetensors' own error names the damage
    if not isinstance(header, dict):
        return FileKind("unknown")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return FileKind("truncated", f"truncated safetensors file (it holds {size} of its {need} bytes)", _REDOWNLOAD)
    return FileKind("safetensors")


def _zip(path: Path) -> FileKind:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return FileKind("truncated", "truncated or damaged zip file (its end, the archive's directory, is missing: a "
                        "PyTorch checkpoint cut short?)", _REDOWNLOAD)
    if any(n.endswith("data.pkl") for n in names):
        return FileKind("torch-zip")
    shown = ", ".join(names[:5]) + (f" ... and {len(names) - 5} more" if len(names) > 5 else "")
    return FileKind("zip", f"a zip archive that is not a PyTorch checkpoint (it holds: {shown or 'nothing'})",
                    "extract it and point fastface at the weight file inside")


def _archive(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7-Zip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"Rar!"):
        return "RAR"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def _text(head: bytes) -> str | None:
    """The head decoded as text if it looks like text (UTF-8, no NUL, few control characters), else None."""
    if b"\x00" in head:
        return None
    text = head.decode("utf-8", "ignore")
    if not text or len(text.encode("utf-8")) < 0.95 * len(head):
        return None
    controls = sum(1 for c in text if ord(c) < 32 and c not in "\t\r\n\f")
    return text if controls <= 0.01 * len(text) else None


def _json(path: Path, size: int) -> object | None:
    if size > _JSON_LIMIT:
        return None
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, OSError):
        return None


def _json_kind(parsed: object) -> FileKind:
    if isinstance(parsed, dict) and "weight_map" in parsed:
        return FileKind("json", "the index of sharded weights (JSON with a 'weight_map')",
                        "point fastface at the folder that holds the index and its shard files")
    keys = ", ".join(list(parsed)[:6]) if isinstance(parsed, dict) else f"a list of {len(parsed)} items"
    hint = "a model config" if isinstance(parsed, dict) and ("_class_name" in parsed or "architectures" in parsed) else "JSON"
    return FileKind("json", f"a JSON file ({hint}: {keys})", "point fastface at the weight file itself (.safetensors or .bin)")

"""fastface.hub: local paths, a fake Hugging Face cache (refs + snapshots + blobs), env vars, errors, downloads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastface.hub as hub
from fastface.hub import HubFile, HubFolder, WeightNotFoundError
from fastface.models.loading import WeightFormatError

REPO = "org/model"
C1 = "1" * 40
C2 = "2" * 40
C3 = "3" * 40


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None = "main",
                 mtime: float | None = None) -> Path:
    """Write a snapshot as huggingface_hub does: blobs/<hash> and snapshots/<commit>/<path> links to them."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    for rel, data in files.items():
        blob = repo_dir / "blobs" / f"{abs(hash((commit, rel))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    snap.mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    if mtime is not None:
        os.utime(snap, (mtime, mtime))
    return snap


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache named by HF_HUB_CACHE, other HF variables cleared, and no network calls allowed."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    forbid_network(monkeypatch)
    return c


def forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def fail(*args, **kwargs):
        pytest.fail(f"huggingface_hub was called although downloads are not allowed: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


# ----------------------------------------------------------------------------------------------------------------
# Cache location


def test_cache_dir_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", "~/hfhome")
    assert hub.hub_cache_dir() == tmp_path / "home" / "hfhome" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hub_cache_dir() == tmp_path / "new"
    assert hub.hub_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert hub.repo_cache_folder("a/b") == tmp_path / "new" / "models--a--b"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_offline_flag(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.is_offline() is expected


# ----------------------------------------------------------------------------------------------------------------
# Finding files in the cache


def test_refs_main_names_the_snapshot(cache: Path) -> None:
    add_snapshot(cache, REPO, C1, {"w.safetensors": b"old"}, ref=None, mtime=2e9)  # newer mtime, but not main
    add_snapshot(cache, REPO, C2, {"w.safetensors": b"main"}, ref="main", mtime=1e9)
    p = hub.resolve_file(REPO, "w.safetensors")
    assert p == cache / "models--org--model" / "snapshots" / C2 / "w.safetensors"
    assert p.read_bytes() == b"main"
    assert hub.resolve(HubFile(REPO, "w.safetensors")) == p


def test_fallback_to_a_snapshot_with_the_file_is_logged(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    add_snapshot(cache, REPO, C1, {"a.bin": b"a1"}, ref=None, mtime=1e9)
    add_snapshot(cache, REPO, C2, {"a.bin": b"a2"}, ref=None, mtime=2e9)
    add_snapshot(cache, REPO, C3, {"b.bin": b"b"}, ref="main", mtime=3e9)  # main lacks a.bin
    with caplog.at_level(logging.INFO, logger="fastface.hub"):
        p = hub.resolve_file(REPO, "a.bin")
    assert p.read_bytes() == b"a2"  # the newest snapshot holding it
    assert C2 in caplog.text and "lacks a.bin" in caplog.text
    # no refs/main at all
    (cache / "models--org--model" / "refs" / "main").unlink()
    assert hub.resolve_file(REPO, "b.bin").read_bytes() == b"b"


def test_explicit_revision_is_pinned(cache: Path) -> None:
    add_snapshot(cache, REPO, C1, {"w.bin": b"v1", "only_v1.bin": b"x"}, ref="v1")
    add_snapshot(cache, REPO, C2, {"w.bin": b"main"}, ref="main")
    assert hub.resolve_file(REPO, "w.bin", revision="v1").read_bytes() == b"v1"
    assert hub.resolve_file(REPO, "w.bin", revision=C1).read_bytes() == b"v1"
    assert hub.resolve(HubFile(REPO, "w.bin", revision=C2)).read_bytes() == b"main"
    # The default revision falls back to v1's snapshot; a pinned revision never does.
    assert hub.resolve_file(REPO, "only_v1.bin").read_bytes() == b"x"
    with pytest.raises(WeightNotFoundError, match="revision main"):
        hub.resolve_file(REPO, "only_v1.bin", revision="main")
    with pytest.raises(WeightNotFoundError, match=r"no refs/v2.*--revision v2"):
        hub.resolve_file(REPO, "w.bin", revision="v2")


def test_subfolder_and_bad_ref_file(cache: Path) -> None:
    add_snapshot(cache, REPO, C1, {"models/image_encoder/model.safetensors": b"enc"})
    ref = HubFile(REPO, "model.safetensors", subfolder="models/image_encoder")
    assert ref.path_in_repo == "models/image_encoder/model.safetensors"
    assert hub.resolve(ref).read_bytes() == b"enc"
    assert hub.resolve_file(REPO, "model.safetensors", subfolder="models/image_encoder") == hub.resolve(ref)
    (cache / "models--org--model" / "refs" / "main").write_text("not-a-commit")
    # a damaged ref is reported but the file is still found in the snapshot that holds it
    assert hub.resolve(ref).read_bytes() == b"enc"


def test_missing_file_error_names_repo_file_cache_and_remedies(cache: Path) -> None:
    add_snapshot(cache, REPO, C1, {"other.bin": b""})
    with pytest.raises(WeightNotFoundError) as info:
        hub.resolve_file(REPO, "unet.safetensors", subfolder="unet")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, WeightFormatError)
    assert REPO in msg and "unet/unet.safetensors" in msg
    assert str(cache) in msg and str(cache / "models--org--model" / "snapshots") in msg
    assert f"refs/main -> {C1}" in msg
    assert f"`hf download {REPO} unet/unet.safetensors`" in msg
    assert "fastface[hub]" in msg and "download=True" in msg and "local path" in msg
    # an uncached repo says so
    with pytest.raises(WeightNotFoundError, match=r"models--other--repo does not exist"):
        hub.resolve_file("other/repo", "x.bin")


def test_broken_link_is_not_a_file(cache: Path) -> None:
    snap = add_snapshot(cache, REPO, C1, {"w.bin": b"data"})
    blob = (snap / "w.bin").resolve()
    blob.unlink()  # an interrupted download leaves the link without its blob
    with pytest.raises(WeightNotFoundError, match="Broken cache links"):
        hub.resolve_file(REPO, "w.bin")


def test_explicit_cache_dir_in_message_and_command(tmp_path: Path, cache: Path) -> None:
    other = tmp_path / "elsewhere"
    add_snapshot(other, REPO, C1, {"w.bin": b"x"})
    assert hub.resolve_file(REPO, "w.bin", cache_dir=other).read_bytes() == b"x"
    with pytest.raises(WeightNotFoundError, match=f"--cache-dir {other}"):
        hub.resolve_file(REPO, "nope.bin", cache_dir=other)


# ----------------------------------------------------------------------------------------------------------------
# Local paths and bad references


def test_local_paths(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "lora.safetensors"
    f.write_bytes(b"x")
    d = tmp_path / "model"
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "config.json").write_text("{}")
    assert hub.resolve_file(f) == f
    assert hub.resolve_file(str(f)) == f
    assert hub.resolve(f) == f
    assert hub.resolve_file(d, "config.json", subfolder="unet") == d / "unet" / "config.json"
    assert hub.resolve_folder(d, required=["unet/config.json"]) == d
    assert hub.resolve_folder(d, "unet") == d / "unet"
    with pytest.raises(WeightNotFoundError, match=r"holds \['config.json'\]"):
        hub.resolve_file(d, "weights.bin", subfolder="unet")
    with pytest.raises(WeightFormatError, match="is a file; give no filename"):
        hub.resolve_file(f, "x.bin")
    with pytest.raises(WeightNotFoundError, match="no such local folder"):
        hub.resolve_file(tmp_path / "nodir", "x.bin")
    with pytest.raises(WeightFormatError, match="is a folder"):
        hub.resolve_file(d)
    with pytest.raises(WeightNotFoundError, match="no such file"):
        hub.resolve_file(tmp_path / "missing.safetensors")
    with pytest.raises(WeightNotFoundError, match=r"missing \['vae/config.json'\]"):
        hub.resolve_folder(d, required=["vae/config.json"])
    with pytest.raises(WeightFormatError, match="is a file"):
        hub.resolve_folder(f)
    with pytest.raises(WeightNotFoundError, match="no such local folder"):
        hub.resolve_folder(tmp_path / "nowhere")
    with pytest.raises(WeightNotFoundError, match="give the file name"):
        hub.resolve_file("org/missing-thing")


def test_bad_references() -> None:
    for bad in ("a/b/c", "a--b/c", "../x", "a b/c", ""):
        with pytest.raises(ValueError, match="not a Hugging Face repo id"):
            HubFile(bad, "x.bin")
    for bad in ("../x.bin", "a//b", "", "./x"):
        with pytest.raises(ValueError, match="relative path inside the repo"):
            HubFile(REPO, bad)
    with pytest.raises(ValueError, match="relative path"):
        HubFolder(REPO, required=("../up",))
    with pytest.raises(ValueError, match="inside the HubFile"):
        hub.resolve_file(HubFile(REPO, "x.bin"), "y.bin")
    with pytest.raises(ValueError, match="at least one candidate"):
        hub.resolve_first([])


def test_download_command() -> None:
    assert hub.download_command(REPO, ["a/b.bin"]) == f"hf download {REPO} a/b.bin"
    cmd = hub.download_command(REPO, include=["unet/*", "vae/*"], revision="v1")
    assert cmd == f'hf download {REPO} --include "unet/*" "vae/*" --revision v1'


# ----------------------------------------------------------------------------------------------------------------
# Whole (diffusers) folders


SDXL_FILES = {
    "model_index.json": b"{}",
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": b"u",
    "text_encoder/config.json": b"{}",
    "text_encoder_2/config.json": b"{}",
    "vae/config.json": b"{}",
}


def test_folder_by_snapshot(cache: Path) -> None:
    snap = add_snapshot(cache, "stabilityai/sdxl", C1, SDXL_FILES)
    assert hub.resolve_folder("stabilityai/sdxl") == snap
    assert hub.resolve_folder("stabilityai/sdxl", required=["unet/config.json", "vae"]) == snap
    assert hub.resolve(HubFolder("stabilityai/sdxl", "unet", required=("config.json",))) == snap / "unet"
    # main only has part of the repo; a required part is taken from the older snapshot that has it
    add_snapshot(cache, "stabilityai/sdxl", C2, {"model_index.json": b"{}"}, ref="main")
    assert hub.resolve_folder("stabilityai/sdxl", "text_encoder_2") == snap / "text_encoder_2"
    with pytest.raises(WeightNotFoundError, match=r"folder 'unet' with \['missing.json'\].*--include \"unet/\*\""):
        hub.resolve(HubFolder("stabilityai/sdxl", "unet", required=("missing.json",), allow_patterns=("unet/*",)))


# ----------------------------------------------------------------------------------------------------------------
# Downloads (huggingface_hub replaced by fakes that write into the cache layout)


def fake_hf_hub_download(calls: list):
    def download(repo_id, filename, *, subfolder=None, revision=None, cache_dir=None, **kwargs):
        calls.append(dict(repo_id=repo_id, filename=filename, subfolder=subfolder, revision=revision,
                          cache_dir=cache_dir, **kwargs))
        rel = f"{subfolder}/{filename}" if subfolder else filename
        snap = add_snapshot(Path(cache_dir), repo_id, C3, {rel: b"downloaded"}, ref=revision or "main")
        return str(snap / rel)

    return download


def test_download_only_when_allowed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    with pytest.raises(WeightNotFoundError, match="hf download"):
        hub.resolve_file(REPO, "w.bin", subfolder="sub")  # forbid_network fails the test if called
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download(calls))
    p = hub.resolve_file(REPO, "w.bin", subfolder="sub", download=True)
    assert p.read_bytes() == b"downloaded" and p == cache / "models--org--model" / "snapshots" / C3 / "sub" / "w.bin"
    assert calls == [dict(repo_id=REPO, filename="w.bin", subfolder="sub", revision=None, cache_dir=str(cache))]
    # now cached: found again without a second download
    assert hub.resolve_file(REPO, "w.bin", subfolder="sub", download=True) == p
    assert hub.resolve(HubFile(REPO, "w.bin", subfolder="sub")) == p
    assert len(calls) == 1


def test_offline_env_blocks_downloads(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightNotFoundError, match="HF_HUB_OFFLINE is set"):
        hub.resolve_file(REPO, "w.bin", download=True)
    with pytest.raises(WeightNotFoundError, match="HF_HUB_OFFLINE is set"):
        hub.resolve_folder(REPO, download=True)


def test_missing_hub_extra(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(WeightNotFoundError, match=r"huggingface_hub is not installed \(pip install 'fastface\[hub\]'\)"):
        hub.resolve_file(REPO, "w.bin", download=True)


def test_download_failure_becomes_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def boom(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    with pytest.raises(WeightNotFoundError, match=r"The download failed: OSError: connection refused.*hf download"):
        hub.resolve_file(REPO, "w.bin", download=True)


def test_folder_download_with_patterns(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list = []

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, cache_dir, allow_patterns))
        return str(add_snapshot(Path(cache_dir), repo_id, C1, {"vae/config.json": b"{}"}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ref = HubFolder("stabilityai/sdxl", "vae", required=("config.json",), allow_patterns=("vae/config.json",))
    got = hub.resolve(ref, download=True)
    assert got == cache / "models--stabilityai--sdxl" / "snapshots" / C1 / "vae"
    assert calls == [("stabilityai/sdxl", None, str(cache), ["vae/config.json"])]
    # a download that does not bring the required files is an error, not a silent success
    bad = HubFolder("stabilityai/sdxl", "unet", required=("config.json",), allow_patterns=("vae/*",))
    with pytest.raises(WeightNotFoundError, match="lacks"):
        hub.resolve(bad, download=True)


def test_resolve_first(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    a = HubFolder("laion/clip", required=("model.safetensors",))
    b = HubFolder("h94/ip", "models/image_encoder", required=("model.safetensors",))
    with pytest.raises(WeightNotFoundError, match=r"none of 2 .*\[1\] laion/clip.*\[2\] h94/ip"):
        hub.resolve_first([a, b])
    snap = add_snapshot(cache, "h94/ip", C1, {"models/image_encoder/model.safetensors": b"e"})
    assert hub.resolve_first([a, b]) == snap / "models" / "image_encoder"  # cached second beats downloading first
    calls: list = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(add_snapshot(Path(kwargs["cache_dir"]), repo_id, C2, {"model.safetensors": b"l"}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.resolve_first([HubFolder("x/y", required=("model.safetensors",)), a], download=True).name == C2
    assert calls == ["x/y"]


def test_import_does_not_load_huggingface_hub() -> None:
    code = "import sys, fastface.hub, fastface.presets; assert 'huggingface_hub' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)

"""`fastface doctor` and missing-file errors: every file a run needs, found or missing, on a fake Hugging Face cache
and a fake insightface root; every missing part named at once; failed downloads leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface.adapters.faceid_adapter import FACEID_REPO
from fastface.adapters.pulid_adapter import EVA_CLIP_REPO, PULID_REPO
from fastface.cli import EXIT_OK, EXIT_WEIGHTS, main
from fastface.needs import MissingWeightsError
from fastface.pipeline import Pipeline
from fastface.presets import HYPER_REPO, SDXL_BASE

COMMIT = "c" * 40
BASE_FILES = {  # the fp32 files of the SDXL base folders (dtype fp32 looks for these first)
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "text_encoder_2": ("config.json", "model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
}


def add_files(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A snapshot in the real cache layout: blobs/<name>, snapshots/<commit>/<path> -> blob links, refs/main."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    for i, (rel, data) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snap


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (-1 for folders): what a command must not change."""
    return {str(p.relative_to(root)): (-1 if p.is_dir() else p.lstat().st_size) for p in sorted(root.rglob("*"))}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Hugging Face cache (HF_HOME/hub) holding the UNet, text_encoder and the Hyper LoRA, lacking
    text_encoder_2, the VAE and the FaceID adapter file; an insightface root with buffalo_l, without antelopev2."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cache = tmp_path / "hf" / "hub"
    files = {f"{part}/{name}": b"x" * (10 + i) for part in ("unet", "text_encoder")
             for i, name in enumerate(BASE_FILES[part])}
    add_files(cache, SDXL_BASE, files)
    add_files(cache, HYPER_REPO, {"Hyper-SDXL-4steps-lora.safetensors": b"l" * 1234})
    face_root = tmp_path / "insightface"
    (face_root / "models" / "buffalo_l").mkdir(parents=True)
    (face_root / "models" / "buffalo_l" / "det_10g.onnx").write_bytes(b"d" * 2000)
    (face_root / "models" / "buffalo_l" / "w600k_r50.onnx").write_bytes(b"w" * 3000)
    import fastface.hub as hub

    monkeypatch.setattr(hub, "_facexlib_weights_dir", lambda: None)  # an installed facexlib is not looked in
    return cache, face_root


DOCTOR = ["doctor", "--preset", "hyper", "--adapter", "faceid", "--dtype", "fp32", "--no-progress"]


def test_doctor_lists_every_file_found_or_missing(fake, capsys):
    cache, face_root = fake
    assert main([*DOCTOR, "--face-root", str(face_root)]) == EXIT_WEIGHTS
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows = {line[18:33].strip(): line[:17].strip() for line in lines if line.startswith(("found ", "MISSING ", "optional, missing "))}
    assert rows == {"unet": "found", "weights": "found", "text_encoder": "found", "text_encoder_2": "MISSING",
                    "vae": "MISSING", "adapter": "MISSING", "face_pack": "found"}, out
    repo_dir = cache / "models--stabilityai--stable-diffusion-xl-base-1.0"
    assert f"at {repo_dir / 'snapshots' / COMMIT / 'unet'}" in out  # where it was found
    assert "diffusion_pytorch_model.safetensors" in out and "11 B" in out  # its files, with sizes
    assert "1.2 kB" in out  # the LoRA
    assert f"looked in {repo_dir}/snapshots/*/vae" in out  # where the missing ones were looked for
    assert f"looked in {cache}/models--h94--IP-Adapter-FaceID/snapshots/*/ip-adapter-faceid_sdxl.bin" in out
    assert f"at {face_root}" in out and "5.0 kB" in out  # buffalo_l: its two .onnx files
    assert "3 of 7 parts missing" in out
    assert (f"Get them all: fastface doctor --preset hyper --adapter faceid --dtype fp32 --face-root {face_root} "
            "--download") in out


def test_doctor_json_and_exit_code(fake, capsys):
    cache, face_root = fake
    assert main([*DOCTOR, "--face-root", str(face_root), "--json"]) == EXIT_WEIGHTS
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["cache_dir"] == str(cache)
    parts = {p["name"]: p for p in report["parts"]}
    assert [n for n, p in parts.items() if not p["found"]] == ["text_encoder_2", "vae", "adapter"]
    assert parts["weights"]["size"] == 1234 and parts["weights"]["files"][0]["found"] is True
    assert parts["vae"]["local_copy_flag"] == "--base" and parts["adapter"]["local_copy_flag"] == "--adapter-file"
    assert [f["found"] for f in parts["vae"]["files"]] == [False, False]
    # the missing parts given: all found, exit 0
    snap = cache / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / COMMIT
    for part in ("text_encoder_2", "vae"):
        for name in BASE_FILES[part]:
            (snap / part).mkdir(exist_ok=True)
            (snap / part / name).write_bytes(b"y")
    add_files(cache, FACEID_REPO, {"ip-adapter-faceid_sdxl.bin": b"a"})
    assert main([*DOCTOR, "--face-root", str(face_root), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["ok"] is True
    # without the face pack: missing unless the faces are face files (--no-faces)
    assert main([*DOCTOR, "--face-root", str(face_root.parent / "none")]) == EXIT_WEIGHTS
    assert main([*DOCTOR, "--face-root", str(face_root.parent / "none"), "--no-faces"]) == EXIT_OK


def test_pulid_face_models_are_asked_of_the_adapter(fake, capsys, tmp_path):
    cache, face_root = fake
    add_files(cache, EVA_CLIP_REPO, {"EVA02_CLIP_L_336_psz14_s6B.pt": b"e"})
    code = main(["doctor", "--adapter", "pulid", "--faces-only", "--face-root", str(face_root), "--json"])
    parts = {p["name"]: p for p in json.loads(capsys.readouterr().out)["parts"]}
    assert code == EXIT_WEIGHTS and list(parts) == ["eva", "face_parser", "face_detector", "face_pack"]
    assert parts["eva"]["found"] and not parts["face_parser"]["found"] and not parts["face_pack"]["found"]
    assert parts["face_detector"]["optional"] and parts["face_parser"]["looked_in"] == [
        str(face_root / "models" / "facexlib")]
    assert parts["face_pack"]["looked_in"] == [f"{face_root}/models/antelopev2/*.onnx"]


def test_from_pretrained_names_every_missing_part(fake, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        Pipeline.from_pretrained("hyper", "faceid", device="cpu", dtype="fp32", face_root=tmp_path / "no-root")
    msg = str(err.value)
    # the face models photos will need are named too (not required to load: face files need none)
    assert [m.need.name for m in err.value.missing] == ["text_encoder_2", "vae", "adapter", "face_pack"]
    assert "for face photos: insightface model pack 'buffalo_l' not found" in msg
    assert "face_root= (CLI: --face-root)" in msg
    assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
    for part in ('--include "text_encoder_2/config.json"', '--include "vae/config.json"',
                 f"hf download {FACEID_REPO} ip-adapter-faceid_sdxl.bin"):
        assert part in msg
    assert msg.startswith("4 weight files this run needs are missing")
    assert "`fastface doctor --preset hyper --adapter faceid --download` (or pass download=True)" in msg
    assert "give a local copy with base= (CLI: --base)" in msg and "adapter_file= (CLI: --adapter-file)" in msg


def test_generate_names_every_missing_part_with_the_doctor_command(fake, capsys):
    cache, face_root = fake
    before = tree(cache.parent.parent)
    args = ["generate", "--adapter", "faceid", "--face", "me.png", "-p", "x", "--dtype", "fp32", "--device", "cpu",
            "--face-root", str(face_root.parent / "elsewhere"), "--no-progress"]
    assert main(args) == EXIT_WEIGHTS
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastface: error: 4 weight files")
    for name in ("text_encoder_2", "vae/config.json", "ip-adapter-faceid_sdxl.bin", "model pack 'buffalo_l'"):
        assert name in err
    assert (f"fastface doctor --preset hyper --adapter faceid --dtype fp32 --face-root {face_root.parent / 'elsewhere'}"
            " --download") in err
    assert "--face-root" in err and "face_root=" not in err and "download=True" not in err  # the CLI's flags
    assert "https://github.com/deepinsight/insightface/releases/download/" in err
    # a face file needs no face models: the pack is not asked for
    assert main([*args[:4], "me.safetensors", *args[5:]]) == EXIT_WEIGHTS
    assert "buffalo_l" not in capsys.readouterr().err
    assert tree(cache.parent.parent) == before  # nothing written


def _failing_downloads(monkeypatch):
    """Every downloader starts writing, then the network fails."""
    import huggingface_hub

    import fastface.hub as hub

    def hf_file(repo_id, filename, *, cache_dir, **kw):
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / "abc.incomplete").write_bytes(b"half")
        (Path(cache_dir) / ".locks" / repo.name).mkdir(parents=True, exist_ok=True)
        raise ConnectionError("network is unreachable")

    def hf_folder(repo_id, *, cache_dir, **kw):
        return hf_file(repo_id, "x", cache_dir=cache_dir)

    def url(url, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        (dest.parent / f".{dest.name}.part").write_bytes(b"half")
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hf_folder)
    monkeypatch.setattr(hub, "_download_url", url)


def test_failed_downloads_leave_nothing_behind(fake, capsys, monkeypatch, tmp_path):
    cache, face_root = fake
    _failing_downloads(monkeypatch)
    empty_root = tmp_path / "new-root"  # does not exist: a failed pack download must not create it
    before = tree(tmp_path)
    code = main(["doctor", "--adapter", "pulid", "--dtype", "fp32", "--face-root", str(empty_root), "--download",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == EXIT_WEIGHTS
    assert out.count("the download failed (ConnectionError: network is unreachable") == 7  # 6 required + RetinaFace
    assert "allow downloads" not in out and "Not fetched: see the reason under each missing part" in out
    assert tree(tmp_path) == before and not empty_root.exists()
    # generate --download: the same, said in one line, and no "allow downloads"
    code = main(["generate", "--adapter", "faceid", "--face", "me.png", "-p", "x", "--dtype", "fp32", "--device",
                 "cpu", "--face-root", str(empty_root), "--download", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_WEIGHTS and "the download failed (ConnectionError" in err and "allow downloads" not in err
    assert "check the network connection" in err and "--download` again" in err
    assert tree(tmp_path) == before
    # the library's error from a failed download says so too
    with pytest.raises(MissingWeightsError, match=r"the download failed \(ConnectionError") as exc:
        Pipeline.from_pretrained("hyper", "faceid", device="cpu", dtype="fp32", download=True)
    assert "allow downloads" not in str(exc.value)
    assert tree(tmp_path) == before


def test_pack_download_is_atomic(tmp_path, monkeypatch):
    """A pack arrives whole (renamed into place from a temporary folder) or not at all."""
    import zipfile

    import fastface.hub as hub

    def good(url, dest):
        with zipfile.ZipFile(dest, "w") as zf:  # antelopev2.zip's layout: a top folder named after the pack
            zf.writestr("antelopev2/scrfd_10g_bnkps.onnx", b"d")
            zf.writestr("antelopev2/glintr100.onnx", b"r")

    monkeypatch.setattr(hub, "_download_url", good)
    root = tmp_path / "root"
    (root / "models" / "antelopev2").mkdir(parents=True)  # an empty folder from an earlier failed attempt
    folder = hub.download_insightface_pack(root, "antelopev2")
    assert sorted(p.name for p in folder.iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    assert sorted(p.name for p in (root / "models").iterdir()) == ["antelopev2"]

    def not_a_zip(url, dest):
        dest.write_bytes(b"<html>rate limited</html>")

    monkeypatch.setattr(hub, "_download_url", not_a_zip)
    with pytest.raises(ValueError, match="not a zip archive"):
        hub.download_insightface_pack(tmp_path / "other", "buffalo_l")
    assert not (tmp_path / "other").exists()


def test_insightface_url_is_the_one_insightface_uses(tmp_path, monkeypatch):
    from insightface.utils import storage

    import fastface.hub as hub

    tried = []

    def capture(url, path=None, overwrite=False, sha1_hash=None):
        tried.append(url)
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(storage, "download_file", capture)
    with pytest.raises(ConnectionError):
        storage.download("models", "buffalo_l", root=str(tmp_path))
    assert tried == [hub.insightface_pack_url("buffalo_l")]
    # insightface 0.7.3's storage module: no model_zoo_download_url, BASE_REPO_URL names the v0.7 release
    monkeypatch.delattr(storage, "model_zoo_download_url", raising=False)
    monkeypatch.setattr(storage, "BASE_REPO_URL", "https://github.com/deepinsight/insightface/releases/download/v0.7")
    assert hub.insightface_pack_url("antelopev2") == (
        "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip")


def test_face_files_refuse_non_finite_embeddings(tmp_path):
    from safetensors.torch import save_file

    from fastface.face_files import load_face_file

    emb = np.ones(512, np.float32)
    emb[3] = np.nan
    np.save(tmp_path / "nan.npy", emb)
    with pytest.raises(ValueError, match=r"nan.npy: the face embedding holds non-finite values \(1 NaN, 0 Inf"):
        load_face_file(tmp_path / "nan.npy")
    save_file({"embedding": torch.full((512,), float("inf"))}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(ValueError, match=r"inf.safetensors: tensor 'embedding' holds non-finite values"):
        load_face_file(tmp_path / "inf.safetensors")


def test_importing_the_face_module_stops_albumentations_update_checks():
    code = "import os, fastface.adapters.faces; print(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))"
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr


def test_offline_download_says_why(fake, capsys, monkeypatch, tmp_path):
    _failing_downloads(monkeypatch)  # a network call would show up as "the download failed"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree(tmp_path)
    code = main(["generate", "--adapter", "faceid", "--face", "me.png", "-p", "x", "--dtype", "fp32", "--device",
                 "cpu", "--face-root", str(tmp_path / "new-root"), "--download", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_WEIGHTS and "the download failed" not in err
    assert err.count("HF_HUB_OFFLINE is set, so the network was not used") == 5  # 3 hub files + the face pack, and the closing advice
    assert "fix that, then run `fastface doctor --preset hyper --adapter faceid" in err
    assert tree(tmp_path) == before


def test_doctor_download_fetches_everything_missing_in_one_go(fake, capsys, monkeypatch, tmp_path):
    import zipfile

    import huggingface_hub

    import fastface.hub as hub

    cache, face_root = fake
    calls: list[str] = []

    def hf_file(repo_id, filename, *, subfolder=None, revision=None, cache_dir, **kw):
        calls.append(f"{repo_id}/{filename}")
        return str(add_files(Path(cache_dir), repo_id, {filename: b"f"}) / filename)

    def hf_folder(repo_id, *, revision=None, cache_dir, allow_patterns, **kw):
        calls.append(f"{repo_id}:{','.join(allow_patterns)}")
        snap = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT
        for rel in allow_patterns:  # the patterns are the exact files
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).write_bytes(b"s")
        return str(snap)

    def url(u, dest):  # as hub._download_url: makes the folder, writes the file
        calls.append(u)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.suffix == ".zip":
            with zipfile.ZipFile(dest, "w") as zf:
                zf.writestr("antelopev2/glintr100.onnx", b"r")
        else:
            dest.write_bytes(b"u")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hf_folder)
    monkeypatch.setattr(hub, "_download_url", url)
    args = ["doctor", "--adapter", "pulid", "--dtype", "fp32", "--face-root", str(face_root), "--no-progress"]
    assert main([*args, "--download"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "MISSING" not in out and "all 10 parts found" in out
    assert len(calls) == 7  # text_encoder_2, vae, the PuLID file, EVA, BiSeNet, RetinaFace, antelopev2: once each
    assert f"{PULID_REPO}/pulid_v1.bin" in calls and hub.insightface_pack_url("antelopev2") in calls
    assert main(args) == EXIT_OK and len(calls) == 7  # all found now, nothing fetched again
    assert sorted(p.name for p in (face_root / "models").iterdir()) == ["antelopev2", "buffalo_l", "facexlib"]

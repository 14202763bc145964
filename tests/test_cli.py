"""The ``fastface`` command as a user runs it (subprocesses): selfcheck, generate from a fake Hugging Face cache,
the PNG metadata (and regenerating an image from it), and every error path with its exit code."""

from __future__ import annotations

import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastface.cli import EXIT_FACE, EXIT_USAGE, EXIT_WEIGHTS, main
from fastface.pipeline import METADATA_KEY, Pipeline
from fastface.adapters.faceid_adapter import CLIP_H_REPO, FACEID_REPO
from fastface.adapters.pulid_adapter import BISENET_URL, EVA_CLIP_REPO, PULID_REPO
from fastface.face_files import save_face_file
from fastface.presets import HYPER_REPO, SDXL_BASE
from fastface.selfcheck import NOT_MEANINGFUL, tiny_face, write_tiny_weights

sys.path.insert(0, str(Path(__file__).parent))
import onnx_face_models  # noqa: E402  (needs the onnx package of the test extra)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
COMMIT = "a1" * 20
_script = Path(sys.executable).parent / "fastface"
FASTFACE = [str(_script)] if _script.is_file() else [sys.executable, "-m", "fastface.cli"]


def add_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """A repo in the huggingface_hub cache layout: refs/main -> snapshots/<commit>/<files>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for rel, src in files.items():
        dst = repo_dir / "snapshots" / COMMIT / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny weights under the presets' real repo ids and file names, a face file, tiny insightface packs (buffalo_l,
    antelopev2) and facexlib's BiSeNet file (random weights) where PuLID looks for it."""
    root = tmp_path_factory.mktemp("cli")
    w = write_tiny_weights(root / "w")
    cache = root / "hub"
    add_snapshot(cache, SDXL_BASE, {str(p.relative_to(w.base)): p for p in w.base.rglob("*") if p.is_file()})
    add_snapshot(cache, HYPER_REPO, {"Hyper-SDXL-4steps-lora.safetensors": w.lora})
    add_snapshot(cache, FACEID_REPO, {"ip-adapter-faceid-plusv2_sdxl.bin": w.adapter_bin})
    add_snapshot(cache, CLIP_H_REPO, {p.name: p for p in w.image_encoder.iterdir()})
    add_snapshot(cache, PULID_REPO, {"pulid_v1.bin": w.pulid_v1, "pulid_v1.1.safetensors": w.pulid_v11})
    add_snapshot(cache, EVA_CLIP_REPO, {"EVA02_CLIP_L_336_psz14_s6B.pt": w.eva})
    from fastface.adapters.pulid_faces import BiSeNet

    onnx_face_models.make_pack(root / "insightface", "antelopev2", seed=1)
    (root / "insightface" / "models" / "facexlib").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(BiSeNet().state_dict(), root / "insightface" / "models" / "facexlib" / "parsing_bisenet.pth")
    save_face_file(root / "me.safetensors", tiny_face())
    np.save(root / "emb.npy", np.asarray(tiny_face().embedding))
    onnx_face_models.make_pack(root / "insightface", "buffalo_l")
    Image.fromarray(onnx_face_models.face_image(256, ((96, 64, 32),))).save(root / "photo.png")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "black.png")
    (root / "notes.jpg").write_text("not an image")
    variables = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return root, variables


def run(env, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    root, variables = env
    if cache is not None:
        variables = {**variables, "HF_HUB_CACHE": str(cache)}
    return subprocess.run([*FASTFACE, *args], cwd=root, env=variables, capture_output=True, text=True, timeout=300)


TINY = ["--height", "64", "--width", "64", "--device", "cpu", "--dtype", "fp32", "--no-progress"]


def test_help_covers_every_pipeline_option(env):
    res = run(env, "generate", "--help")
    assert res.returncode == 0
    text = res.stdout
    call = set(inspect.signature(Pipeline.__call__).parameters) - {"self", "prompt", "face", "callback",
                                                                   "method_options", "sampler_params"}
    load = set(inspect.signature(Pipeline.from_pretrained).parameters) - {"recipe_overrides", "fuse_adapter_lora"}
    flags = {"--" + name.replace("_", "-") for name in call | load}
    flags |= {"--prompt", "--face", "--set", "--sampler-param", "--output", "--no-progress"}
    assert sorted(f for f in flags if f not in text) == []
    assert "exit codes" in text and "--download" in text
    top = run(env, "--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("generate", "embed", "selfcheck"))


def test_selfcheck(env):
    res = run(env, "selfcheck")
    assert res.returncode == 0, res.stderr
    assert "NOT meaningful" in res.stdout and NOT_MEANINGFUL in res.stdout
    assert res.stdout.count("\nok ") == 11 and "FAIL" not in res.stdout
    assert res.stdout.count(" pulid ") == 2 and res.stdout.count(" pulid-v1.1 ") == 1


def test_generate_from_the_hf_cache_and_reproduce_from_metadata(env, monkeypatch):
    root, variables = env
    args = ["generate", "--preset", "hyper", "--adapter", "faceid-plusv2", "--face", "photo.png", "--face",
            "me.safetensors", "--face-root", "insightface", "--prompt", "a photo of a person", "--seed", "7",
            "--num-images", "2", "--method", "fastface-am1", "--set", "alpha=1,2,2,1", "--ip-scale", "0.7",
            "-o", "out/img.png", *TINY]
    res = run(env, *args)
    assert res.returncode == 0, res.stderr
    paths = [root / "out" / "img-0.png", root / "out" / "img-1.png"]
    assert res.stdout.split() == [str(Path("out/img-0.png")), str(Path("out/img-1.png"))]
    metas = []
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (64, 64)
            metas.append(json.loads(im.text[METADATA_KEY]))
    assert [m["seed"] for m in metas] == [7, 8]
    m = metas[1]
    assert (m["preset"], m["adapter"], m["method"], m["steps"], m["sampler"]) == (
        "hyper", "faceid-plusv2", "fastface-am1", 4, "ddim")
    assert m["method_options"] == {"alpha": [1, 2, 2, 1]} and m["ip_scale"] == 0.7 and m["num_images"] == 1
    assert m["face"]["crops"] == 2 and "photo.png" in m["face"]["source"]
    assert SDXL_BASE.replace("/", "--") in m["weights"]["unet"]  # found in the cache
    # the stored command regenerates image 1 alone (same seed, batch of one): the same PNG pixels
    words = shlex.split(m["command"])
    assert words[:2] == ["fastface", "generate"] and "--seed" in words and words[words.index("--seed") + 1] == "8"
    words[words.index("--output") + 1] = str(root / "again.png")
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_CACHE", variables["HF_HUB_CACHE"])
    assert main(words[1:] + ["--no-progress"]) == 0
    with Image.open(root / "again.png") as a, Image.open(paths[1]) as b:
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["generate", "--prompt", "x"], EXIT_USAGE, "the following arguments are required: --face"),
        (["generate", "--face", "me.safetensors", "-p", "x", "--method", "magic"], EXIT_USAGE, "invalid choice"),
        (["generate", "--face", "me.safetensors", "-p", "x", "--set", "zeta=1"], EXIT_USAGE,
         "unknown setting(s) ['zeta']"),
        (["generate", "--face", "me.safetensors", "-p", "x", "--steps", "3"], EXIT_USAGE, "8 steps only, not 3"),
        (["generate", "--face", "me.safetensors", "-p", "x", "--set", "alpha"], EXIT_USAGE, "--set takes KEY=VALUE"),
        (["generate", "--face", "me.safetensors", "-p", "x", "--preset", "lightning"], EXIT_WEIGHTS,
         "ByteDance/SDXL-Lightning"),
        (["generate", "--face", "black.png", "--face-root", "insightface", "-p", "x"], EXIT_FACE, "no face found"),
        (["generate", "--face", "notes.jpg", "--face-root", "insightface", "-p", "x"], EXIT_FACE, "cannot read"),
        (["generate", "--face", "emb.npy", "-p", "x"], EXIT_FACE, "needs the aligned face crop"),
        (["generate", "--face", "photo.png", "--face-root", "nowhere", "-p", "x"], EXIT_WEIGHTS,
         "model pack 'buffalo_l' not found"),
    ],
    ids=["no-face-option", "bad-choice", "bad-setting", "unreleased-steps", "bad-set", "missing-weights", "no-face",
         "unreadable-photo", "embedding-without-crop", "missing-face-pack"],
)
def test_error_paths(env, args, code, message):
    res = run(env, *args, *TINY)
    assert res.returncode == code, (res.stdout, res.stderr)
    last = res.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith(("fastface: error:", "fastface generate: error:")), res.stderr
    if code != EXIT_USAGE or "required" not in message:
        assert "Traceback" not in res.stderr


def test_missing_weights_names_the_file_and_the_fix(env, tmp_path):
    res = run(env, "generate", "--face", "me.safetensors", "-p", "x", *TINY, cache=tmp_path / "empty")
    assert res.returncode == EXIT_WEIGHTS
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stabilityai/stable-diffusion-xl-base-1.0" in lines[0]
    assert "--download" in lines[0] and "hf download" in lines[0]


def test_embed_writes_a_face_file(env, monkeypatch):
    root, _ = env
    monkeypatch.chdir(root)
    assert main(["embed", "--face", "photo.png", "--face-root", "insightface", "-o", "photo.safetensors"]) == 0
    from fastface.face_files import load_face_file

    face = load_face_file(root / "photo.safetensors")
    assert face.crop.shape == (224, 224, 3) and abs(float(np.linalg.norm(face.embedding)) - 1) < 1e-5
    assert main(["embed", "--face", "black.png", "--face-root", "insightface", "-o", "x.safetensors"]) == EXIT_FACE
    assert main(["embed", "--face", "photo.png", "-o", "x.npy"]) == EXIT_USAGE


def test_embed_keeps_an_existing_file_unless_overwrite(env, monkeypatch, capsys):
    root, _ = env
    monkeypatch.chdir(root)
    (root / "mine.safetensors").write_bytes(b"precious")
    args = ["embed", "--face", "photo.png", "--face-root", "insightface", "-o", "mine.safetensors"]
    assert main(args) == EXIT_USAGE
    assert "exists and is kept" in capsys.readouterr().err and (root / "mine.safetensors").read_bytes() == b"precious"
    assert main([*args, "--overwrite"]) == 0
    from fastface.face_files import load_face_file

    assert load_face_file(root / "mine.safetensors").crop.shape == (224, 224, 3)


def test_face_pack_is_downloaded_only_when_allowed(tmp_path, monkeypatch):
    import zipfile

    import fastface.hub as hub
    from fastface.face_files import open_face_analyzer
    from fastface.models.loading import WeightFormatError

    calls = []
    onnx_face_models.make_pack(tmp_path / "made", "buffalo_l")

    def fake_download(url, dest):  # the release zip of insightface's URL, built from a tiny pack
        calls.append(url)
        with zipfile.ZipFile(dest, "w") as zf:
            for f in (tmp_path / "made" / "models" / "buffalo_l").iterdir():
                zf.write(f, f.name)

    monkeypatch.setattr(hub, "_download_url", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    root = tmp_path / "root"
    with pytest.raises(WeightFormatError, match="not found"):
        open_face_analyzer(root, "buffalo_l")
    assert calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightFormatError, match="not found"):
        open_face_analyzer(root, "buffalo_l", download=True)
    assert not root.exists()  # nothing made
    monkeypatch.delenv("HF_HUB_OFFLINE")
    analyzer = open_face_analyzer(root, "buffalo_l", download=True)
    assert calls == [hub.insightface_pack_url("buffalo_l")] and analyzer.pack == "buffalo_l"
    assert sorted(p.name for p in (root / "models").iterdir()) == ["buffalo_l"]  # no zip, no temporary folder left


# ----------------------------------------------------------------------------------------------------------------
# PuLID


def test_generate_pulid_from_a_photo(env):
    """antelopev2 (face root) + BiSeNet (face root's models/facexlib) + EVA-CLIP and pulid_v1.bin (HF cache)."""
    root, _ = env
    res = run(env, "generate", "--adapter", "pulid", "--face", "photo.png", "--face-root", "insightface", "--prompt",
              "a photo of a person", "--seed", "3", "--method", "fastface-am1", "-o", "pulid.png", *TINY)
    assert res.returncode == 0, res.stderr
    with Image.open(root / "pulid.png") as im:
        assert im.size == (64, 64)
        m = json.loads(im.text[METADATA_KEY])
    assert (m["adapter"], m["method"], m["ip_scale"], m["lora_scale"]) == ("pulid", "fastface-am1", 0.8, None)
    assert (m["pulid"]["mode"], m["pulid"]["num_zero"], m["pulid"]["projection"]) == ("fidelity", 8, "ortho_v2")
    assert m["face"]["photos"] == 1 and "photo.png" in m["face"]["source"]
    assert PULID_REPO.replace("/", "--") in m["weights"]["adapter"]
    assert EVA_CLIP_REPO.replace("/", "--") in m["weights"]["eva"]
    assert m["weights"]["face_parser"].endswith(str(Path("insightface/models/facexlib/parsing_bisenet.pth")))
    assert "--adapter pulid" in m["command"]


def test_embed_pulid_face_file(env, monkeypatch):
    from fastface.adapters.pulid_identity import load_pulid_face_file

    root, variables = env
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_CACHE", variables["HF_HUB_CACHE"])
    args = ["embed", "--adapter", "pulid", "--face", "photo.png", "--face-root", "insightface", "--device", "cpu"]
    assert main([*args, "-o", "pulid-face.safetensors"]) == 0
    person = load_pulid_face_file(root / "pulid-face.safetensors")
    assert person.id_cond.shape == (1, 512 + 32) and len(person.hidden_states) == 5  # the tiny EVA's widths
    assert main(["embed", "--adapter", "faceid", "--eva", "x.pt", "--face", "photo.png", "-o", "x.safetensors"]) == 2


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--adapter", "pulid", "--face", "photo.png", "--cache-dir", "empty-cache"], EXIT_WEIGHTS,
         "hf download QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt"),
        (["--adapter", "pulid", "--face", "photo.png", "--face-root", "nowhere"], EXIT_WEIGHTS, BISENET_URL),
        (["--adapter", "pulid", "--face", "photo.png", "--eva", "no-eva.pt"], EXIT_WEIGHTS, "no-eva.pt: no such"),
        (["--adapter", "pulid", "--face", "emb.npy"], EXIT_FACE, "PuLID needs photos or a PuLID face file"),
        (["--adapter", "pulid-v1.1", "--face", "me.safetensors"], EXIT_FACE, "no 'pulid_id_cond'"),
        (["--adapter", "faceid", "--face", "emb.npy", "--pulid-mode", "style"], EXIT_USAGE, "is a PuLID option"),
        (["--adapter", "pulid", "--face", "photo.png", "--lora-scale", "0.5"], EXIT_USAGE, "PuLID has no LoRA"),
        (["--adapter", "pulid-v1.1", "--face", "photo.png", "--id-mix"], EXIT_USAGE, "--id-mix is a PuLID v1 option"),
        (["--adapter", "pulid", "--face", "photo.png", "--face-detector", "nowhere.pth"], EXIT_WEIGHTS,
         "nowhere.pth: no such RetinaFace file"),
        (["--adapter", "faceid", "--face", "emb.npy", "--face-detector", "x.pth"], EXIT_USAGE, "is a PuLID option"),
    ],
    ids=["missing-eva", "missing-bisenet", "missing-local-eva", "embedding", "faceid-face-file", "mode-not-pulid",
         "lora-scale", "id-mix-v1.1", "missing-local-detector", "detector-not-pulid"],
)
def test_pulid_error_paths(env, monkeypatch, capsys, args, code, message):
    root, variables = env
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_CACHE", variables["HF_HUB_CACHE"])
    if "--face-root" not in args:
        args = [*args, "--face-root", "insightface"]
    assert main(["generate", "-p", "x", *args, *TINY]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastface: error:") and message in lines[0], lines


def test_pulid_alignment_retinaface_or_keypoints(env, monkeypatch, caplog, tmp_path):
    """--face-detector FILE: photos aligned with RetinaFace (recorded in the PNG and the face file, and in the
    regenerating command); without the file: insightface keypoints and the warning saying how to get it."""
    from test_pipeline_pulid import write_tiny_retinaface

    from fastface.adapters.pulid_identity import load_pulid_face_file

    root, variables = env
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_CACHE", variables["HF_HUB_CACHE"])
    monkeypatch.setattr("fastface.hub._facexlib_weights_dir", lambda: None)
    det = write_tiny_retinaface(tmp_path / "detection_Resnet50_Final.pth", root / "photo.png")
    gen = ["generate", "--adapter", "pulid", "--face", "photo.png", "--face-root", "insightface", "-p", "x",
           "--method", "baseline", "--seed", "1", *TINY]
    with caplog.at_level("INFO", logger="fastface"):
        assert main([*gen, "--face-detector", str(det), "-o", "rf.png"]) == 0
    assert "aligned as upstream" in caplog.text and "differs from upstream" not in caplog.text
    with Image.open(root / "rf.png") as im:
        m = json.loads(im.text[METADATA_KEY])
    assert m["pulid"]["alignment"] == "retinaface" and m["weights"]["face_detector"] == str(det)
    assert f"--face-detector {det}" in m["command"]
    assert main(["embed", "--adapter", "pulid", "--face", "photo.png", "--face-root", "insightface", "--device",
                 "cpu", "--face-detector", str(det), "-o", "rf.safetensors"]) == 0
    assert load_pulid_face_file(root / "rf.safetensors").alignment == "retinaface"
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastface"):
        assert main([*gen, "-o", "kp.png"]) == 0
    assert "differs from upstream" in caplog.text and "--face-detector" in caplog.text
    with Image.open(root / "kp.png") as im:
        m = json.loads(im.text[METADATA_KEY])
    assert m["pulid"]["alignment"] == "insightface-keypoints" and "face_detector" not in m["weights"]

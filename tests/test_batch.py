"""Batch generation (prompts file x identities folder) on tiny random weights: a 2-process torchrun (gloo, CPU)
gives the single-process images bit for bit, a resumed run regenerates nothing, a half-finished run regenerates
only what is missing; conflicting files are refused (or overwritten on request); the engine's pieces alone.
``python -m fastface generate ARGS`` (what torchrun runs) and ``fastface generate ARGS`` (``cli.main``) are the
same command: both are driven here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastface import cli
from fastface.batch import BatchTask, batch_mode, plan_batch
from fastface.eval.data import Identity, load_identities
from fastface.jobs import (
    RankInfo,
    atomic_write,
    rank_device,
    rank_info,
    read_png_json,
    run_each,
    save_png_json,
    shard,
    total,
)
from fastface.face_files import save_face_file
from fastface.selfcheck import tiny_face

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a person", "A person reading in a library", "oil painting; person on a boat"]


def main(argv: list[str]) -> int:
    """``fastface generate ARGS``, in process."""
    return cli.main(["generate", *argv])


def _data(root: Path) -> tuple[Path, Path]:
    """Three identities: two face files and a subfolder of two face files (several photos of one person)."""
    faces = root / "faces"
    (faces / "cid").mkdir(parents=True)
    save_face_file(faces / "ann.safetensors", tiny_face(1))
    save_face_file(faces / "bob.safetensors", tiny_face(2))
    save_face_file(faces / "cid" / "a.safetensors", tiny_face(3))
    save_face_file(faces / "cid" / "b.safetensors", tiny_face(4))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return prompts, faces


def _one_person(root: Path, prompts_text: str) -> tuple[Path, Path]:
    """A prompts file and a faces folder holding one person, ann."""
    prompts, faces = root / "p.txt", root / "faces"
    faces.mkdir()
    save_face_file(faces / "ann.safetensors", tiny_face(1))
    prompts.write_text(prompts_text, encoding="utf-8")
    return prompts, faces


def _args(prompts: Path, faces: Path, out: Path, *extra: str) -> list[str]:
    return ["--selfcheck-weights", "--prompts-file", str(prompts), "--faces-dir", str(faces), "--out-dir", str(out),
            "--no-progress", *extra]


def _pngs(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*.png"))}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _summary(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_torchrun_two_ranks_equal_single_process_and_resume_regenerates_nothing(tmp_path, capsys):
    prompts, faces = _data(tmp_path)
    single, dist = tmp_path / "single", tmp_path / "dist"
    assert main(_args(prompts, faces, single, "--summary", str(tmp_path / "single.json"))) == 0
    assert "total: 9 generated, 0 skipped, 0 failed" in capsys.readouterr().out
    images = _pngs(single)
    assert len(images) == 9 and {k.split("/")[0] for k in images} == {"ann", "bob", "cid"}

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fastface", "generate", *_args(prompts, faces, dist, "--summary", str(tmp_path / "dist.json"))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(tmp_path / "dist.json")
    assert [(r["rank"], r["generated"], r["skipped"], r["failed"]) for r in summary["ranks"]] == [(0, 5, 0, 0),
                                                                                                   (1, 4, 0, 0)]
    assert (summary["total"]["generated"], summary["total"]["failed"]) == (9, 0)
    assert "total: 9 generated, 0 skipped, 0 failed" in proc.stdout  # rank 0 prints the total
    # the same files, pixel for pixel (the PNG bytes differ only by the temporary weight paths in the metadata)
    assert list(_pngs(dist)) == list(images)
    for rel, path in images.items():
        assert np.array_equal(_pixels(path), _pixels(dist / rel)), rel
        one, two = (read_png_json(p, "fastface") for p in (path, dist / rel))
        assert one["batch"] == two["batch"] and one["seed"] == two["seed"] == one["batch"]["seed"]
    different = {_pixels(p).tobytes() for p in images.values()}
    assert len(different) == 9  # every (identity, prompt) its own image

    # resuming the two-rank output in one process: nothing regenerated, no file touched
    before = {rel: p.stat().st_mtime_ns for rel, p in _pngs(dist).items()}
    assert main(_args(prompts, faces, dist, "--summary", str(tmp_path / "again.json"))) == 0
    again = _summary(tmp_path / "again.json")["total"]
    assert (again["generated"], again["skipped"], again["failed"]) == (0, 9, 0)
    assert {rel: p.stat().st_mtime_ns for rel, p in _pngs(dist).items()} == before


def test_half_finished_run_regenerates_only_the_missing_images(tmp_path):
    prompts, faces = _data(tmp_path)
    out = tmp_path / "out"
    assert main(_args(prompts, faces, out)) == 0
    images = _pngs(out)
    pixels = {rel: _pixels(p) for rel, p in images.items()}
    gone = ["ann/" + next(k.split("/")[1] for k in images if k.startswith("ann/")),
            "cid/" + next(k.split("/")[1] for k in images if k.startswith("cid/"))]
    for rel in gone:
        images[rel].unlink()
    kept = {rel: p.stat().st_mtime_ns for rel, p in images.items() if rel not in gone}
    (out / "ann" / "stray.png.tmp").write_bytes(b"")  # not an output: ignored
    # resumed through `fastface generate` (the same command as python -m fastface.batch)
    assert cli.main(["generate", *_args(prompts, faces, out, "--summary", str(tmp_path / "s.json"))]) == 0
    s = _summary(tmp_path / "s.json")["total"]
    assert (s["generated"], s["skipped"], s["failed"]) == (2, 7, 0)
    assert {rel: p.stat().st_mtime_ns for rel, p in _pngs(out).items() if rel not in gone} == kept
    for rel in gone:  # regenerated, equal to the first run's
        assert np.array_equal(_pixels(out / rel), pixels[rel])


def test_files_made_otherwise_are_refused_unless_overwrite(tmp_path, capsys):
    prompts, faces = _one_person(tmp_path, "a photo of a person\n")
    out = tmp_path / "out"
    assert main(_args(prompts, faces, out, "--method", "baseline")) == 0
    (path,) = _pngs(out).values()
    first, stamp = path.read_bytes(), path.stat().st_mtime_ns
    capsys.readouterr()

    assert main(_args(prompts, faces, out)) == 2  # fastface-am1 now: the file records baseline
    err = capsys.readouterr().err
    assert str(path) in err and "settings.method" in err and "--overwrite" in err
    assert path.read_bytes() == first and path.stat().st_mtime_ns == stamp

    path.write_bytes(b"not a png")  # a foreign file is refused too
    assert main(_args(prompts, faces, out)) == 2
    assert "not a readable image of a fastface batch" in capsys.readouterr().err and path.read_bytes() == b"not a png"

    assert main(_args(prompts, faces, out, "--overwrite", "--summary", str(tmp_path / "s.json"))) == 0
    assert _summary(tmp_path / "s.json")["total"]["generated"] == 1
    assert read_png_json(path, "fastface")["method"] == "fastface-am1"

    assert main(_args(prompts, faces, out, "--vae-tile", "64")) == 2  # tiled decoding makes other pixels
    assert "settings.vae_tile" in capsys.readouterr().err

    # the adapter LoRA's form (CPU default: unfused) changes pixels by rounding: a fused batch resumes only fused
    fused = tmp_path / "fused"
    assert main(_args(prompts, faces, fused, "--fused-lora")) == 0
    capsys.readouterr()
    assert main(_args(prompts, faces, fused)) == 2
    assert "settings.unfused_lora" in (err := capsys.readouterr().err) and "--fused-lora" in err
    assert main(_args(prompts, faces, fused, "--fused-lora", "--summary", str(tmp_path / "f.json"))) == 0
    assert _summary(tmp_path / "f.json")["total"]["generated"] == 0  # resumed: nothing regenerated


def test_an_unreadable_face_fails_its_images_and_the_others_go_on(tmp_path, capsys):
    prompts, faces = _one_person(tmp_path, "a photo of a person\na person in a park\n")
    (faces / "bad.npy").write_bytes(b"this is text, not an array")
    out = tmp_path / "out"
    assert main(_args(prompts, faces, out, "--summary", str(tmp_path / "s.json"))) == 4
    s = _summary(tmp_path / "s.json")["total"]
    assert (s["generated"], s["skipped"], s["failed"]) == (2, 0, 2)
    assert all("identity 'bad'" in reason and "bad.npy" in reason for _, reason in s["failures"])
    assert len(_pngs(out)) == 2 and all(k.startswith("ann/") for k in _pngs(out)) and not (out / "bad").exists()
    assert "failed: bad/" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--prompt", "x"], "--prompt is for a single image"),
    (["--num-images", "2"], "--num-images is for a single --prompt"),
])
def test_single_image_options_are_refused_in_a_batch(tmp_path, capsys, argv, words):
    prompts, faces = _one_person(tmp_path, "a photo\n")
    assert main(_args(prompts, faces, tmp_path / "out", *argv)) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_adapter_options_come_generically_and_are_checked_before_anything_runs(tmp_path, capsys):
    prompts, faces = _one_person(tmp_path, "a photo\n")
    out = tmp_path / "out"
    # another adapter's option, a bad value and an unusable device: exit 2, nothing made (not even the folder)
    for extra, words in ((["--adapter-option", "mode=style"], "mode is a PuLID option"),
                         (["--s-scale", "-1"], "--s-scale must be"),
                         (["--device", "cuda:7" if __import__("torch").cuda.is_available() else "cuda"], "device")):
        assert cli.main(["generate", *_args(prompts, faces, out, *extra)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.startswith("fastface: error:"), err
        assert not out.exists()
    # a named flag and --adapter-option reach the adapter and are recorded (defaults filled in) in the request
    args = _args(prompts, faces, out, "--s-scale", "0.5", "--adapter-option", "lora_scale=0.7", "--summary",
                 str(tmp_path / "s.json"))
    assert cli.main(["generate", *args]) == 0
    (path,) = _pngs(out).values()
    meta = read_png_json(path, "fastface")
    assert (meta["s_scale"], meta["lora_scale"]) == (0.5, 0.7)
    settings = meta["batch"]["settings"]
    assert (settings["s_scale"], settings["lora_scale"], settings["adapter"]) == (0.5, 0.7, "faceid-plusv2")
    assert main(args) == 0 and _summary(tmp_path / "s.json")["total"]["skipped"] == 1  # resumes: the same request


def test_out_dir_that_is_a_file_and_missing_batch_options(tmp_path, capsys):
    prompts, faces = _one_person(tmp_path, "a photo\n")
    (tmp_path / "file").write_text("x")
    assert main(_args(prompts, faces, tmp_path / "file")) == 2
    assert "the output folder is a file" in capsys.readouterr().err
    assert main(["--selfcheck-weights", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "o")]) == 2
    assert "missing: --faces-dir" in capsys.readouterr().err
    (task,) = plan_batch(load_identities(faces, (".safetensors",)), ["a photo"], 0, faces)
    (tmp_path / "o" / task.image).mkdir(parents=True)
    assert main(_args(prompts, faces, tmp_path / "o")) == 2
    assert f"{tmp_path / 'o' / task.image}: a folder is where this image goes" in capsys.readouterr().err


def test_plan_seeds_and_names_do_not_depend_on_order_or_sharding(tmp_path):
    prompts, faces = _data(tmp_path)
    ids = load_identities(faces, (".safetensors",))
    assert [i.name for i in ids] == ["ann", "bob", "cid"] and ids[2].path.is_dir()
    tasks = plan_batch(ids, PROMPTS, 5, faces)
    assert tasks[6].files == ("cid/a.safetensors", "cid/b.safetensors")
    by_key = {(t.identity.name, t.prompt): (t.seed, t.image) for t in tasks}
    reverse = plan_batch(ids[::-1], PROMPTS[::-1], 5, faces)
    assert {(t.identity.name, t.prompt): (t.seed, t.image) for t in reverse} == by_key
    assert len({t.image for t in tasks}) == 9
    assert all(t.image.endswith(f"-{t.seed}.png") for t in tasks)
    other = plan_batch(ids, PROMPTS, 6, faces)
    assert not {t.image for t in other} & {t.image for t in tasks}  # another --seed adds beside the old images
    parts = [shard(tasks, r, 2) for r in range(2)]
    assert sorted(t.index for p in parts for t in p) == list(range(9)) and len(parts[0]) == 5


def test_identity_folder_names_a_person_once(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "1.png").write_bytes(b"")
    (tmp_path / "ann.png").write_bytes(b"")
    with pytest.raises(ValueError, match="share the identity name 'ann'.*one subfolder"):
        load_identities(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "ann.png").unlink()
    assert [i.name for i in load_identities(tmp_path)] == ["ann"]  # a folder without photos is no identity
    with pytest.raises(ValueError, match="no identity photos"):
        load_identities(tmp_path / "empty")


def test_rank_info_reads_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert rank_info() == RankInfo(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_info() == RankInfo(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4.*torchrun"):
        rank_info()
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="WORLD_SIZE='four' is not an integer"):
        rank_info()


def test_atomic_png_writes_and_metadata(tmp_path):
    path = tmp_path / "a" / "x.png"
    save_png_json(Image.new("RGB", (4, 4), (1, 2, 3)), path, "k", {"seed": 7})
    assert read_png_json(path, "k") == {"seed": 7} and read_png_json(path, "other") == {}
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda tmp: (tmp.write_bytes(b"half"), (_ for _ in ()).throw(RuntimeError("killed"))))
    assert read_png_json(path, "k") == {"seed": 7} and sorted(p.name for p in path.parent.iterdir()) == ["x.png"]
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:-30])  # a damaged file reads as "no metadata"
    assert read_png_json(cut, "k") == {} and read_png_json(tmp_path / "none.png", "k") == {}


def test_run_each_counts_outcomes_and_catches_only_the_given_errors():
    tasks = [BatchTask(i, Identity("a", Path("a.png")), ("a.png",), "p", i, f"{i}.png") for i in range(4)]

    def work(task: BatchTask) -> str:
        if task.index == 1:
            raise KeyError("no")
        return "skipped" if task.index == 2 else "generated"

    s = run_each(tasks, work, progress=False, catch=(KeyError,), name=lambda t: t.image)
    assert s.counts == {"generated": 2, "failed": 1, "skipped": 1} and s.failures == [("1.png", "'no'")]
    assert total([s, s]).counts == {"generated": 4, "failed": 2, "skipped": 2}
    with pytest.raises(KeyError):
        run_each(tasks, work, progress=False)


def test_batch_mode_tells_a_batch_from_a_single_image():
    from argparse import Namespace

    assert batch_mode(Namespace(prompts_file="p.txt", faces_dir=None, out_dir=None, prompt=None, face=None))
    assert not batch_mode(Namespace(prompts_file=None, faces_dir=None, out_dir=None, prompt="x", face=["a.png"]))
    with pytest.raises(ValueError, match="required: --face .or, for a batch: --prompts-file, --faces-dir"):
        batch_mode(Namespace(prompts_file=None, faces_dir=None, out_dir=None, prompt="x", face=None))


def test_rank_device_gives_each_rank_its_gpu():
    import torch

    assert rank_device("cuda", 3) == "cuda:3"  # a bare "cuda" under torchrun: one GPU per rank, not all on GPU 0
    assert rank_device("cuda:1", 3) == "cuda:1" and rank_device("cpu", 3) == "cpu"
    assert rank_device(None, 2) == ("cuda:2" if torch.cuda.is_available() else "cpu")


def test_another_adapter_and_its_options_through_the_same_code(tmp_path, capsys):
    """PuLID (tiny weights, its own face file format and its own options) through the batch: the batch asks the
    adapter, it knows no adapter by name."""
    from fastface.adapters.base import FaceSettings
    from fastface.adapters.registry import get_entry
    from fastface.selfcheck import write_tiny_weights

    entry = get_entry("pulid")
    (tiny,) = [a for a in write_tiny_weights(tmp_path / "w").adapters if a.name == "pulid"]
    preparer = entry.adapter.face_preparer(entry.preset, FaceSettings())
    faces = tmp_path / "faces"
    preparer.save(faces / "pat.safetensors", preparer.prepare(tiny.face))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a person\n", encoding="utf-8")
    out = tmp_path / "out"
    args = _args(prompts, faces, out, "--adapter", "pulid", "--adapter-option", "mode=style")
    assert cli.main(["generate", *args, "--lora-scale", "1"]) == 2  # FaceID's option is refused for PuLID
    assert "--lora-scale is an IP-Adapter option" in capsys.readouterr().err and not out.exists()
    assert cli.main(["generate", *args]) == 0
    (path,) = _pngs(out).values()
    meta = read_png_json(path, "fastface")
    assert meta["adapter"] == "pulid" and meta["batch"]["settings"]["mode"] == "style"

"""`fastface generate` loses nothing and fails early: existing images are kept (a new name, said on stderr) unless
--overwrite, the command stored in a PNG does not replace that PNG, unwritable outputs and unusable devices fail
before anything is read or loaded (exit 2), non-finite sampling is exit 5, files that are not weights exit 3;
selfcheck runs on the tiny-work thread count. Tiny random weights (--selfcheck-weights), in process."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastface import batch, cli
from fastface.cli import EXIT_NUMERIC, EXIT_USAGE, EXIT_WEIGHTS, main
from fastface.devices import DeviceError
from fastface.face_files import save_face_file
from fastface.jobs import read_png_json
from fastface.pipeline import Pipeline
from fastface.selfcheck import run_selfcheck, tiny_face, write_tiny_weights

TINY = ["--selfcheck-weights", "--height", "64", "--width", "64", "--no-progress", "-p", "a photo of a person"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def face(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    save_face_file(tmp_path / "me.safetensors", tiny_face(1))
    return tmp_path / "me.safetensors"


def _no_loading(monkeypatch) -> None:
    """Fail the test if anything tries to load a pipeline or read a face."""
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be loaded or read before the checks")

    monkeypatch.setattr(Pipeline, "from_pretrained", refuse)
    monkeypatch.setattr(cli, "_identity", refuse)


def test_existing_image_is_kept_and_the_stored_command_does_not_replace_its_png(face, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", "-f", str(face), "--seed", "3", "-o", str(out), *TINY]) == 0
    first = out.read_bytes()
    capsys.readouterr()

    assert main(["generate", "-f", str(face), "--seed", "3", "-o", str(out), *TINY]) == 0
    res = capsys.readouterr()
    again = tmp_path / "out-1.png"
    assert res.out.split() == [str(again)] and out.read_bytes() == first
    assert res.err.strip() == f"fastface: {out} exists and is kept; writing {again} instead (--overwrite replaces it)"
    words = shlex.split(read_png_json(again, "fastface")["command"])
    assert words[words.index("--output") + 1] == str(again) and "--overwrite" not in words  # the name written

    # re-running the command stored in out-1.png writes out-1-1.png and leaves out-1.png as it was
    kept = again.read_bytes()
    assert main(words[1:]) == 0
    third = tmp_path / "out-1-1.png"
    assert again.read_bytes() == kept and third.is_file()
    assert f"{again} exists and is kept; writing {third} instead" in capsys.readouterr().err

    # --overwrite replaces the file itself (another seed: other pixels), no new name, nothing said
    assert main(["generate", "-f", str(face), "--seed", "4", "-o", str(out), "--overwrite", *TINY]) == 0
    res = capsys.readouterr()
    assert res.out.split() == [str(out)] and res.err == ""
    assert read_png_json(out, "fastface")["seed"] == 4 and out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["out-1-1.png", "out-1.png", "out.png"]


def test_several_images_into_a_folder_keep_existing_names(face, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "fastface-5.png").write_bytes(b"mine")
    assert main(["generate", "-f", str(face), "--seed", "5", "--num-images", "2", "-o", str(folder), *TINY]) == 0
    res = capsys.readouterr()
    assert res.out.split() == [str(folder / "fastface-5-1.png"), str(folder / "fastface-6.png")]
    assert (folder / "fastface-5.png").read_bytes() == b"mine" and "fastface-5-1.png instead" in res.err
    with Image.open(folder / "fastface-6.png") as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("case", ["parent-is-a-file", "read-only-folder", "output-is-a-folder", "not-png"])
def test_unwritable_output_fails_before_anything_loads(face, tmp_path, monkeypatch, capsys, case):
    if case == "parent-is-a-file":
        (tmp_path / "notes.txt").write_text("x")
        output, words = tmp_path / "notes.txt" / "sub" / "out.png", f"{tmp_path / 'notes.txt'} is a file, not a folder"
    elif case == "read-only-folder":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        if os.access(locked, os.W_OK):  # root may write in it: a folder nobody may write in (Linux /proc/1)
            locked.chmod(0o700)
            locked = Path("/proc/1")
            if not locked.is_dir() or os.access(locked, os.W_OK):
                pytest.skip("no folder this user may not write in")
        output, words = locked / "new" / "out.png", f"no permission to write in {locked}"
    elif case == "output-is-a-folder":  # a folder where the image goes (a folder as --output gets fastface-SEED.png)
        (tmp_path / "imgs" / "fastface-0.png").mkdir(parents=True)
        output, words = f"{tmp_path / 'imgs'}/", f"{tmp_path / 'imgs' / 'fastface-0.png'} is a folder"
    else:
        output, words = tmp_path / "out.jpg", "--output must be a .png file or a folder"
    before = sorted(tmp_path.rglob("*"))
    _no_loading(monkeypatch)
    assert main(["generate", "-f", str(face), "-o", str(output), "--seed", "0", *TINY]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("fastface: error:") and words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no folder made
    if case == "read-only-folder":
        (tmp_path / "locked").chmod(0o700)


@NO_CUDA
def test_unusable_device_is_said_before_any_file_is_opened(tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    missing = tmp_path / "nowhere"
    # a face that does not exist, weights that do not exist: the device is still the first thing said
    assert main(["generate", "-f", str(missing / "me.png"), "-p", "x", "--device", "cuda", "--base", str(missing),
                 "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("fastface: error: device 'cuda':") and "--device cpu" in err
    assert main(["selfcheck", "--device", "cuda"]) == EXIT_USAGE
    assert "device 'cuda'" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(DeviceError, match="device 'cuda'.*device='cpu'"):
        Pipeline.from_pretrained("hyper", "faceid-plusv2", device="cuda", base=missing, weights=missing / "w.bin",
                                 adapter_file=missing / "a.bin")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        Pipeline.from_pretrained(device="gpu0", base=missing)


def test_non_finite_sampling_is_exit_5_and_writes_nothing(face, tmp_path, monkeypatch, capsys):
    make = batch._selfcheck_pipeline

    def poisoned(args, device):
        pipe = make(args, device)
        with torch.no_grad():
            pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")  # weights holding NaN
        return pipe

    monkeypatch.setattr(batch, "_selfcheck_pipeline", poisoned)
    assert main(["generate", "-f", str(face), "-o", str(tmp_path / "out.png"), *TINY]) == EXIT_NUMERIC
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the model returned NaN/Inf at step 1 of 4" in err
    assert "--dtype bf16" in err and "no image was written" in err and not list(tmp_path.glob("*.png"))


def test_a_file_that_is_not_weights_is_exit_3(face, tmp_path, capsys):
    w = write_tiny_weights(tmp_path / "w")
    (tmp_path / "adapter.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    argv = ["generate", "-f", str(face), "-p", "x", "--base", str(w.base), "--weights", str(w.lora), "--adapter-file",
            str(tmp_path / "adapter.bin"), "--image-encoder", str(w.image_encoder), "--dtype", "fp32", "--height",
            "64", "--width", "64", "--no-progress", "-o", str(tmp_path / "out.png")]
    assert main(argv) == EXIT_WEIGHTS
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter.bin" in err and "LFS" in err, err
    assert not (tmp_path / "out.png").exists()


def test_selfcheck_runs_on_the_tiny_work_threads(monkeypatch):
    seen: list[int] = []

    class Stop(Exception):
        pass

    def log(line: str) -> None:  # the first line is logged inside the thread setting: record it and stop there
        seen.append(torch.get_num_threads())
        raise Stop(line)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for env, threads in ((None, 1), ("3", 3)):
            if env is None:
                monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            else:
                monkeypatch.setenv("OMP_NUM_THREADS", env)
            with pytest.raises(Stop, match=f"tiny work on {threads} CPU thread"):
                run_selfcheck(log=log)
            assert seen[-1] == threads and torch.get_num_threads() == 2  # restored after
    finally:
        torch.set_num_threads(before)
    with pytest.raises(DeviceError):
        run_selfcheck(device="meta", log=log)

"""Files that are not weights are named for what they are, with what to do; weights holding NaN/Inf are refused.

Each case asserts the exact error type, a message naming the file and the fix, and that the file and its folder
are left as they were (nothing written, nothing renamed).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastface.models.file_kinds import identify
from fastface.models.loading import WeightFormatError, check_finite_tensors, read_torch_bin, read_weights
from fastface.models.vae import AutoencoderKL, vae_config
from fastface.models.vae_loading import load_vae

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4b1e1bdc\nsize 3944692752\n"
HTML = b"<!DOCTYPE html>\n<html class=''><head><title>model.bin at main</title></head><body>...</body></html>\n"


def _zip_bytes(names: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in names.items():
            z.writestr(name, data)
    return buf.getvalue()


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.randn(64, 64)}, buf)
    return buf.getvalue()


def _legacy_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.randn(64, 64)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


# (file content, expected words in the message: what it is, then what to do)
CASES = {
    "text": (b"these are not weights, just some notes\nsecond line\n", ["a text file", "these are not weights",
                                                                       "point fastface at the weight file itself"]),
    "html": (HTML, ["an HTML page", "'/resolve/' link"]),
    "lfs": (LFS, ["a Git LFS pointer (the real file has 3944692752 bytes)", "git lfs pull"]),
    "json": (json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}).encode(),
             ["a JSON file (a model config: _class_name, in_channels)", "point fastface at the weight file itself"]),
    "index": (json.dumps({"metadata": {}, "weight_map": {"a": "x-00001.safetensors"}}).encode(),
              ["the index of sharded weights", "the folder that holds the index"]),
    "zip": (_zip_bytes({"readme.txt": b"hi", "model/weights.onnx": b"\x08\x07"}),
            ["a zip archive that is not a PyTorch checkpoint (it holds: readme.txt, model/weights.onnx)",
             "extract it"]),
    "gzip": (gzip.compress(b"\x00" * 100), ["a gzip archive", "extract it first"]),
    "empty": (b"", ["an empty file (0 bytes)", "download it again"]),
    "cut-zip": (_torch_zip()[:3000], ["truncated or damaged zip file", "download it again"]),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("suffix", [".bin", ".safetensors", ".pth"])
def test_non_weight_files_are_named(tmp_path, case, suffix):
    content, words = CASES[case]
    path = tmp_path / f"ip-adapter{suffix}"
    path.write_bytes(content)
    before = _snapshot(tmp_path)
    with pytest.raises(WeightFormatError) as info:
        read_weights(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, msg
    assert "could run code" not in msg and "refused" not in msg
    assert _snapshot(tmp_path) == before


def test_text_bin_was_a_key_error(tmp_path):
    """The regression: torch.load(weights_only=True) of a text file raises a bare unpickler error; fastface names it."""
    path = tmp_path / "model.bin"
    path.write_bytes(CASES["text"][0])
    with pytest.raises((KeyError, IndexError)):
        torch.load(path, weights_only=True)
    with pytest.raises(WeightFormatError, match=r"model\.bin: this is a text file"):
        read_torch_bin(path)


def test_truncated_legacy_pickle(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(_legacy_pickle()[:5000])
    with pytest.raises(WeightFormatError, match=r"old\.pth: truncated PyTorch weight file.*download it again"):
        read_weights(path)


def test_truncated_safetensors_says_how_much(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFormatError, match=rf"unet\.safetensors: not a readable safetensors file: truncated "
                                                rf"safetensors file \(it holds {len(data) // 2} of its {len(data)} bytes\)"):
        read_weights(path)


def test_safetensors_named_bin_is_read(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    path = tmp_path / "weights.bin"
    save_file(sd, path)
    got = read_weights(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_pickle_named_safetensors_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(_torch_zip())
    with pytest.raises(WeightFormatError, match=r"weights\.safetensors: .*PyTorch checkpoint .*Rename it to \.bin"):
        read_weights(path)


def test_weights_are_identified_as_weights(tmp_path):
    (tmp_path / "a.bin").write_bytes(_torch_zip())
    (tmp_path / "b.bin").write_bytes(_legacy_pickle())
    save_file({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    assert [identify(tmp_path / n).kind for n in ("a.bin", "b.bin", "c.safetensors")] == ["torch-zip", "pickle",
                                                                                         "safetensors"]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickles_still_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": _RunsCode(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightFormatError, match=r"evil\.bin: refused to load.*could run code"):
        read_weights(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"x": _RunsCode(marker)}, protocol=4))
    with pytest.raises(WeightFormatError, match=r"raw\.pkl: refused to load"):
        read_weights(raw)
    assert not marker.exists()


# --- non-finite weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_safetensors_refused(tmp_path, bad, dtype):
    w = torch.randn(4, 6).to(dtype)
    w[2, 3] = bad
    path = tmp_path / "lora.safetensors"
    save_file({"ok": torch.randn(3).to(dtype), "layer.weight": w, "steps": torch.arange(3)}, path)
    nan, inf = (1, 0) if bad != bad else (0, 1)
    with pytest.raises(WeightFormatError, match=rf"lora\.safetensors: tensor 'layer\.weight' holds non-finite values "
                                                rf"\({nan} NaN, {inf} Inf of 24\).*download it again"):
        read_weights(path)
    assert read_weights(path, check_finite=False)["layer.weight"].shape == (4, 6)


def test_non_finite_nested_bin_names_the_tensor(tmp_path):
    """An IP-Adapter .bin nests its parts; the name is the dotted path, and later bad tensors are counted."""
    sd = {"image_proj": {"proj.weight": torch.randn(8, 4)},
          "ip_adapter": {"1.to_k_ip.weight": torch.full((4, 4), float("nan")), "3.to_v_ip.weight": torch.randn(4, 4)}}
    sd["ip_adapter"]["3.to_v_ip.weight"][0, 0] = float("inf")
    path = tmp_path / "ip-adapter-faceid_sdxl.bin"
    torch.save(sd, path)
    with pytest.raises(WeightFormatError, match=r"tensor 'ip_adapter\.1\.to_k_ip\.weight' holds non-finite values "
                                                r"\(16 NaN, 0 Inf of 16\) \(and 1 more tensor\(s\): "
                                                r"ip_adapter\.3\.to_v_ip\.weight\)"):
        read_weights(path)


def test_attention_masks_may_hold_minus_inf():
    mask = torch.full((4, 4), float("-inf")).triu(1)
    check_finite_tensors({"model.attn_mask": mask, "w": torch.randn(2)}, "x.safetensors")  # no error


def test_model_loader_refuses_nan_weights(tmp_path):
    """Through a model loader (the VAE's): the error comes at load, naming the file and the tensor."""
    torch.manual_seed(0)
    vae = AutoencoderKL(vae_config("tiny"))
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "vae.safetensors"
    save_file(sd, path)
    with pytest.raises(WeightFormatError, match=r"vae\.safetensors: tensor 'decoder\.conv_out\.weight' holds "
                                                r"non-finite values \(1 NaN"):
        load_vae(path, "tiny")

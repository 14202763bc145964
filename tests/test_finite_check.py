"""The NaN / ±Inf check of CPU safetensors files maps pieces of the file briefly, not the loaded tensors.

* parity: :func:`nonfinite_in_file` (the file in pieces, each mapped then unmapped) names exactly the tensors that
  :func:`nonfinite_tensors` (``aminmax`` on the loaded tensors) names, and the ones we planted: fp32, fp16, bf16 and
  fp64; a NaN, +Inf or -Inf first, last, or just either side of a chunk boundary (chunks of 64 bytes, so every
  tensor spans many); clean tensors, an integer tensor and an ``attn_mask`` holding -inf are not named; an fp16
  tensor with an odd element count; a file packed without alignment (fp32 / fp64 tensors starting off their element
  size: read into an aligned buffer instead of mapped).
* memory: reading a 64 MiB file with the check leaves less than 8 MiB of it resident in this process (RssFile), and
  summing the tensors afterwards makes it resident (so the measurement can see it). Linux only (/proc).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastface.models.finite import checked_tensors, nonfinite_in_file, nonfinite_tensors
from fastface.models.loading import WeightFormatError, read_safetensors

CHUNK = 64  # bytes: 16 fp32 / 32 fp16 elements per read


def _planted() -> tuple[dict[str, torch.Tensor], set[str]]:
    gen = torch.Generator().manual_seed(0)
    tensors, bad = {}, set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        per_chunk = CHUNK // torch.empty((), dtype=dtype).element_size()
        name = str(dtype).replace("torch.", "")
        tensors[f"{name}.clean"] = torch.randn(1000, generator=gen).to(dtype)
        for value, label in ((float("nan"), "nan"), (float("inf"), "pinf"), (float("-inf"), "ninf")):
            for where in (0, per_chunk - 1, per_chunk, 3 * per_chunk + 1, 999):
                t = torch.randn(1000, generator=gen).to(dtype)
                t[where] = value
                key = f"{name}.{label}.{where}"
                tensors[key], _ = t, bad.add(key)
    tensors["odd.f16"] = torch.randn(7, generator=gen).half()  # 14 bytes (the writer puts it after the wider dtypes)
    tensors["odd.after"] = torch.randn(33, generator=gen)
    tensors["odd.after.nan"] = torch.randn(33, generator=gen)
    tensors["odd.after.nan"][32] = float("nan")
    bad.add("odd.after.nan")
    tensors["ints"] = torch.arange(100)
    tensors["text.causal_attn_mask"] = torch.full((4, 4), float("-inf")).triu(1)
    return tensors, bad


def test_file_check_equals_tensor_check(tmp_path: Path):
    tensors, planted = _planted()
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    sd = load_file(str(path))
    from_tensors = nonfinite_tensors(checked_tensors(sd.items()))
    from_file = nonfinite_in_file(path, sd, chunk_bytes=CHUNK)
    assert set(from_file) == set(from_tensors) == planted
    assert from_file == from_tensors  # same order, so the error names the same first tensor
    assert nonfinite_in_file(path, sd) == from_tensors  # the default 64 MiB chunk (one read per tensor)


def test_read_safetensors_refuses_through_the_file_check(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10), "b.weight": torch.tensor([1.0, float("inf")])}, str(path))
    with pytest.raises(WeightFormatError, match=r"tensor 'b.weight' holds non-finite values \(0 NaN, 1 Inf of 2\)"):
        read_safetensors(path)
    assert torch.equal(read_safetensors(path, check_finite=False)["a"], torch.ones(10))


def _rss_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_check_leaves_the_mapped_file_out_of_resident_memory(tmp_path: Path):
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(16)}, str(path))  # 16 x 4 MiB
    before = _rss_file_mib()
    sd = read_safetensors(path)
    after_load = _rss_file_mib()
    assert after_load - before < 8, (before, after_load)
    total = sum(float(t.sum()) for t in sd.values())  # a model using the weights maps them in
    assert total == total
    assert _rss_file_mib() - before > 56, (before, _rss_file_mib())


def _write_unaligned(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file with the tensors packed in the given order, without alignment padding (the format
    allows it; safetensors' own writer sorts by alignment), so a tensor can start off its element size."""
    import json
    import struct

    names = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}
    header, blobs, at = {}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % 8)  # the header itself may be padded with spaces
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_unaligned_tensors_are_read_not_mapped(tmp_path: Path):
    gen = torch.Generator().manual_seed(1)
    bad32, bad64 = torch.randn(40, generator=gen), torch.randn(40, generator=gen).double()
    bad32[33], bad64[0] = float("nan"), float("-inf")
    tensors = {"f16": torch.randn(3, generator=gen).half(), "f32.bad": bad32,  # starts at byte 6 of the data
               "f32.ok": torch.randn(40, generator=gen), "f64.bad": bad64,
               "f64.ok": torch.randn(9, generator=gen).double()}
    path = tmp_path / "u.safetensors"
    _write_unaligned(path, tensors)
    sd = load_file(str(path))
    assert all(torch.allclose(sd[k], v, rtol=0, atol=0, equal_nan=True) for k, v in tensors.items())  # read back
    from_tensors = nonfinite_tensors(checked_tensors(sd.items()))
    assert from_tensors == ["f32.bad", "f64.bad"]
    assert nonfinite_in_file(path, sd, chunk_bytes=CHUNK) == from_tensors

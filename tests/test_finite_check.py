"""The NaN / ±Inf check of CPU safetensors files reads the file, not the mapping (fastface.models.finite).

* parity: :func:`nonfinite_in_file` (the file's bytes in chunks) names exactly the tensors that
  :func:`nonfinite_tensors` (``aminmax`` on the loaded tensors) names, and the ones we planted: fp32, fp16, bf16 and
  fp64; a NaN, +Inf or -Inf first, last, or just either side of a chunk boundary (chunks of 64 bytes, so every
  tensor spans many); clean tensors, an integer tensor and an ``attn_mask`` holding -inf are not named; an fp16
  tensor with an odd element count shifts the offsets of the tensors after it.
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
    tensors["odd.f16"] = torch.randn(7, generator=gen).half()  # 14 bytes: later offsets are not 4-aligned
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

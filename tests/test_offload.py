"""fastface.offload.on_device: outputs equal with and without it, and the module gets its own tensors back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastface.offload import module_device, on_device


def small_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def snapshot(m: nn.Module) -> dict[str, tuple[int, torch.dtype, torch.device]]:
    return {k: (v.data_ptr(), v.dtype, v.device) for k, v in m.state_dict().items()}


def test_roundtrip_restores_the_same_storage_and_outputs():
    """Inside: moved (here cast to fp64, the same code path as a device move); after: the original tensors."""
    m = small_model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    params = list(m.parameters())
    before, ref = snapshot(m), m(x)
    ref64 = copy.deepcopy(m).double()(x.double())
    with torch.no_grad(), on_device(m, "cpu", dtype=torch.float64) as inside:
        assert inside is m and all(p.dtype == torch.float64 for p in m.parameters())
        assert m[1].running_mean.dtype == torch.float64 and m[1].num_batches_tracked.dtype == torch.int64
        assert torch.equal(m(x.double()), ref64)
    assert snapshot(m) == before  # same storage (no copy back), same dtype and device
    assert all(a is b for a, b in zip(m.parameters(), params))  # Parameter objects kept (hooks, references)
    assert torch.equal(m(x), ref)


def test_restores_after_an_exception_and_noop_when_already_there():
    m = small_model()
    before = snapshot(m)
    with pytest.raises(RuntimeError, match="boom"), on_device(m, "cpu", dtype=torch.float64):
        raise RuntimeError("boom")
    assert snapshot(m) == before
    with on_device(m, "cpu") as inside:  # already there: nothing moves
        assert inside is m and snapshot(m) == before
    assert module_device(m) == torch.device("cpu") and module_device(nn.ReLU()) == torch.device("cpu")
    with pytest.raises(ValueError, match="meta"), on_device(m, "meta"):
        pass


def test_a_parameter_replaced_inside_comes_home():
    m = small_model()
    with on_device(m, "cpu", dtype=torch.float64):
        m[3].weight = nn.Parameter(torch.zeros(4, 8, 1, 1, dtype=torch.float64))
    assert m[3].weight.dtype == torch.float64 and m[3].weight.device.type == "cpu"
    assert float(m[3].weight.abs().sum()) == 0.0


def test_memory_mapped_weights_stay_mapped(tmp_path):
    """A zero-copy (memory-mapped) model is still backed by its file after a round trip."""
    from safetensors.torch import load_file, save_file

    m = small_model()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "m.safetensors"))
    sd = load_file(str(tmp_path / "m.safetensors"))
    m.load_state_dict(sd, assign=True)
    with on_device(m, "cpu", dtype=torch.float64):
        pass
    assert all(m.state_dict()[k].data_ptr() == v.data_ptr() for k, v in sd.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_roundtrip():
    m = small_model()
    x = torch.randn(2, 3, 8, 8)
    before, ref = snapshot(m), m(x)
    with torch.no_grad(), on_device(m, "cuda"):
        assert module_device(m).type == "cuda"
        out = m(x.cuda()).cpu()
    assert snapshot(m) == before and torch.allclose(out, ref, atol=1e-5)


def test_several_modules_together():
    a, b = small_model(), small_model()
    before = (snapshot(a), snapshot(b))
    with on_device([a, b], "cpu", dtype=torch.float64) as pair:
        assert pair[0] is a and pair[1] is b
        assert a[0].weight.dtype == b[0].weight.dtype == torch.float64
    assert (snapshot(a), snapshot(b)) == before

"""resolve_device: a clear DeviceError for a device this machine cannot use; tiny_work: the thread count for tiny work."""

from __future__ import annotations

import pytest
import torch

from fastface.devices import DeviceError, default_device, resolve_device
from fastface.threads import tiny_work, tiny_work_threads


def test_cpu_and_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == default_device()
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", ["cdua", "gpu", "cuda:x", "cuda:-1", "", "cpu cuda", -1])
def test_malformed_names(bad):
    with pytest.raises(DeviceError, match=rf"unknown device {bad!r}.*expected 'cpu', 'cuda', 'cuda:N'"):
        resolve_device(bad)


@pytest.mark.parametrize("bad", [True, 1.5, ["cuda"]])
def test_wrong_types(bad):
    with pytest.raises(DeviceError, match=r"device must be a name like 'cpu', 'cuda'"):
        resolve_device(bad)


def test_meta_and_non_compute_types_are_refused():
    with pytest.raises(DeviceError, match=r"'meta' holds no data.*device='cpu' \(command line: --device cpu\)"):
        resolve_device("meta")
    with pytest.raises(DeviceError, match=r"device 'opengl': 'opengl' is not a device fastface can run on"):
        resolve_device("opengl")


def _no_cuda(monkeypatch, build: str | None):
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("asked", ["cuda", "cuda:0", 0, torch.device("cuda")])
def test_cuda_on_a_cpu_only_torch(monkeypatch, asked):
    _no_cuda(monkeypatch, None)
    with pytest.raises(DeviceError, match=r"CPU-only build without CUDA support; install a CUDA build of torch.*"
                                          r"--device cpu"):
        resolve_device(asked)


def test_cuda_build_without_gpu(monkeypatch):
    _no_cuda(monkeypatch, "12.4")
    with pytest.raises(DeviceError, match=r"device 'cuda': CUDA is not available on this machine.*CUDA 12\.4.*"
                                          r"CUDA_VISIBLE_DEVICES.*nvidia-smi.*--device cpu"):
        resolve_device("cuda")


def test_cuda_index_past_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"device 'cuda:2': there is no GPU 2; this machine shows 2 CUDA device\(s\) "
                                          r"\(cuda:0 \.\. cuda:1\)"):
        resolve_device("cuda:2")


def test_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    with pytest.raises(DeviceError, match=r"device 'mps': this torch build has no MPS .*--device cpu"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"device 'mps': MPS is not available \(it needs an Apple-silicon Mac"):
        resolve_device("mps")


def test_other_backend(monkeypatch):
    if not hasattr(torch, "xpu"):
        pytest.skip("this torch has no xpu module")
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"device 'xpu': the xpu backend is not available on this machine"):
        resolve_device("xpu")


def test_tiny_work_threads_reads_omp(monkeypatch):
    assert tiny_work_threads({}) == 1
    assert tiny_work_threads({"OMP_NUM_THREADS": "4"}) == 4
    assert tiny_work_threads({"OMP_NUM_THREADS": " "}) == 1
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match=rf"OMP_NUM_THREADS='{bad}' is not a positive integer"):
            tiny_work_threads({"OMP_NUM_THREADS": bad})


def test_tiny_work_sets_and_restores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    with tiny_work() as n:
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with tiny_work(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        with tiny_work(0):
            pass
    assert torch.get_num_threads() == before


def test_suite_runs_single_threaded_with_omp_set_for_subprocesses():
    import os

    assert os.environ.get("OMP_NUM_THREADS")  # set by conftest (or by the caller) for the CLI subprocesses
    assert torch.get_num_threads() == int(os.environ.get("FASTFACE_TEST_THREADS", os.environ["OMP_NUM_THREADS"]))

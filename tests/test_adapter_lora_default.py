"""Where the adapter's own LoRA is fused: ``fuse_adapter_lora`` None (default) fuses off the CPU only.

Tiny weights in the real layouts (:func:`fastface.selfcheck.write_tiny_weights`), hyper, fp32, CPU.

* the rule: an explicit True/False wins; None is fused for ``cuda``/``mps``/``xpu`` devices, unfused for ``cpu``;
  anything else is a TypeError that names the three choices.
* the CPU default pipeline computes the LoRA beside each projection (nothing fused), ``True`` fuses every LoRA
  layer, and the two make the same image within fp32 rounding (max |difference| <= 1e-4 on pixels in
  [0, 1] after 4 steps; the per-layer fused == unfused check is tests/test_ip_adapter.py's).
* the CLI: ``--fused-lora`` / ``--unfused-lora`` reach the pipeline as True / False, neither as None, both at once is
  a usage error; a batch records ``unfused_lora`` exactly when its pipeline runs unfused (the CPU default included).
"""

from __future__ import annotations

import argparse

import pytest
import torch

import fastface.cli
from fastface.batch import adapter_lora_choice, batch_settings
from fastface.pipeline import Pipeline, resolve_fuse_adapter_lora
from fastface.selfcheck import write_tiny_weights

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize(("given", "device", "fused"), [
    (None, "cpu", False), (None, "cuda", True), (None, "cuda:1", True), (None, "mps", True),
    (True, "cpu", True), (False, "cuda", False),
])
def test_rule(given, device, fused):
    assert resolve_fuse_adapter_lora(given, torch.device(device)) is fused


def test_rule_rejects_other_values():
    with pytest.raises(TypeError, match="True, False or None"):
        resolve_fuse_adapter_lora("yes", torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("tiny"))


def _pipe(tiny, **kw) -> tuple[Pipeline, object]:
    run = next(a for a in tiny.adapters if a.name == "faceid-plusv2")
    pipe = Pipeline.from_pretrained("hyper", "faceid-plusv2", base=tiny.base, weights=tiny.lora, dtype="fp32",
                                    device="cpu", **run.load, **kw)
    return pipe, run.face


def test_cpu_default_is_unfused_and_equals_fused(tiny):
    pipe, face = _pipe(tiny)
    loras = pipe.adapter_handle.lora_modules
    assert pipe.fuse_adapter_lora is False and loras and not any(m.is_fused for m in loras)
    fused, _ = _pipe(tiny, fuse_adapter_lora=True)
    assert fused.fuse_adapter_lora is True and all(m.is_fused for m in fused.adapter_handle.lora_modules)
    a = pipe("a photo of a person", face=face, method="fastface-am1", seed=1, height=64, width=64)
    b = fused("a photo of a person", face=face, method="fastface-am1", seed=1, height=64, width=64)
    assert a.unet_evaluations == b.unet_evaluations
    diff = (a.pixels - b.pixels).abs().max().item()
    assert diff <= 1e-4, diff
    # unfusing gives back exactly the unfused computation
    fused.adapter_handle.unfuse_lora()
    c = fused("a photo of a person", face=face, method="fastface-am1", seed=1, height=64, width=64)
    assert torch.equal(c.pixels, a.pixels)


def _args(*extra: str) -> argparse.Namespace:
    return fastface.cli.build_parser().parse_args(["generate", "-p", "x", *extra])


def test_cli_flags():
    assert adapter_lora_choice(_args()) is None
    assert adapter_lora_choice(_args("--fused-lora")) is True
    assert adapter_lora_choice(_args("--unfused-lora")) is False
    with pytest.raises(SystemExit) as e:
        _args("--fused-lora", "--unfused-lora")
    assert e.value.code == 2


@pytest.mark.parametrize(("extra", "device", "recorded"), [
    ((), "cpu", True), ((), "cuda", False), (("--fused-lora",), "cpu", False), (("--unfused-lora",), "cuda", True),
])
def test_batch_records_an_unfused_lora(extra, device, recorded):
    settings = batch_settings(_args("--dtype", "fp32", *extra), {}, device)
    assert settings.get("unfused_lora", False) is recorded

"""The pipeline's stages: ``offload=True`` (each part on the device only for its stage) and tiled VAE decoding.

Tiny weights in the real layouts (:func:`fastface.selfcheck.write_tiny_weights`), hyper, fp32, CPU.

* offload: the outputs are bit-identical to the plain pipeline's (on the CPU the move is a no-op), four stages are
  entered in order (the adapter's modules, the text encoders, the UNet, the VAE), never nested, and every module
  forward of the call runs inside the stage of its own part (a global forward pre-hook checks each one).
* tiling: above 1024 px the image is ``vae.decode(latents, tile=128)`` exactly (and not the plain decode); at or
  below it, or with ``vae_tile=0``, the plain decode exactly; ``vae_tile=N`` forces tiles of N latents.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

import fastface.stages
from fastface.offload import on_device
from fastface.pipeline import Pipeline
from fastface.selfcheck import write_tiny_weights
from fastface.stages import TILE_ABOVE_PX, decode_tile

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("tiny"))


def _load(tiny, adapter: str, **kw) -> Pipeline:
    run = next(a for a in tiny.adapters if a.name == adapter)
    kw.setdefault("device", "cpu")
    pipe = Pipeline.from_pretrained("hyper", adapter, base=tiny.base, weights=tiny.lora, dtype="fp32", **run.load, **kw)
    return pipe, run.face


# ---------------------------------------------------------------------------------------------------------------
# offload


class StageSpy:
    """Wraps on_device: records the modules of each stage, and checks every module forward against them."""

    def __init__(self) -> None:
        self.stages: list[list[nn.Module]] = []
        self.active: set[int] = set()
        self.depth = 0
        self.max_depth = 0
        self.forwards = 0
        self.outside: list[str] = []

    @contextmanager
    def on_device(self, modules, device, *args, **kwargs):
        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.stages.append(mods)
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        self.active = {id(m) for top in mods for m in top.modules()}
        try:
            with on_device(modules, device, *args, **kwargs) as inside:
                yield inside
        finally:
            self.depth -= 1
            self.active = set()

    def check(self, module: nn.Module, _args) -> None:
        self.forwards += 1
        if id(module) not in self.active:
            self.outside.append(type(module).__name__)


@pytest.mark.parametrize("adapter,method", [("faceid-plusv2", "fastface-am2"), ("faceid-plusv2", "fastface-am1"),
                                            ("pulid", "fastface-am1")])
def test_offload_equals_plain_and_runs_every_stage_inside_on_device(tiny, adapter, method, monkeypatch) -> None:
    plain, face = _load(tiny, adapter)
    pipe, _ = _load(tiny, adapter, offload=True)
    assert pipe.offload and not plain.offload
    ref = plain([PROMPT, "a portrait"], face=face, method=method, seed=5, height=64, width=64)
    spy = StageSpy()
    monkeypatch.setattr(fastface.stages, "on_device", spy.on_device)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy.check)
    try:
        out = pipe([PROMPT, "a portrait"], face=face, method=method, seed=5, height=64, width=64)
    finally:
        handle.remove()
    assert torch.equal(out.latents, ref.latents) and torch.equal(out.pixels, ref.pixels)
    assert out.unet_evaluations == ref.unet_evaluations
    expected = [pipe.identity_adapter.offload_modules(), [pipe.text.encoder_1, pipe.text.encoder_2], [pipe.unet],
                [pipe.vae]]
    assert [[id(m) for m in s] for s in spy.stages] == [[id(m) for m in s] for s in expected]
    assert spy.max_depth == 1  # one part at a time
    assert spy.forwards > 100 and spy.outside == [], f"modules run outside their stage: {sorted(set(spy.outside))}"


def test_adapters_name_their_modules(tiny) -> None:
    plus, _ = _load(tiny, "faceid-plusv2")
    assert plus.identity_adapter.offload_modules() == [plus.adapter.projection, plus.image_encoder]
    pulid, _ = _load(tiny, "pulid")
    assert pulid.identity_adapter.offload_modules() == [pulid.adapter.encoder]  # no face models loaded (face file)


def test_offload_loads_on_the_cpu(tiny, monkeypatch) -> None:
    """Loading touches no accelerator: every part waits on the CPU (the device is used by calls only). The device
    check is bypassed so that a CPU-only machine can ask for CUDA: any tensor sent there would fail."""
    monkeypatch.setattr("fastface.pipeline.resolve_device", torch.device)
    pipe, _ = _load(tiny, "faceid-plusv2", offload=True, device="cuda")
    assert pipe.device == torch.device("cuda")
    parts = [pipe.unet, pipe.vae, pipe.text.encoder_1, pipe.text.encoder_2, *pipe.identity_adapter.offload_modules()]
    assert all(p.device.type == "cpu" for m in parts for p in m.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_equals_plain_cuda(tiny) -> None:
    plain, face = _load(tiny, "faceid-plusv2", device="cuda")
    pipe, _ = _load(tiny, "faceid-plusv2", device="cuda", offload=True)
    ref = plain(PROMPT, face=face, method="fastface-am1", seed=2, height=64, width=64)
    out = pipe(PROMPT, face=face, method="fastface-am1", seed=2, height=64, width=64)
    assert all(p.device.type == "cpu" for p in pipe.unet.parameters())  # back home after the call
    assert (out.pixels - ref.pixels).abs().max().item() <= 1e-5
    assert out.unet_evaluations == ref.unet_evaluations


# ---------------------------------------------------------------------------------------------------------------
# tiled decoding


def test_decode_tile_threshold() -> None:
    assert TILE_ABOVE_PX == 1024
    assert decode_tile(1024, 1024, 8, None) is None and decode_tile(512, 768, 8, None) is None
    assert decode_tile(1032, 64, 8, None) == 128 and decode_tile(64, 2048, 8, None) == 128
    assert decode_tile(2048, 2048, 8, 0) is None and decode_tile(64, 64, 8, 4) == 4


def test_above_the_threshold_the_pipeline_decodes_in_tiles(tiny) -> None:
    pipe, face = _load(tiny, "faceid-plusv2")
    out = pipe(PROMPT, face=face, method="baseline", seed=1, height=64, width=1032)  # latents 8 x 129: two tiles
    tiled = pipe.vae.decode(out.latents, tile=128)
    assert torch.equal(out.pixels, tiled)
    assert not torch.equal(out.pixels, pipe.vae.decode(out.latents))  # really tiled (tiling is not exact)
    assert out.settings["vae_tile"] == 128
    never, _ = _load(tiny, "faceid-plusv2", vae_tile=0)
    plain = never(PROMPT, face=face, method="baseline", seed=1, height=64, width=1032)
    assert torch.equal(plain.latents, out.latents) and torch.equal(plain.pixels, pipe.vae.decode(out.latents))
    assert "vae_tile" not in plain.settings


def test_at_or_below_the_threshold_the_decode_is_unchanged(tiny, monkeypatch) -> None:
    pipe, face = _load(tiny, "faceid-plusv2")
    tiles = []
    decode = type(pipe.vae).decode
    monkeypatch.setattr(type(pipe.vae), "decode",
                        lambda self, x, tile=None: tiles.append(tile) or decode(self, x, tile))
    out = pipe(PROMPT, face=face, method="baseline", seed=1, height=64, width=64)
    assert tiles == [None] and "vae_tile" not in out.settings
    monkeypatch.undo()
    assert torch.equal(out.pixels, pipe.vae.decode(out.latents))


def test_forced_vae_tile(tiny) -> None:
    pipe, face = _load(tiny, "faceid-plusv2", vae_tile=4)
    ref, _ = _load(tiny, "faceid-plusv2")
    out = pipe(PROMPT, face=face, method="baseline", seed=1, height=64, width=64)
    plain = ref(PROMPT, face=face, method="baseline", seed=1, height=64, width=64)
    assert torch.equal(out.latents, plain.latents)
    assert torch.equal(out.pixels, pipe.vae.decode(out.latents, tile=4))
    assert not torch.equal(out.pixels, plain.pixels) and out.settings["vae_tile"] == 4
    for bad in (-1, 2.5, True, "128"):
        with pytest.raises(ValueError, match="vae_tile must be"):
            _load(tiny, "faceid-plusv2", vae_tile=bad)


# ---------------------------------------------------------------------------------------------------------------
# the CLI flags


def test_cli_flags_reach_the_pipeline(tiny, tmp_path, monkeypatch) -> None:
    """``fastface generate --offload --vae-tile 4 --compile``: from_pretrained gets them, the image is the library's
    (same seed, vae_tile=4, offload; compiled there with inductor, so not compiled here), and the PNG's settings and
    reproduce command carry them."""
    import json

    import numpy as np
    from PIL import Image

    import fastface.cli
    from fastface.face_files import save_face_file
    from fastface.generation import METADATA_KEY
    from fastface.selfcheck import tiny_face

    seen = {}
    load = Pipeline.from_pretrained.__func__

    def spy(cls, *args, **kw):
        seen.update(kw)
        kw["compile"] = False  # recorded; compiling is test_pipeline_compile.py's
        return load(cls, *args, **kw)

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(spy))
    face = save_face_file(tmp_path / "me.safetensors", tiny_face())
    out = tmp_path / "img.png"
    args = ["generate", "-p", PROMPT, "--preset", "hyper", "--adapter", "faceid-plusv2", "--face", str(face),
            "--base", str(tiny.base), "--weights", str(tiny.lora), "--adapter-file", str(tiny.adapter),
            "--image-encoder", str(tiny.image_encoder), "--seed", "3", "--method", "fastface-am1", "--height", "64",
            "--width", "64", "--device", "cpu", "--dtype", "fp32", "--no-progress", "--offload", "--vae-tile", "4",
            "--compile", "--unfused-lora", "-o", str(out)]
    assert fastface.cli.main(args) == 0
    assert (seen["offload"], seen["vae_tile"], seen["compile"], seen["fuse_adapter_lora"]) == (True, 4, True, False)
    monkeypatch.undo()
    pipe, _ = _load(tiny, "faceid-plusv2", vae_tile=4, offload=True, fuse_adapter_lora=False)
    ref = pipe(PROMPT, face=tiny_face(), method="fastface-am1", seed=3, height=64, width=64)
    with Image.open(out) as im:
        meta = json.loads(im.text[METADATA_KEY])
        assert np.array_equal(np.asarray(im), np.asarray(ref.images[0]))
    assert meta["vae_tile"] == 4
    assert all(w in meta["command"].split() for w in ("--offload", "--compile", "--vae-tile", "--unfused-lora"))

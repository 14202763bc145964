"""``Pipeline.from_pretrained(..., compile=...)``: the pipeline calls :func:`fastface.compile_unet`'s module.

Tiny weights in the real layouts (selfcheck's text encoders and VAE, a micro UNet folder, a FaceID-Plus-v2 file
for it), the lightning recipe with that UNet, fp32, CPU.
The compiled pipeline (``aot_eager`` backend, ``fullgraph=True``: any graph break raises) gives the eager pipeline's
image within 1e-5 (max abs, pixels in [0, 1]) with the same UNet evaluations per image (fastface-am1 10,
fastface-am2 12), compiles once per distinct branch set (2 and 1 graphs), and a second call compiles nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from fastface.adapters.faceid_adapter import FaceIDAdapter
from fastface.compile import CompiledUNet
from fastface.models.unet import UNet, get_unet_config
from fastface.pipeline import Pipeline
from fastface.selfcheck import write_tiny_weights
from fastface.tiny import perturb, save_safetensors, write_json

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TOL = 1e-5
EVALUATIONS = {"fastface-am1": 10, "fastface-am2": 12}
MICRO = get_unet_config("tiny").replace(depth=(0, 1, 1), layers_per_block=1)
GRAPHS = {"fastface-am1": 2, "fastface-am2": 1}  # distinct branch sets of the 4-step schedule (docs/compile.md)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny text encoders and VAE (selfcheck's), a micro UNet (one transformer block per level: aot_eager compiles
    it in seconds) as a diffusers UNet folder, and a FaceID-Plus-v2 adapter written for it."""
    root = tmp_path_factory.mktemp("tiny")
    w = write_tiny_weights(root / "tiny")
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        unet = perturb(UNet(MICRO), gen)
    write_json(root / "micro" / "config.json", MICRO.to_diffusers_config())
    save_safetensors(unet, root / "micro" / "diffusion_pytorch_model.safetensors")
    run = next(a for a in FaceIDAdapter.write_tiny(root / "adapter", unet, gen, 0) if a.name == "faceid-plusv2")
    return dict(base=w.base, unet=root / "micro", **run.load), run.face


def _load(tiny, **kw) -> Pipeline:
    # lightning with a user UNet folder: that UNet as it is (no distilled file)
    return Pipeline.from_pretrained("lightning", "faceid-plusv2", dtype="fp32", device="cpu", **tiny[0], **kw)


def _generate(pipe: Pipeline, face, method: str, seed: int = 3):
    return pipe("a photo of a person", face=face, method=method, seed=seed, height=64, width=64)


@pytest.mark.parametrize("method", list(EVALUATIONS))
def test_compiled_pipeline_equals_eager(tiny, method) -> None:
    face = tiny[1]
    eager = _generate(_load(tiny), face, method)
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    pipe = _load(tiny, compile={"backend": cnt, "fullgraph": True})
    assert isinstance(pipe.unet_call, CompiledUNet) and pipe.unet_call.unet is pipe.unet
    out = _generate(pipe, face, method)
    assert dict(counters["graph_break"]) == {}
    assert cnt.frame_count == GRAPHS[method]
    err = (out.pixels - eager.pixels).abs().max().item()
    assert err <= TOL, f"{method}: compiled vs eager pixels differ by {err:.2e}"
    assert (out.latents - eager.latents).abs().max().item() <= TOL * eager.latents.abs().max().item()
    assert out.unet_evaluations == eager.unet_evaluations == EVALUATIONS[method]
    again = _generate(pipe, face, method)  # a second call: new hooks, same settings -> the cached graphs
    assert cnt.frame_count == GRAPHS[method], "the second call recompiled"
    assert torch.equal(again.pixels, out.pixels) and again.unet_evaluations == out.unet_evaluations
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks  # attached for the call only


def test_compile_true_and_bad_values(tiny) -> None:
    pipe = _load(tiny, compile=True)
    assert isinstance(pipe.unet_call, CompiledUNet)  # defaults of compile_unet (inductor); not run here
    plain = _load(tiny)
    assert plain.unet_call is plain.unet
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        _load(tiny, compile="inductor")

"""End to end on the tiny UNet: FaceID-Plus-v2 installed from an original-format file, CLIP features from our
vision encoder, DCG and AM attached by hooks, 4 steps through the samplers, for every method preset."""

from __future__ import annotations

import pytest
import torch
from test_ip_adapter import make_image_proj, make_ip_adapter, save_flat_safetensors

import fastface
from fastface import samplers
from fastface.adapters.faceid import FaceIDProjConfig
from fastface.adapters.ip_adapter import IPAdapterFaceID
from fastface.models.clip_vision import CLIPVisionEncoder
from fastface.models.unet import UNet, get_unet_config
from fastface.presets import resolve_method

METHODS = ["baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2"]
# UNet evaluations per image for a 4-step run; the official implementation spends 12 on every method.
EXPECTED_EVALUATIONS = {"baseline": 4, "dcg": 10, "am1": 4, "am2": 12, "fastface-am1": 10, "fastface-am2": 12}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = get_unet_config("tiny")
    unet = UNet(cfg).eval()
    vision = CLIPVisionEncoder("tiny").eval()
    gen = torch.Generator().manual_seed(3)
    pcfg = FaceIDProjConfig(context_dim=cfg.context_dim, plus=True, clip_dim=vision.config.hidden_size)
    dims = [attn.to_q.out_features for _, attn in unet.attention_layers()]
    path = save_flat_safetensors(
        tmp_path_factory.mktemp("plus") / "ip-adapter-faceid-plusv2_sdxl.safetensors",
        make_image_proj(pcfg, gen),
        make_ip_adapter(dims, cfg.context_dim, gen, rank=4),
    )
    adapter = IPAdapterFaceID.from_file(path)
    handle = adapter.install(unet, lora_scale=1.0)

    g = torch.Generator().manual_seed(5)
    s = vision.config.image_size
    pixels = torch.randn(1, 3, s, s, generator=g)  # stands in for a preprocessed face crop
    with torch.no_grad():
        emb = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
        id_tokens = adapter.encode(emb, vision(pixels))
        null_id = adapter.null_tokens(vision.null_features(pixels))
    cond = dict(
        context=torch.randn(1, 77, cfg.context_dim, generator=g),
        text_embeds=torch.randn(1, cfg.pooled_dim, generator=g),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    )

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, cond["context"], text_embeds=cond["text_embeds"], time_ids=cond["time_ids"],
                    id_tokens=id_tokens, id_scale=0.8)

    noise = torch.randn(1, 4, 8, 8, generator=g)
    yield unet, model, null_id, noise
    handle.remove()


def run(setup, method: str, sampler=samplers.ddim) -> tuple[torch.Tensor, int]:
    unet, model, null_id, noise = setup
    dcg, am = resolve_method(method, "hyper", adapter="faceid-plusv2")
    ts = samplers.timesteps(4, spacing="trailing")
    with fastface.attach(unet, dcg=dcg, am=am, null_id=null_id, timesteps=ts) as h:
        out = sampler(model, noise.clone(), ts, generator=torch.Generator().manual_seed(9))
        return out, h.branch_evaluations


def test_every_method_runs_deterministically_with_its_evaluation_count(setup) -> None:
    results = {}
    for method in METHODS:
        out, evals = run(setup, method)
        assert torch.isfinite(out).all()
        assert evals == EXPECTED_EVALUATIONS[method], method
        results[method] = out
    again, _ = run(setup, "fastface-am2")
    assert torch.equal(again, results["fastface-am2"])
    for method in ("dcg", "am1", "am2", "fastface-am1", "fastface-am2"):
        diff = (results[method] - results["baseline"]).abs().max() / results["baseline"].abs().max()
        assert diff > 1e-3, f"{method} gave the baseline image"
    assert not torch.equal(results["fastface-am1"], results["fastface-am2"])


def test_euler_lightning_recipe_with_fastface_am1(setup) -> None:
    out, evals = run(setup, "fastface-am1", samplers.euler)
    base, base_evals = run(setup, "baseline", samplers.euler)
    assert (evals, base_evals) == (10, 4)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)

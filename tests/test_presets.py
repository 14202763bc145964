"""fastface.presets: model/adapter/method presets, the paper's settings, overrides and their errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from fastface import hub
from fastface.am import AM1Config, AM2Config
from fastface.dcg import DCG_CONFIGS, Branch, DCGConfig, StepSchedule, Variant
from fastface.hub import HubFile, HubFolder
from fastface.presets import (
    ADAPTER_PRESETS,
    DEFAULT_METHOD,
    FP16_FIX_VAE,
    METHOD_PRESETS,
    MODEL_PRESETS,
    SDXL_BASE,
    MethodPreset,
    ModelPreset,
    Release,
    baseline_dcg,
    get_adapter_preset,
    get_model_preset,
    model_recipe,
    resolve_method,
)

# ----------------------------------------------------------------------------------------------------------------
# Models


def test_model_presets_match_the_official_recipes() -> None:
    """fastface-official.md Sec. 3 (4 steps) and sdxl-formats-samplers.md Sec. 2.2 / 3.9."""
    want = {
        # name: (sampler, params, timesteps, resolution, guidance, apply, weights)
        "hyper": ("ddim", {"eta": 0.0}, (999, 749, 499, 249), 1024, 1.0, "lora",
                  HubFile("ByteDance/Hyper-SD", "Hyper-SDXL-4steps-lora.safetensors")),
        "lightning": ("euler", {}, (999, 749, 499, 249), 1024, 1.0, "unet",
                      HubFile("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")),
        "lcm": ("lcm", {}, (999, 759, 499, 259), 1024, 1.5, "lora",
                HubFile("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors")),
        "turbo": ("euler_ancestral", {}, (999, 749, 499, 249), 512, 1.0, "none", None),
        "tcd": ("tcd", {"eta": 0.3}, (999, 759, 499, 259), 1024, 1.0, "lora",
                HubFile("h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors")),
    }
    assert set(MODEL_PRESETS) == set(want)
    for name, (sampler, params, ts, res, g, apply, weights) in want.items():
        r = model_recipe(name)
        assert (r.steps, r.sampler, r.params, r.timesteps, r.resolution, r.guidance, r.apply, r.weights) == (
            4, sampler, params, ts, res, g, apply, weights), name
        assert r.lora_scale == 1.0 and r.base == SDXL_BASE and r.vae is None
    assert model_recipe("turbo").unet == "stabilityai/sdxl-turbo"
    assert all(model_recipe(n).unet is None for n in MODEL_PRESETS if n != "turbo")


def test_released_step_counts_and_files() -> None:
    hyper = {n: model_recipe("hyper", n) for n in (1, 2, 4, 8)}
    assert {n: r.weights.filename for n, r in hyper.items()} == {
        1: "Hyper-SDXL-1step-lora.safetensors",
        2: "Hyper-SDXL-2steps-lora.safetensors",
        4: "Hyper-SDXL-4steps-lora.safetensors",
        8: "Hyper-SDXL-8steps-lora.safetensors",
    }
    assert (hyper[1].sampler, hyper[1].params, hyper[1].timesteps) == ("tcd", {"eta": 1.0}, (999,))  # card
    assert hyper[8].sampler == "ddim" and hyper[2].timesteps == (999, 499)
    for n in (2, 4, 8):
        assert model_recipe("lightning", n).weights.filename == f"sdxl_lightning_{n}step_unet.safetensors"
    assert MODEL_PRESETS["hyper"].released_steps == (1, 2, 4, 8)
    assert MODEL_PRESETS["lightning"].released_steps == (1, 2, 4, 8)
    assert MODEL_PRESETS["lcm"].released_steps is None
    for name in ("lcm", "tcd", "turbo"):
        assert model_recipe(name, 6).steps == 6


def test_unreleased_steps_are_errors_unless_weights_are_given(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'lightning' has distilled weights for 1, 2, 4, 8 steps only, not 3"):
        model_recipe("lightning", 3)
    with pytest.raises(ValueError, match=r"'hyper' has distilled weights for 1, 2, 4, 8 steps only, not 6"):
        model_recipe("hyper", 6)
    lora = tmp_path / "my.safetensors"
    r = model_recipe("hyper", 6, weights=lora)
    assert (r.steps, r.weights, r.sampler, len(r.timesteps)) == (6, lora, "ddim", 6)
    assert r.sources()["weights"] == lora
    with pytest.raises(ValueError, match="has no distilled weights file to replace"):
        model_recipe("turbo", weights=lora)
    assert model_recipe("turbo", weights=lora, apply="lora").weights == lora
    with pytest.raises(ValueError, match="integer >= 1"):
        model_recipe("lcm", 0)


def test_experimental_and_unrecommended_steps_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fastface.presets"):
        r = model_recipe("lightning", 1)
    assert r.params == {"prediction": "sample"} and r.weights.filename == "sdxl_lightning_1step_unet_x0.safetensors"
    assert "experimental" in caplog.text and "x0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastface.presets"):
        model_recipe("lcm", 4)
        model_recipe("hyper", 8)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="fastface.presets"):
        model_recipe("turbo", 8)
    assert "turbo is meant for 1-4 steps; 8" in caplog.text


def test_every_recipe_runs_its_sampler() -> None:
    """The recipe's sampler accepts its parameters and timesteps (a zero-eps model on a tiny latent)."""
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    cases = [(n, None) for n in MODEL_PRESETS] + [("hyper", 1), ("lightning", 1), ("lightning", 8)]
    for name, steps in cases:
        r = model_recipe(name, steps)
        x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
        out = r.sampler_fn(model, x, torch.tensor(r.timesteps, dtype=torch.float32),
                           generator=torch.Generator().manual_seed(1), **r.params)
        assert out.shape == x.shape and torch.isfinite(out).all(), (name, steps)


def test_hyper_one_step_tcd_equals_ddim_trailing() -> None:
    """The card's TCD (eta 1) for the 1-step LoRA and the official DDIM trailing coincide at one step."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: torch.einsum("oc,bchw->bohw", w, x) * (t / 1000)  # noqa: E731
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    r = model_recipe("hyper", 1)
    got = r.sampler_fn(model, x, torch.tensor(r.timesteps, dtype=torch.float32), **r.params)
    ref = model_recipe("hyper", 2, sampler="ddim", sampler_params={"eta": 0.0}, spacing="trailing")
    ddim = ref.sampler_fn(model, x, torch.tensor([999.0]), **ref.params)
    torch.testing.assert_close(got, ddim, rtol=1e-6, atol=1e-6)


def test_model_overrides_and_errors(tmp_path: Path) -> None:
    r = model_recipe("hyper", sampler="euler")
    assert (r.sampler, r.params) == ("euler", {})  # the old sampler's eta is dropped
    r = model_recipe("tcd", sampler_params={"eta": 0.5}, resolution=768, guidance=2.0, lora_scale=0.8)
    assert (r.params, r.resolution, r.guidance, r.lora_scale) == ({"eta": 0.5}, 768, 2.0, 0.8)
    assert model_recipe("hyper", spacing="linspace").timesteps == (999, 666, 333, 0)
    with pytest.raises(ValueError, match=r"sampler 'ddim' takes no parameter\(s\) \['gamma'\]; known parameters: eta"):
        model_recipe("hyper", sampler_params={"gamma": 1})
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'; known samplers: ddim, dpmpp_2m, euler"):
        model_recipe("hyper", sampler="heun")
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['cfg'\]; known settings: apply, base"):
        model_recipe("hyper", cfg=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        model_recipe("hyper", resolution=1020)
    with pytest.raises(ValueError, match=r"guidance must be a finite number >= 0\.0, got -1"):
        model_recipe("lcm", guidance=-1)
    with pytest.raises(ValueError, match="unknown timestep spacing 'even'"):
        model_recipe("lcm", spacing="even")
    with pytest.raises(ValueError, match=r"unknown model preset 'sd15'; known presets: hyper, lcm, lightning, tcd, turbo"):
        model_recipe("sd15")
    # preset-level overrides
    p = get_model_preset("lightning", default_steps=8, vae=FP16_FIX_VAE)
    assert model_recipe(p).weights.filename == "sdxl_lightning_8step_unet.safetensors"
    assert model_recipe(p).sources()["vae"] == HubFolder(
        FP16_FIX_VAE, required=("config.json", "diffusion_pytorch_model.safetensors"),
        allow_patterns=("config.json", "diffusion_pytorch_model.safetensors"))
    assert get_model_preset("lcm", sampler="tcd").sampler_params == ()
    with pytest.raises(ValueError, match=r"steps only, not 3"):
        get_model_preset("lightning", default_steps=3)
    with pytest.raises(ValueError, match=r"unknown model preset setting\(s\) \['step'\]; known settings: apply"):
        get_model_preset("lcm", step=3)
    with pytest.raises(ValueError, match="duplicate step counts"):
        ModelPreset("x", "", "lora", (Release("a.bin", 4), Release("b.bin", 4)), sampler="ddim")
    with pytest.raises(ValueError, match="needs a weight file in every release"):
        ModelPreset("x", "", "lora", (Release(None),), sampler="ddim")
    with pytest.raises(ValueError, match="takes no release file"):
        ModelPreset("x", "", "none", (Release("a.bin"),), sampler="ddim")


def test_sources_for_hub_and_local_bases(tmp_path: Path) -> None:
    src = model_recipe("lightning").sources("fp16")
    assert src["unet"] == HubFolder(SDXL_BASE, "unet", required=("config.json",), allow_patterns=("unet/config.json",))
    assert src["text_encoder_2"].required == ("config.json", "model.fp16.safetensors")
    assert src["vae"].allow_patterns == ("vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors")
    turbo = model_recipe("turbo").sources()
    assert turbo["unet"].repo_id == "stabilityai/sdxl-turbo" and "weights" not in turbo
    assert turbo["unet"].required == ("config.json", "diffusion_pytorch_model.safetensors")
    assert turbo["text_encoder"].repo_id == SDXL_BASE
    local = model_recipe("hyper", base=tmp_path).sources()
    assert local["text_encoder"] == tmp_path / "text_encoder" and local["unet"] == tmp_path / "unet"


def test_recipe_files_are_found_in_a_fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Presets and hub agree: the released file is found where `hf download` puts it."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    commit = "a" * 40
    repo = cache / "models--ByteDance--Hyper-SD"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "Hyper-SDXL-2steps-lora.safetensors").write_bytes(b"lora")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert hub.resolve(model_recipe("hyper", 2).sources()["weights"]).read_bytes() == b"lora"
    with pytest.raises(hub.WeightNotFoundError, match="Hyper-SDXL-4steps-lora.safetensors"):
        hub.resolve(model_recipe("hyper", 4).sources()["weights"])


# ----------------------------------------------------------------------------------------------------------------
# Adapters


def test_adapter_presets() -> None:
    fid, plus = ADAPTER_PRESETS["faceid"], ADAPTER_PRESETS["faceid-plusv2"]
    assert fid.weights == HubFile("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sdxl.bin")
    assert plus.weights == HubFile("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin")
    assert (fid.variant, plus.variant, plus.shortcut, fid.image_encoder) == ("faceid", "faceid_plus", True, ())
    assert [(e.repo_id, e.subfolder) for e in plus.image_encoder] == [
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None), ("h94/IP-Adapter", "models/image_encoder")]
    for a in (fid, plus):
        assert (a.ip_scale, a.lora_scale, a.s_scale, a.face_pack, a.det_size) == (0.8, 1.0, 1.0, "buffalo_l", 640)
    assert plus.invert_first_token and not fid.invert_first_token
    assert get_adapter_preset("faceid-plusv2", ip_scale=0.5, lora_scale=0.6).ip_scale == 0.5
    assert get_adapter_preset("faceid", image_encoder="some/folder").image_encoder == ("some/folder",)
    with pytest.raises(ValueError, match=r"unknown adapter preset 'instantid'; known adapters: faceid, faceid-plusv2, "
                                         r"pulid, pulid-v1.1"):
        get_adapter_preset("instantid")
    with pytest.raises(ValueError, match=r"unknown adapter preset setting\(s\) \['scale'\]; known settings: "):
        get_adapter_preset("faceid", scale=1.0)
    with pytest.raises(ValueError, match=r"ip_scale must be a finite number >= 0\.0, got -0\.1"):
        get_adapter_preset("faceid", ip_scale=-0.1)
    with pytest.raises(ValueError, match="needs an image_encoder"):
        get_adapter_preset("faceid-plusv2", image_encoder=())
    with pytest.raises(ValueError, match="multiple of 32"):
        get_adapter_preset("faceid", det_size=650)


# ----------------------------------------------------------------------------------------------------------------
# Methods


def test_paper_settings() -> None:
    assert DEFAULT_METHOD == "fastface-am1"
    assert set(METHOD_PRESETS) == {"baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2"}
    for name in ("dcg", "fastface-am1", "fastface-am2"):
        dcg, _ = resolve_method(name, "hyper")
        assert dcg.variant is Variant.DCG2 and dcg.rescale == 0.75
        assert dcg.coefficients(4) == ((1.0, 1.5, 1.5, 1.0), (1.0, 3.0, 3.0, 1.0))
    _, am1 = resolve_method("fastface-am1", "hyper")
    assert isinstance(am1, AM1Config) and (am1.p, am1.s_up, am1.s_down, am1.clamp) == (1.3, 1.45, 1.55, 10.0)
    _, am2 = resolve_method("fastface-am2", "hyper")
    steps = am2.steps(4)
    assert [s.d for s in steps] == [7.5, 5.0, 5.0, 5.0] and [s.s for s in steps] == [1.0, 1.55, 1.55, 1.55]
    assert {s.q for s in steps} == {0.65} and {s.w for s in steps} == {0.7} and am2.invert_first
    # AM-only AM2 is the official config without AdaIN, under the baseline guidance, all three branches kept
    dcg, am2_only = resolve_method("am2", "turbo")
    assert am2_only == AM2Config(adain=False) and {s.w for s in am2_only.steps(4)} == {None}
    assert dcg == DCG_CONFIGS["none"] and dcg.needed(4, keep_all=True) == ((Branch.UNCOND, Branch.ID, Branch.TEXT_ID),) * 4
    assert resolve_method("am1", "lightning") == (DCG_CONFIGS["none"], AM1Config())
    assert resolve_method("dcg", "hyper")[1] is None and resolve_method("baseline", "hyper")[1] is None


def test_baseline_guidance_is_the_models() -> None:
    branches = {b: torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(i))
                for i, b in enumerate((Branch.UNCOND, Branch.ID, Branch.TEXT_ID))}
    u, t = branches[Branch.UNCOND], branches[Branch.TEXT_ID]
    # LCM: plain CFG 1.5 with the zero-text, zero-id null; needs only those two branches
    for method in ("baseline", "am1", "am2"):
        dcg, _ = resolve_method(method, "lcm")
        assert dcg == DCG_CONFIGS["cfg1.5"] == baseline_dcg(1.5)
        assert dcg.needed(4) == ((Branch.UNCOND, Branch.TEXT_ID),) * 4
        for i in range(4):
            torch.testing.assert_close(dcg.guide(branches, i, 4), u + 1.5 * (t - u), rtol=1e-6, atol=1e-6)
    # the others: g = 1, the conditional prediction alone, bit for bit
    for model in ("hyper", "lightning", "turbo", "tcd"):
        dcg, _ = resolve_method("baseline", model)
        assert dcg.needed(4) == ((Branch.TEXT_ID,),) * 4
        assert torch.equal(dcg.guide({Branch.TEXT_ID: t}, 2, 4), t)
    # model given as a recipe, a number, or not at all
    assert resolve_method("baseline", model_recipe("lcm"))[0] == baseline_dcg(1.5)
    assert resolve_method("baseline", 2.0)[0].coefficients(2) == ((2.0, 2.0), (2.0, 2.0))
    assert resolve_method("baseline")[0] == DCG_CONFIGS["none"]
    # DCG methods ignore the model's guidance (the paper uses the same lists for LCM)
    assert resolve_method("dcg", "lcm")[0] == DCG_CONFIGS["paper"]


def test_method_overrides() -> None:
    dcg, am = resolve_method("fastface-am1", "hyper", alpha=2.0, beta=[1, 4, 4, 2], rescale=None, s_up=1.6)
    assert dcg.coefficients(4) == ((1.0, 2.0, 2.0, 1.0), (1.0, 4.0, 4.0, 2.0)) and dcg.rescale is None
    assert am == AM1Config(s_up=1.6)
    dcg, _ = resolve_method("dcg", "hyper", alpha=StepSchedule.constant(1.2), variant="dcg3")
    assert dcg.alpha.resolve(3) == (1.2, 1.2, 1.2) and dcg.variant is Variant.DCG3
    _, am = resolve_method("fastface-am2", "hyper", d=6.0, s=[1.0, 1.4, 1.4, 1.4], adain=False, q=0.5)
    assert [x.d for x in am.steps(4)] == [6.0] * 4 and [x.s for x in am.steps(4)][1] == 1.4
    assert (am.adain, am.q.values) == (False, (0.5,))
    assert resolve_method("baseline", "hyper", guidance=1.5)[0] == baseline_dcg(1.5)
    # the adapter decides AM2's first-token inversion unless set explicitly
    assert not resolve_method("fastface-am2", "hyper", adapter="faceid")[1].invert_first
    assert resolve_method("am2", "hyper", adapter="faceid-plusv2")[1].invert_first
    assert resolve_method("am2", "hyper", adapter="faceid", invert_first=True)[1].invert_first
    custom = MethodPreset("mine", "", DCGConfig(rescale=0.5), None)
    assert resolve_method(custom, "hyper")[0].rescale == 0.5


def test_method_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'cfg'; known methods: am1, am2, baseline, dcg, fastface-am1"):
        resolve_method("cfg", "hyper")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['s_up'\] for method 'dcg'.*has no AM"):
        resolve_method("dcg", "hyper", s_up=1.5)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['d'\] for method 'am1'; known settings: .*s_down"):
        resolve_method("am1", "hyper", d=5.0)
    with pytest.raises(ValueError, match="'guidance' .* applies to baseline, am1 and am2"):
        resolve_method("fastface-am1", "hyper", guidance=2.0)
    with pytest.raises(ValueError, match=r"method 'dcg': .*rescale \(phi\) must be a finite number in \[0.0, 1.0\]"):
        resolve_method("dcg", "hyper", rescale=1.5)
    with pytest.raises(ValueError, match=r"method 'fastface-am2': AM2 quantile q must lie in \(0.0, 1.0\)"):
        resolve_method("fastface-am2", "hyper", q=1.5)
    with pytest.raises(ValueError, match="adain must be True or False"):
        resolve_method("fastface-am2", "hyper", adain="yes")
    with pytest.raises(ValueError, match="alpha must be a StepSchedule, a number or a per-step list"):
        resolve_method("dcg", "hyper", alpha="high")
    with pytest.raises(ValueError, match="unknown DCG variant 'dcg9'"):
        resolve_method("dcg", "hyper", variant="dcg9")
    with pytest.raises(ValueError, match=r"guidance must be a finite number >= 0\.0, got -1"):
        resolve_method("baseline", "hyper", guidance=-1.0)
    with pytest.raises(ValueError, match="unknown model preset 'sd3'"):
        resolve_method("baseline", "sd3")
    with pytest.raises(ValueError, match="unknown adapter preset 'x'"):
        resolve_method("am2", "hyper", adapter="x")


def test_presets_are_frozen() -> None:
    with pytest.raises(AttributeError):
        MODEL_PRESETS["hyper"].guidance = 2.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ADAPTER_PRESETS["faceid"].ip_scale = 1.0  # type: ignore[misc]
    assert os.fspath(model_recipe("hyper", base="./local").sources()["vae"]) == os.path.join("local", "vae")

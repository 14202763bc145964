"""fastface.samplers against diffusers' schedulers (driven as StableDiffusionXLPipeline drives them), plus the
timestep fixtures of the reference notes, determinism, callbacks and every error path."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)

import fastface.samplers as S

# SDXL base 1.0 scheduler/scheduler_config.json; every scheduler below is built from it like X.from_config(...)
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SHAPE = (2, 4, 8, 8)
STEPS = [1, 2, 3, 4, 8]
RTOL = 1e-6  # max|ours - diffusers| / max|diffusers|, fp32

# diffusers' schedulers call np.array() on torch tensors, which numpy 2 flags as deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class EpsModel:
    """A deterministic random ε model: a fixed random linear map of x, a tanh, and smooth functions of t."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE[1:])
        self.a = torch.randn(d, d, generator=g) * (0.5 / d**0.5)
        self.b = torch.randn(SHAPE[1:], generator=g)
        self.c = torch.randn(SHAPE[1:], generator=g)
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.as_tensor(t))
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        lin = (x.flatten(1) @ self.a).view_as(x)
        return lin + 0.3 * torch.tanh(x) + self.b * torch.sin(t / 137.0) + self.c * torch.cos(t / 311.0) * t / 1000


# name -> (our sampler, our kwargs, timesteps(n) kwargs, diffusers class, config overrides, step kwargs)
CASES = {
    "euler": (S.euler, {}, {"spacing": "trailing"}, EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, {}),
    "euler_x0": (
        S.euler,
        {"prediction": "sample"},
        {"spacing": "trailing"},
        EulerDiscreteScheduler,
        {"timestep_spacing": "trailing", "prediction_type": "sample"},
        {},
    ),
    "euler_leading": (S.euler, {"vp_init": True}, {"spacing": "leading"}, EulerDiscreteScheduler, {}, {}),
    "euler_linspace": (
        S.euler,
        {},
        {"spacing": "linspace"},
        EulerDiscreteScheduler,
        {"timestep_spacing": "linspace"},
        {},
    ),
    "euler_ancestral": (
        S.euler_ancestral,
        {},
        {"spacing": "trailing"},
        EulerAncestralDiscreteScheduler,
        {"timestep_spacing": "trailing"},
        {},
    ),
    "ddim": (S.ddim, {}, {"spacing": "trailing"}, DDIMScheduler, {"timestep_spacing": "trailing"}, {"eta": 0.0}),
    "ddim_eta0.7": (
        S.ddim,
        {"eta": 0.7},
        {"spacing": "trailing"},
        DDIMScheduler,
        {"timestep_spacing": "trailing"},
        {"eta": 0.7},
    ),
    "lcm": (S.lcm, {}, {"spacing": "lcm"}, LCMScheduler, {}, {}),
    "tcd": (S.tcd, {}, {"spacing": "lcm"}, TCDScheduler, {}, {"eta": 0.3}),
    "tcd_eta1": (S.tcd, {"eta": 1.0}, {"spacing": "lcm"}, TCDScheduler, {}, {"eta": 1.0}),
    "tcd_eta0": (S.tcd, {"gamma": 0.0}, {"spacing": "lcm"}, TCDScheduler, {}, {"eta": 0.0}),
    "dpmpp_2m": (
        S.dpmpp_2m,
        {},
        {"spacing": "trailing"},
        DPMSolverMultistepScheduler,
        {"timestep_spacing": "trailing"},
        {},
    ),
    "dpmpp_2m_karras": (
        S.dpmpp_2m,
        {"karras": True},
        {"spacing": "karras"},
        DPMSolverMultistepScheduler,
        {"timestep_spacing": "trailing", "use_karras_sigmas": True},
        {},
    ),
}
STOCHASTIC = {"euler_ancestral": {}, "ddim": {"eta": 0.7}, "lcm": {}, "tcd": {"eta": 0.3}}


def run_diffusers(cls, overrides: dict, step_kwargs: dict, seed: int, n: int | None = None, custom=None):
    """The StableDiffusionXLPipeline denoising loop around a diffusers scheduler, with a stand-in UNet."""
    sched = cls.from_config({**SDXL_SCHEDULER_CONFIG, **overrides})
    sched.set_timesteps(n) if custom is None else sched.set_timesteps(timesteps=custom)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    model = EpsModel()
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, generator=g, return_dict=False, **step_kwargs)[0]
    return latents, sched.timesteps


def run_ours(fn, kwargs: dict, ts: torch.Tensor, seed: int, **extra):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    return fn(EpsModel(), x, ts, generator=g, **kwargs, **extra)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name: str, n: int) -> None:
    fn, kwargs, ts_kwargs, cls, overrides, step_kwargs = CASES[name]
    ref, ref_ts = run_diffusers(cls, overrides, step_kwargs, seed=1234 + n, n=n)
    ts = S.timesteps(n, **ts_kwargs)
    assert torch.equal(ts, ref_ts.float()), (ts, ref_ts)
    ours = run_ours(fn, kwargs, ts, seed=1234 + n)
    assert torch.isfinite(ref).all()
    err = rel_err(ours, ref)
    assert err <= RTOL, f"{name} n={n}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "fn, cls, kwargs, custom",
    [
        (S.lcm, LCMScheduler, {}, [800]),  # Hyper-SD 1-step UNet
        (S.lcm, LCMScheduler, {}, [999, 499, 99, 9, 2]),  # small t: c_skip/c_out far from 0/1
        (S.tcd, TCDScheduler, {"eta": 0.5}, [999, 499, 99, 9, 2]),
    ],
)
def test_custom_timesteps_parity(fn, cls, kwargs: dict, custom: list[int]) -> None:
    ts = S.timesteps(custom=custom)
    assert ts.tolist() == [float(t) for t in custom]
    ref, _ = run_diffusers(cls, {}, kwargs, seed=7, custom=custom)
    err = rel_err(run_ours(fn, kwargs, ts, seed=7), ref)
    assert err <= RTOL, f"{fn.__name__} {custom}: relative error {err:.2e}"


def test_schedule_equals_diffusers_and_notes() -> None:
    ref = DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    assert torch.equal(S.alphas_cumprod(), ref.alphas_cumprod)
    assert torch.equal(S.sdxl_schedule().betas, ref.betas)
    acp, sig = S.alphas_cumprod(), S.sigmas()
    assert acp[0].item() == pytest.approx(0.99915, abs=1e-5) and acp[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert sig[999].item() == pytest.approx(14.6147, abs=1e-4) and sig[0].item() == pytest.approx(0.029168, rel=1e-4)
    trailing = S.sigma_at(S.timesteps(4)).tolist()
    assert trailing == pytest.approx([14.6147, 4.0817, 1.6129, 0.6932], abs=1e-4)


def test_timestep_fixtures_from_notes() -> None:
    assert S.timesteps(4, "lcm").tolist() == [999, 759, 499, 259]
    assert S.timesteps(8, "lcm").tolist() == [999, 879, 759, 639, 499, 379, 259, 139]
    assert S.timesteps(3, "lcm").tolist() == [999, 679, 339]
    assert S.timesteps(4, "trailing").tolist() == [999, 749, 499, 249]
    assert S.timesteps(3).tolist() == [999, 666, 332]
    assert S.timesteps(8).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    assert S.timesteps(4, "leading").tolist() == [751, 501, 251, 1]
    assert S.timesteps(4, "karras").tolist() == [999, 687, 146, 0]
    assert S.timesteps(1).tolist() == [999] and S.timesteps(1, "lcm").tolist() == [999]
    ts = S.timesteps(4)
    assert ts.dtype == torch.float32 and ts.dim() == 1


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "lcm", "karras"])
def test_timesteps_equal_diffusers_for_1_to_50_steps(spacing: str) -> None:
    cls, over = {
        "trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
        "leading": (EulerDiscreteScheduler, {}),
        "linspace": (EulerDiscreteScheduler, {"timestep_spacing": "linspace"}),
        "lcm": (TCDScheduler, {}),
        "karras": (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing", "use_karras_sigmas": True}),
    }[spacing]
    sched = cls.from_config({**SDXL_SCHEDULER_CONFIG, **over})
    for n in range(1, 51):
        sched.set_timesteps(n)
        assert torch.equal(S.timesteps(n, spacing), sched.timesteps.float()), (spacing, n)


def test_ddim_previous_timestep_rule_n3() -> None:
    """With ε ≡ 0 each DDIM step multiplies x by √(ᾱ_prev/ᾱ_t), prev = t - 1000//3: 999→666, 666→333, 332→ᾱ_0."""
    acp = S.alphas_cumprod().double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = S.ddim(lambda x_t, t: torch.zeros_like(x_t), x, S.timesteps(3))
    factor = (acp[666] / acp[999] * acp[333] / acp[666] * acp[0] / acp[332]).sqrt().item()
    assert rel_err(out, x * factor) <= 1e-6
    assert abs(factor - (acp[0] / acp[999]).sqrt().item()) > 1e-4  # the plain "next timestep" rule would differ


def test_tcd_final_output_is_noised_at_s0_and_euler_last_step_returns_x0() -> None:
    acp = S.alphas_cumprod()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    e = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    out = S.tcd(lambda x_t, t: e, x, S.timesteps(1, "lcm"), eta=0.3)
    x0 = (x - (1 - acp[999]).sqrt() * e) / acp[999].sqrt()
    assert rel_err(out, acp[0].sqrt() * x0 + (1 - acp[0]).sqrt() * e) <= 1e-6
    s = S.sigmas()[999]
    out = S.euler_ancestral(lambda x_t, t: e, x, S.timesteps(1))
    assert torch.equal(out, x * s - s * e)
    assert torch.equal(S.euler(lambda x_t, t: e, x, S.timesteps(1), prediction="sample"), e)  # Lightning 1-step x0


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_result(name: str) -> None:
    fn, kwargs, ts_kwargs, *_ = CASES[name]
    ts = S.timesteps(4, **ts_kwargs)
    assert torch.equal(run_ours(fn, kwargs, ts, seed=9), run_ours(fn, kwargs, ts, seed=9))


@pytest.mark.parametrize("name", list(CASES))
def test_generator_changes_only_stochastic_samplers(name: str) -> None:
    fn, kwargs, ts_kwargs, *_ = CASES[name]
    ts = S.timesteps(4, **ts_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = fn(EpsModel(), x, ts, generator=torch.Generator().manual_seed(1), **kwargs)
    b = fn(EpsModel(), x, ts, generator=torch.Generator().manual_seed(2), **kwargs)
    eta = kwargs.get("eta", kwargs.get("gamma", 0.3 if fn is S.tcd else 0.0))
    stochastic = eta > 0 or fn in (S.euler_ancestral, S.lcm)
    assert (not torch.equal(a, b)) == stochastic
    if stochastic:
        assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "ddim", "lcm", "tcd", "dpmpp_2m"])
def test_callback_and_model_contract(name: str) -> None:
    fn = S.SAMPLERS[name]
    ts = S.timesteps(4, "lcm" if name in ("lcm", "tcd") else "trailing")
    model, calls = EpsModel(), []
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out = fn(model, x, ts, generator=g, callback=lambda i, t, xt: calls.append((i, t, xt)))
    assert [(i, t) for i, t, _ in calls] == list(enumerate(ts.tolist()))
    assert torch.equal(calls[-1][2], out) and all(xt.shape == SHAPE for *_, xt in calls)
    assert len(model.seen) == 4
    for t_b, t in zip(model.seen, ts):
        assert t_b.dtype == torch.float32 and t_b.shape == () and t_b.device.type == "cpu" and t_b == t


def test_registry() -> None:
    assert set(S.SAMPLERS) == {"euler", "euler_ancestral", "ddim", "lcm", "tcd", "dpmpp_2m"}


def _zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.timesteps(0), "1..1000"),
        (lambda: S.timesteps(1001), "1..1000"),
        (lambda: S.timesteps(2.0), "integer"),
        (lambda: S.timesteps(4, "cosine"), "trailing, leading, linspace, lcm, karras"),
        (lambda: S.timesteps(custom=[1000, 500]), "0..999"),
        (lambda: S.timesteps(custom=[500, -1]), "0..999"),
        (lambda: S.timesteps(custom=[200, 800]), "descending"),
        (lambda: S.timesteps(custom=[]), "1..1000"),
        (lambda: S.timesteps(2, custom=[800]), "does not match"),
        (lambda: S.timesteps(51, "lcm"), "original_steps"),
        (lambda: S.timesteps(4, "lcm", original_steps=0), "original_steps"),
        (lambda: S.timesteps(1000, "leading"), "0..999"),
        (lambda: S.euler(_zero, torch.randn(SHAPE), torch.tensor([1000.0])), "0..999"),
        (lambda: S.lcm(_zero, torch.randn(SHAPE), torch.tensor([-1.0])), "0..999"),
        (lambda: S.ddim(_zero, torch.randn(SHAPE), torch.tensor([])), "non-empty 1-D"),
        (lambda: S.tcd(_zero, torch.randn(SHAPE), torch.ones(2, 2)), "non-empty 1-D"),
        (lambda: S.dpmpp_2m(_zero, torch.randn(SHAPE), torch.tensor([249.0, 999.0])), "descending"),
        (lambda: S.euler(_zero, torch.ones(SHAPE, dtype=torch.long), S.timesteps(2)), "floating-point"),
        (lambda: S.ddim(_zero, torch.randn(SHAPE), S.timesteps(2), eta=1.5), r"eta must be a number in \[0, 1\]"),
        (lambda: S.ddim(_zero, torch.randn(SHAPE), S.timesteps(2), eta=-0.1), r"\[0, 1\]"),
        (lambda: S.tcd(_zero, torch.randn(SHAPE), S.timesteps(2, "lcm"), eta=1.01), r"\[0, 1\]"),
        (lambda: S.tcd(_zero, torch.randn(SHAPE), S.timesteps(2, "lcm"), gamma=-1.0), r"\[0, 1\]"),
        (lambda: S.tcd(_zero, torch.randn(SHAPE), S.timesteps(2, "lcm"), eta=0.3, gamma=0.5), "not both"),
        (lambda: S.euler(_zero, torch.randn(SHAPE), S.timesteps(2), prediction="v"), "'epsilon' or 'sample'"),
        (lambda: S.dpmpp_2m(_zero, torch.randn(SHAPE), S.timesteps(4), karras=True), "timesteps\\(n, 'karras'\\)"),
        (lambda: S.euler(lambda x, t: x[:1], torch.randn(SHAPE), S.timesteps(2)), "shaped like its input"),
    ],
)
def test_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()

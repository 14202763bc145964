"""AM (fastface.am) against references written here from the official semantics, plus properties and errors.

The references transcribe reference/fastface-official.md Sec. 2.2-2.3 with explicit loops (torch.quantile per
(b, head, token) slice, min/max per token column, AdaIN statistics from their formulas), independent of the
library code. Maps are random softmax maps at batch 3 (the three DCG branches of one image), fp32, tolerance 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastface import am
from fastface.am import AM1Config, AM2Config
from fastface.dcg import StepSchedule

TOL = 1e-6
B, H, N, K, D = 3, 2, 64, 4, 16


def _maps(b: int = B, seed: int = 0, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, H, N, k, generator=g) * 2.0, dim=-1)


def _values(b: int = B, seed: int = 1, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, k, D, generator=g)


# --- references ----------------------------------------------------------------------------------------------


def ref_scale_power(a, s, p):
    out = torch.empty_like(a)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in a.shape)).tolist():
        out[tuple(idx)] = min(s * float(a[tuple(idx)]) ** p, 10.0)
    return out


def ref_softmask(a, d, s, q, invert):
    """Official steps 1-6 (notes Sec. 2.3), whole-batch normalisation (dims 0, 1, 2 per token)."""
    x = a.clone()
    if invert:
        x[..., 0] = 1 - x[..., 0]
    b, h, n, k = x.shape

    def norm(y):
        out = torch.empty_like(y)
        for t in range(k):
            col = y[..., t]
            out[..., t] = (col - col.min()) / (col.max() - col.min())
        return out

    quant = torch.empty(b, h, 1, k)
    for i in range(b):
        for j in range(h):
            for t in range(k):
                quant[i, j, 0, t] = torch.quantile(x[i, j, :, t].float(), q)
    quant = quant.clamp(min=1e-6)
    y = torch.clamp(s * norm(torch.sigmoid(d * (norm(x) - quant))), max=10.0)
    if invert:
        for i in range(b):
            for j in range(h):
                y[i, j, :, 0] = y[i, j, :, 0].max() - y[i, j, :, 0]
    return y


def _stats(row):
    m = row.sum() / len(row)
    sd = math.sqrt(float(((row - m) ** 2).sum()) / (len(row) - 1))
    return m, sd


def ref_adain_rows(xt, x, w):
    """Per row of the last axis: w·xt + (1−w)·((xt − μt)σ/(σt + 1e-6) + μ); unbiased std."""
    out = torch.empty_like(xt)
    flat_t, flat, flat_o = xt.reshape(-1, xt.shape[-1]), x.reshape(-1, x.shape[-1]), out.view(-1, xt.shape[-1])
    for r in range(flat_t.shape[0]):
        mt, st = _stats(flat_t[r].double())
        m, sd = _stats(flat[r].double())
        restyled = (flat_t[r].double() - mt) * sd / (st + 1e-6) + m
        flat_o[r] = (w * flat_t[r].double() + (1 - w) * restyled).float()
    return out


def ref_am2(a, v, d, s, q, w, invert):
    """Official AM2 with AdaIN: map transform, AdaIN on maps, A_f @ V, AdaIN on outputs with NaN fallback."""
    a_t = ref_softmask(a, d, s, q, invert)
    a_f = ref_adain_rows(a_t, a, w)
    o_t = torch.einsum("bhnk,bhkd->bhnd", a_f, v)
    o = torch.einsum("bhnk,bhkd->bhnd", a, v)
    o_r = ref_adain_rows(o_t, o, w)
    return a_f, (o_t if torch.isnan(o_r).any() else o_r)


# --- parity with the references -------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["up", "down"])
def test_scale_power_matches_reference(part):
    a = _maps(b=1, k=4)[:, :, :16]
    cfg = AM1Config()
    out = cfg.apply(a, part)
    s = 1.45 if part == "up" else 1.55  # official scales_map
    assert (out - ref_scale_power(a, s, 1.3)).abs().max() < TOL


def test_scale_power_clamps_at_ten():
    a = torch.full((1, 1, 2, 2), 0.9)
    assert torch.equal(am.scale_power(a, 20.0), torch.full_like(a, 10.0))


@pytest.mark.parametrize("invert", [True, False])
@pytest.mark.parametrize("d,s", [(7.5, 1.0), (5.0, 1.55)])
def test_softmask_matches_reference(invert, d, s):
    a = _maps()
    out = am.softmask(a, d, s, 0.65, invert_first=invert)
    err = (out - ref_softmask(a, d, s, 0.65, invert)).abs().max()
    assert out.dtype == a.dtype and err < TOL


@pytest.mark.parametrize("step", [0, 1, 3])
def test_am2_with_adain_matches_reference(step):
    a, v = _maps(), _values()
    cfg = AM2Config()
    p = cfg.step(step, 4)
    a_f = cfg.apply(a, step, 4)
    o_t = a_f @ v
    o = cfg.apply_output(o_t, a, v, step, 4)
    ref_a, ref_o = ref_am2(a, v, p.d, p.s, 0.65, 0.7, invert=True)
    assert (a_f - ref_a).abs().max() < TOL
    assert (o - ref_o).abs().max() < TOL


def test_adain_output_nan_falls_back():
    a, v = _maps(), _values()
    o_t = a @ v
    o_t[0, 0, 0, 0] = float("nan")
    out = am.adain_output(o_t, a, v, 0.7)
    # Official: any NaN in the AdaIN result -> the transformed output unchanged (here, for the image's branches).
    assert torch.equal(torch.nan_to_num(out, nan=-7.0), torch.nan_to_num(o_t, nan=-7.0))


def test_no_adain_config():
    a = _maps()
    cfg = am.get_am_config("am2_no_adain")
    torch.testing.assert_close(cfg.apply(a, 1, 4), ref_softmask(a, 5.0, 1.55, 0.65, True), rtol=0, atol=TOL)
    o_t = torch.randn(B, H, N, D)
    assert cfg.apply_output(o_t, a, _values(), 1, 4) is o_t


def test_spatial_quantile_matches_torch():
    x = torch.rand(2, 3, 101, 4)
    for q in (0.65, 0.5, 0.01, 0.99, torch.tensor(0.3)):
        ref = torch.quantile(x, float(q), dim=-2, keepdim=True)
        torch.testing.assert_close(am.spatial_quantile(x, q), ref, rtol=0, atol=0)


# --- properties ---------------------------------------------------------------------------------------------


def test_schedule_rule():
    cfg = AM2Config()
    steps = cfg.steps(4)
    assert [p.d for p in steps] == [7.5, 5.0, 5.0, 5.0]
    assert [p.s for p in steps] == [1.0, 1.55, 1.55, 1.55]
    assert {p.q for p in steps} == {0.65} and {p.w for p in steps} == {0.7}
    assert [p.d for p in cfg.steps(1)] == [7.5]
    assert [p.s for p in cfg.steps(6)] == [1.0] + [1.55] * 5


def test_batch_invariance_with_groups():
    g = 4
    imgs = [_maps(seed=10 + i) for i in range(g)]  # each [3 branches, H, N, K]
    vals = [_values(seed=20 + i) for i in range(g)]
    # Batch layout of chunk(3): index = branch * g + image.
    batch = torch.stack(imgs, dim=1).reshape(B * g, H, N, K)
    vbatch = torch.stack(vals, dim=1).reshape(B * g, H, K, D)
    cfg = AM2Config()
    a_f = cfg.apply(batch, 1, 4, groups=g)
    o = cfg.apply_output(a_f @ vbatch, batch, vbatch, 1, 4, groups=g)
    for i in range(g):
        alone_a = cfg.apply(imgs[i], 1, 4)
        alone_o = cfg.apply_output(alone_a @ vals[i], imgs[i], vals[i], 1, 4)
        torch.testing.assert_close(a_f[i::g], alone_a, rtol=0, atol=1e-7)
        torch.testing.assert_close(o[i::g], alone_o, rtol=0, atol=1e-7)
    # Without groups the normalisation spans all 12 entries and the image changes: the coupling is real.
    coupled = cfg.apply(batch, 1, 4, groups=1)
    assert (coupled[0::g] - cfg.apply(imgs[0], 1, 4)).abs().max() > 1e-3


def test_nan_fallback_is_per_image():
    g = 2
    a = torch.stack([_maps(seed=1), _maps(seed=2)], dim=1).reshape(B * g, H, N, K)
    v = torch.stack([_values(seed=3), _values(seed=4)], dim=1).reshape(B * g, H, K, D)
    o_t = a @ v
    o_t[g * 1 + 0, 0, 0, 0] = float("nan")  # branch 1 of image 0
    out = am.adain_output(o_t, a, v, 0.7, groups=g)
    assert torch.equal(out[0::g].nan_to_num(nan=5.0), o_t[0::g].nan_to_num(nan=5.0))
    torch.testing.assert_close(out[1::g], am.adain_output(o_t[1::g], a[1::g], v[1::g], 0.7))


def test_fp16_in_fp16_out():
    a = _maps().half()
    out = am.am2_probs(a, 5.0, 1.55)
    assert out.dtype == torch.float16
    ref = am.am2_probs(a.float(), 5.0, 1.55)
    assert (out.float() - ref).abs().max() < 1e-2


def test_per_sample_tensor_coefficients():
    a = _maps()
    d, s = torch.tensor([7.5, 5.0, 5.0]), torch.tensor([1.0, 1.55, 1.0])
    out = am.softmask(a, d, s)
    # Per-branch d and s (the normalisation still spans the branches, so they are not separable per sample).
    ref = ref_softmask(a, d.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1), 0.65, True)
    assert (out - ref).abs().max() < TOL
    same = am.softmask(a, torch.full((B,), 5.0), torch.full((B,), 1.55))
    assert (same - ref_softmask(a, 5.0, 1.55, 0.65, True)).abs().max() < TOL


def test_compiles_without_graph_breaks():
    a, v = _maps(), _values()
    d, s, q, w = torch.tensor(5.0), torch.tensor(1.55), torch.tensor(0.65), torch.tensor(0.7)

    def run(a, v, d, s, q, w):
        a_f = am.am2_probs(a, d, s, q, w)
        return am.adain_output(a_f @ v, a, v, w), am.scale_power(a, s)

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for x, y in zip(compiled(a, v, d, s, q, w), run(a, v, d, s, q, w)):
        torch.testing.assert_close(x, y)


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a: am.softmask(a, 5.0, 1.55, q=1.0), r"quantile q must lie in \(0, 1\)"),
        (lambda a: am.softmask(a, 5.0, 1.55, q=0.0), "quantile"),
        (lambda a: am.softmask(a, -5.0, 1.55), "sharpness d"),
        (lambda a: am.softmask(a, 5.0, -1.0), "scale s"),
        (lambda a: am.softmask(a, 5.0, 1.55, groups=2), "dividing the batch size 3"),
        (lambda a: am.softmask(a[0], 5.0, 1.55), r"\[batch, heads, positions, tokens\]"),
        (lambda a: am.scale_power(a, -1.45), "AM1 scale"),
        (lambda a: am.scale_power(a, 1.45, p=-1.0), "AM1 power"),
        (lambda a: am.adain_maps(a, a, 1.5), "AdaIN weight"),
        (lambda a: am.adain_maps(a, a[:, :, :8], 0.7), "equal shapes"),
        (lambda a: am.adain_maps(a[..., :1], a[..., :1], 0.7), "at least 2"),
        (lambda a: am.adain_output(a @ _values(), a, _values()[:, :, :2], 0.7), "values must be"),
        (lambda a: am.adain_output((a @ _values())[:, :, :8], a, _values(), 0.7), "head output must be"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(_maps())


def test_bad_configs():
    with pytest.raises(ValueError, match="quantile"):
        AM2Config(q=StepSchedule.constant(1.0))
    with pytest.raises(ValueError, match="AdaIN weight"):
        AM2Config(w=StepSchedule.constant(1.5))
    with pytest.raises(ValueError, match="schedule value"):
        AM2Config(d=StepSchedule.first_step(-7.5, 5.0))
    with pytest.raises(ValueError, match="cannot cover 5 steps"):
        AM2Config(s=StepSchedule.custom([1.0, 1.55, 1.55, 1.55])).steps(5)
    with pytest.raises(ValueError, match="StepSchedule"):
        AM2Config(d=7.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="AM1Config.s_up"):
        AM1Config(s_up=-1.0)
    with pytest.raises(ValueError, match="'up' and 'down'"):
        AM1Config().scale("mid")
    with pytest.raises(ValueError, match="step index"):
        AM2Config().step(-1, 4)
    with pytest.raises(ValueError, match="unknown AM config"):
        am.get_am_config("am3")

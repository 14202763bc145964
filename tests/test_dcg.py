"""DCG (fastface.dcg) against references written here from the official semantics, plus properties and errors.

The references transcribe reference/fastface-official.md Sec. 1 element by element in float64 numpy, independent
of the library code. Tolerance: 1e-6 absolute on fp32 predictions (relative where |value| > 1,
since the guided outputs reach magnitudes near 10).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fastface import dcg
from fastface.dcg import Branch, DCGConfig, StepSchedule, Variant

TOL = 1e-6


def _preds(b: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (b, 4, 8, 8)
    # Different scales per branch so the rescale ratio is far from 1.
    return tuple(torch.randn(shape, generator=g) * s for s in (1.0, 1.3, 0.8))  # type: ignore[return-value]


# --- references ----------------------------------------------------------------------------------------------


def ref_combine(u, e1, e2, alpha, beta, variant):
    """Paper Eq. 16/17/18 element by element (code dcg_type 1/3/2)."""
    u, e1, e2 = (np.asarray(x, dtype=np.float64) for x in (u, e1, e2))
    out = np.empty_like(u)
    for idx in np.ndindex(u.shape):
        if variant == "dcg3":  # eps(∅,∅) + α(eps(t,∅) − eps(∅,∅)) + β(eps(∅,id) − eps(∅,∅))
            out[idx] = u[idx] + alpha * (e1[idx] - u[idx]) + beta * (e2[idx] - u[idx])
        else:  # dcg1 / dcg2: second term relative to branch 1
            out[idx] = u[idx] + alpha * (e1[idx] - u[idx]) + beta * (e2[idx] - e1[idx])
    return out


def _std_unbiased(x: np.ndarray) -> float:
    vals = x.reshape(-1)
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def ref_rescale(eps, e1, e2, phi):
    """Official: r = (σ(out1) + σ(out2)) / (2σ(ε̂)) per sample over C,H,W; ε̂ · (φ r + 1 − φ)."""
    eps, e1, e2 = (np.asarray(x, dtype=np.float64) for x in (eps, e1, e2))
    out = np.empty_like(eps)
    for b in range(eps.shape[0]):
        r = (_std_unbiased(e1[b]) + _std_unbiased(e2[b])) / (2 * _std_unbiased(eps[b]))
        out[b] = eps[b] * (phi * r + (1 - phi))
    return out


def _maxerr(a: torch.Tensor, ref: np.ndarray) -> float:
    """Max error relative to max(1, |ref|): absolute below 1, relative above (fp32 ulp grows with magnitude)."""
    return float((np.abs(a.double().numpy() - ref) / np.maximum(1.0, np.abs(ref))).max())


# --- parity with the references -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dcg1", "dcg2", "dcg3"])
@pytest.mark.parametrize("alpha,beta", [(1.5, 3.0), (1.0, 1.0), (0.0, 2.0), (2.5, 0.0)])
def test_combine_matches_reference(variant, alpha, beta):
    u, e1, e2 = _preds()
    out = dcg.combine(u, e1, e2, alpha, beta, variant)
    assert out.dtype == torch.float32 and out.shape == u.shape
    assert _maxerr(out, ref_combine(u, e1, e2, alpha, beta, variant)) < TOL


@pytest.mark.parametrize("phi", [0.75, 0.0, 1.0, 0.3])
def test_rescale_matches_reference(phi):
    u, e1, e2 = _preds(b=2)
    eps = dcg.combine(u, e1, e2, 1.5, 3.0)
    out = dcg.rescale(eps, e1, e2, phi)
    assert _maxerr(out, ref_rescale(eps, e1, e2, phi)) < TOL


@pytest.mark.parametrize("variant", ["dcg1", "dcg2", "dcg3"])
def test_guide_full_matches_reference(variant):
    u, e1, e2 = _preds()
    names = [b.value for b in dcg.VARIANT_BRANCHES[Variant(variant)]]
    out = dcg.guide(dict(zip(names, (u, e1, e2))), 1.5, 3.0, 0.75, variant)
    ref = ref_rescale(ref_combine(u, e1, e2, 1.5, 3.0, variant), e1, e2, 0.75)
    assert _maxerr(out, ref) < TOL


def test_per_sample_tensor_coefficients():
    u, e1, e2 = _preds(b=3)
    alpha, beta, phi = torch.tensor([1.0, 1.5, 2.0]), torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.75, 0.0, 1.0])
    out = dcg.rescale(dcg.combine(u, e1, e2, alpha, beta), e1, e2, phi)
    for i in range(3):
        a, b, p = float(alpha[i]), float(beta[i]), float(phi[i])
        ui, e1i, e2i = u[i : i + 1], e1[i : i + 1], e2[i : i + 1]
        ref = ref_rescale(ref_combine(ui, e1i, e2i, a, b, "dcg2"), e1i, e2i, p)
        assert _maxerr(out[i : i + 1], ref) < TOL


# --- properties ---------------------------------------------------------------------------------------------


def test_alpha_beta_one_without_rescale_is_text_id():
    u, ei, eti = _preds()
    torch.testing.assert_close(dcg.combine(u, ei, eti, 1.0, 1.0), eti, rtol=0, atol=TOL)
    # From the needed branch alone the result is exactly eps(text, id).
    assert dcg.needed_branches(1.0, 1.0, None) == (Branch.TEXT_ID,)
    assert torch.equal(dcg.guide({"text_id": eti}, 1.0, 1.0, None), eti)


def test_beta_zero_drops_text_term():
    u, ei, eti = _preds()
    out = dcg.combine(u, ei, eti, 1.7, 0.0)
    torch.testing.assert_close(out, dcg.combine(u, ei, torch.randn_like(eti), 1.7, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(out, u + 1.7 * (ei - u), rtol=0, atol=TOL)
    assert Branch.TEXT_ID not in dcg.needed_branches(1.7, 0.0, None)


def test_rescale_at_alpha_beta_one_still_rescales():
    # Official quirk (notes 1.3, 7.7): at the first/last step ε̂ = ε_ti but r ≠ 1.
    u, ei, eti = _preds()
    out = dcg.guide({"uncond": u, "id": ei, "text_id": eti}, 1.0, 1.0, 0.75)
    assert not torch.allclose(out, eti, atol=1e-3)
    assert _maxerr(out, ref_rescale(eti, ei, eti, 0.75)) < TOL


@pytest.mark.parametrize("variant", ["dcg1", "dcg2", "dcg3"])
def test_branch_skipping_equals_full(variant):
    u, e1, e2 = _preds(b=2, seed=3)
    order = dcg.VARIANT_BRANCHES[Variant(variant)]
    full = dict(zip(order, (u, e1, e2)))
    cases = itertools.product([1.0, 1.5, 0.0], [1.0, 3.0, 0.0], [None, 0.75])
    n_skipped = 0
    for alpha, beta, phi in cases:
        need = dcg.needed_branches(alpha, beta, phi, variant)
        n_skipped += 3 - len(need)
        part = {b: full[b] for b in need}
        ref = dcg.guide(full, alpha, beta, phi, variant)
        got = dcg.guide(part, alpha, beta, phi, variant)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        # Dropping any needed branch is an error, never a silent wrong answer.
        for b in need:
            with pytest.raises(ValueError, match="missing"):
                dcg.guide({k: t for k, t in part.items() if k != b}, alpha, beta, phi, variant)
    assert n_skipped > 0


def test_needed_branches_examples():
    assert dcg.needed_branches(1.5, 3.0, 0.75) == (Branch.UNCOND, Branch.ID, Branch.TEXT_ID)
    assert dcg.needed_branches(1.0, 3.0, None) == (Branch.ID, Branch.TEXT_ID)  # α = 1 cancels (∅,∅)
    assert dcg.needed_branches(1.0, 1.0, 0.75) == (Branch.ID, Branch.TEXT_ID)  # rescale needs both stds
    assert dcg.needed_branches(1.0, 1.0, 0.0) == (Branch.TEXT_ID,)  # φ = 0 is no rescale
    assert dcg.needed_branches(1.5, 1.5, None) == (Branch.UNCOND, Branch.TEXT_ID)  # plain CFG
    assert dcg.needed_branches(torch.tensor(1.0), 1.0, None) == dcg.VARIANT_BRANCHES[Variant.DCG2]


def test_paper_schedule():
    assert dcg.paper_schedule(4, 1.5) == (1.0, 1.5, 1.5, 1.0)
    assert dcg.paper_schedule(4, 3.0) == (1.0, 3.0, 3.0, 1.0)
    assert dcg.paper_schedule(1, 3.0) == (1.0,)
    assert dcg.paper_schedule(2, 3.0) == (1.0, 1.0)
    assert dcg.paper_schedule(6, 2.0) == (1.0, 2.0, 2.0, 2.0, 2.0, 1.0)
    cfg = DCGConfig()
    assert cfg.coefficients(4) == ((1.0, 1.5, 1.5, 1.0), (1.0, 3.0, 3.0, 1.0))
    assert cfg.step(1, 4) == (1.5, 3.0)
    assert StepSchedule.custom([1, 2, 3, 4, 5]).resolve(3) == (1.0, 2.0, 3.0)
    assert StepSchedule.first_step(7.5, 5).resolve(3) == (7.5, 5.0, 5.0)
    assert dcg.constant_schedule(3, 1.5) == (1.5, 1.5, 1.5)


def test_evaluation_counts():
    paper = DCGConfig()
    assert paper.needed(4)[0] == (Branch.ID, Branch.TEXT_ID)
    assert paper.evaluations(4) == 2 + 3 + 3 + 2
    assert paper.evaluations(4, keep_all=True) == 12  # official: 3 per step
    assert DCGConfig(rescale=None).evaluations(4) == 1 + 3 + 3 + 1
    assert dcg.get_dcg_config("none").evaluations(4) == 4
    assert dcg.get_dcg_config("cfg1.5").evaluations(4) == 8


def test_config_guide_uses_step_coefficients():
    u, ei, eti = _preds()
    cfg = DCGConfig()
    preds = {"uncond": u, "id": ei, "text_id": eti}
    out = cfg.guide(preds, 2, 4)
    assert _maxerr(out, ref_rescale(ref_combine(u, ei, eti, 1.5, 3.0, "dcg2"), ei, eti, 0.75)) < TOL


def test_fp16_keeps_dtype():
    u, ei, eti = (x.half() for x in _preds())
    out = dcg.guide({"uncond": u, "id": ei, "text_id": eti}, 1.5, 3.0, 0.75)
    assert out.dtype == torch.float16
    ref = ref_rescale(ref_combine(u.float(), ei.float(), eti.float(), 1.5, 3.0, "dcg2"), ei.float(), eti.float(), 0.75)
    assert _maxerr(out.float(), ref) < 2e-2


def test_compiles_without_graph_breaks():
    u, ei, eti = _preds(b=2)
    alpha, beta, phi = torch.tensor([1.5, 1.0]), torch.tensor([3.0, 1.0]), torch.tensor(0.75)

    def step(u, ei, eti, alpha, beta, phi):
        return dcg.guide({"uncond": u, "id": ei, "text_id": eti}, alpha, beta, phi)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(u, ei, eti, alpha, beta, phi), step(u, ei, eti, alpha, beta, phi))


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: dcg.combine(*p, -1.0, 1.0), "alpha"),
        (lambda p: dcg.combine(*p, 1.0, -0.5), "beta"),
        (lambda p: dcg.combine(*p, float("nan"), 1.0), "alpha"),
        (lambda p: dcg.combine(*p, 1.0, 1.0, "dcg4"), "unknown DCG variant"),
        (lambda p: dcg.combine(p[0], p[1], p[2][:, :2], 1.0, 1.0), "same shape"),
        (lambda p: dcg.rescale(p[0], p[1], p[2], 1.5), "phi"),
        (lambda p: dcg.rescale(p[0], p[1], p[2], -0.1), "phi"),
        (lambda p: dcg.guide({"text": p[0], "text_id": p[2]}, 1.0, 1.0, None), "not used by variant"),
        (lambda p: dcg.guide({"foo": p[0]}, 1.0, 1.0, None), "unknown branch"),
        (lambda p: dcg.guide({"text_id": p[2]}, 1.5, 3.0, None), "missing"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(_preds())


def test_bad_schedules_and_configs():
    with pytest.raises(ValueError, match="cannot cover 4 steps"):
        StepSchedule.custom([1.0, 1.5, 1.0]).resolve(4)
    with pytest.raises(ValueError, match="cannot cover"):
        DCGConfig(alpha=StepSchedule.custom([1.0, 1.5])).coefficients(4)
    with pytest.raises(ValueError, match="positive integer"):
        dcg.paper_schedule(0, 1.5)
    with pytest.raises(ValueError, match="peak"):
        dcg.paper_schedule(4, -1.0)
    with pytest.raises(ValueError, match="schedule value"):
        StepSchedule.custom([1.0, -2.0])
    with pytest.raises(ValueError, match="unknown schedule rule"):
        StepSchedule("cosine", (1.0,))
    with pytest.raises(ValueError, match="takes 2 value"):
        StepSchedule("first_step", (1.0,))
    with pytest.raises(ValueError, match="at least one value"):
        StepSchedule.custom([])
    with pytest.raises(ValueError, match="rescale"):
        DCGConfig(rescale=1.2)
    with pytest.raises(ValueError, match="StepSchedule"):
        DCGConfig(alpha=[1.0, 1.5, 1.5, 1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown DCG variant"):
        DCGConfig(variant="dcg9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step index"):
        DCGConfig().step(4, 4)
    with pytest.raises(ValueError, match="unknown DCG config"):
        dcg.get_dcg_config("fancy")
    with pytest.raises(ValueError, match="python-number"):
        dcg.branch_weights(torch.tensor(1.0), 1.0)  # type: ignore[arg-type]

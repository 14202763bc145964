"""The identity branch runs SDPA when nothing hooks its map, and the explicit, hookable map otherwise."""

from __future__ import annotations

import torch

from fastface.models.attention import IdentityAttention, has_hooks


def test_identity_branch_uses_the_explicit_map_only_when_hooked():
    torch.manual_seed(0)
    ip = IdentityAttention(64, 32, 2, 32)
    q, o, tok = torch.randn(2, 2, 16, 32), torch.randn(2, 2, 16, 32), torch.randn(2, 4, 32)
    scale = torch.tensor([1.0, 0.5])
    seen = []
    with torch.no_grad():
        fast = ip(q, o, tok, scale)
        assert not has_hooks(ip.probs) and not has_hooks(ip.head_out)
        h = ip.probs.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
        assert has_hooks(ip.probs)
        explicit = ip(q, o, tok, scale)
        h.remove()
        # the same math written out independently
        k = ip.to_k_ip(tok).view(2, 4, 2, 32).transpose(1, 2)
        v = ip.to_v_ip(tok).view(2, 4, 2, 32).transpose(1, 2)
        want = o + scale.view(-1, 1, 1, 1) * (torch.softmax(q @ k.transpose(-1, -2) * 32**-0.5, dim=-1) @ v)
    assert seen == [(2, 2, 16, 4)]  # the hook saw the map: the explicit path ran
    assert torch.equal(explicit, want)  # explicit path: unchanged, bit for bit
    assert ((fast - want).abs().max() / want.abs().max()).item() <= 1e-6  # SDPA: fp32 rounding only

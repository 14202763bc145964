"""Per-image seeds for evaluation sweeps: a stable hash of (identity, prompt, base seed).

The official benchmark draws every image from one generator consumed in directory order, so an image's noise
depends on its position in the run. Here each image's seed is a pure function of its identity name, its prompt
and the run's base seed: an image can be regenerated on its own, and a sweep gives the same images whatever the
shard count, the order or a resumption. The method, model and scales are deliberately *not* hashed in: every
configuration of a sweep starts from the same noise for the same (identity, prompt) pair, so differences
between configurations are paired comparisons.
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["derive_seed", "SEED_RULE", "MAX_SEED"]

# Largest seed + 1: below 2**63 - 1, so ``seed + i`` of a one-image call stays a valid non-negative int64.
MAX_SEED = 2**63 - 1
SEED_RULE = "seed = int.from_bytes(sha256(json.dumps([identity, prompt, base_seed]))[:8], 'big') % (2**63 - 1)"


def derive_seed(identity: str, prompt: str, base_seed: int = 0) -> int:
    """The seed of one (identity, prompt) image of a run with ``base_seed`` (see :data:`SEED_RULE`).

    The JSON encoding makes the hashed bytes unambiguous (no separator collisions), and is independent of the
    platform, the Python hash seed and the process.
    """
    if not isinstance(identity, str) or not isinstance(prompt, str):
        raise ValueError(
            f"identity and prompt must be strings, got {type(identity).__name__} and {type(prompt).__name__}"
        )
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"base_seed must be a non-negative integer, got {base_seed!r}")
    payload = json.dumps([identity, prompt, base_seed], ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") % MAX_SEED

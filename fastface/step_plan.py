"""The step plan of an attached FastFace: per sampling step the branches to evaluate and the DCG/AM2 coefficients.

Resolved once when the schedule is announced (``attach(timesteps=...)`` or ``handle.set_timesteps``), never per
UNet call or per hook call. Host steps read python numbers from :attr:`StepPlan.coefs`; device steps (a timestep on
an accelerator, or a compiled call) read 0-dim tensors from :meth:`StepPlan.tables`, built once per device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fastface.am import AM1Config, AM2Config
from fastface.dcg import Branch, DCGConfig

__all__ = ["StepCoefs", "DeviceTables", "StepPlan", "NO_COEFS"]


class StepCoefs(NamedTuple):
    """One step's coefficients: DCG α, β and AM2 d, s, q, w (None where the method has no such coefficient).

    Python floats on the host path, 0-dim float32 tensors on a device path.
    """

    alpha: Any = None
    beta: Any = None
    d: Any = None
    s: Any = None
    q: Any = None
    w: Any = None


NO_COEFS = StepCoefs()
_FIELDS = StepCoefs._fields


class DeviceTables(NamedTuple):
    """A plan's per-step values on one device: timesteps (float64 [n]), each coefficient as [n], and per step."""

    timesteps: torch.Tensor
    columns: dict[str, torch.Tensor]
    rows: tuple[StepCoefs, ...]

    def step_of(self, t: torch.Tensor) -> torch.Tensor:
        """The step index (0-dim int64 tensor on the device) of a timestep tensor: the nearest announced timestep.

        A per-sample timestep ``[B]`` is read at its first entry (every image of a call is at the same step).
        No host sync: an unknown timestep cannot be reported here, it maps to the nearest step.
        """
        ts = self.timesteps
        return (ts - t.reshape(-1)[:1].to(ts.dtype)).abs().argmin()

    def gather(self, step: torch.Tensor) -> StepCoefs:
        """The coefficients at a device step index, as 0-dim tensors (no host sync)."""
        # torch.take, not columns[k][step]: indexing with a tensor would be read back as a python int when compiled
        return StepCoefs(*(torch.take(self.columns[k], step) if k in self.columns else None for k in _FIELDS))


@dataclass(frozen=True)
class StepPlan:
    """Per step of an announced schedule: the branches to evaluate (batch order) and the coefficients.

    ``union`` holds every branch some step needs, in batch order: the batch of a call whose step is only known on
    a device. Missing branches have weight 0 at every step, so guiding over the union equals the per-step result.
    """

    timesteps: tuple[float, ...]
    branches: tuple[tuple[Branch, ...], ...]
    union: tuple[Branch, ...]
    coefs: tuple[StepCoefs, ...]
    _tables: dict[torch.device, DeviceTables] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        timesteps: Sequence[float] | torch.Tensor,
        dcg: DCGConfig | None,
        am: AM1Config | AM2Config | None,
        keep_all: bool,
    ) -> StepPlan:
        """Resolve (and so validate) the schedules of ``dcg`` and ``am`` for the announced timesteps."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
        n = ts.numel()
        if n < 1:
            raise ValueError("set_timesteps needs at least one timestep")
        cols: dict[str, tuple[Any, ...]] = {}
        if dcg is not None:
            cols["alpha"], cols["beta"] = dcg.coefficients(n)
            branches = dcg.needed(n, keep_all)
            union = tuple(b for b in dcg.branches if any(b in s for s in branches))
        else:
            branches, union = ((Branch.TEXT_ID,),) * n, (Branch.TEXT_ID,)
        if isinstance(am, AM2Config):
            steps = am.steps(n)
            for k in ("d", "s", "q", "w"):
                cols[k] = tuple(getattr(p, k) for p in steps)
            if not am.adain:
                del cols["w"]
        coefs = tuple(StepCoefs(**{k: v[i] for k, v in cols.items()}) for i in range(n))
        return cls(tuple(ts.tolist()), branches, union, coefs)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def host_step(self, t: Any) -> int:
        """The step of a timestep known on the host (a number or a CPU tensor); ValueError if not in the schedule."""
        tv = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        dist = [abs(x - tv) for x in self.timesteps]
        i = min(range(len(dist)), key=dist.__getitem__)
        if dist[i] > 1e-3 * max(1.0, abs(tv)):
            raise ValueError(
                f"timestep {tv} is not in the announced schedule {list(self.timesteps)}; call "
                "handle.set_timesteps with the sampler's timesteps or pass step=i"
            )
        return i

    def tables(self, device: torch.device | str) -> DeviceTables:
        """The plan's values on ``device`` (built on the first request per device, then reused)."""
        device = torch.device(device)
        tab = self._tables.get(device)
        if tab is None:
            names = [k for k in _FIELDS if getattr(self.coefs[0], k) is not None]
            columns = {k: torch.tensor([getattr(c, k) for c in self.coefs], dtype=torch.float32, device=device)
                       for k in names}
            rows = tuple(
                StepCoefs(**{k: torch.tensor(getattr(c, k), dtype=torch.float32, device=device) for k in names})
                for c in self.coefs
            )
            ts = torch.tensor(self.timesteps, dtype=torch.float64, device=device)
            tab = self._tables[device] = DeviceTables(ts, columns, rows)
        return tab

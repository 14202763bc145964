"""Attaching DCG and AM to a UNet with forward (pre-)hooks: ``handle = fastface.attach(unet, dcg=..., am=...)``.

- **DCG**: a forward pre-hook on the UNet expands the batch into the guidance branches (null text = zeros as in
  SDXL's empty prompt, or a given negative; null identity = the adapter's tokens for a zero embedding) and a
  forward hook combines the branch predictions (:mod:`fastface.dcg`). The sampler never knows guidance exists.
- **AM**: forward hooks on the identity-attention hook points (``<layer>.ip.probs`` for the map and
  ``<layer>.ip.head_out`` for the per-head output) of the target blocks: down and up, not mid (:mod:`fastface.am`).

The step index of a call comes from an explicit ``step=`` keyword of the UNet call, or from the timestep looked
up in the schedule announced with :meth:`FastFace.set_timesteps` (never from counting calls). A timestep known on
the host (a python number or a CPU tensor, which is what :mod:`fastface.samplers` passes) gives a host step index:
branches whose output is unused at that step are skipped. A timestep on an accelerator is looked up on the device
(no host sync); then every branch any step needs is computed and the coefficients are gathered on the device.
All state lives in the handle: two UNets with different settings can run side by side.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastface import dcg as _dcg
from fastface.am import AM1Config, AM2Config, adain_maps, adain_output, softmask
from fastface.dcg import Branch, DCGConfig

logger = logging.getLogger(__name__)

__all__ = ["CallSpec", "OUR_UNET", "DIFFUSERS_UNET", "FastFace", "attach", "identity_points"]


@dataclass(frozen=True)
class CallSpec:
    """Where a UNet's forward takes its inputs: argument names, or dotted paths into dict arguments.

    ``text`` entries are replaced by the null text in text-free branches, ``id`` entries by the null identity in
    identity-free branches; ``batch`` entries are per-sample extras repeated for every branch.
    """

    x: str = "x"
    t: str = "t"
    text: tuple[str, ...] = ("context", "text_embeds")
    id: tuple[str, ...] = ("id_tokens",)
    batch: tuple[str, ...] = ("time_ids", "id_scale", "timestep_cond")


OUR_UNET = CallSpec()
# diffusers' UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ..., added_cond_kwargs=...)
DIFFUSERS_UNET = CallSpec(
    x="sample",
    t="timestep",
    text=("encoder_hidden_states", "added_cond_kwargs.text_embeds"),
    id=("added_cond_kwargs.image_embeds",),
    batch=("added_cond_kwargs.time_ids", "timestep_cond"),
)


def _get(args: Mapping[str, Any], path: str) -> Any:
    node: Any = args
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(args: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = args
    for part in parents:
        node[part] = dict(node[part])  # copy: never mutate the caller's dicts
        node = node[part]
    node[last] = value


def _cat(items: Sequence[Any]) -> Any:
    """Concatenate per-branch values along the batch: tensors, or lists/tuples of tensors element-wise."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items, dim=0)
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([it[j] for it in items]) for j in range(len(first)))
    raise ValueError(f"cannot batch a UNet argument of type {type(first).__name__} over guidance branches")


def _expand_like(null: Any, ref: Any) -> Any:
    """A null value with batch 1 (or the same batch) broadcast to the batch of ``ref``."""
    if isinstance(ref, torch.Tensor):
        null = torch.as_tensor(null).to(device=ref.device, dtype=ref.dtype)
        return null.expand(ref.shape[0], *null.shape[1:]) if null.shape[0] != ref.shape[0] else null
    if isinstance(ref, (list, tuple)) and isinstance(null, (list, tuple)) and len(null) == len(ref):
        return type(ref)(_expand_like(n, r) for n, r in zip(null, ref))
    raise ValueError(f"the null conditioning must match the call's value ({type(ref).__name__})")


def _zeros_like(ref: Any) -> Any:
    if isinstance(ref, torch.Tensor):
        return torch.zeros_like(ref)
    if isinstance(ref, (list, tuple)):
        return type(ref)(_zeros_like(r) for r in ref)
    raise ValueError(f"cannot build a zero null for a UNet argument of type {type(ref).__name__}")


def identity_points(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The identity-attention modules (those exposing ``probs`` and ``head_out`` hook points), in module order."""
    found = []
    for name, mod in unet.named_modules():
        probs, head_out = getattr(mod, "probs", None), getattr(mod, "head_out", None)
        if isinstance(probs, nn.Module) and isinstance(head_out, nn.Module):
            found.append((name, mod))
    return found


def _part(name: str) -> str | None:
    """'down' / 'up' / 'mid' from a layer name (first path component naming a UNet part)."""
    for comp in name.split("."):
        for part in ("down", "up", "mid"):
            if comp.startswith(part):
                return part
    return None


@dataclass
class _Call:
    """What the pre-hook decided for the UNet call in flight (read by the AM hooks and the post-hook)."""

    branches: tuple[Branch, ...]
    step: int | torch.Tensor  # host index, or a 0-dim device tensor
    images: int  # batch size before branch expansion (AM2 groups)
    expanded: bool


class FastFace:
    """The handle returned by :func:`attach`: owns the hooks and the per-call state; ``.remove()`` detaches.

    Also a context manager (removes on exit). ``branch_evaluations`` counts UNet evaluations per image (the sum
    over calls of the branches computed; the official implementation spends 3 per step) and ``unet_calls`` the
    calls; :meth:`reset_stats` zeroes both.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        dcg: DCGConfig | None,
        am: AM1Config | AM2Config | None,
        null_id: Any,
        null_text: Mapping[str, Any] | None,
        spec: CallSpec,
        tokens: Sequence[int] | None,
        timesteps: Sequence[float] | torch.Tensor | None,
    ) -> None:
        if dcg is not None and not isinstance(dcg, DCGConfig):
            raise ValueError(f"dcg must be a fastface.dcg.DCGConfig (or None), got {type(dcg).__name__}")
        if am is not None and not isinstance(am, (AM1Config, AM2Config)):
            raise ValueError(f"am must be an AM1Config or AM2Config (or None), got {type(am).__name__}")
        self.unet, self.dcg, self.am, self.spec = unet, dcg, am, spec
        self.keep_all = isinstance(am, AM2Config)  # AM2's min-max couples the branches of an image
        self.tokens = None if tokens is None else [int(t) for t in tokens]
        self.null_id = null_id if (null_id is None or isinstance(null_id, Mapping)) else {spec.id[0]: null_id}
        self.null_text = dict(null_text) if null_text is not None else None
        if dcg is not None and self.null_id is None:
            raise ValueError(
                "DCG needs the null identity (the adapter's id tokens for a zero embedding), e.g. "
                "attach(unet, dcg=..., null_id=adapter.null_tokens(...))"
            )
        self._signature = inspect.signature(unet.forward)
        self._timesteps: torch.Tensor | None = None
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._call: _Call | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.unet_calls = 0
        self.branch_evaluations = 0
        if timesteps is not None:
            self.set_timesteps(timesteps)
        self._install()

    # -- schedule ---------------------------------------------------------------------------------------------

    def set_timesteps(self, timesteps: Sequence[float] | torch.Tensor) -> None:
        """Announce the sampling schedule; each UNet call's step is its timestep's position in it."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
        if ts.numel() < 1:
            raise ValueError("set_timesteps needs at least one timestep")
        if self.dcg is not None:
            self.dcg.coefficients(ts.numel())  # validates the schedules for this step count
        if isinstance(self.am, AM2Config):
            self.am.steps(ts.numel())
        self._timesteps = ts
        self._device_tables.clear()

    @property
    def num_steps(self) -> int | None:
        return None if self._timesteps is None else int(self._timesteps.numel())

    def reset_stats(self) -> None:
        self.unet_calls = 0
        self.branch_evaluations = 0

    def _host_step(self, t: Any) -> int:
        if self._timesteps is None:
            raise ValueError(
                "the step index is unknown: announce the schedule with handle.set_timesteps(timesteps) before "
                "sampling, or pass step=i to the UNet call"
            )
        tv = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        dist = (self._timesteps - tv).abs()
        i = int(dist.argmin())
        if float(dist[i]) > 1e-3 * max(1.0, abs(tv)):
            raise ValueError(
                f"timestep {tv} is not in the announced schedule {self._timesteps.tolist()}; call "
                "handle.set_timesteps with the sampler's timesteps or pass step=i"
            )
        return i

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-step coefficient tables on a device (built once per schedule and device)."""
        if device not in self._device_tables:
            n = self.num_steps
            assert n is not None
            tab: dict[str, list[float]] = {"ts": self._timesteps.tolist()}
            if self.dcg is not None:
                alphas, betas = self.dcg.coefficients(n)
                w = [_dcg.branch_weights(a, b, self.dcg.variant) for a, b in zip(alphas, betas)]
                tab.update(alpha=list(alphas), beta=list(betas), w0=[x[0] for x in w], w1=[x[1] for x in w],
                           w2=[x[2] for x in w])
            if isinstance(self.am, AM2Config):
                steps = self.am.steps(n)
                tab.update(d=[s.d for s in steps], s=[s.s for s in steps], q=[s.q for s in steps],
                           w=[0.0 if s.w is None else s.w for s in steps])
            self._device_tables[device] = {
                k: torch.tensor(v, dtype=torch.float64 if k == "ts" else torch.float32, device=device)
                for k, v in tab.items()
            }
        return self._device_tables[device]

    def _resolve_step(self, t: Any, explicit: Any) -> int | torch.Tensor:
        if explicit is not None:
            n = self.num_steps
            if isinstance(explicit, bool) or not isinstance(explicit, int) or (n is not None and not 0 <= explicit < n):
                raise ValueError(f"step must be an integer in [0, {n}), got {explicit!r}")
            if n is None:
                raise ValueError("step=i needs the step count: announce the schedule with handle.set_timesteps")
            return explicit
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            if self._timesteps is None:
                raise ValueError("announce the schedule with handle.set_timesteps(timesteps) before sampling")
            ts = self._tables(t.device)["ts"]
            return (ts - t.reshape(-1)[:1].to(ts.dtype)).abs().argmin()  # 0-dim device tensor, no sync
        return self._host_step(t)

    # -- hooks ------------------------------------------------------------------------------------------------

    def _install(self) -> None:
        self._handles.append(self.unet.register_forward_pre_hook(self._pre, with_kwargs=True))
        if self.dcg is not None:
            self._handles.append(self.unet.register_forward_hook(self._post, with_kwargs=True))
        if self.am is None:
            return
        targets = [(n, m) for n, m in identity_points(self.unet) if _part(n) in ("down", "up")]
        if not targets:
            raise ValueError(
                "AM needs an identity adapter installed: the UNet has no identity-attention hook points "
                "(modules with 'probs' and 'head_out') in its down or up blocks. Install an adapter first, "
                "e.g. fastface.adapters.ip_adapter.install(...)"
            )
        for name, mod in targets:
            part = _part(name)
            self._handles.append(mod.probs.register_forward_hook(self._map_hook(part)))
            if isinstance(self.am, AM2Config) and self.am.adain:
                self._handles.append(mod.head_out.register_forward_hook(self._out_hook))
        logger.debug("AM attached to %d identity-attention layers", len(targets))

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        explicit = kwargs.pop("step", None)
        bound = self._signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        x = arguments.get(self.spec.x)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"fastface hooks: the UNet call has no latents argument '{self.spec.x}'")
        t = arguments.get(self.spec.t)
        needs_step = self.dcg is not None or isinstance(self.am, AM2Config)
        step = self._resolve_step(t, explicit) if needs_step else 0
        images = x.shape[0]
        if self.dcg is None:
            branches: tuple[Branch, ...] = (Branch.TEXT_ID,)
            self._call = _Call(branches, step, images, expanded=False)
        else:
            n = self.num_steps
            per_step = self.dcg.needed(n, self.keep_all)
            if isinstance(step, int):
                branches = per_step[step]
            else:  # device step: every branch some step needs, in batch order
                used = {b for s in per_step for b in s}
                branches = tuple(b for b in self.dcg.branches if b in used)
            arguments = self._expand(arguments, branches, images)
            self._call = _Call(branches, step, images, expanded=True)
        self.unet_calls += 1
        self.branch_evaluations += len(branches)
        new = inspect.BoundArguments(self._signature, arguments)  # type: ignore[arg-type]
        return new.args, new.kwargs

    def _expand(self, arguments: dict[str, Any], branches: tuple[Branch, ...], images: int) -> dict[str, Any]:
        spec = self.spec
        nb = len(branches)
        out = dict(arguments)
        for path in spec.id:
            value = _get(arguments, path)
            if value is None:
                raise ValueError(f"DCG needs the identity conditioning '{path}' in the UNet call")
        for path in (*spec.text, *spec.id):
            value = _get(arguments, path)
            if value is None:
                continue
            is_text = path in spec.text
            if is_text:
                null = (self.null_text or {}).get(path)
                null = _zeros_like(value) if null is None else _expand_like(null, value)
            else:
                null = self.null_id.get(path) if self.null_id else None
                if null is None:
                    raise ValueError(f"DCG has no null identity for '{path}'; pass null_id={{'{path}': tensor}}")
                null = _expand_like(null, value)
            parts = [value if (b.has_text if is_text else b.has_id) else null for b in branches]
            _set(out, path, _cat(parts) if nb > 1 else parts[0])
        for path in (spec.x, spec.t, *spec.batch):
            value = _get(arguments, path)
            if nb > 1 and isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == images:
                _set(out, path, value.repeat(nb, *([1] * (value.ndim - 1))))
            elif nb > 1 and isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != 1:
                raise ValueError(f"'{path}' has batch {value.shape[0]}, expected {images} (or 1)")
        return out

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self._call
        if call is None or not call.expanded:
            return output
        eps_all = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, tuple) else output.sample
        preds = dict(zip(call.branches, eps_all.chunk(len(call.branches), dim=0)))
        assert self.dcg is not None
        if isinstance(call.step, int):
            alpha, beta = self.dcg.step(call.step, self.num_steps)
            eps = _dcg.guide(preds, alpha, beta, self.dcg.rescale, self.dcg.variant)
        else:
            eps = self._guide_device(preds, call.step, eps_all.device)
        self._call = None
        if isinstance(output, torch.Tensor):
            return eps
        if isinstance(output, tuple):
            return (eps, *output[1:])
        output.sample = eps
        return output

    def _guide_device(self, preds: dict[Branch, torch.Tensor], step: torch.Tensor, device: torch.device) -> torch.Tensor:
        """DCG with coefficients gathered on the device at a device step index (no host sync)."""
        assert self.dcg is not None
        tab = self._tables(device)
        order = self.dcg.branches
        if all(b in preds for b in order):
            eps = _dcg.combine(preds[order[0]], preds[order[1]], preds[order[2]], tab["alpha"][step],
                               tab["beta"][step], self.dcg.variant)
        else:  # the linear-weight form over the branches some step needs (missing ones have weight 0 everywhere)
            eps = sum(tab[f"w{i}"][step].to(preds[b].dtype) * preds[b] for i, b in enumerate(order) if b in preds)
        if self.dcg.rescale:
            eps = _dcg.rescale(eps, preds[order[1]], preds[order[2]], self.dcg.rescale)
        return eps

    def _groups(self, batch: int) -> int:
        call = self._call
        images = call.images if call is not None else batch
        return images if batch % images == 0 else batch

    def _step_params(self, device: torch.device) -> tuple[Any, Any, Any, Any]:
        """AM2's (d, s, q, w) at the current step: python floats on the host path, 0-dim tensors otherwise."""
        assert isinstance(self.am, AM2Config)
        call = self._call
        step = call.step if call is not None else 0
        if isinstance(step, int):
            p = self.am.step(step, self.num_steps or 1)
            return p.d, p.s, p.q, p.w
        tab = self._tables(device)
        return tab["d"][step], tab["s"][step], tab["q"][step], (tab["w"][step] if self.am.adain else None)

    def _select(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.tokens is None else a[..., self.tokens]

    def _scatter(self, a: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return sel
        out = a.clone()
        out[..., self.tokens] = sel
        return out

    def _map_hook(self, part: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            a = inputs[0]  # the softmax map [B, H, N, K]
            if isinstance(self.am, AM1Config):
                return self._scatter(output, self.am.apply(self._select(output), part))
            d, s, q, w = self._step_params(a.device)
            groups = self._groups(a.shape[0])
            sm = softmask(self._select(a), d, s, q, self.am.invert_first, groups, self.am.clamp)
            a_t = self._scatter(a, sm)
            return a_t if w is None else adain_maps(a_t, a, w)

        return hook

    def _out_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        o_t, a, v = inputs[0], inputs[1], inputs[2]
        _, _, _, w = self._step_params(o_t.device)
        if w is None:
            return output
        return adain_output(output, a, v, w, self._groups(o_t.shape[0]))

    # -- lifetime ---------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach every hook; the UNet's outputs are then bit-identical to before attaching."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._call = None

    def __enter__(self) -> FastFace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    unet: nn.Module,
    *,
    dcg: DCGConfig | str | None = None,
    am: AM1Config | AM2Config | str | None = None,
    null_id: torch.Tensor | Mapping[str, Any] | None = None,
    null_text: Mapping[str, Any] | None = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    tokens: Sequence[int] | None = None,
    spec: CallSpec = OUR_UNET,
) -> FastFace:
    """Attach FastFace's DCG and/or AM to ``unet`` with forward hooks; returns a removable handle.

    ``dcg``: a :class:`~fastface.dcg.DCGConfig` or a name from ``fastface.dcg.DCG_CONFIGS`` ("paper", "none",
    "cfg1.5"). ``am``: an :class:`~fastface.am.AM1Config` / :class:`~fastface.am.AM2Config` or a name from
    ``fastface.am.AM_CONFIGS``. ``null_id``: the null identity for DCG (the adapter's tokens of a zero embedding,
    batch 1 or B), or a mapping from call paths to values. ``null_text``: a negative conditioning per text path
    (default zeros, SDXL's ``force_zeros_for_empty_prompt``). ``timesteps``: the sampling schedule (or announce it
    later with :meth:`FastFace.set_timesteps`). ``tokens``: the id tokens AM transforms (default all).
    ``spec``: how the UNet's forward names its inputs (:data:`OUR_UNET`, :data:`DIFFUSERS_UNET`, or your own).

    Without DCG the batch is left as it is and AM treats every sample as its own image. To reproduce the official
    AM-only runs (three branches computed, only eps(text, id) used) pass ``dcg="none"`` with AM2.
    """
    if isinstance(dcg, str):
        dcg = _dcg.get_dcg_config(dcg)
    if isinstance(am, str):
        from fastface.am import get_am_config

        am = get_am_config(am)
    return FastFace(unet, dcg=dcg, am=am, null_id=null_id, null_text=null_text, spec=spec, tokens=tokens,
                    timesteps=timesteps)

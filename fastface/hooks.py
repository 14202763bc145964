"""Attaching DCG and AM to a UNet with forward (pre-)hooks: ``handle = fastface.attach(unet, dcg=..., am=...)``.

- **DCG**: a forward pre-hook on the UNet expands the batch into the guidance branches (null text = zeros as in
  SDXL's empty prompt, or a given negative; null identity = the adapter's tokens for a zero embedding) and a
  forward hook combines the branch predictions (:mod:`fastface.dcg`). The sampler never knows guidance exists.
- **AM**: forward hooks on the identity-attention hook points (``<layer>.ip.probs`` for the map and
  ``<layer>.ip.head_out`` for the per-head output) of the target blocks: down and up, not mid (:mod:`fastface.am`).

The step plan (per step: the branches to evaluate, the DCG coefficients and AM2's parameters) is resolved once,
when the schedule is announced (``attach(timesteps=...)`` or :meth:`FastFace.set_timesteps`). The step of a call
comes from an explicit ``step=`` keyword of the UNet call, or from its timestep looked up in that schedule (never
from counting calls). A timestep known on the host (a python number or a CPU tensor, which is what
:mod:`fastface.samplers` passes) gives a host step: branches whose output is unused at that step are skipped. A
timestep on an accelerator is looked up on the device (no host sync); then the union of the branches of all steps
is computed and the coefficients are gathered on the device. The UNet's pre-hook hands the step to the AM hooks
and the post-hook through the call in flight; an AM hook running outside a UNet call raises.
All state lives in the handle: two UNets with different settings can run side by side.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from fastface.am import AM1Config, AM2Config, adain_maps, adain_output, get_am_config, softmask
from fastface.dcg import Branch, DCGConfig, get_dcg_config, guide
from fastface.step_plan import NO_COEFS, StepCoefs, StepPlan

logger = logging.getLogger(__name__)

__all__ = ["CallSpec", "OUR_UNET", "FastFace", "attach", "attached", "identity_points"]


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


class _Call(NamedTuple):
    """What the pre-hook decided for the UNet call in flight: read by the AM hooks and the post-hook."""

    branches: tuple[Branch, ...]  # batch order
    coefs: StepCoefs  # this step's coefficients: python floats (host step) or 0-dim tensors (device step)
    images: int  # batch size before branch expansion (AM2 groups)
    expanded: bool


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class FastFace:
    """The handle returned by :func:`attach`: owns the hooks, the step plan and the per-call state.

    ``.remove()`` detaches; also a context manager (removes on exit). ``branch_evaluations`` counts UNet
    evaluations per image (the sum over calls of the branches computed; the official implementation spends 3 per
    step) and ``unet_calls`` the calls; :meth:`reset_stats` zeroes both.
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
        other = attached(unet)
        if other is not None:
            raise ValueError(
                f"this UNet already has FastFace attached ({other.describe()}); call .remove() on that handle "
                "(or leave its `with` block) before attaching again"
            )
        self.unet, self.dcg, self.am, self.spec = unet, dcg, am, spec
        self._keep_all = isinstance(am, AM2Config)  # AM2's min-max couples the branches of an image
        self._needs_step = dcg is not None or isinstance(am, AM2Config)
        self.tokens = None if tokens is None else [int(t) for t in tokens]
        self.null_id = null_id if (null_id is None or isinstance(null_id, Mapping)) else {spec.id[0]: null_id}
        self.null_text = dict(null_text) if null_text is not None else None
        if dcg is not None and self.null_id is None:
            raise ValueError(
                "DCG needs the null identity (the adapter's id tokens for a zero embedding), e.g. "
                "attach(unet, dcg=..., null_id=adapter.null_tokens(...))"
            )
        self._signature = inspect.signature(unet.forward)
        params = list(self._signature.parameters.values())
        self._positional = [p.name for p in params if p.kind in _POSITIONAL]
        self._plain = not any(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
                              for p in params)
        self.plan: StepPlan | None = None
        self._call: _Call | None = None
        self._pending: tuple[tuple[Branch, ...], StepCoefs] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.unet_calls = 0
        self.branch_evaluations = 0
        if timesteps is not None:
            self.set_timesteps(timesteps)
        self._install()
        unet.__dict__[_ATTR] = self

    def describe(self) -> str:
        """The handle's settings in one line (for messages)."""
        return f"dcg={self.dcg!r}, am={self.am!r}, steps={self.num_steps}"

    def __repr__(self) -> str:
        return f"FastFace({self.describe()}, attached={bool(self._handles)})"

    # -- schedule ---------------------------------------------------------------------------------------------

    def set_timesteps(self, timesteps: Sequence[float] | torch.Tensor) -> None:
        """Announce the sampling schedule: resolves the step plan; each call's step is its timestep's position."""
        self._set_plan(StepPlan.build(timesteps, self.dcg, self.am, self._keep_all))

    def _set_plan(self, plan: StepPlan) -> None:
        # the device tables of the UNet's device (and the host) now: built inside a compiled call they would cost a
        # recompile once they exist
        for p in itertools.islice(self.unet.parameters(), 1):
            plan.tables(p.device)
        plan.tables("cpu")
        self.plan = plan

    @property
    def keep_all(self) -> bool:
        """Whether every DCG branch is evaluated at every step (AM2 couples the branches; settable for tests)."""
        return self._keep_all

    @keep_all.setter
    def keep_all(self, value: bool) -> None:
        self._keep_all = bool(value)
        if self.plan is not None:
            self._set_plan(StepPlan.build(self.plan.timesteps, self.dcg, self.am, self._keep_all))

    @property
    def num_steps(self) -> int | None:
        return None if self.plan is None else self.plan.num_steps

    def reset_stats(self) -> None:
        self.unet_calls = 0
        self.branch_evaluations = 0

    def _need_plan(self) -> StepPlan:
        if self.plan is None:
            raise ValueError(
                "the step index is unknown: announce the schedule with handle.set_timesteps(timesteps) before "
                "sampling, or attach(..., timesteps=...)"
            )
        return self.plan

    def _host_step(self, t: Any, explicit: Any) -> int | None:
        """The step of a call when the host knows it (explicit ``step=`` or a host timestep), else None."""
        if explicit is not None:
            n = self.num_steps
            if isinstance(explicit, bool) or not isinstance(explicit, int) or (n is not None and not 0 <= explicit < n):
                raise ValueError(f"step must be an integer in [0, {n}), got {explicit!r}")
            self._need_plan()
            return explicit
        plan = self._need_plan()
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return None
        return plan.host_step(t)

    def _resolve(self, t: Any, explicit: Any, device: torch.device) -> tuple[tuple[Branch, ...], StepCoefs]:
        """(branches, coefficients) of a call: the host step's, or the branch union with device-gathered values."""
        if not self._needs_step:
            return (Branch.TEXT_ID,), NO_COEFS
        compiling = torch.compiler.is_compiling()
        i = None if (compiling and explicit is None) else self._host_step(t, explicit)
        plan = self._need_plan()
        if i is not None:
            return plan.branches[i], (plan.tables(device).rows[i] if compiling else plan.coefs[i])
        tab = plan.tables(t.device if isinstance(t, torch.Tensor) else device)
        return plan.union, tab.gather(tab.step_of(torch.as_tensor(t, device=tab.timesteps.device)))

    def prepare_call(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Resolve the step of the next UNet call on the host, before a compiled call (see :func:`compile_unet`).

        Returns the keyword arguments without ``step``: the compiled graph then depends on the branch set only
        (the coefficients enter as tensors), so a run recompiles at most once per distinct branch set.
        """
        kwargs = dict(kwargs)
        explicit = kwargs.pop("step", None)
        arguments = self._bind(args, kwargs)
        x = self._latents(arguments)
        t = arguments.get(self.spec.t)
        if not self._needs_step:
            branches, coefs = (Branch.TEXT_ID,), NO_COEFS
        else:
            i = self._host_step(t, explicit)
            plan = self._need_plan()
            device = t.device if i is None else x.device
            tab = plan.tables(device)  # built here, outside the compiled region
            branches, coefs = (plan.union, None) if i is None else (plan.branches[i], tab.rows[i])
        self._pending = None if coefs is None else (branches, coefs)
        self.unet_calls += 1
        self.branch_evaluations += len(branches)
        return kwargs

    def end_call(self) -> None:
        """Forget the step :meth:`prepare_call` resolved and the call in flight (after a call, even a failed one)."""
        self._pending = None
        self._call = None

    # -- hooks ------------------------------------------------------------------------------------------------

    def _install(self) -> None:
        targets = [(n, m) for n, m in identity_points(self.unet) if _part(n) in ("down", "up")]
        if self.am is not None and not targets:
            raise ValueError(
                "AM needs an identity adapter installed: the UNet has no identity-attention hook points "
                "(modules with 'probs' and 'head_out') in its down or up blocks. Install an adapter first, "
                "e.g. fastface.adapters.ip_adapter.install(...)"
            )
        self._handles.append(self.unet.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._post, with_kwargs=True))
        if self.am is None:
            return
        for name, mod in targets:
            self._handles.append(mod.probs.register_forward_hook(self._map_hook(_part(name))))
            if isinstance(self.am, AM2Config) and self.am.adain:
                self._handles.append(mod.head_out.register_forward_hook(self._out_hook))
        logger.debug("AM attached to %d identity-attention layers", len(targets))

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name (a plain dict, cheap and traceable by torch.compile)."""
        if not self._plain or len(args) > len(self._positional):
            return dict(self._signature.bind(*args, **kwargs).arguments)
        arguments = dict(zip(self._positional, args))
        for k, v in kwargs.items():
            if k in arguments:
                raise TypeError(f"the UNet call got multiple values for argument '{k}'")
            arguments[k] = v
        return arguments

    def _latents(self, arguments: Mapping[str, Any]) -> torch.Tensor:
        x = arguments.get(self.spec.x)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"fastface hooks: the UNet call has no latents argument '{self.spec.x}'")
        return x

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        explicit = kwargs.pop("step", None)
        arguments = self._bind(args, kwargs)
        x = self._latents(arguments)
        pending, self._pending = self._pending, None
        if pending is not None:  # resolved on the host by prepare_call (a compiled call)
            branches, coefs = pending
        else:
            branches, coefs = self._resolve(arguments.get(self.spec.t), explicit, x.device)
            if not torch.compiler.is_compiling():
                self.unet_calls += 1
                self.branch_evaluations += len(branches)
        images = x.shape[0]
        expanded = self.dcg is not None
        if expanded:
            arguments = self._expand(arguments, branches, images)
        self._call = _Call(branches, coefs, images, expanded)
        n = len(args)
        new_args = tuple(arguments.pop(name) for name in self._positional[:n]) if self._plain else None
        if new_args is None:
            bound = inspect.BoundArguments(self._signature, arguments)  # type: ignore[arg-type]
            return bound.args, bound.kwargs
        return new_args, arguments

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
        call, self._call = self._call, None
        if call is None or not call.expanded:
            return output
        assert self.dcg is not None
        eps_all = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, tuple) else output.sample
        preds = dict(zip(call.branches, eps_all.chunk(len(call.branches), dim=0)))
        eps = guide(preds, call.coefs.alpha, call.coefs.beta, self.dcg.rescale, self.dcg.variant)
        if isinstance(output, torch.Tensor):
            return eps
        if isinstance(output, tuple):
            return (eps, *output[1:])
        output.sample = eps
        return output

    def _context(self) -> _Call:
        """The call in flight; AM hooks run only inside a UNet call (the pre-hook resolves its step)."""
        call = self._call
        if call is None:
            raise RuntimeError(
                "a FastFace AM hook ran outside a UNet call: the step and the branch grouping come from the UNet's "
                "forward pre-hook, so call the UNet the handle is attached to (not its attention layers alone)"
            )
        return call

    def _groups(self, call: _Call, batch: int) -> int:
        return call.images if batch % call.images == 0 else batch

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
            call = self._context()
            a = inputs[0]  # the softmax map [B, H, N, K]
            if isinstance(self.am, AM1Config):
                return self._scatter(output, self.am.apply(self._select(output), part))
            c = call.coefs
            sm = softmask(self._select(a), c.d, c.s, c.q, self.am.invert_first, self._groups(call, a.shape[0]),
                          self.am.clamp)
            a_t = self._scatter(a, sm)
            return a_t if c.w is None else adain_maps(a_t, a, c.w)

        return hook

    def _out_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        call = self._context()
        o_t, a, v = inputs[0], inputs[1], inputs[2]
        w = call.coefs.w
        if w is None:
            return output
        return adain_output(output, a, v, w, self._groups(call, o_t.shape[0]))

    # -- lifetime ---------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach every hook; the UNet's outputs are then bit-identical to before attaching."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.end_call()
        if self.unet.__dict__.get(_ATTR) is self:
            del self.unet.__dict__[_ATTR]

    def __enter__(self) -> FastFace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


_ATTR = "_fastface_handle"


def attached(unet: nn.Module) -> FastFace | None:
    """The FastFace handle attached to ``unet`` (None if there is none)."""
    return unet.__dict__.get(_ATTR)


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
    ``spec``: how the UNet's forward names its inputs (:data:`OUR_UNET`, ``fastface.integrations.DIFFUSERS_ID_SPEC``
    or your own).

    Without DCG the batch is left as it is and AM treats every sample as its own image. To reproduce the official
    AM-only runs (three branches computed, only eps(text, id) used) pass ``dcg="none"`` with AM2. A UNet carries
    at most one handle: attaching to a UNet that has one raises (remove the old handle first).
    """
    if isinstance(dcg, str):
        dcg = get_dcg_config(dcg)
    if isinstance(am, str):
        am = get_am_config(am)
    return FastFace(unet, dcg=dcg, am=am, null_id=null_id, null_text=null_text, spec=spec, tokens=tokens,
                    timesteps=timesteps)

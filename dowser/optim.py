"""Masked optimizers on bit-packed masks: only the trainable entries move, and (by default) only
they have optimizer state.

`MaskedAdamW` / `MaskedSGD` are `torch.optim.Optimizer` subclasses whose step is one op per
parameter group (`torch.ops.dowser.masked_adamw_step` / `masked_sgd_step`: C++/OpenMP on CPU,
a multi-tensor CUDA kernel on GPU, plain PyTorch as fallback). `mask_gradients` is the hook
mode for optimizers dowser does not own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from dowser import _ops  # noqa: F401  (declares the ops)
from dowser import _bits
from dowser._checks import check_packed, master_args
from dowser.distributed import local_rows, local_tensor, shard_mask

__all__ = ["MaskedAdamW", "MaskedSGD", "mask_gradients", "GradientMaskHandle"]

_MAX_COMPACT = 2**31 - 1  # compact indices are int32


def _resolve_masks(masks: Mapping, model: torch.nn.Module | None,
                   params: Iterable[torch.Tensor] | None) -> tuple[dict, dict]:
    """Map parameters to validated packed masks (on the parameter's device) and to names."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a Mapping of parameters (or names) to packed int32 masks, "
                        f"got {type(masks).__name__}")
    names: dict[torch.Tensor, str] = {}
    by_name: dict[str, torch.Tensor] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=True):
            names[p] = name
            by_name[name] = p
    allowed = None if params is None else {id(p) for p in params}
    out: dict[torch.Tensor, torch.Tensor] = {}
    for key, mask in masks.items():
        if isinstance(key, str):
            if model is None:
                raise ValueError(f"masks are keyed by parameter name ({key!r}): pass model= so the "
                                 "names can be resolved")
            if key not in by_name:
                raise ValueError(f"masks[{key!r}]: the model has no parameter of that name")
            p = by_name[key]
            label = key
        elif isinstance(key, torch.Tensor):
            p = key
            label = names.get(p, f"parameter of shape {tuple(p.shape)}")
        else:
            raise TypeError(f"masks keys must be parameters or names, got {type(key).__name__}")
        if allowed is not None and id(p) not in allowed:
            raise ValueError(f"masks[{label!r}]: that parameter is not among the optimizer's params")
        if not p.is_floating_point():
            raise ValueError(f"masks[{label!r}]: parameter must be floating point, got {p.dtype}")
        check_packed(f"masks[{label!r}]", mask, p.numel())
        if p in out:
            raise ValueError(f"masks[{label!r}]: that parameter has two masks")
        names.setdefault(p, label)
        local, row0 = local_rows(p)
        if local.shape != p.shape:  # an FSDP2 shard: its own rows of the mask, re-packed once
            mask = shard_mask(mask.to(local.device), p.shape, row0, local.shape[0])
        out[p] = mask.detach().to(local.device).contiguous()
    return out, names


class _MaskedOptimizer(torch.optim.Optimizer):
    """Shared machinery: masks, compact-state layout, names, exact state_dict round trips."""

    _state_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, masks: Mapping, defaults: dict, *,
                 model: torch.nn.Module | None, compact_state: bool,
                 master_weights: bool | None = None) -> None:
        if master_weights not in (None, True, False):
            raise ValueError("master_weights must be None (auto), True or False, got "
                             f"{master_weights!r}")
        super().__init__(params, defaults)
        # None (auto) and True: fp32 master copies of the trainable entries of every bf16/fp16
        # parameter; fp32/fp64 parameters never need one.
        self.master_weights = master_weights
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._masks, self._names = _resolve_masks(masks, model, all_params)
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                self._names.setdefault(p, f"param_groups[{gi}]['params'][{pi}]")
        self.compact_state = bool(compact_state)
        self._offsets: dict[torch.Tensor, torch.Tensor] = {}
        self._counts: dict[torch.Tensor, int] = {}

    def _name(self, p: torch.Tensor) -> str:
        return self._names.get(p, f"parameter of shape {tuple(p.shape)}")

    # -- masks ------------------------------------------------------------------------------
    def trainable_count(self, p: torch.Tensor) -> int:
        """Number of trainable entries of `p` (all of them when it has no mask)."""
        if p not in self._counts:
            mask = self._masks.get(p)
            k = local_tensor(p).numel() if mask is None else _bits.count_trainable(mask, self._word_offsets(p))
            if mask is not None and self.compact_state and k > _MAX_COMPACT:
                raise ValueError(f"{self._name(p)}: {k} trainable entries exceed the compact "
                                 "state's int32 index; use compact_state=False")
            self._counts[p] = k
        return self._counts[p]

    def _word_offsets(self, p: torch.Tensor) -> torch.Tensor | None:
        mask = self._masks.get(p)
        if mask is None or not self.compact_state:
            return None
        if p not in self._offsets:  # once per mask: per-word popcount prefix sums
            self._offsets[p] = _bits.word_offsets(mask)
        return self._offsets[p]

    def _state_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        if p in self._masks and self.compact_state:
            return (self.trainable_count(p),)
        return tuple(local_tensor(p).shape)  # a DTensor's state covers its local shard

    def _new_state(self, p: torch.Tensor) -> torch.Tensor:
        # fp32 state for every parameter dtype (fp32 math for bf16/fp16 parameters)
        return torch.zeros(self._state_shape(p), dtype=torch.float32, device=p.device)

    # -- fp32 master weights of bf16/fp16 parameters ----------------------------------------
    def uses_master(self, p: torch.Tensor) -> bool:
        """Whether `p` keeps an fp32 master copy of its trainable entries: bf16/fp16
        parameters unless master_weights=False. A bf16 step rounded straight to bf16 loses
        every update below half an ulp (lr 2e-5 on |w| ~ 0.02), fp32 math or not."""
        return self.master_weights is not False and p.dtype in (torch.bfloat16, torch.float16)

    def _state_keys_for(self, p: torch.Tensor) -> tuple[str, ...]:
        """The state tensors `p` has (laid out like the moments: compact or dense)."""
        return self._state_keys + (("master",) if self.uses_master(p) else ())

    def _new_master(self, p: torch.Tensor) -> torch.Tensor:
        """The parameter's trainable entries in fp32 (compact: in mask order; dense: all of
        them), laid out exactly like the moment state."""
        loc = local_tensor(p)
        if p in self._masks and self.compact_state:
            idx = torch.ops.dowser.unpack_mask(self._masks[p], loc.numel())
            return loc.reshape(-1)[idx].to(torch.float32)
        return loc.to(torch.float32).contiguous().clone()

    def _master(self, p: torch.Tensor, state: dict) -> torch.Tensor | None:
        if not self.uses_master(p):
            return None
        if "master" not in state:  # first step (or resumed from a state saved without one)
            state["master"] = self._new_master(p)
        return state["master"]

    def refresh_master_weights(self) -> None:
        """Forget the fp32 master copies: the next step starts them again from the parameters.
        Call after writing new values into bf16/fp16 parameters outside the optimizer (the
        master would otherwise overwrite them at the next step)."""
        for st in self.state.values():
            st.pop("master", None)

    def _raise_bad(self, bad: torch.Tensor, params: list[torch.Tensor], skipped: bool = False,
                   partial: bool = False) -> None:
        # One host read of the verdict (the sync a step makes by design); the counts are
        # copied to the host only when there is something to report.
        if bool(bad.any()):
            counts = bad.tolist()
            which = ", ".join(f"{self._name(p)} ({c})" for p, c in zip(params, counts) if c)
            if partial:  # step_in_backward, atomic mode: each hook stepped its own parameter
                raise ValueError(f"NaN/Inf gradient in trainable entries of {which}: those "
                                 "parameters were not updated; step_in_backward updated every "
                                 "other parameter in its gradient hook")
            if skipped:
                raise ValueError(f"NaN/Inf gradient in trainable entries of {which}: "
                                 "nonfinite='skip' left those entries (param and state) unchanged "
                                 "and updated all the others; this step was NOT atomic")
            raise ValueError(f"NaN/Inf gradient in trainable entries of {which}; nothing was "
                             "updated (use torch.amp.GradScaler to skip such steps)")

    def _check_all(self) -> bool:
        """Before a step that spans several op calls (groups or devices): count NaN/Inf
        trainable gradients over all of them and raise before anything is written, so the
        step stays atomic. Returns whether it checked (the calls may then skip their own pass)."""
        calls = [plist for g in self.param_groups for plist in self._grouped(g)]
        if len(calls) < 2:
            return False
        counts = [torch.ops.dowser.count_nonfinite([local_tensor(p.grad) for p in plist],
                                                   [self._masks.get(p) for p in plist])
                  for plist in calls]
        self._raise_bad(_gather_counts(counts), [p for plist in calls for p in plist])
        return True

    def _grouped(self, group: dict, params: list[torch.Tensor] | None = None):
        """The group's parameters that have a gradient, split by device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in (group["params"] if params is None else params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{self._name(p)}: sparse gradients are not supported")
            by_device.setdefault(p.device, []).append(p)
        return by_device.values()

    # -- state dicts ------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class, in either state layout, bit-exactly.

        torch's loader casts floating state to the parameter dtype (bf16 state for bf16
        parameters); the fp32 state is put back untouched afterwards, and converted between
        compact and dense layout when the saving optimizer used the other one.
        """
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} parameters, the optimizer {len(params)}")
        converted = {}
        for idx, p in zip(saved_ids, params):
            if idx in saved_state:
                # a master saved by an optimizer that used one, loaded into one that does not
                # (master_weights=False): dropped; in the other direction it starts afresh
                converted[idx] = {k: self._load_value(p, k, v) for k, v in saved_state[idx].items()
                                  if k != "master" or self.uses_master(p)}
        super().load_state_dict(state_dict)
        for idx, p in zip(saved_ids, params):
            if idx in converted:
                self.state[p] = converted[idx]

    def _dense_state(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """fp32 state `value` (compact or dense) laid out like p's local tensor, zeros at
        frozen entries."""
        loc = local_tensor(p)
        if tuple(value.shape) == tuple(loc.shape):
            return value.to(torch.float32).clone()
        dense = torch.zeros(loc.numel(), dtype=torch.float32, device=loc.device)
        dense[torch.ops.dowser.unpack_mask(self._masks[p], loc.numel())] = value
        return dense.view(loc.shape)

    def _load_value(self, p: torch.Tensor, key: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if key == "step":
            return value.detach().clone().to(torch.float32)
        if key not in self._state_keys + ("master",):
            return value.detach().clone().to(p.device)
        loc = local_tensor(p)  # a DTensor's state covers its local shard
        value = value.detach().to(device=loc.device, dtype=torch.float32)
        mask = self._masks.get(p)
        want = self._state_shape(p)
        if tuple(value.shape) == want:
            return value.clone()
        if mask is not None and value.numel() == loc.numel() and want == (self.trainable_count(p),):
            idx = torch.ops.dowser.unpack_mask(mask, loc.numel())
            return value.reshape(-1)[idx].clone()  # dense -> compact
        if mask is not None and value.dim() == 1 and value.numel() == self.trainable_count(p):
            return self._dense_state(p, value)
        raise ValueError(f"state_dict: {key} of {self._name(p)} has shape {tuple(value.shape)}, "
                         f"expected {want}: it was saved with another mask")


def _gather_counts(counts: list[torch.Tensor]) -> torch.Tensor:
    """Per-call NaN/Inf counts as one tensor on the first call's device (device-to-device
    copies: no host synchronisation until the caller reads the verdict)."""
    device = counts[0].device
    return torch.cat([c.to(device) for c in counts])


def _check_hyper(lr: float, eps: float | None, weight_decay: float) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if eps is not None and (not math.isfinite(eps) or eps < 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


class MaskedAdamW(_MaskedOptimizer):
    """AdamW that updates only the trainable entries of masked parameters.

    Args:
        params_or_groups: parameters or parameter groups, as for torch.optim.AdamW.
        masks: Mapping of parameters (or, with `model`, parameter names) to packed int32 masks
            (`dowser.ops.pack_mask` layout; 1 = trainable). Parameters without a mask train
            densely, exactly like torch.optim.AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, applied to
            trainable entries only).
        model: resolves mask names to parameters (and names parameters in messages).
        compact_state: keep exp_avg / exp_avg_sq (fp32) for the k trainable entries only
            (about 8·ρ + 0.125 bytes per masked parameter, the prefix sums included);
            False keeps fp32 state shaped like each parameter.
        maximize: maximise the objective.
        master_weights: None (default, auto) or True: every bf16/fp16 parameter keeps an fp32
            master copy of its trainable entries (state "master", laid out like exp_avg:
            4·ρ bytes per masked parameter when compact); the step reads and writes the
            master and stores its value rounded to nearest-even in the parameter, so updates
            smaller than half a bf16 ulp (lr 2e-5 on |w| ≈ 0.02) accumulate instead of being
            lost. False: no master (the fp32 result is rounded straight to the parameter
            dtype). fp32 parameters never have one. See docs/memory.md.
        step_in_backward: update each parameter from its post-accumulate-grad hook and free its
            gradient at once (peak gradient memory: one parameter's); `step()` then only runs
            the closure. Gradient accumulation over several backward passes is not possible in
            this mode.
        nonfinite: what a NaN/Inf gradient in a trainable entry does.
            ``"check"`` (default, atomic): a read-only pass over the trainable gradients comes
            first (over every parameter group, when there are several); if one is NaN/Inf,
            ValueError is raised and nothing at all was written.
            ``"skip"`` (one pass, faster, NOT atomic): every trainable entry with a finite
            gradient is updated; each entry whose gradient is NaN/Inf keeps its parameter and
            state bits; after the step, ValueError names the parameters that had such entries
            (the step itself has happened and its step counter advanced).

    Frozen entries are never written, in either mode. With torch.amp.GradScaler, steps with
    non-finite gradients are skipped before this optimizer sees them.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params_or_groups: Any, masks: Mapping, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, model: torch.nn.Module | None = None,
                 compact_state: bool = True, maximize: bool = False,
                 step_in_backward: bool = False, nonfinite: str = "check",
                 master_weights: bool | None = None) -> None:
        _check_hyper(lr, eps, weight_decay)
        if nonfinite not in ("check", "skip"):
            raise ValueError(f"nonfinite must be 'check' or 'skip', got {nonfinite!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params_or_groups, masks, defaults, model=model, compact_state=compact_state,
                         master_weights=master_weights)
        self.nonfinite = nonfinite
        self.step_in_backward = bool(step_in_backward)
        self._hooks: list = []
        # step_in_backward: the hooks' NaN/Inf counts, read once at the end of the backward
        # pass (an autograd engine callback), not once per parameter.
        self._pending: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self._pending_task: int | None = None
        if self.step_in_backward:
            if any(local_tensor(p) is not p for g in self.param_groups for p in g["params"]):
                raise ValueError("step_in_backward=True does not support FSDP2 (DTensor) "
                                 "parameters: their gradients are reduce-scattered after the "
                                 "hook runs; use step_in_backward=False")
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(
                            self._make_hook(group)))

    def _make_hook(self, group: dict) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self._queue_verdict()
            with torch.no_grad():
                # the op in the optimizer's mode ("check" writes nothing for a parameter whose
                # gradient has a trainable NaN/Inf, "skip" updates its finite entries); its
                # count is read with every other hook's at the end of the backward pass.
                self._update(group, [p], self._pending, deferred=True)
            p.grad = None  # free this gradient now: peak gradient memory is one parameter's

        return hook

    def _queue_verdict(self) -> None:
        """Once per backward pass: read every hook's NaN/Inf count at its end (one sync)."""
        task_id = torch._C._current_graph_task_id()  # this backward pass (torch >= 2.1)
        if task_id == self._pending_task:
            return
        self._pending.clear()  # left by a backward pass that failed before its end
        self._pending_task = task_id
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        pending, self._pending = self._pending, []
        self._pending_task = None
        if not pending:
            return
        params = [p for _, plist in pending for p in plist]
        bad = _gather_counts([b for b, _ in pending])
        if not bool(bad.any()):  # the one host read of this backward pass
            return
        if self.nonfinite == "check":  # their op wrote nothing: their step did not happen
            for p, c in zip(params, bad.tolist()):
                if c:
                    self.state[p]["step"] -= 1.0
            self._raise_bad(bad, params, partial=True)
        self._raise_bad(bad, params, skipped=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grads_finite: bool = False) -> Any:
        """One AdamW step over every parameter with a gradient (or, with step_in_backward,
        just run the closure: its backward pass does the updates).

        grads_finite=True: the caller has already proved every gradient finite — e.g. the
        total norm returned by torch.nn.utils.clip_grad_norm_ is finite (a NaN/Inf anywhere
        makes it NaN/Inf) — so the atomic NaN/Inf pre-pass is skipped and the step reads the
        gradients once. Should a gradient be NaN/Inf after all, its entries keep their bits
        and ValueError follows the step, as with nonfinite="skip"."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            return loss
        skipped: list = []
        # verified: a count over every group found no trainable NaN/Inf, so the ops' own counts
        # are zero and need no second host read (at most one sync per step).
        verified = self.nonfinite == "check" and not grads_finite and self._check_all()
        checked = self.nonfinite == "check" and (bool(grads_finite) or verified)
        for group in self.param_groups:
            self._update(group, None, skipped, checked)
        if not verified:
            self._raise_skipped(skipped)  # nonfinite="skip": after every group was stepped
        return loss

    def _raise_skipped(self, skipped: list) -> None:
        if skipped:
            bad = _gather_counts([b for b, _ in skipped])
            self._raise_bad(bad, [p for _, plist in skipped for p in plist], skipped=True)

    def _update(self, group: dict, params: list[torch.Tensor] | None, skipped: list,
                checked: bool = False, deferred: bool = False) -> None:
        # checked: every gradient is known finite, so the op's one-pass mode writes the same
        # bits as its checking mode, without the second read. deferred (step_in_backward):
        # the counts go to `skipped` unread, whatever the mode.
        beta1, beta2 = group["betas"]
        one_pass = self.nonfinite == "skip" or checked
        for plist in self._grouped(group, params):
            grads, m, v, masks, offs, steps, masters = [], [], [], [], [], [], []
            for p in plist:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = self._new_state(p)
                    state["exp_avg_sq"] = self._new_state(p)
                masters.append(self._master(p, state))
                grads.append(local_tensor(p.grad))
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
                masks.append(self._masks.get(p))
                offs.append(self._word_offsets(p))
                steps.append(float(state["step"]) + 1.0)
            bad = torch.ops.dowser.masked_adamw_step(
                [local_tensor(p) for p in plist], grads, m, v, masks, offs, steps, float(group["lr"]), float(beta1),
                float(beta2), float(group["eps"]), float(group["weight_decay"]),
                bool(group["maximize"]), one_pass, *master_args(masters))
            if one_pass or deferred:  # counted now (check mode undoes it for a NaN/Inf
                for p in plist:       # parameter, see _finish_backward); read after all groups
                    self.state[p]["step"] += 1.0
                skipped.append((bad, plist))
                continue
            self._raise_bad(bad, plist)
            for p in plist:
                self.state[p]["step"] += 1.0

    def remove_hooks(self) -> None:
        """Remove the step_in_backward hooks (the optimizer then steps only via step())."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.step_in_backward = False


class MaskedSGD(_MaskedOptimizer):
    """SGD (torch.optim.SGD's math: coupled weight decay, momentum, dampening, Nesterov) that
    updates only the trainable entries of masked parameters; the momentum buffer (fp32) is
    compact by default. Same mask, NaN, master-weight (`master_weights`) and state-dict
    contracts as `MaskedAdamW`."""

    _state_keys = ("momentum_buffer",)

    def __init__(self, params_or_groups: Any, masks: Mapping, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 model: torch.nn.Module | None = None, compact_state: bool = True,
                 maximize: bool = False, master_weights: bool | None = None) -> None:
        _check_hyper(lr, None, weight_decay)
        if not math.isfinite(momentum) or momentum < 0:
            raise ValueError(f"momentum must be a finite number >= 0, got {momentum!r}")
        if not math.isfinite(dampening):
            raise ValueError(f"dampening must be finite, got {dampening!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params_or_groups, masks, defaults, model=model, compact_state=compact_state,
                         master_weights=master_weights)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SGD step over every parameter with a gradient (atomic: a NaN/Inf trainable
        gradient anywhere raises before anything is written)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        verified = self._check_all()  # then the ops' own counts are zero: not read again
        for group in self.param_groups:
            has_momentum = group["momentum"] != 0
            for plist in self._grouped(group):
                grads, bufs, masks, offs, first, masters = [], [], [], [], [], []
                for p in plist:
                    state = self.state[p]
                    masters.append(self._master(p, state))
                    grads.append(local_tensor(p.grad))
                    masks.append(self._masks.get(p))
                    offs.append(self._word_offsets(p))
                    fresh = "momentum_buffer" not in state
                    first.append(fresh)
                    if has_momentum:
                        bufs.append(self._new_state(p) if fresh else state["momentum_buffer"])
                bad = torch.ops.dowser.masked_sgd_step(
                    [local_tensor(p) for p in plist], grads, bufs, masks, offs, first, float(group["lr"]),
                    float(group["momentum"]), float(group["dampening"]),
                    float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]),
                    *master_args(masters))
                if not verified:
                    self._raise_bad(bad, plist)
                if has_momentum:
                    for p, b in zip(plist, bufs):
                        self.state[p]["momentum_buffer"] = b
        return loss


# ---- hook mode for optimizers dowser does not own ----------------------------------------------

class GradientMaskHandle:
    """The hooks installed by `mask_gradients`; `remove()` (or leaving a `with` block) removes
    them."""

    def __init__(self, handles: list, masks: dict | None = None, names: dict | None = None) -> None:
        self._handles = handles
        self._masks = masks or {}
        self._names = names or {}

    def check(self, optimizer: Any) -> None:
        """Refuse (ValueError) an optimizer that would move frozen entries despite their zero
        gradient: for optimizers created after the hooks, e.g. by `deepspeed.initialize`."""
        _refuse(optimizer, self._masks, self._names)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "GradientMaskHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)


def _refuse(optimizer: torch.optim.Optimizer, masked: dict, names: dict) -> None:
    """Refuse optimizers that would still move frozen entries although their gradient is 0."""
    if isinstance(optimizer, _MaskedOptimizer):
        return
    ids = {id(p) for p in masked}
    groups = list(enumerate(optimizer.param_groups))
    ours = [(gi, g) for gi, g in groups if any(id(p) in ids for p in g["params"])]
    # An optimizer over flattened copies (DeepSpeed ZeRO) holds none of the parameters
    # themselves: every group may then hold masked entries.
    for gi, group in ours or groups:
        wd = group.get("weight_decay", 0) or 0
        if wd != 0:
            raise ValueError(
                f"mask_gradients: {type(optimizer).__name__} param_groups[{gi}] has weight_decay="
                f"{wd}: (decoupled) weight decay moves frozen entries even with a zero gradient. "
                "Use dowser.MaskedAdamW (or MaskedSGD), which never writes frozen entries, or set "
                "weight_decay=0 for the masked parameters")
        for p in group["params"]:
            if id(p) not in ids:
                continue
            for key, val in optimizer.state.get(p, {}).items():
                if isinstance(val, torch.Tensor) and val.shape == p.shape and key != "step":
                    frozen = ~torch.ops.dowser.unpack_mask(masked[p], p.numel()).view(p.shape)
                    if bool((val[frozen] != 0).any()):
                        raise ValueError(
                            f"mask_gradients: {type(optimizer).__name__} already holds non-zero "
                            f"{key!r} (momentum) state for frozen entries of {names[p]}; it would "
                            "keep moving them. Use dowser.MaskedAdamW instead, or a fresh optimizer")


def mask_gradients(model: torch.nn.Module, masks: Mapping,
                   optimizer: torch.optim.Optimizer | None = None) -> GradientMaskHandle:
    """Zero the frozen entries of every masked parameter's gradient as soon as it is
    accumulated (post-accumulate-grad hooks), for optimizers dowser does not own.

    A zero gradient keeps a frozen entry still in SGD/Adam/AdamW/RMSprop/Adagrad started from
    fresh state, but not under weight decay (AdamW's decoupled decay, or L2 decay) or momentum
    state that is already non-zero there: given `optimizer`, such configurations are refused
    with ValueError (use `MaskedAdamW`). Returns a handle whose `remove()` drops the hooks
    and whose `check(optimizer)` does that refusal for an optimizer made afterwards.

    DeepSpeed ZeRO-2/3: call this before `deepspeed.initialize` (ZeRO-3 partitions the
    parameters there), with weight_decay 0 in the DeepSpeed optimizer config, then
    `handle.check(engine.optimizer)`.
    """
    resolved, names = _resolve_masks(masks, model, None)
    if optimizer is not None:
        _refuse(optimizer, resolved, names)
    handles = []
    for p, mask in resolved.items():
        if not p.requires_grad:
            continue

        def hook(param: torch.Tensor, mask: torch.Tensor = mask) -> None:
            if param.grad is None:
                return
            grad = param.grad  # its shape, not the param's: ZeRO-3 partitions param.data
            frozen = ~torch.ops.dowser.unpack_mask(mask, grad.numel()).view(grad.shape)
            # masked_fill, not a multiply: a NaN gradient at a frozen entry becomes 0 as well
            grad.masked_fill_(frozen, 0)

        handles.append(p.register_post_accumulate_grad_hook(hook))
    return GradientMaskHandle(handles, resolved, names)

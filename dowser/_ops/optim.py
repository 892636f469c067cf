"""dowser::masked_adamw_step / dowser::masked_sgd_step: optimizer steps on bit-packed masks;
dowser::count_nonfinite: their read-only NaN/Inf pass alone.

One call updates every parameter of a group (same device). Per tensor: a packed mask (None =
every entry trains) and, for compact state, the mask's per-word popcount prefix sums. Each op
returns the per-tensor count of NaN/Inf gradients in trainable entries; when any is non-zero
the op wrote nothing (dowser.optim raises ValueError naming the parameter). With
skip_nonfinite=True (AdamW only) the step is one pass instead: entries whose gradient is
NaN/Inf keep their param and state bits, every other trainable entry is updated, and the
counts say how many were skipped.

masters (last argument, optional; None entries = none): fp32 master copies of bf16/fp16
parameters, laid out exactly like the tensor's optimizer state (compact: k entries in mask
order; dense: numel entries). The step reads the parameter value from the master, computes in
fp32, writes the new value to the master and, rounded to the parameter dtype (nearest even),
to the parameter.
"""

from __future__ import annotations

import torch

from dowser import reference
from dowser._registry import define, register
from dowser.selfcheck import add_case

_ADAMW_SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
                 "Tensor(c!)[] exp_avg_sqs, Tensor?[] masks, Tensor?[] offsets, float[] steps, "
                 "float lr, float beta1, float beta2, float eps, float weight_decay, "
                 "bool maximize, bool skip_nonfinite=False, Tensor(d!)?[]? masters=None) -> Tensor")
_SGD_SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor?[] masks, "
               "Tensor?[] offsets, bool[] first, float lr, float momentum, float dampening, "
               "float weight_decay, bool nesterov, bool maximize, Tensor(d!)?[]? masters=None) "
               "-> Tensor")


def _fake_counts(params, *args, **kwargs) -> torch.Tensor:
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((len(params),), dtype=torch.int64, device=device)


_COUNT_SCHEMA = "(Tensor[] grads, Tensor?[] masks) -> Tensor"


def _fake_count(grads, masks) -> torch.Tensor:
    return _fake_counts(grads)


masked_adamw_step_op = define("masked_adamw_step", _ADAMW_SCHEMA, _fake_counts)
count_nonfinite_op = define("count_nonfinite", _COUNT_SCHEMA, _fake_count)
masked_sgd_step_op = define("masked_sgd_step", _SGD_SCHEMA, _fake_counts)

register("masked_adamw_step", "reference", ("cpu", "cuda"))(reference.masked_adamw_)
register("masked_sgd_step", "reference", ("cpu", "cuda"))(reference.masked_sgd_)
# CUDA: the reference (one parameter's trainable index at a time); only multi-group steps use it.
register("count_nonfinite", "reference", ("cpu", "cuda"))(reference.count_nonfinite)

_EMPTY: dict[torch.device, torch.Tensor] = {}

# Whether dowser._C's masked steps take the `masters` list (one extra tensor-list argument,
# the last one: after skip_nonfinite / maximize on CPU, after the stream on CUDA; empty tensor =
# none). None = detect from the binding's signature; set True/False to force. Steps that carry
# masters go to the reference backend while the kernels do not take them; steps without masters
# always use the kernels.
KERNELS_TAKE_MASTERS: bool | None = None
_BASE_ARGS = {"masked_adamw_cpu": 14, "masked_sgd_cpu": 12,
              "masked_adamw_cuda": 15, "masked_sgd_cuda": 13}


def _takes_masters(fn) -> bool:
    if KERNELS_TAKE_MASTERS is not None:
        return KERNELS_TAKE_MASTERS
    doc = (getattr(fn, "__doc__", None) or "").split("\n", 1)[0]
    if "masters" in doc:
        return True
    base = _BASE_ARGS.get(getattr(fn, "__name__", ""), None)
    return base is not None and doc.count(": ") > base  # pybind: "argN: type" per argument


def _has_masters(masters) -> bool:
    return masters is not None and any(m is not None for m in masters)


def _none_as_empty(ts, device) -> list[torch.Tensor]:
    # The C++ entry points take plain tensor lists: an empty tensor stands for None.
    empty = _EMPTY.setdefault(torch.device(device), torch.empty(0, dtype=torch.int32, device=device))
    return [empty if t is None else t for t in ts]


def _contiguous_params(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Kernels write contiguous memory: non-contiguous params get a contiguous working copy,
    copied back afterwards (frozen entries keep their exact bits through the round trip)."""
    work, back = [], []
    for i, p in enumerate(params):
        if p.is_contiguous():
            work.append(p)
        else:
            c = p.contiguous()
            work.append(c)
            back.append((p, c))
    return work, back


def _copy_back(back: list[tuple], bad: torch.Tensor, skip_nonfinite: bool = False) -> None:
    # Atomic mode wrote nothing when a count is non-zero; skip mode always updated the rest.
    if back and (skip_nonfinite or not bool(bad.any())):
        for p, c in back:
            p.copy_(c)


@register("masked_adamw_step", "cpp", ("cpu",), cpp_symbol="masked_adamw_cpu")
def _adamw_cpp(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, steps, lr, beta1, beta2, eps,
               weight_decay, maximize, skip_nonfinite=False, masters=None) -> torch.Tensor:
    from dowser import _ext

    fn = _ext.load().masked_adamw_cpu
    extra = ()
    if _takes_masters(fn):
        extra = (_none_as_empty(masters or [None] * len(params), "cpu"),)
    elif _has_masters(masters):
        return reference.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, steps,
                                       lr, beta1, beta2, eps, weight_decay, maximize,
                                       skip_nonfinite, masters)
    work, back = _contiguous_params(list(params))
    bad = fn(
        work, [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        _none_as_empty(masks, "cpu"), _none_as_empty(offsets, "cpu"), [float(s) for s in steps],
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
        bool(skip_nonfinite), *extra)
    _copy_back(back, bad, bool(skip_nonfinite))
    return bad


@register("count_nonfinite", "cpp", ("cpu",), cpp_symbol="count_nonfinite_cpu")
def _count_cpp(grads, masks) -> torch.Tensor:
    from dowser import _ext

    return _ext.load().count_nonfinite_cpu([g.contiguous() for g in grads], _none_as_empty(masks, "cpu"))


@register("masked_sgd_step", "cpp", ("cpu",), cpp_symbol="masked_sgd_cpu")
def _sgd_cpp(params, grads, bufs, masks, offsets, first, lr, momentum, dampening, weight_decay,
             nesterov, maximize, masters=None) -> torch.Tensor:
    from dowser import _ext

    fn = _ext.load().masked_sgd_cpu
    extra = ()
    if _takes_masters(fn):
        extra = (_none_as_empty(masters or [None] * len(params), "cpu"),)
    elif _has_masters(masters):
        return reference.masked_sgd_(params, grads, bufs, masks, offsets, first, lr, momentum,
                                     dampening, weight_decay, nesterov, maximize, masters)
    work, back = _contiguous_params(list(params))
    bad = fn(
        work, [g.contiguous() for g in grads], list(bufs), _none_as_empty(masks, "cpu"),
        _none_as_empty(offsets, "cpu"), [bool(f) for f in first], float(lr), float(momentum),
        float(dampening), float(weight_decay), bool(nesterov), bool(maximize), *extra)
    _copy_back(back, bad)
    return bad


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register("masked_adamw_step", "cuda", ("cuda",), cpp_symbol="masked_adamw_cuda")
def _adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, steps, lr, beta1, beta2, eps,
                weight_decay, maximize, skip_nonfinite=False, masters=None) -> torch.Tensor:
    from dowser import _ext

    if not len(params):
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    fn = _ext.load().masked_adamw_cuda
    extra = ()
    if _takes_masters(fn):
        extra = (_none_as_empty(masters or [None] * len(params), device),)
    elif _has_masters(masters):
        return reference.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, steps,
                                       lr, beta1, beta2, eps, weight_decay, maximize,
                                       skip_nonfinite, masters)
    work, back = _contiguous_params(list(params))
    bad = fn(
        work, [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        _none_as_empty(masks, device), _none_as_empty(offsets, device), [float(s) for s in steps],
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
        bool(skip_nonfinite), _cuda_stream(device), *extra)
    _copy_back(back, bad, bool(skip_nonfinite))
    return bad


@register("masked_sgd_step", "cuda", ("cuda",), cpp_symbol="masked_sgd_cuda")
def _sgd_cuda(params, grads, bufs, masks, offsets, first, lr, momentum, dampening, weight_decay,
              nesterov, maximize, masters=None) -> torch.Tensor:
    from dowser import _ext

    if not len(params):
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    fn = _ext.load().masked_sgd_cuda
    extra = ()
    if _takes_masters(fn):
        extra = (_none_as_empty(masters or [None] * len(params), device),)
    elif _has_masters(masters):
        return reference.masked_sgd_(params, grads, bufs, masks, offsets, first, lr, momentum,
                                     dampening, weight_decay, nesterov, maximize, masters)
    work, back = _contiguous_params(list(params))
    bad = fn(
        work, [g.contiguous() for g in grads], list(bufs), _none_as_empty(masks, device),
        _none_as_empty(offsets, device), [bool(f) for f in first], float(lr), float(momentum),
        float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
        _cuda_stream(device), *extra)
    _copy_back(back, bad)
    return bad


def _selfcheck_count_inputs(gen: torch.Generator) -> tuple:
    grads = [torch.randn(37, 45, generator=gen), torch.randn(70, generator=gen).to(torch.bfloat16)]
    grads[0].view(-1)[torch.randint(0, grads[0].numel(), (9,), generator=gen)] = float("nan")
    grads[1][torch.randint(0, 70, (3,), generator=gen)] = float("inf")
    mask = reference.pack_mask(torch.rand(37, 45, generator=gen) < 0.5)
    return grads, [mask, None]


add_case("count_nonfinite", _selfcheck_count_inputs)

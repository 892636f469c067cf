"""The `cuda` backend: dowser._C built with CUDA (csrc/cuda/*.cu). The CUDA stream is passed
as an integer (the .cu files include only torch/extension.h and the CUDA runtime). None of
these kernels synchronises with the host. Every wrapper runs with its tensors' device current
(`on_its_device`): the stream and the launch belong to that device."""

from __future__ import annotations

import torch

from dowser._checks import masters_per_param
from dowser._ops.backends._common import contiguous_params, copy_back, none_as_empty, on_its_device
from dowser._registry import register


def _c():
    from dowser import _ext

    return _ext.load()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register("count_nonfinite", "cuda", ("cuda",), cpp_op="dowser_C::count_nonfinite_cuda")
@on_its_device
def count_nonfinite(grads, masks):
    # csrc/cuda/count_nonfinite.cu registers itself (TORCH_LIBRARY_FRAGMENT): one launch.
    if not len(grads):
        return torch.zeros(0, dtype=torch.int64)
    device = grads[0].device
    return torch.ops.dowser_C.count_nonfinite_cuda(
        [g.contiguous() for g in grads], none_as_empty(masks, device), _stream(device))


@register("masked_adamw_step", "cuda", ("cuda",), cpp_symbol="masked_adamw_cuda")
@on_its_device
def masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, steps, lr, beta1,
                      beta2, eps, weight_decay, maximize, skip_nonfinite=False, masters=None,
                      has_master=None):
    per_param = masters_per_param(masters, has_master, len(params))  # checked first
    if not len(params):
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    work, back = contiguous_params(list(params))
    bad = _c().masked_adamw_cuda(
        work, [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        none_as_empty(masks, device), none_as_empty(offsets, device), [float(s) for s in steps],
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
        bool(skip_nonfinite), _stream(device), none_as_empty(per_param, device))
    copy_back(back)
    return bad


@register("masked_sgd_step", "cuda", ("cuda",), cpp_symbol="masked_sgd_cuda")
@on_its_device
def masked_sgd_step(params, grads, bufs, masks, offsets, first, lr, momentum, dampening,
                    weight_decay, nesterov, maximize, masters=None, has_master=None):
    per_param = masters_per_param(masters, has_master, len(params))  # checked first
    if not len(params):
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    work, back = contiguous_params(list(params))
    bad = _c().masked_sgd_cuda(
        work, [g.contiguous() for g in grads], list(bufs), none_as_empty(masks, device),
        none_as_empty(offsets, device), [bool(f) for f in first], float(lr), float(momentum),
        float(dampening), float(weight_decay), bool(nesterov), bool(maximize), _stream(device),
        none_as_empty(per_param, device))
    copy_back(back)
    return bad

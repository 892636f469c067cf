"""The `cpp` backend: dowser._C's OpenMP kernels on CPU (csrc/cpu/*.cpp)."""

from __future__ import annotations

from dowser._bits import score_factors
from dowser._checks import masters_per_param
from dowser._ops.backends._common import contiguous_params, copy_back, none_as_empty
from dowser._registry import register


def _c():
    from dowser import _ext

    return _ext.load()


@register("pack_mask", "cpp", ("cpu",), cpp_symbol="pack_mask_cpu")
def pack_mask(mask):
    return _c().pack_mask_cpu(mask)


@register("unpack_mask", "cpp", ("cpu",), cpp_symbol="unpack_mask_cpu")
def unpack_mask(packed, numel):
    return _c().unpack_mask_cpu(packed, numel)


def _factors(out_factors, in_factors, batch_weights):
    # Row factors transposed to (d_out, B) so one row's factors are contiguous.
    pw, a = score_factors(out_factors, in_factors, batch_weights)
    return pw.t().contiguous(), a.contiguous()


@register("scores", "cpp", ("cpu",), cpp_symbol="scores_cpu")
def scores(weight, out_factors, in_factors, batch_weights):
    return _c().scores_cpu(weight, *_factors(out_factors, in_factors, batch_weights))


@register("select_masks_global", "cpp", ("cpu",), cpp_symbol="select_masks_cpu")
def select_masks_global(weights, out_factors, in_factors, batch_weights, k):
    pws, As = [], []
    for o, i, w in zip(out_factors, in_factors, batch_weights):
        pw, a = _factors(o, i, w)
        pws.append(pw)
        As.append(a)
    masks, stats = _c().select_masks_cpu(list(weights), pws, As, int(k))
    return list(masks), stats


@register("select_mask", "cpp", ("cpu",), cpp_symbol="select_masks_cpu")
def select_mask(weight, out_factors, in_factors, batch_weights, k):
    masks, stats = select_masks_global([weight], [out_factors], [in_factors], [batch_weights], k)
    return masks[0], stats


@register("count_nonfinite", "cpp", ("cpu",), cpp_symbol="count_nonfinite_cpu")
def count_nonfinite(grads, masks):
    return _c().count_nonfinite_cpu([g.contiguous() for g in grads], none_as_empty(masks, "cpu"))


@register("masked_adamw_step", "cpp", ("cpu",), cpp_symbol="masked_adamw_cpu")
def masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, steps, lr, beta1,
                      beta2, eps, weight_decay, maximize, skip_nonfinite=False, masters=None,
                      has_master=None):
    per_param = masters_per_param(masters, has_master, len(params))  # checked first
    work, back = contiguous_params(list(params))
    bad = _c().masked_adamw_cpu(
        work, [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        none_as_empty(masks, "cpu"), none_as_empty(offsets, "cpu"), [float(s) for s in steps],
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
        bool(skip_nonfinite), none_as_empty(per_param, "cpu"))
    copy_back(back)
    return bad


@register("masked_sgd_step", "cpp", ("cpu",), cpp_symbol="masked_sgd_cpu")
def masked_sgd_step(params, grads, bufs, masks, offsets, first, lr, momentum, dampening,
                    weight_decay, nesterov, maximize, masters=None, has_master=None):
    per_param = masters_per_param(masters, has_master, len(params))  # checked first
    work, back = contiguous_params(list(params))
    bad = _c().masked_sgd_cpu(
        work, [g.contiguous() for g in grads], list(bufs), none_as_empty(masks, "cpu"),
        none_as_empty(offsets, "cpu"), [bool(f) for f in first], float(lr), float(momentum),
        float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
        none_as_empty(per_param, "cpu"))
    copy_back(back)
    return bad

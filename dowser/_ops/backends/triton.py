"""The `triton` backend: dowser.kernels (CUDA; CPU only under TRITON_INTERPRET=1). Triton launches
on the current device: every wrapper makes its tensors' device current (`on_its_device`)."""

from __future__ import annotations

from dowser._bits import score_factors
from dowser._ops.backends._common import on_its_device
from dowser._registry import register


@register("pack_mask", "triton", ("cpu", "cuda"))
@on_its_device
def pack_mask(mask):
    from dowser.kernels import pack

    return pack.pack_mask(mask)


@register("unpack_mask", "triton", ("cpu", "cuda"))
@on_its_device
def unpack_mask(packed, numel):
    from dowser.kernels import pack

    return pack.unpack_mask(packed, numel)


@register("scores", "triton", ("cpu", "cuda"))
@on_its_device
def scores(weight, out_factors, in_factors, batch_weights):
    from dowser.kernels import score

    return score.scores(weight, *score_factors(out_factors, in_factors, batch_weights))


@register("select_masks_global", "triton", ("cpu", "cuda"))
@on_its_device
def select_masks_global(weights, out_factors, in_factors, batch_weights, k):
    from dowser.kernels import select

    layers = [(w, *score_factors(o, i, b))
              for w, o, i, b in zip(weights, out_factors, in_factors, batch_weights)]
    return select.select_masks(layers, int(k))


@register("select_mask", "triton", ("cpu", "cuda"))
@on_its_device
def select_mask(weight, out_factors, in_factors, batch_weights, k):
    masks, stats = select_masks_global([weight], [out_factors], [in_factors], [batch_weights], k)
    return masks[0], stats

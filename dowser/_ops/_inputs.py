"""Small deterministic inputs shared by the self-check (dowser selfcheck) and opcheck tests."""

from __future__ import annotations

import torch

from dowser import reference


def exact_layer(gen: torch.Generator) -> tuple:
    """A layer whose scores are exact in fp32 (small integers, batch weights summing to a power
    of two), so every backend must agree with the reference bit for bit, heavy ties included."""
    w = torch.randint(-6, 7, (37, 101), generator=gen).to(torch.float32)
    psi = torch.randint(0, 4, (4, 37), generator=gen).to(torch.float32)
    a = torch.randint(0, 4, (4, 101), generator=gen).to(torch.float32)
    return w, psi, a, torch.tensor([1.0, 3.0, 2.0, 2.0])


def optim_group(gen: torch.Generator, compact: bool = True) -> dict:
    """One parameter group of three tensors (fp32 masked, bf16 masked, fp32 dense) with their
    gradients, masks, word offsets, fp32 state (compact for masked tensors) and fp32 masters
    (one per tensor: the bf16 tensor's, off its bf16 grid; None for the fp32 tensors)."""
    shapes = [(37, 45), (70,), (9, 8)]
    params = [torch.randn(37, 45, generator=gen), torch.randn(70, generator=gen).to(torch.bfloat16),
              torch.randn(9, 8, generator=gen)]
    grads = [torch.randn(s, generator=gen).to(p.dtype) for s, p in zip(shapes, params)]
    masks = [reference.pack_mask(torch.rand(shapes[0], generator=gen) < 0.4),
             reference.pack_mask(torch.rand(shapes[1], generator=gen) < 0.6), None]
    offsets = [reference.word_offsets(m) if (compact and m is not None) else None for m in masks]
    sizes = [p.numel() if o is None else reference.count_trainable(m, o)
             for p, m, o in zip(params, masks, offsets)]
    state = lambda: [torch.rand(n, generator=gen) for n in sizes]  # noqa: E731
    state1, state2 = state(), state()
    bf = params[1].float()
    bf = bf[reference.unpack_mask(masks[1], bf.numel())] if offsets[1] is not None else bf
    masters = [None, bf + torch.randn(bf.shape, generator=gen) * 1e-4, None]
    return {"params": params, "grads": grads, "masks": masks, "offsets": offsets,
            "state1": state1, "state2": state2, "masters": masters}

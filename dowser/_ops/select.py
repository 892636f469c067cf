"""dowser::scores / dowser::select_mask / dowser::select_masks_global.

Scores S = |W| * (Psi^T diag(w) A) / sum(w) and the exact bottom-k selection of DESIGN.md §2
(k lowest scores, ties by lower flat index; globally: by layer order, then flat index) as
bit-packed int32 masks. The selection ops also return int64 stats
[threshold key, count strictly below, ties taken] (key -1 when k = 0).

Backends: reference (materialise + stable sort), cpp (dowser._C: OpenMP radix passes that
recompute score rows and never hold S), triton (fused score tiles + histogram passes).
"""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import words_for
from dowser._registry import define, register
from dowser.selfcheck import add_case


def _fake_scores(weight, out_factors, in_factors, batch_weights):
    return weight.new_empty(weight.shape, dtype=torch.float32)


def _fake_select(weight, out_factors, in_factors, batch_weights, k):
    return (weight.new_empty((words_for(weight.numel()),), dtype=torch.int32),
            weight.new_empty((3,), dtype=torch.int64))


def _fake_select_global(weights, out_factors, in_factors, batch_weights, k):
    return ([w.new_empty((words_for(w.numel()),), dtype=torch.int32) for w in weights],
            torch.empty((3,), dtype=torch.int64))


scores_op = define("scores", "(Tensor weight, Tensor out_factors, Tensor in_factors, "
                   "Tensor batch_weights) -> Tensor", _fake_scores)
select_mask_op = define("select_mask", "(Tensor weight, Tensor out_factors, Tensor in_factors, "
                        "Tensor batch_weights, SymInt k) -> (Tensor, Tensor)", _fake_select)
select_masks_global_op = define(
    "select_masks_global", "(Tensor[] weights, Tensor[] out_factors, Tensor[] in_factors, "
    "Tensor[] batch_weights, SymInt k) -> (Tensor[], Tensor)", _fake_select_global)

register("scores", "reference", ("cpu", "cuda"))(reference.scores)
register("select_mask", "reference", ("cpu", "cuda"))(reference.select_mask)
register("select_masks_global", "reference", ("cpu", "cuda"))(reference.select_masks_global)


def _cpp_factors(out_factors, in_factors, batch_weights):
    # Row factors transposed to (d_out, B) so one row's factors are contiguous.
    pw, a = reference.score_factors(out_factors, in_factors, batch_weights)
    return pw.t().contiguous(), a.contiguous()


@register("scores", "cpp", ("cpu",), cpp_symbol="scores_cpu")
def _scores_cpp(weight, out_factors, in_factors, batch_weights):
    from dowser import _ext

    pw, a = _cpp_factors(out_factors, in_factors, batch_weights)
    return _ext.load().scores_cpu(weight, pw, a)


@register("select_masks_global", "cpp", ("cpu",), cpp_symbol="select_masks_cpu")
def _select_global_cpp(weights, out_factors, in_factors, batch_weights, k):
    from dowser import _ext

    pws, As = [], []
    for o, i, w in zip(out_factors, in_factors, batch_weights):
        pw, a = _cpp_factors(o, i, w)
        pws.append(pw)
        As.append(a)
    masks, stats = _ext.load().select_masks_cpu(list(weights), pws, As, int(k))
    return list(masks), stats


@register("select_mask", "cpp", ("cpu",), cpp_symbol="select_masks_cpu")
def _select_cpp(weight, out_factors, in_factors, batch_weights, k):
    masks, stats = _select_global_cpp([weight], [out_factors], [in_factors], [batch_weights], k)
    return masks[0], stats


@register("scores", "triton", ("cpu", "cuda"))
def _scores_triton(weight, out_factors, in_factors, batch_weights):
    from dowser.kernels import score

    return score.scores(weight, *reference.score_factors(out_factors, in_factors, batch_weights))


@register("select_masks_global", "triton", ("cpu", "cuda"))
def _select_global_triton(weights, out_factors, in_factors, batch_weights, k):
    from dowser.kernels import select

    layers = [(w, *reference.score_factors(o, i, b))
              for w, o, i, b in zip(weights, out_factors, in_factors, batch_weights)]
    return select.select_masks(layers, int(k))


@register("select_mask", "triton", ("cpu", "cuda"))
def _select_triton(weight, out_factors, in_factors, batch_weights, k):
    masks, stats = _select_global_triton([weight], [out_factors], [in_factors], [batch_weights], k)
    return masks[0], stats


# Self-check inputs whose scores are exact in fp32 (small integers, batch weights summing to a
# power of two), so every backend must agree with the reference bit for bit, heavy ties included.
def _exact_inputs(gen: torch.Generator) -> tuple:
    w = torch.randint(-6, 7, (37, 101), generator=gen).to(torch.float32)
    psi = torch.randint(0, 4, (4, 37), generator=gen).to(torch.float32)
    a = torch.randint(0, 4, (4, 101), generator=gen).to(torch.float32)
    return w, psi, a, torch.tensor([1.0, 3.0, 2.0, 2.0])


def _selfcheck_select(gen: torch.Generator) -> tuple:
    return (*_exact_inputs(gen), 1000)


def _selfcheck_global(gen: torch.Generator) -> tuple:
    w, psi, a, bw = _exact_inputs(gen)
    w2, psi2, a2, bw2 = _exact_inputs(gen)
    return [w, w2[:, :50].t()], [psi, a2[:, :50]], [a, psi2], [bw, bw2], 2000


def _same_selection(a, b) -> bool:
    (ma, sa), (mb, sb) = a, b
    ma = ma if isinstance(ma, list) else [ma]
    mb = mb if isinstance(mb, list) else [mb]
    return torch.equal(sa.cpu(), sb.cpu()) and len(ma) == len(mb) and all(
        torch.equal(x.cpu(), y.cpu()) for x, y in zip(ma, mb))


add_case("scores", _exact_inputs)
add_case("select_mask", _selfcheck_select, _same_selection)
add_case("select_masks_global", _selfcheck_global, _same_selection)

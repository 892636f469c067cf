"""Dowser-LoRA (dowser.build_lora_masks): row masks on lora_B and column masks on lora_A from the
axis means of a rule's scores, against the authors' rule (train_dowser.py, `_build_axis_mask`)
on a tiny layer, and trained through PEFT with MaskedAdamW."""

import math

import pytest
import torch
from torch import nn

import dowser
from dowser.lora_masks import axis_fraction, axis_scores
from dowser.ops import unpack_mask
from dowser.probe import ProbeEntry, ProbeStats

peft = pytest.importorskip("peft")

D_OUT, D_IN, R = 13, 11, 4


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT, bias=False)
        self.head = nn.Linear(D_OUT, 3, bias=False)

    def forward(self, x):
        return self.head(self.proj(x))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    gen = torch.Generator().manual_seed(seed + 1)
    entry = ProbeEntry(torch.rand(3, D_OUT, generator=gen) + 0.1, torch.rand(3, D_IN, generator=gen) + 0.1,
                       torch.tensor([4.0, 4.0, 2.0]), torch.rand(3, D_IN, generator=gen))
    stats = ProbeStats({"proj": entry}, {"seed": 0})
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"],
                                                     lora_dropout=0.0))
    return pm, stats, entry


def _authors_axis_mask(scores, frac, eps=1e-12):
    """The authors' `_build_axis_mask` (train_dowser.py), re-typed from their script."""
    if frac <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if frac >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    if (scores.max() - scores.min()) < eps:
        return torch.ones_like(scores, dtype=torch.bool)
    k = max(1, int(round(len(scores) * frac)))
    k = min(k, len(scores))
    thresh = torch.kthvalue(scores.view(-1), k).values
    return scores <= thresh


def _names(pm):
    pre = "base_model.model.proj."
    return pre + "lora_B.default.weight", pre + "lora_A.default.weight"


@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5, 0.9])
def test_masks_equal_the_authors_rule_on_a_tiny_layer(rho):
    pm, stats, entry = _setup()
    masks = dowser.build_lora_masks(pm, stats, rho)
    w = pm.base_model.model.proj.get_base_layer().weight
    imp = entry.scores(w)  # the dense importance matrix the authors load (fp64 here)
    p = 1 - math.sqrt(1 - rho)  # their p_axis
    rows_ref, cols_ref = _authors_axis_mask(imp.mean(dim=1), p), _authors_axis_mask(imp.mean(dim=0), p)
    kb, ka = _names(pm)
    B = unpack_mask(masks[kb], (D_OUT, R))
    A = unpack_mask(masks[ka], (R, D_IN))
    assert torch.equal(B, rows_ref[:, None].expand(D_OUT, R))
    assert torch.equal(A, cols_ref[None, :].expand(R, D_IN))
    assert masks.metadata["method"] == "dowser-lora" and masks.metadata["axis_fraction"] == pytest.approx(p)
    # the factor form of the axis means equals the dense means
    rows, cols = axis_scores(w, entry.out_factors, entry.in_factors, entry.batch_weights)
    torch.testing.assert_close(rows, imp.mean(dim=1))
    torch.testing.assert_close(cols, imp.mean(dim=0))


def test_exact_count_where_the_authors_rule_overshoots():
    pm, stats, _ = _setup()
    with torch.no_grad():
        pm.base_model.model.proj.get_base_layer().weight.fill_(0.5)  # every score ties
    masks = dowser.build_lora_masks(pm, None, 0.5, method="magnitude", targets=["proj"])
    kb, ka = _names(pm)
    rows = unpack_mask(masks[kb], (D_OUT, R))[:, 0]
    p = axis_fraction(0.5)
    k = math.floor(p * D_OUT + 0.5)
    assert rows.tolist() == [True] * k + [False] * (D_OUT - k)  # exactly k, the lowest indices
    assert _authors_axis_mask(torch.full((D_OUT,), 0.5), p).all()  # theirs: the whole axis


def test_every_rule_plugs_in_and_random_is_reproducible():
    pm, stats, _ = _setup()
    kb, _ = _names(pm)
    got = {m: dowser.build_lora_masks(pm, stats, 0.5, method=m, seed=3) for m in ("dowser", "magnitude", "wanda", "random")}
    p = axis_fraction(0.5)
    for m, ms in got.items():
        assert int(unpack_mask(ms[kb], (D_OUT, R))[:, 0].sum()) == math.floor(p * D_OUT + 0.5), m
    again = dowser.build_lora_masks(pm, None, 0.5, method="random", seed=3, targets=["proj"])
    assert all(torch.equal(again[k], got["random"][k]) for k in again)
    with pytest.raises(ValueError, match="needs probe statistics"):
        dowser.build_lora_masks(pm, None, 0.5)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        dowser.build_lora_masks(pm, stats, 0.5, targets=["head"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        dowser.build_lora_masks(Tiny(), stats, 0.5)


def test_trains_through_peft_and_frozen_rows_and_columns_never_move():
    pm, stats, _ = _setup()
    masks = dowser.build_lora_masks(pm, stats, 0.5)
    kb, ka = _names(pm)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        params[kb].normal_()  # PEFT starts B at 0: give it values so a stray update would show
    before = {k: params[k].detach().clone() for k in (kb, ka)}
    opt = dowser.MaskedAdamW([p for p in pm.parameters() if p.requires_grad], masks, model=pm, lr=1e-2,
                             weight_decay=0.1)
    x, y = torch.randn(16, D_IN), torch.randn(16, 3)
    for _ in range(5):
        loss = ((pm(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, shape in ((kb, (D_OUT, R)), (ka, (R, D_IN))):
        on = unpack_mask(masks[k], shape)
        moved = params[k].detach() != before[k]
        assert not moved[~on].any() and moved[on].any(), k

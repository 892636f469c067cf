"""PEFT: a dowser fine-tune exported as a Super-Tuning adapter merges back bit for bit, and
dowser masks as the support of a PEFT adapter train only the masked entries."""

import copy

import pytest
import torch

import dowser
from dowser.ops import unpack_mask
from tests.models import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from dowser.integrations.peft import export_adapter, get_peft_model, supertuning_sparsity  # noqa: E402

PROBE = dict(n_samples=4, batch_size=2, n_rademacher=2, seq_len=16, progress=False)


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (4, 12), generator=gen) for _ in range(n)]


def _dowser_finetune(model, masks, steps=3):
    opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks,
                             model=model, lr=3e-3, weight_decay=0.1)
    for ids in _batches(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _same_bits(a, b):
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype,scope", [(torch.float32, "matrix"), (torch.float32, "global"),
                                         (torch.bfloat16, "matrix")])
def test_export_round_trip_is_bit_exact(tmp_path, dtype, scope):
    base = tiny_llama(n_layers=3, dtype=dtype)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.1, layers=2, scope=scope, **PROBE)
    _dowser_finetune(tuned, masks)
    report = export_adapter(tuned, masks, tmp_path, base=base)
    assert report["slots"] >= report["trainable"] == sum(masks.counts()[n][0] for n in masks)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], peft.SupertuningConfig)
    layer = dict(loaded.base_model.model.named_modules())["model.layers.2.mlp.down_proj"]
    name = "model.layers.2.mlp.down_proj.weight"
    k = masks.counts()[name][0]
    idx = layer.supertuning_indices["default"].long()
    assert torch.equal(idx[:k], unpack_mask(masks[name], masks.shapes[name]).reshape(-1)
                       .nonzero().flatten())
    ids = torch.randint(3, 90, (2, 10))
    want = tuned(input_ids=ids).logits
    unmerged = loaded(input_ids=ids).logits
    merged = loaded.merge_and_unload()
    # every weight bit for bit: masked entries (one slot, or two where w + v cannot reach the
    # fine-tuned value), frozen entries (spare slots add -0.0) and the norms (modules_to_save)
    assert report["inexact"] == 0, report
    assert report["two_slot"] > 0, report  # the path for entries w + v cannot reach is exercised
    for (pname, p), q in zip(tuned.named_parameters(), merged.parameters()):
        assert _same_bits(p, q), f"{pname}: merged weight differs from the dowser fine-tune"
    assert torch.equal(unmerged, want) and torch.equal(merged(input_ids=ids).logits, want)


def test_export_small_updates_are_bit_exact(tmp_path):
    """A fine-tune that moves entries by less than their size (the usual case on pretrained
    weights): every merged weight equals the dowser fine-tune bit for bit, outputs too."""
    base = tiny_llama(n_layers=3)
    with torch.no_grad():  # entries away from 0, as in a pretrained model's bulk
        for p in base.parameters():
            p.copy_(torch.where(p.abs() < 0.01, torch.full_like(p, 0.01) * torch.sign(p + 1e-9), p))
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.1, layers=2, **PROBE)
    opt = dowser.MaskedAdamW([p for p in tuned.parameters() if p.requires_grad], masks,
                             model=tuned, lr=1e-3, weight_decay=0.1)
    for ids in _batches(3):
        tuned(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    report = export_adapter(tuned, masks, tmp_path, base=base)
    assert report["inexact"] == 0 and report["two_slot"] == 0, report  # all one-slot (Sterbenz)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).merge_and_unload()
    for (name, p), q in zip(tuned.named_parameters(), merged.parameters()):
        assert _same_bits(p, q), name
    ids = torch.randint(3, 90, (2, 10))
    assert torch.equal(merged(input_ids=ids).logits, tuned(input_ids=ids).logits)


def test_export_refuses_what_supertuning_cannot_carry(tmp_path):
    base = tiny_gpt2(n_layers=2)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.1, layers=1, **PROBE)
    with pytest.raises(ValueError, match="nn.Linear weights only"):
        export_adapter(tuned, masks, tmp_path, base=base)
    base = tiny_llama(n_layers=2)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.1, layers=1, **PROBE)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight[
            ~unpack_mask(masks["model.layers.1.self_attn.q_proj.weight"], (32, 32))] += 1
    with pytest.raises(ValueError, match="frozen entries of 'model.layers.1.self_attn.q_proj.weight'"):
        export_adapter(tuned, masks, tmp_path, base=base)


def test_sparsity_matches_peft_slot_formula():
    counts = {"a": (3, 7), "b": (10, 100), "c": (0, 5), "d": (1000, 9999)}
    s = supertuning_sparsity(counts)
    assert 0.0 <= s < 1.0
    assert all(int(n * (1 - s)) >= max(k, 1) for k, n in counts.values())
    assert int(7 * (1 - s)) == 3  # the tightest layer gets no spare slot
    assert supertuning_sparsity({"a": (5, 5)}) == 0.0


def test_train_through_peft_on_dowser_masks(tmp_path):
    base = tiny_llama(n_layers=3)
    stats = dowser.probe(base, None, layers=2, **PROBE)
    masks = dowser.build_masks(base, stats, rho=0.1, scope="global")  # uneven k: spare slots
    pm = get_peft_model(copy.deepcopy(base), masks)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    slots = sum(p.numel() for p in trainable)
    k_total = sum(masks.counts()[n][0] for n in masks)
    assert slots > k_total
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)  # PEFT's side: any optimizer
    losses = []
    data = _batches(4)
    for _ in range(3):
        for ids in data:
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    pm.save_pretrained(str(tmp_path))
    ids = torch.randint(3, 90, (2, 10))
    want = pm(input_ids=ids).logits
    merged = copy.deepcopy(pm).merge_and_unload()
    for name, p in merged.named_parameters():
        b = base.get_parameter(name)
        if name in masks:
            frozen = ~unpack_mask(masks[name], p.shape)
            assert _same_bits(p[frozen], b[frozen]), f"{name}: an entry outside the mask moved"
            if masks.counts()[name][0] > 0:  # global scope may give a matrix no entry
                assert not torch.equal(p, b), f"{name}: nothing trained"
        else:
            assert _same_bits(p, b), name
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(loaded(input_ids=ids).logits, want)
    again = loaded.merge_and_unload()
    for (name, p), q in zip(merged.named_parameters(), again.parameters()):
        assert _same_bits(p, q), name

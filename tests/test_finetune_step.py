"""The fine-tuning step of dowser.finetune.train: the answer-token loss through the model's
logits_to_keep, and MaskedAdamW.step(grads_finite=True) (one gradient pass after a finite
clipped norm)."""

from __future__ import annotations

import pytest
import torch

import dowser
from dowser.finetune import answer_loss, train
from dowser.tasks import CharTokenizer, cipher_examples, collate
from tests.models import tiny_llama


def _batch():
    tok = CharTokenizer()
    ex = cipher_examples(tok, 6, seed=0, bos_id=tok.bos_token_id)
    return tok, ex, collate(ex, tok.pad_token_id)


def test_answer_loss_equals_the_models_loss_and_gradient():
    tok, _, batch = _batch()
    model = tiny_llama(vocab=tok.vocab_size)
    ref = model(**batch).loss
    ref.backward()
    g_ref = model.model.layers[1].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    got = answer_loss(model, batch)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight.grad, g_ref,
                               rtol=1e-5, atol=1e-7)


def test_answer_loss_falls_back_without_logits_to_keep():
    tok, _, batch = _batch()
    inner = tiny_llama(vocab=tok.vocab_size)

    class Plain(torch.nn.Module):  # a forward without logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    assert torch.equal(answer_loss(Plain(), batch), inner(**batch).loss)


def _masked_setup(seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(37, 29))
    mask = dowser.ops.pack_mask(torch.rand(37, 29) < 0.4)
    return p, mask


def test_grads_finite_step_is_bitwise_the_checked_step():
    runs = []
    for grads_finite in (False, True):
        p, mask = _masked_setup()
        opt = dowser.MaskedAdamW([p], {p: mask}, lr=1e-2, weight_decay=0.1)
        for i in range(3):
            p.grad = torch.randn(37, 29, generator=torch.Generator().manual_seed(i))
            opt.step(grads_finite=grads_finite)
        runs.append((p.detach().clone(), opt.state[p]["exp_avg"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_grads_finite_wrongly_claimed_never_writes_bad_or_frozen_entries():
    p, mask = _masked_setup()
    before = p.detach().clone()
    opt = dowser.MaskedAdamW([p], {p: mask}, lr=1e-2)
    trainable = dowser.ops.unpack_mask(mask, p.shape)
    bad = trainable.nonzero()[0]
    p.grad = torch.randn(37, 29)
    p.grad[bad[0], bad[1]] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        opt.step(grads_finite=True)
    assert torch.equal(p.detach()[~trainable], before[~trainable])
    assert p.detach()[bad[0], bad[1]] == before[bad[0], bad[1]]


def test_train_runs_with_masked_adamw_and_keeps_frozen_entries():
    tok, ex, _ = _batch()
    model = tiny_llama(vocab=tok.vocab_size)
    w = model.model.layers[1].mlp.up_proj.weight
    mask = dowser.ops.pack_mask(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.2)
    before = w.detach().clone()
    opt = dowser.MaskedAdamW([w], {w: mask}, lr=1e-2)
    for p in model.parameters():
        p.requires_grad_(p is w)
    losses = train(model, ex, opt, steps=3, batch_size=4, pad_id=tok.pad_token_id,
                   progress=False)
    frozen = ~dowser.ops.unpack_mask(mask, w.shape)
    assert len(losses) == 3 and torch.equal(w.detach()[frozen], before[frozen])
    assert not torch.equal(w.detach(), before)

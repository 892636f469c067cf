"""PyTorch Lightning: Trainer.fit trains a tiny Llama through dowser's callback and optimizer:
the loss falls, frozen entries stay bit-identical, the masks ride in every checkpoint, the masks
file and the delta are written, resuming is bit-exact, and other masks are refused."""

import copy

import pytest
import torch

import dowser
from dowser.integrations._common import DELTA_FILE, MASKS_FILE
from tests.models import tiny_llama

L = pytest.importorskip("lightning.pytorch")
from dowser.integrations.lightning import CHECKPOINT_KEY, DowserCallback  # noqa: E402

PROBE = dict(n_samples=4, batch_size=2, n_rademacher=2, seq_len=16)


class LitLM(L.LightningModule):
    def __init__(self, model, cb, lr=1e-2):
        super().__init__()
        self.model, self.cb, self.lr, self.losses = model, cb, lr, []

    def training_step(self, batch, _):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return self.cb.optimizer(self, lr=self.lr, weight_decay=0.1)


def _loader():
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(3, 97, (24, 12), generator=gen)  # a fixed random "language"
    data[:, 1::2] = (data[:, 0::2] * 7) % 94 + 3          # every odd token follows its left one
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _fit(model, cb, root, epochs, ckpt_path=None):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[cb],
                        default_root_dir=str(root), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True)
    lit = LitLM(model, cb)
    trainer.fit(lit, _loader(), ckpt_path=ckpt_path)
    return trainer, lit


def test_fit_frozen_entries_checkpoint_and_resume(tmp_path):
    init = tiny_llama(n_layers=3)
    before = {n: p.detach().clone() for n, p in init.named_parameters()}

    full = copy.deepcopy(init)
    cb = DowserCallback(rho=0.2, layers=2, **PROBE)
    trainer, lit = _fit(full, cb, tmp_path / "full", 2)
    masks = cb.masks
    assert len(lit.losses) == 6 and lit.losses[-1] < lit.losses[0], lit.losses
    assert isinstance(trainer.optimizers[0], dowser.MaskedAdamW)
    for name, p in full.named_parameters():
        if name in masks:
            frozen = ~dowser.ops.unpack_mask(masks[name], p.shape)
            assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{name}: frozen entry moved"
            assert not torch.equal(p.detach(), before[name]), f"{name}: nothing trained"
        elif name.startswith("model.layers.0.") or "embed" in name or name.startswith("lm_head"):
            assert not p.requires_grad and torch.equal(p.detach(), before[name]), name
    assert (tmp_path / "full" / MASKS_FILE).is_file()
    saved = dowser.MaskSet.load(tmp_path / "full" / MASKS_FILE)
    assert all(torch.equal(saved[n], masks[n]) for n in masks)
    ckpts = sorted((tmp_path / "full").rglob("*.ckpt"))
    assert ckpts, "Lightning wrote no checkpoint"
    assert CHECKPOINT_KEY in torch.load(ckpts[0], weights_only=False)

    # the delta restores the fine-tune onto a fresh copy of the base, bit for bit
    fresh = copy.deepcopy(init)
    dowser.apply_delta(fresh, str(tmp_path / "full" / DELTA_FILE))
    for (name, p), q in zip(full.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{name}: delta does not restore the fine-tune"

    # one epoch, then resume the second from the epoch-1 checkpoint with the masks file
    half = copy.deepcopy(init)
    cb1 = DowserCallback(masks=masks)
    _fit(half, cb1, tmp_path / "half", 1)
    ckpt = sorted((tmp_path / "half").rglob("*.ckpt"))[-1]
    resumed = copy.deepcopy(init)
    cb2 = DowserCallback(masks=str(tmp_path / "full" / MASKS_FILE))
    _fit(resumed, cb2, tmp_path / "resumed", 2, ckpt_path=str(ckpt))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name}: resume is not bit-exact"

    # a checkpoint made with other masks is refused
    other = DowserCallback(rho=0.3, layers=2, **PROBE)
    with pytest.raises(ValueError, match="different mask"):
        _fit(copy.deepcopy(init), other, tmp_path / "other", 2, ckpt_path=str(ckpt))


def test_refuses_plain_optimizer(tmp_path):
    class Plain(LitLM):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    cb = DowserCallback(rho=0.2, layers=1, **PROBE)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[cb],
                        default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="would move frozen entries"):
        trainer.fit(Plain(tiny_llama(n_layers=2), cb), _loader())


def test_bad_settings_fail_before_work():
    with pytest.raises(ValueError, match="rho"):
        DowserCallback(rho=1.5)
    with pytest.raises(ValueError, match="unknown setting 'rh'"):
        DowserCallback(rh=0.1)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        DowserCallback(masks="nowhere.safetensors")

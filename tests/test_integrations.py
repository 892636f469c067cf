"""Training end to end: HF Trainer (tiny Llava), accelerate and a plain loop with MaskedAdamW."""

import copy

import pytest
import torch

import dowser
from dowser.integrations.hf import MASKS_FILE, DowserCallback, masked_optimizer
from tests.models import tiny_llama, tiny_llava

transformers = pytest.importorskip("transformers")

N_IMAGE_TOKENS = 16  # tiny_llava: 16x16 images, 4x4 patches


class _Examples(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            text = torch.randint(3, 90, (12,), generator=gen)
            ids = torch.cat([torch.tensor([1]), torch.full((N_IMAGE_TOKENS,), 99), text])
            labels = ids.clone()
            labels[: 1 + N_IMAGE_TOKENS] = -100
            self.items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                               "labels": labels,
                               "pixel_values": torch.randn(3, 16, 16, generator=gen)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_frozen(model, before, masks):
    for name, p in model.named_parameters():
        if name in masks:
            frozen = ~dowser.ops.unpack_mask(masks[name], p.shape)
            assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{name}: frozen entry moved"
        elif not p.requires_grad:
            assert torch.equal(p.detach(), before[name]), f"{name}: untouched module changed"


def _check_trained(model, before, masks):
    """Every masked matrix's trainable entries moved (the dense norms and biases alone make
    the loss fall, so a step that skipped the masked matrices would pass a loss check)."""
    params = dict(model.named_parameters())
    for name, packed in masks.items():
        p = params[name]
        train = dowser.ops.unpack_mask(packed, p.shape)
        if bool(train.any()):
            assert bool((p.detach()[train] != before[name][train]).any()), \
                f"{name}: no trainable entry moved"


def _args(out, max_steps, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=max_steps, save_steps=3, save_strategy="steps", learning_rate=1e-2,
        weight_decay=0.1, logging_steps=1, report_to=[], use_cpu=True, bf16=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **kw)


@pytest.fixture(scope="module")
def prepared_llava():
    model = tiny_llava(n_layers=3)
    masks = dowser.prepare(model, None, rho=0.2, layers=2, include_projector=True, n_samples=4,
                           batch_size=2, n_rademacher=2, seq_len=24, progress=False)
    return model, masks


def test_trainer_llava_frozen_entries_and_resume(tmp_path, prepared_llava):
    init, masks = prepared_llava
    assert any("multi_modal_projector" in n for n in masks)
    assert not any(p.requires_grad for n, p in init.named_parameters() if "vision_tower" in n)
    before = _snapshot(init)
    ds = _Examples()

    def trainer_for(model, steps):
        return transformers.Trainer(model=model, args=_args(tmp_path, steps), train_dataset=ds,
                                    optimizers=(masked_optimizer(model, masks, _args(tmp_path, steps)), None),
                                    callbacks=[DowserCallback(masks)])

    full = copy.deepcopy(init)
    trainer = trainer_for(full, 6)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    _check_frozen(full, before, masks)
    _check_trained(full, before, masks)
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / MASKS_FILE).is_file() and (ckpt / "optimizer.pt").is_file()
    assert dowser.MaskSet.load(str(ckpt / MASKS_FILE), model=full).keys() == masks.keys()

    # Trainer's own resume loads VLM checkpoints without transformers' key renaming
    # (huggingface/transformers#43701), so the weights come back through from_pretrained.
    resumed = type(init).from_pretrained(str(ckpt))
    for (name, p), q in zip(init.named_parameters(), resumed.parameters()):
        q.requires_grad_(p.requires_grad)
    trainer_for(resumed, 6).train(resume_from_checkpoint=str(ckpt))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name}: resume is not bit-exact"

    # a resume with other masks is refused, also when the checkpoint goes to train() only
    other = dowser.build_masks(init, method="random", rho=0.2, seed=7,
                               targets=[n[: -len(".weight")] for n in masks])
    again = type(init).from_pretrained(str(ckpt))
    for (name, p), q in zip(init.named_parameters(), again.parameters()):
        q.requires_grad_(p.requires_grad)
    refused = transformers.Trainer(model=again, args=_args(tmp_path, 6), train_dataset=ds,
                                   optimizers=(masked_optimizer(again, other, _args(tmp_path, 6)), None),
                                   callbacks=[DowserCallback(other)])
    with pytest.raises(ValueError, match="different mask"):
        refused.train(resume_from_checkpoint=str(ckpt))


def test_callback_refuses_an_optimizer_that_moves_frozen_entries(tmp_path, prepared_llava):
    init, masks = prepared_llava
    model = copy.deepcopy(init)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 1), train_dataset=_Examples(4),
                                   optimizers=(opt, None), callbacks=[DowserCallback(masks)])
    with pytest.raises(ValueError, match="masked_optimizer"):
        trainer.train()


def test_accelerate_and_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(n_layers=3)
    masks = dowser.prepare(model, None, rho=0.1, layers=2, n_samples=4, batch_size=2,
                           n_rademacher=2, seq_len=16, progress=False)
    before = _snapshot(model)
    opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks, model=model,
                             lr=1e-2, weight_decay=0.1)
    data = torch.utils.data.DataLoader(torch.randint(3, 90, (16, 20)), batch_size=4)
    acc = accelerate.Accelerator(cpu=True)
    model, opt, data = acc.prepare(model, opt, data)
    losses = []
    model.train()
    for _ in range(3):
        for ids in data:
            loss = model(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    assert losses[-1] < losses[0]
    _check_frozen(acc.unwrap_model(model), before, masks)
    _check_trained(acc.unwrap_model(model), before, masks)

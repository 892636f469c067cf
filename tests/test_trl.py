"""TRL: SFTTrainer trains a tiny Llama with dowser's masked optimizer and callback: the loss
falls, frozen entries stay bit-identical, and resuming from a checkpoint is bit-exact."""

import copy

import pytest
import torch

import dowser
from dowser.integrations.hf import MASKS_FILE, DowserCallback, masked_optimizer
from tests.models import tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROBE = dict(n_samples=4, batch_size=2, n_rademacher=2, seq_len=16, progress=False)
CIPHER = dict(zip("0123456789", "kqzvehrmwb"))


def tiny_tokenizer():
    """A word-level tokenizer built offline for tiny_llama's 97-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "cipher:", "="] + list("0123456789") + \
        list("abcdefghijklmnopqrstuvwxyz")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def cipher_dataset(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        digits = [str(int(d)) for d in torch.randint(0, 10, (4,), generator=gen)]
        rows.append({"text": "cipher: " + " ".join(digits) + " = " + " ".join(CIPHER[d] for d in digits)})
    return datasets.Dataset.from_list(rows)


def _config(out, max_steps):
    return trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=8, max_steps=max_steps,
                         save_steps=3, save_strategy="steps", learning_rate=1e-2, weight_decay=0.1,
                         logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                         data_seed=0, dataloader_num_workers=0, disable_tqdm=True, max_length=16)


def test_sft_trainer_masked_optimizer_frozen_entries_and_resume(tmp_path):
    init = tiny_llama(n_layers=3)
    masks = dowser.prepare(init, None, rho=0.2, layers=2, **PROBE)
    before = {n: p.detach().clone() for n, p in init.named_parameters()}
    tok, ds = tiny_tokenizer(), cipher_dataset()

    def trainer_for(model, steps):
        args = _config(tmp_path, steps)
        return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              optimizers=(masked_optimizer(model, masks, args), None),
                              callbacks=[DowserCallback(masks)])

    full = copy.deepcopy(init)
    trainer = trainer_for(full, 6)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    for name, p in full.named_parameters():
        if name in masks:
            frozen = ~dowser.ops.unpack_mask(masks[name], p.shape)
            assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{name}: frozen entry moved"
            assert not torch.equal(p.detach(), before[name]), f"{name}: nothing trained"
        elif not p.requires_grad:
            assert torch.equal(p.detach(), before[name]), f"{name}: untouched module changed"
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / MASKS_FILE).is_file() and (ckpt / "optimizer.pt").is_file()

    resumed = copy.deepcopy(init)  # TRL's resume loads the checkpoint's weights into it
    trainer_for(resumed, 6).train(resume_from_checkpoint=str(ckpt))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name}: resume is not bit-exact"

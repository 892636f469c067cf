"""Hugging Face Trainer integration.

    masks = dowser.prepare(model, tokenizer, rho=0.1, layers=8)      # probe, masks, freezing
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(masked_optimizer(model, masks, args), None),
                      callbacks=[DowserCallback(masks)])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

`masked_optimizer` builds a `dowser.MaskedAdamW` from the TrainingArguments the way Trainer
builds its own AdamW (learning rate, betas, epsilon, and weight decay on all but biases and
norms). Its compact state goes into Trainer's `optimizer.pt` and resumes bit-exactly.
`DowserCallback` saves the masks into every checkpoint, checks on resume that they are the
masks the run was started with, and refuses an optimizer that would move frozen entries.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from transformers import TrainerCallback, TrainingArguments

from dowser.optim import MaskedAdamW, MaskedSGD

MASKS_FILE = "dowser_masks.safetensors"


def masked_optimizer(model: torch.nn.Module, masks: Mapping[str, torch.Tensor],
                     args: TrainingArguments, **kwargs: Any) -> MaskedAdamW:
    """A MaskedAdamW over `model`'s trainable parameters, configured from `args`."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True")
    return MaskedAdamW(groups, masks, model=model, lr=args.learning_rate,
                       betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **kwargs)


class DowserCallback(TrainerCallback):
    """Keeps a run's masks with its checkpoints and guards the frozen entries.

    Args:
        masks: the MaskSet (or any Mapping name -> packed mask with `.save`) the run trains with.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = masks

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None and not isinstance(optimizer, (MaskedAdamW, MaskedSGD)):
            inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
            if not isinstance(inner, (MaskedAdamW, MaskedSGD)):
                raise ValueError(
                    f"DowserCallback: the Trainer's optimizer is {type(optimizer).__name__}, which "
                    "would move frozen entries; pass optimizers=(dowser.integrations.hf."
                    "masked_optimizer(model, masks, args), None) to Trainer")
        if model is not None:
            params = dict(model.named_parameters())
            missing = [n for n in self.masks if n not in params]
            if missing:
                raise ValueError(f"DowserCallback: the model has no parameter {missing[0]!r} "
                                 "named by the masks")
        ckpt = getattr(args, "resume_from_checkpoint", None)
        if not isinstance(ckpt, str) and state is not None and state.global_step > 0:
            # train(resume_from_checkpoint=...) leaves args alone, but Trainer has restored the
            # step by now and names its checkpoints output_dir/checkpoint-<step>
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if isinstance(ckpt, str) and os.path.isfile(os.path.join(ckpt, MASKS_FILE)):
            self._check_same(os.path.join(ckpt, MASKS_FILE))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.masks.save(os.path.join(folder, MASKS_FILE))

    def _check_same(self, path: str) -> None:
        from dowser.masks import MaskSet

        saved = MaskSet.load(path)
        for name, packed in self.masks.items():
            if name not in saved or not torch.equal(saved[name].cpu(), packed.cpu()):
                raise ValueError(f"DowserCallback: checkpoint {path} was trained with a different "
                                 f"mask for {name!r}")

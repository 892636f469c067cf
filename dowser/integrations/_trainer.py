"""What the plugins built on Hugging Face's Trainer (ms-swift, LLaMA-Factory) share: the masks
of a run that may be resuming, and a callback that also writes the masks file and the delta."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from dowser.integrations._common import (MASKS_FILE, DowserSettings, check_same_masks,
                                         setup_masks, write_delta)
from dowser.integrations.hf import DowserCallback
from dowser.masks import MaskSet


def masks_for_run(model: nn.Module, tokenizer: Any, settings: DowserSettings,
                  resume_from_checkpoint: str | None = None) -> MaskSet:
    """The masks to train `model` with. A run resuming from a checkpoint that holds masks trains
    with those: Trainer loads the checkpoint's weights before it builds the optimizer, and a
    probe of the partly fine-tuned weights would pick other entries. Otherwise probe (or load
    `settings.masks`)."""
    if isinstance(resume_from_checkpoint, str):
        path = os.path.join(resume_from_checkpoint, MASKS_FILE)
        if os.path.isfile(path):
            # the frozen entries of a dowser fine-tune are the base's: the content check holds
            masks = setup_masks(model, tokenizer, DowserSettings(**{
                **vars(settings), "masks": path}))
            if settings.masks is not None:  # asked for a mask file: it must be the same masks
                check_same_masks(MaskSet.load(settings.masks), masks,
                                 f"dowser: checkpoint {resume_from_checkpoint}")
            return masks
    return setup_masks(model, tokenizer, settings)


class DowserRunCallback(DowserCallback):
    """DowserCallback (masks in every checkpoint, resume check, optimizer check) that also
    writes the masks file when training starts and the sparse delta when it ends."""

    def __init__(self, masks: MaskSet, settings: DowserSettings, model: nn.Module) -> None:
        super().__init__(masks)
        self.settings, self.model = settings, model

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero:
            path = self.settings.masks_path(args.output_dir)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.masks.save(path)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_delta(self.model, self.masks, self.settings.delta_path(args.output_dir))

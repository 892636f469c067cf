"""PyTorch Lightning integration (`pip install "dowser[lightning]"`).

    dowser_cb = DowserCallback(rho=0.1, layers=8)          # or masks=MaskSet / settings masks=
    class LitLM(lightning.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model                              # a Hugging Face causal LM
        def training_step(self, batch, _):
            return self.model(**batch).loss
        def configure_optimizers(self):
            return dowser_cb.optimizer(self, lr=2e-4, weight_decay=0.01)
    lightning.Trainer(callbacks=[dowser_cb], ...).fit(LitLM(model), loader)   # ckpt_path= resumes

The callback probes the wrapped model in `setup` (or loads a mask file), freezes what the masks
freeze, checks that every optimizer is dowser's, puts the masks into every Lightning checkpoint,
refuses to resume a checkpoint made with other masks, and writes the masks file and the sparse
delta (`dowser.save_delta`) when fit ends. Mask names are those of the wrapped model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

try:  # the unified package first, then the standalone one; both have the same Callback API
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as err:
        raise ImportError("dowser.integrations.lightning needs PyTorch Lightning: "
                          'pip install "dowser[lightning]"') from err

from dowser.integrations._common import (DowserSettings, check_same_masks, is_masked_optimizer,
                                         param_groups, setup_masks, write_delta)
from dowser.masks import MaskSet
from dowser.optim import MaskedAdamW

CHECKPOINT_KEY = "dowser_masks"


def masked_adamw(model: nn.Module, masks: MaskSet, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs: Any) -> MaskedAdamW:
    """A MaskedAdamW over `model`'s trainable parameters (weight decay off for 1-D ones)."""
    return MaskedAdamW(param_groups(model, weight_decay), masks, model=model, lr=lr, betas=betas,
                       eps=eps, **kwargs)


class DowserCallback(Callback):
    """Dowser masks for a LightningModule that wraps a Hugging Face model.

    Args:
        masks: the MaskSet to train with, or a mask file to load in `setup` (checked against
            the model); without it the callback probes there.
        tokenizer: passed to the probe (optional: the config's token ids suffice).
        model_attr: the attribute of the LightningModule that holds the model (default: the
            LightningModule itself if it has a `config`, else its one child that has one).
        output_dir: where the masks file and the delta go (default: trainer.default_root_dir).
        **settings: DowserSettings fields (rho, layers, scope, n_samples, ..., masks,
            masks_out, delta_out).
    """

    def __init__(self, masks: MaskSet | str | os.PathLike | None = None, *, tokenizer: Any = None,
                 model_attr: str | None = None, output_dir: str | None = None,
                 **settings: Any) -> None:
        super().__init__()
        if isinstance(masks, (str, os.PathLike)):  # a mask file: loaded in setup, checked there
            settings["masks"], masks = os.fspath(masks), None
        self.settings = DowserSettings.from_mapping(settings, "DowserCallback")
        self.masks = masks
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.output_dir = output_dir

    # --- the wrapped model and its optimizer ---
    def inner(self, pl_module: nn.Module) -> nn.Module:
        """The Hugging Face model the masks belong to."""
        if self.model_attr is not None:
            model = getattr(pl_module, self.model_attr, None)
            if not isinstance(model, nn.Module):
                raise ValueError(f"DowserCallback: {type(pl_module).__name__} has no module "
                                 f"attribute {self.model_attr!r}")
            return model
        if hasattr(pl_module, "config"):
            return pl_module
        found = [m for m in pl_module.children() if hasattr(m, "config")]
        if len(found) != 1:
            raise ValueError(f"DowserCallback: {type(pl_module).__name__} has {len(found)} child "
                             "modules with a `config`; say which one with model_attr=")
        return found[0]

    def optimizer(self, pl_module: nn.Module, lr: float = 1e-3, **kwargs: Any) -> MaskedAdamW:
        """The MaskedAdamW to return from `configure_optimizers` (after `setup` made the masks)."""
        if self.masks is None:
            raise RuntimeError("DowserCallback.optimizer: no masks yet; pass the callback to "
                               "lightning.Trainer(callbacks=[...]) so that setup runs first")
        return masked_adamw(self.inner(pl_module), self.masks, lr=lr, **kwargs)

    # --- Lightning hooks ---
    def setup(self, trainer, pl_module, stage: str) -> None:
        model = self.inner(pl_module)
        if self.masks is None:
            # the probe switches the model to eval and back as it needs; Lightning sets train()
            self.masks = setup_masks(model, self.tokenizer, self.settings)
        else:
            from dowser.pipeline import freeze_outside_layers

            params = dict(model.named_parameters())
            missing = [n for n in self.masks if n not in params]
            if missing:
                raise ValueError(f"DowserCallback: the model has no parameter {missing[0]!r} "
                                 "named by the masks")
            freeze_outside_layers(model, [n.rsplit(".", 1)[0] for n in self.masks])

    def on_fit_start(self, trainer, pl_module) -> None:
        for opt in trainer.optimizers:
            if not is_masked_optimizer(opt):
                raise ValueError(
                    f"DowserCallback: the optimizer is {type(opt).__name__}, which would move "
                    "frozen entries; return dowser_callback.optimizer(self, lr=...) from "
                    "configure_optimizers")
        if trainer.is_global_zero:
            path = self.settings.masks_path(self._out(trainer))
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.masks.save(path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "masks": {k: v.detach().cpu().clone() for k, v in self.masks.items()},
            "shapes": {k: list(v) for k, v in self.masks.shapes.items()}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("DowserCallback: the checkpoint has no dowser masks (it was not "
                             "made by a dowser run); refusing to resume it with masks")
        check_same_masks(self.masks, saved["masks"], "DowserCallback: the checkpoint")

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_delta(self.inner(pl_module), self.masks,
                        self.settings.delta_path(self._out(trainer)))

    def _out(self, trainer) -> str:
        return self.output_dir or trainer.default_root_dir

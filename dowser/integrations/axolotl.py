"""Axolotl plugin (`pip install "dowser[axolotl]"`): dowser masks for `axolotl train cfg.yml`.

    plugins:
      - dowser.integrations.axolotl.DowserPlugin
    dowser:
      rho: 0.1
      layers: 8
      # masks: run1/dowser_masks.safetensors     # train with a saved mask file instead of probing

After Axolotl loads the model the plugin probes it (data-free, `dowser.prepare`) or loads the
mask file, and freezes what the masks freeze; the Trainer's optimizer is `dowser.MaskedAdamW`
(learning rate, betas, epsilon and weight decay from the YAML); the masks go into every
checkpoint (and `output_dir`), a resume with other masks is refused, and the sparse delta
(`dowser.save_delta`) is written to `output_dir` after training. Full fine-tuning only: no
`adapter:` (LoRA/QLoRA) together with `dowser:`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

try:
    from axolotl.integrations.base import BasePlugin
    from pydantic import BaseModel
except ImportError as err:
    raise ImportError(f"dowser.integrations.axolotl needs Axolotl ({err}): "
                      'pip install "dowser[axolotl]" (in its own environment: it pins its stack)') from err

from dowser.integrations._common import (MASKS_FILE, DowserSettings, check_same_masks,
                                         setup_masks, write_delta)
from dowser.masks import MaskSet


class DowserArgs(BaseModel):
    """The `dowser:` block of an Axolotl config (keys: DowserSettings fields)."""

    dowser: Optional[dict[str, Any]] = None


def _settings(cfg) -> DowserSettings:
    return DowserSettings.from_mapping(cfg.get("dowser") or {}, "axolotl config `dowser:`")


class DowserPlugin(BasePlugin):
    """Dowser sparse fine-tuning inside Axolotl (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks = None
        self.model = None
        self.settings: DowserSettings | None = None

    def get_input_args(self) -> str:
        return "dowser.integrations.axolotl.DowserArgs"

    def register(self, cfg) -> None:
        # fail on a bad block before any model is loaded
        self.settings = _settings(cfg)

    def pre_model_load(self, cfg) -> None:
        self.settings = _settings(cfg)
        if cfg.get("adapter"):
            raise ValueError(f"dowser: adapter {cfg.get('adapter')!r} is set; dowser fine-tunes "
                             "the base weights through masks, remove `adapter:`")

    def post_model_load(self, cfg, model) -> None:
        settings = self.settings or _settings(cfg)
        self.model = model
        self.masks = setup_masks(model, None, settings)
        out = settings.masks_path(cfg.output_dir)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        self.masks.save(out)

    def create_optimizer(self, cfg, trainer):
        """The MaskedAdamW (the hook of Axolotl versions that call plugins' create_optimizer)."""
        from dowser.integrations._common import is_masked_optimizer
        from dowser.integrations.hf import masked_optimizer

        if self.masks is None:
            raise RuntimeError("dowser: the model was not prepared (post_model_load did not run)")
        if not is_masked_optimizer(getattr(trainer, "optimizer", None)):
            trainer.optimizer = masked_optimizer(trainer.model, self.masks, trainer.args)
        return trainer.optimizer

    def post_trainer_create(self, cfg, trainer) -> None:
        # Axolotl 0.19 defines create_optimizer on plugins but never calls it; Trainer builds
        # an optimizer only when it has none, so setting it here works with every version
        self.create_optimizer(cfg, trainer)
        resume = cfg.get("resume_from_checkpoint")
        if isinstance(resume, str) and os.path.isfile(os.path.join(resume, MASKS_FILE)):
            check_same_masks(self.masks, MaskSet.load(os.path.join(resume, MASKS_FILE)),
                             f"dowser: checkpoint {resume}")

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        from dowser.integrations.hf import DowserCallback

        return [DowserCallback(self.masks)]

    def post_train(self, cfg, model) -> None:
        if self.masks is not None:
            write_delta(self.model if self.model is not None else model, self.masks,
                        self.settings.delta_path(cfg.output_dir))

"""ms-swift optimizer plugin (`pip install "dowser[swift]"`): `swift sft --optimizer dowser`.

A plugin file registers it with the run's dowser settings:

    # dowser_plugin.py
    from dowser.integrations.swift import register
    register(rho=0.1, layers=8)          # DowserSettings fields; masks="file" to load masks

    swift sft --model ... --tuner_type full --external_plugins dowser_plugin.py --optimizer dowser ...

When the Trainer builds its optimizer the plugin probes the model (data-free) or loads the
mask file — or, when resuming, the masks saved in the checkpoint — freezes what the masks
freeze, and returns `dowser.MaskedAdamW` configured from swift's arguments (learning rate,
betas, epsilon, weight decay) with swift's own scheduler. The masks go into every checkpoint
and `output_dir`; a resume with other masks is refused; the sparse delta is written to
`output_dir` when training ends. Full fine-tuning only (`--tuner_type full`).
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    from swift.optimizers import OptimizerCallback, optimizers_map
except ImportError as err:
    raise ImportError(f"dowser.integrations.swift needs ms-swift 4.x ({err}): "
                      'pip install "dowser[swift]" (in its own environment: it pins its stack)') from err

from dowser.integrations._common import DowserSettings
from dowser.integrations._trainer import DowserRunCallback, masks_for_run

NAME = "dowser"


@contextlib.contextmanager
def _torch_checkpoint():
    """torch's own activation checkpoint while the probe runs. With gradient checkpointing on
    (swift's default) swift replaces torch.utils.checkpoint.checkpoint by a wrapper that forces
    its use_reentrant choice, and the reentrant variant refuses the keyword arguments that the
    probe's per-layer checkpoint passes to Hugging Face decoder layers."""
    import torch.utils.checkpoint as tuc

    patched = tuc.checkpoint
    tuc.checkpoint = getattr(tuc, "_old_checkpoint", patched)
    try:
        yield
    finally:
        tuc.checkpoint = patched


def register(name: str = NAME, **settings: Any) -> type:
    """Make `--optimizer <name>` train with dowser masks (settings: DowserSettings fields)."""
    cfg = DowserSettings.from_mapping(settings, "dowser.integrations.swift.register")

    class DowserOptimizerCallback(OptimizerCallback):
        settings = cfg

        def create_optimizer(self, model=None):
            from dowser.integrations.hf import masked_optimizer

            model = self.trainer.model if model is None else model
            if getattr(model, "peft_config", None):
                raise ValueError("--optimizer dowser fine-tunes the base weights through masks; "
                                 "use --tuner_type full, not an adapter")
            tokenizer = getattr(getattr(self.trainer, "template", None), "tokenizer", None)
            with _torch_checkpoint():
                masks = masks_for_run(model, tokenizer, self.settings,
                                      getattr(self.args, "resume_from_checkpoint", None))
            self.trainer.add_callback(DowserRunCallback(masks, self.settings, model))
            return masked_optimizer(model, masks, self.args)

    optimizers_map[name] = DowserOptimizerCallback
    return DowserOptimizerCallback

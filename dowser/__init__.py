"""dowser: kernel-accelerated Model-Dowser sparse fine-tuning (arXiv 2602.04509).

Score every weight by how much the model's output depends on it (‖J_i‖·|W_ij|·|h_j|, probed
with prompts the model writes itself), then fine-tune only the least important fraction ρ and
leave the rest bit-exactly untouched.

Entry points: `dowser.probe` (sensitivities), `dowser.build_masks` (exact bottom-ρ masks),
`dowser.prepare` (both, plus freezing), `dowser.MaskedAdamW` / `dowser.MaskedSGD` (the masked
step), `dowser.mask_gradients` (hook mode for other optimizers), `dowser.ops` (the kernels),
`dowser.save_delta` / `dowser.apply_delta` (small task files), `dowser.plan_memory` (will it
fit?), `dowser.ForgettingMeter` (data-free drift from the base, KL per token),
`dowser.integrations` (HF Trainer, TRL, PEFT).
"""

from __future__ import annotations

from dowser._version import __version__

from dowser import ops
from dowser._registry import backend_info
from dowser import probe  # the package is callable: dowser.probe(model, ...)
from dowser.masks import MaskSet, build_lora_masks, build_masks
from dowser.optim import MaskedAdamW, MaskedSGD, mask_gradients
from dowser.pipeline import build_masks_excluding, prepare
from dowser.delta import apply_delta, save_delta
from dowser.plan import plan_memory
from dowser.probe import ProbeEntry, ProbeStats
from dowser.selfcheck import selfcheck
from dowser.forgetting import ForgettingMeter, ForgettingResult

__all__ = ["__version__", "ops", "backend_info", "selfcheck", "probe", "ProbeStats", "ProbeEntry",
           "build_masks", "MaskSet", "prepare", "MaskedAdamW", "MaskedSGD", "mask_gradients",
           "build_masks_excluding", "save_delta", "apply_delta", "plan_memory",
           "ForgettingMeter", "ForgettingResult", "build_lora_masks"]

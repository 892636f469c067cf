"""dowser: kernel-accelerated Model-Dowser sparse fine-tuning (arXiv 2602.04509).

Score every weight by how much the model's output depends on it (‖J_i‖·|W_ij|·|h_j|, probed
with prompts the model writes itself), then fine-tune only the least important fraction ρ and
leave the rest bit-exactly untouched.
"""

from __future__ import annotations

__version__ = "0.1.0"

from dowser import ops  # noqa: E402  (declares the torch.library ops)
from dowser._registry import backend_info  # noqa: E402
from dowser.selfcheck import selfcheck  # noqa: E402

__all__ = ["__version__", "ops", "backend_info", "selfcheck"]

# --- probing and masks (issue #6) ---
from dowser.probe import ProbeEntry, ProbeStats, prepare, probe  # noqa: E402
from dowser.masks import MaskSet, build_masks  # noqa: E402

__all__ += ["probe", "ProbeStats", "ProbeEntry", "build_masks", "MaskSet", "prepare"]

"""Stage 1 of Model-Dowser on Hugging Face models: which weights does the output depend on?

`dowser.probe(model, ...)` (this package is callable: it is `dowser.probe.probe`) returns a
`ProbeStats` of low-rank score factors per targeted linear layer. The rooms:

    targets.py    which linear layers to probe (decoder layers, projector, vision, lm_head)
    draws.py      every random draw of batch b from (seed, b): prompts, Rademacher, pixels
    prompts.py    data-free prompts the model writes itself
    batches.py    probe batches (synthetic, prompts, dataloader) and noise-image inputs
    estimator.py  the probing pass: one forward + R backwards per batch -> factors
    stats.py      ProbeEntry / ProbeStats and their safetensors file
"""

from __future__ import annotations

import sys
import types

from dowser._artifacts import FORMAT_VERSION, model_identity
from dowser.probe.draws import derive_seed, rademacher
from dowser.probe.estimator import probe
from dowser.probe.prompts import synthetic_prompts
from dowser.probe.stats import ProbeEntry, ProbeStats
from dowser.probe.targets import decoder_layers, find_targets, layer_dims

__all__ = ["probe", "ProbeEntry", "ProbeStats", "find_targets", "decoder_layers", "layer_dims",
           "synthetic_prompts", "rademacher", "derive_seed", "model_identity", "FORMAT_VERSION"]


class _CallableModule(types.ModuleType):
    """`dowser.probe` is both this package and the function: calling it calls `probe`."""

    def __call__(self, *args, **kwargs) -> ProbeStats:
        return probe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

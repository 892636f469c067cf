"""What every framework plugin shares: the settings of a dowser run (the `dowser:` block of an
Axolotl YAML, the `--dowser_*` options of ms-swift, the arguments of the Lightning callback),
the masks they lead to (probed or loaded, with the model frozen to match), the optimizer, and
the files a run leaves (masks with each checkpoint, the sparse delta at the end).

Imports no training framework: each plugin module imports its own."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch
from torch import nn

from dowser.masks import MaskSet
from dowser.optim import MaskedAdamW, MaskedSGD

MASKS_FILE = "dowser_masks.safetensors"  # the name dowser.integrations.hf uses too
DELTA_FILE = "dowser_delta.safetensors"


@dataclasses.dataclass
class DowserSettings:
    """One dowser run's settings.

    rho, layers, scope: as `dowser.prepare` (trainable fraction, last `layers` decoder layers,
        "matrix" or "global").
    n_samples, batch_size, n_rademacher, seq_len, seed, estimator: the data-free probe
        (`dowser.probe`).
    masks: a mask file (`MaskSet.save`) to train with instead of probing; it must fit the
        model (names, shapes and the frozen entries' hashes are checked).
    masks_out: where to write the masks once they exist (default: `<output_dir>/` +
        MASKS_FILE); every checkpoint gets its own copy as well.
    delta_out: where to write the sparse task delta after training (default:
        `<output_dir>/` + DELTA_FILE); "" to skip it.
    """

    rho: float = 0.1
    layers: int | None = None
    scope: str = "matrix"
    n_samples: int = 64
    batch_size: int = 4
    n_rademacher: int = 8
    seq_len: int = 64
    seed: int = 0
    estimator: str = "l1"
    masks: str | None = None
    masks_out: str | None = None
    delta_out: str | None = None

    def __post_init__(self) -> None:
        from dowser._checks import check_rho

        self.rho = check_rho(self.rho)
        if self.scope not in ("matrix", "global"):
            raise ValueError(f"dowser scope must be 'matrix' or 'global', got {self.scope!r}")
        if self.estimator not in ("l1", "l2"):
            raise ValueError(f"dowser estimator must be 'l1' or 'l2', got {self.estimator!r}")
        for key in ("n_samples", "batch_size", "n_rademacher", "seq_len"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"dowser {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.layers is not None and int(self.layers) < 1:
            raise ValueError(f"dowser layers must be a positive integer, got {self.layers!r}")
        if self.masks is not None and not os.path.isfile(self.masks):
            raise FileNotFoundError(f"dowser masks file {self.masks!r} does not exist")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "dowser") -> "DowserSettings":
        """Settings from a config block; an unknown key is an error naming it."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def probe_kwargs(self) -> dict[str, Any]:
        return dict(n_samples=int(self.n_samples), batch_size=int(self.batch_size),
                    n_rademacher=int(self.n_rademacher), seq_len=int(self.seq_len),
                    seed=int(self.seed), estimator=self.estimator)

    def masks_path(self, output_dir: str) -> str:
        return self.masks_out or os.path.join(output_dir, MASKS_FILE)

    def delta_path(self, output_dir: str) -> str | None:
        if self.delta_out == "":
            return None
        return self.delta_out or os.path.join(output_dir, DELTA_FILE)


def setup_masks(model: nn.Module, tokenizer: Any, settings: DowserSettings,
                progress: bool = False) -> MaskSet:
    """Probe `model` and build its masks (`dowser.prepare`), or load `settings.masks` and
    freeze the model the way `prepare` would have: trainable exactly the tuned layers."""
    if settings.masks is None:
        from dowser.pipeline import prepare

        layers = None if settings.layers is None else int(settings.layers)
        return prepare(model, tokenizer, rho=settings.rho, layers=layers, scope=settings.scope,
                       progress=progress, **settings.probe_kwargs())
    from dowser.pipeline import freeze_outside_layers

    masks = MaskSet.load(settings.masks, model, check_content=True)
    freeze_outside_layers(model, [n.rsplit(".", 1)[0] for n in masks])
    return masks


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups, as Hugging Face's Trainer makes them: weight
    decay on matrices, none on 1-D parameters (norms, biases)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True")
    return groups


def is_masked_optimizer(optimizer: Any) -> bool:
    """Whether `optimizer` (or the optimizer a wrapper such as accelerate's holds) is dowser's."""
    seen = 0
    while optimizer is not None and seen < 4:
        if isinstance(optimizer, (MaskedAdamW, MaskedSGD)):
            return True
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return False


def check_same_masks(masks: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor],
                     where: str) -> None:
    """Refuse to go on with masks other than those a checkpoint was trained with."""
    if set(saved) != set(masks):
        extra = sorted(set(saved) ^ set(masks))[0]
        raise ValueError(f"{where} was trained with other masks: {extra!r} is in one set only")
    for name, packed in masks.items():
        if not torch.equal(saved[name].cpu(), packed.cpu()):
            raise ValueError(f"{where} was trained with a different mask for {name!r}")


def write_delta(model: nn.Module, masks: MaskSet, path: str | None) -> dict[str, int] | None:
    """The sparse task delta of the fine-tune (`dowser.save_delta`), written to `path`."""
    if not path:
        return None
    from dowser.delta import save_delta

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return save_delta(model, masks, path)

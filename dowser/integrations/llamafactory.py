"""LLaMA-Factory launcher (`pip install "dowser[llamafactory]"`).

    python -m dowser.integrations.llamafactory train_full.yaml [key=value ...]

runs what `llamafactory-cli train train_full.yaml` runs (`llamafactory.train.tuner.run_exp`,
same YAML, same command-line overrides) with one more block in the YAML:

    finetuning_type: full
    dowser:
      rho: 0.1
      layers: 8            # DowserSettings fields; masks: file.safetensors to load masks

LLaMA-Factory 0.9.x has no optimizer plugin point: its trainers build the optimizer through
`create_custom_optimizer`, a fixed if-chain, imported by name into each trainer module, and
HfArgumentParser refuses unknown YAML keys. Its documented extension point is `run_exp(args,
callbacks=...)`. So the launcher removes the `dowser:` block, passes a callback that probes
the model when the Trainer is built (or loads the masks, or when resuming, the checkpoint's),
and, for the length of this run only, has the trainer modules' `create_custom_optimizer`
return `dowser.MaskedAdamW` (from the YAML's learning rate, betas, epsilon, weight decay)
while masks exist. No LLaMA-Factory file is changed; the masks go into every checkpoint and
`output_dir`, a resume with other masks is refused, the delta is written at the end.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

try:
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp as _lf_run_exp
except ImportError as err:
    raise ImportError(f"dowser.integrations.llamafactory needs LLaMA-Factory 0.9 ({err}): "
                      'pip install "dowser[llamafactory]" (in its own environment: it pins its stack)') from err

from dowser.integrations._common import DowserSettings
from dowser.integrations._trainer import DowserRunCallback, masks_for_run

# every LLaMA-Factory trainer module that imports create_custom_optimizer by name
_TRAINER_MODULES = ("llamafactory.train.sft.trainer", "llamafactory.train.pt.trainer",
                    "llamafactory.train.rm.trainer", "llamafactory.train.dpo.trainer",
                    "llamafactory.train.kto.trainer")


class LlamaFactoryCallback(DowserRunCallback):
    """Probes (or loads) the masks when LLaMA-Factory's Trainer has been built."""

    def __init__(self, settings: DowserSettings) -> None:
        super().__init__(None, settings, None)

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise RuntimeError("dowser: LLaMA-Factory's Trainer passed no model to its callbacks")
        self.model = model
        self.masks = masks_for_run(model, processing_class, self.settings,
                                   args.resume_from_checkpoint)


def run_exp(args: dict[str, Any] | list[str] | None = None) -> None:
    """`llamafactory.train.tuner.run_exp` with dowser masks from the args' `dowser:` block."""
    args = read_args(args)
    if not isinstance(args, dict) or "dowser" not in args:
        raise ValueError("dowser: pass a YAML/JSON config (or a dict) with a `dowser:` block")
    args = dict(args)
    settings = DowserSettings.from_mapping(args.pop("dowser") or {}, "LLaMA-Factory config `dowser:`")
    if args.get("finetuning_type", "lora") != "full":
        raise ValueError("dowser fine-tunes the base weights through masks: set "
                         f"finetuning_type: full (got {args.get('finetuning_type', 'lora')!r})")
    callback = LlamaFactoryCallback(settings)

    def create_custom_optimizer(model, training_args, finetuning_args):
        from dowser.integrations.hf import masked_optimizer

        if callback.masks is None:
            raise RuntimeError("dowser: the Trainer was built without the dowser callback")
        return masked_optimizer(model, callback.masks, training_args)

    modules = [importlib.import_module(m) for m in _TRAINER_MODULES]
    saved = [m.create_custom_optimizer for m in modules]
    for m in modules:
        m.create_custom_optimizer = create_custom_optimizer
    try:
        _lf_run_exp(args, callbacks=[callback])
    finally:
        for m, fn in zip(modules, saved):
            m.create_custom_optimizer = fn


def main(argv: list[str] | None = None) -> None:
    """`python -m dowser.integrations.llamafactory cfg.yaml [key=value ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        raise SystemExit("usage: python -m dowser.integrations.llamafactory CONFIG.yaml [key=value ...]")
    sys.argv = [sys.argv[0]] + list(argv)  # read_args reads sys.argv, as llamafactory-cli does
    run_exp()


if __name__ == "__main__":
    main()

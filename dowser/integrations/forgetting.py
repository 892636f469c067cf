"""The forgetting meter in a Hugging Face Trainer (and TRL's trainers, which are Trainers).

    meter = dowser.ForgettingMeter(model, tokenizer, n_samples=32)     # before training starts
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, ...)
    watch_forgetting(trainer, meter, every=50, budget=0.05, on_budget="stop")
    trainer.train()

Every `every` optimizer steps the callback measures the model being trained and logs
`forgetting/kl`, `forgetting/kl_se`, `forgetting/ce`, `forgetting/agreement` and
`forgetting/seconds` with `trainer.log`, so they reach log_history, the console and every
`report_to` integration (TensorBoard, W&B) like the loss does. With a budget, a KL above it warns
(`on_budget="warn"`) or ends training after that step (`"stop"`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from transformers import TrainerCallback

from dowser.forgetting import ForgettingMeter, ForgettingResult

PREFIX = "forgetting/"


class ForgettingCallback(TrainerCallback):
    """Measures forgetting every `every` steps and logs it through the trainer.

    Args:
        meter: a ForgettingMeter built from the model before training.
        trainer: the Trainer to log through (`watch_forgetting` sets it; a callback handed to
            `Trainer(callbacks=[...])` has no other way to reach the trainer's log).
        every: measure after every `every`-th optimizer step (and after the last one).
        budget: a KL per token (nats) not to exceed; None for none.
        on_budget: "warn" (a warning, training goes on) or "stop" (training ends after the step).
    """

    def __init__(self, meter: ForgettingMeter, trainer: Any = None, *, every: int = 50,
                 budget: float | None = None, on_budget: str = "warn") -> None:
        if not isinstance(meter, ForgettingMeter):
            raise TypeError(f"ForgettingCallback: meter must be a dowser.ForgettingMeter, got {type(meter).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"ForgettingCallback: every must be an integer >= 1, got {every!r}")
        if budget is not None and not budget > 0:
            raise ValueError(f"ForgettingCallback: budget must be a KL > 0 (nats/token), got {budget!r}")
        if on_budget not in ("warn", "stop"):
            raise ValueError(f"ForgettingCallback: on_budget must be 'warn' or 'stop', got {on_budget!r}")
        self.meter, self.trainer, self.every = meter, trainer, every
        self.budget, self.on_budget = budget, on_budget
        self.history: list[tuple[int, ForgettingResult]] = []  # (global step, result)
        self.step_seconds: list[float] = []  # wall time of each training step, for the cost
        self._step_t0: float | None = None
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ValueError("ForgettingCallback has no trainer to log through: attach it with "
                             "dowser.integrations.forgetting.watch_forgetting(trainer, meter, ...)")

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_t0 = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._step_t0 is not None:
            self.step_seconds.append(time.perf_counter() - self._step_t0)
            self._step_t0 = None
        step = state.global_step
        if step % self.every != 0 and step < state.max_steps:
            return control
        r = self.meter.measure(model)
        self.history.append((step, r))
        logs = {PREFIX + "kl": r.kl, PREFIX + "kl_se": r.kl_se, PREFIX + "ce": r.ce,
                PREFIX + "agreement": r.agreement, PREFIX + "seconds": r.seconds}
        if self.step_seconds:
            # cost of one measurement in training steps (the mean step so far)
            logs[PREFIX + "cost_in_steps"] = r.seconds / (sum(self.step_seconds) / len(self.step_seconds))
        over = self.budget is not None and r.kl > self.budget
        if self.budget is not None:
            logs[PREFIX + "over_budget"] = float(over)
        self.trainer.log(logs)
        if over:
            msg = (f"forgetting budget exceeded at step {step}: KL {r.kl:.4f} ± {r.kl_se:.4f} "
                   f"> {self.budget} nats/token")
            if self.on_budget == "stop":
                control.should_training_stop = True
                warnings.warn(msg + ": training stops", stacklevel=2)
            elif not self._warned:
                warnings.warn(msg, stacklevel=2)
                self._warned = True
        return control


def watch_forgetting(trainer: Any, meter: ForgettingMeter, *, every: int = 50,
                     budget: float | None = None, on_budget: str = "warn") -> ForgettingCallback:
    """Add a ForgettingCallback bound to `trainer` (an HF Trainer, or a TRL trainer) and
    return it; its `history` holds (step, ForgettingResult) pairs after training."""
    cb = ForgettingCallback(meter, trainer, every=every, budget=budget, on_budget=on_budget)
    trainer.add_callback(cb)
    return cb

"""The training's progress bar: a `TrainerCallback` over the optimizer steps, with the
latest loss, fusion share of the gradient and learning rate as its postfix.

Only the main process shows it; the Trainer's own output (its log dicts, its bar when
``disable_tqdm`` is off) stays where the Trainer writes it: in the stage's log.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from fusion.runtime.progress import bar

# the Trainer's log keys shown after the bar, and how
POSTFIX = {"loss": ("loss", "{:.4f}"), "fuse_grad_share": ("fusion", "{:.1%}"), "learning_rate": ("lr", "{:.2e}")}


class TrainProgress(TrainerCallback):
    """One bar per training run (see the module docstring)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = bar(state.max_steps, "step", initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.set_postfix({name: form.format(logs[key]) for key, (name, form) in POSTFIX.items()
                                  if isinstance(logs.get(key), (int, float))})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

"""Ctrl-C during training: save an ordinary checkpoint at the step reached, then stop.

Without it, Ctrl-C raises ``KeyboardInterrupt`` inside ``Trainer.train`` and every step since the last saved
checkpoint is lost. With :class:`SaveOnInterruptCallback`, the first Ctrl-C lets the optimizer step under way
finish, saves ``checkpoint-<step>`` in ``output_dir`` (the Trainer's own checkpoint, which
``train(resume_from_checkpoint=...)`` and ``transformers.trainer_utils.get_last_checkpoint`` take), and then
``train()`` raises :class:`TrainingInterrupted` naming it. A second Ctrl-C raises ``KeyboardInterrupt`` at once.
It works with any ``Trainer``; the example scripts add it themselves.

Example:
    >>> import os, signal, tempfile, torch
    >>> from datasets import Dataset
    >>> from transformers import Trainer, TrainerCallback, TrainingArguments
    >>> from hf_xsam import SaveOnInterruptCallback, TrainingInterrupted
    >>> class Linear(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(2, 1)
    ...     def forward(self, x, y):
    ...         return {"loss": ((self.fc(x).squeeze(-1) - y) ** 2).mean()}
    >>> class CtrlCAtStep3(TrainerCallback):  # stands in for the user pressing Ctrl-C
    ...     def on_step_begin(self, args, state, control, **kwargs):
    ...         if state.global_step == 2:
    ...             os.kill(os.getpid(), signal.SIGINT)
    >>> data = Dataset.from_dict({"x": [[1.0, 2.0]] * 16, "y": [1.0] * 16})
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=8, per_device_train_batch_size=2, use_cpu=True,
    ...                          save_strategy="no", report_to="none", disable_tqdm=True)
    >>> trainer = Trainer(Linear(), args, train_dataset=data, callbacks=[SaveOnInterruptCallback(), CtrlCAtStep3()])
    >>> try:  # doctest: +ELLIPSIS
    ...     trainer.train()
    ... except TrainingInterrupted as interrupted:
    ...     checkpoint = interrupted.checkpoint
    ...     print(os.path.basename(checkpoint), interrupted.step)
    {...}
    checkpoint-3 3
    >>> _ = trainer.train(resume_from_checkpoint=checkpoint)  # doctest: +ELLIPSIS
    {...}
    >>> trainer.state.global_step  # it went on at step 3
    8
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

__all__ = ["SaveOnInterruptCallback", "TrainingInterrupted"]

logger = logging.get_logger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by ``train()`` after a Ctrl-C, once the checkpoint of the interrupted step is saved.

    Attributes:
        checkpoint: the saved checkpoint folder, to pass to ``train(resume_from_checkpoint=...)``.
        step: the global step it holds.
    """

    def __init__(self, checkpoint: str, step: int):
        super().__init__(f"Training interrupted at step {step}; the checkpoint {checkpoint} is saved")
        self.checkpoint = checkpoint
        self.step = step


class SaveOnInterruptCallback(TrainerCallback):
    """On Ctrl-C (SIGINT), finish the step, save a checkpoint, and stop with :class:`TrainingInterrupted`.

    The handler is installed for the duration of ``train()`` and the previous one restored after it. It is not
    installed when several processes train (each would stop at its own step and the checkpoint's collective save
    would hang; the launcher, ``torchrun`` or ``accelerate launch``, stops them instead) nor outside the main
    thread, where Python cannot catch signals, nor where SIGINT is ignored (a job started in the background by a
    shell script, ``cmd &``, ignores it: Ctrl-C is not meant to reach it).

    Example:
        >>> from hf_xsam import SaveOnInterruptCallback
        >>> SaveOnInterruptCallback().interrupted
        False
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._checkpoint: str | None = None
        self._previous_handler: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupted, self._checkpoint = False, None
        if (
            args.world_size > 1
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        ):
            return
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            self._restore_handler()
            raise KeyboardInterrupt
        self.interrupted = True
        logger.warning("Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to stop at once")

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.interrupted:
            self._checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_handler()
        if not self.interrupted:
            return
        if self._checkpoint is None:  # interrupted after the last step: training finished, nothing saved
            raise KeyboardInterrupt
        raise TrainingInterrupted(self._checkpoint, state.global_step)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

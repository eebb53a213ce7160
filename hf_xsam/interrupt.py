"""Ctrl-C or SIGTERM during training: save an ordinary checkpoint at the step reached, then stop.

Without it, Ctrl-C raises ``KeyboardInterrupt`` inside ``Trainer.train`` and SIGTERM (what Slurm, Kubernetes and
most schedulers send before killing a preempted job) ends the process: every step since the last saved checkpoint
is lost. With :class:`SaveOnInterruptCallback`, the first signal lets the optimizer step under way finish, saves
``checkpoint-<step>`` in ``output_dir`` (the Trainer's own checkpoint, which ``train(resume_from_checkpoint=...)``
and ``transformers.trainer_utils.get_last_checkpoint`` take), and then ``train()`` raises
:class:`TrainingInterrupted` naming it. It works with any ``Trainer``; the example scripts add it themselves.

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
from transformers.trainer import TRAINER_STATE_NAME  # written last: a checkpoint without it is partial
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

__all__ = ["SaveOnInterruptCallback", "TrainingInterrupted"]

logger = logging.get_logger(__name__)

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by ``train()`` after Ctrl-C or SIGTERM, once the checkpoint of the interrupted step is saved.

    Attributes:
        checkpoint: the saved checkpoint folder, to pass to ``train(resume_from_checkpoint=...)``.
        step: the global step it holds.
        signum: the signal that stopped training (``signal.SIGINT`` or ``signal.SIGTERM``); a script exits with
            ``128 + signum`` (130, 143), the shells' convention.
    """

    def __init__(self, checkpoint: str, step: int, signum: int = signal.SIGINT):
        super().__init__(f"Training interrupted at step {step}; the checkpoint {checkpoint} is saved")
        self.checkpoint = checkpoint
        self.step = step
        self.signum = signum


class SaveOnInterruptCallback(TrainerCallback):
    """On Ctrl-C (SIGINT) or SIGTERM, finish the step, save a checkpoint, and stop with :class:`TrainingInterrupted`.

    - A signal during an evaluation (the final one included) saves the checkpoint once the evaluation ends. A signal
      that comes when ``train()`` can no longer save (while it wraps up, after its last save) lets it return as
      usual: training is complete and the caller saves the model.
    - A second signal stops at once, as it would without the callback (``KeyboardInterrupt``; SIGTERM's own
      action), except while the checkpoint is being written: it then stops as soon as the checkpoint is whole, so
      no partial checkpoint is left to be taken for the newest.
    - Nothing here writes to stdout or stderr except through ``logging``, so a closed pipe (``| tee`` stopped by
      the same Ctrl-C) cannot prevent the save.

    The handlers are installed for the duration of ``train()`` and the previous ones restored after it. They are
    not installed when several processes train (each would stop at its own step and the checkpoint's collective
    save would hang; the launcher, ``torchrun`` or ``accelerate launch``, stops them instead) nor outside the main
    thread, where Python cannot catch signals; a signal that is ignored (SIGINT in a job started in the background
    by a shell script, ``cmd &``) stays ignored.

    Example:
        >>> from hf_xsam import SaveOnInterruptCallback
        >>> SaveOnInterruptCallback().interrupted
        False
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._signum = signal.SIGINT
        self._checkpoint: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._args: Any = None
        self._state: Any = None
        self._control: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupted, self._checkpoint = False, None
        self._args, self._state, self._control = args, state, control
        if args.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            self._on_second_signal(signum, frame)
            return
        self.interrupted, self._signum = True, signum
        self._control.should_save = True  # also when the signal comes during an evaluation, the last one included
        logger.warning(
            f"{SIGNALS[signum]}: stopping after this step with a checkpoint; {SIGNALS[signum]} again stops at once"
        )

    def _on_second_signal(self, signum: int, frame: Any) -> None:
        folder = self._pending_checkpoint()
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            logger.warning(f"{SIGNALS[signum]} again: stopping as soon as {folder} is written")
            return
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self._restore_handlers()
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: the signal's own action (SIGTERM ends the process)
            signal.raise_signal(signum)

    def _pending_checkpoint(self) -> str:
        return os.path.join(self._args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self._state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.interrupted and self._checkpoint is None:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self.interrupted:
            self._checkpoint = self._pending_checkpoint()
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_handlers()
        if not self.interrupted:
            return
        if self._checkpoint is None:
            logger.warning(
                f"{SIGNALS[self._signum]} after the last checkpoint train() could save: training is complete, so "
                "train() returns as usual"
            )
            return
        raise TrainingInterrupted(self._checkpoint, state.global_step, self._signum)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous_handlers = {}

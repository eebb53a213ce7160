"""Ctrl-C and SIGTERM with SaveOnInterruptCallback: the checkpoint of the interrupted step, and a resume from it that
ends as the uninterrupted run, for XSAMTrainer and for the plain Trainer; a signal during the final evaluation, a
second one while the checkpoint is written, and one while train() wraps up."""

import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from helpers import TinyClassifier, as_dataset, flat, make_data
from hf_xsam import SaveOnInterruptCallback, TrainingInterrupted, XSAMTrainer, XSAMTrainingArguments


@pytest.fixture(autouse=True)
def python_signal_handlers():
    """Each test starts with Python's own Ctrl-C handler and SIGTERM's default, whatever the suite was started under
    (a shell script's background job starts with SIGINT ignored), and leaves the handlers it found."""
    found = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, found[0])
    signal.signal(signal.SIGTERM, found[1])


class CtrlC(TrainerCallback):
    """Sends this process ``signum`` at the start of the optimizer step after ``after_step``."""

    def __init__(self, after_step, signum=signal.SIGINT):
        self.after_step, self.signum = after_step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.after_step:
            os.kill(os.getpid(), self.signum)


class CtrlCInFinalEvaluation(TrainerCallback):
    """Sends this process SIGINT during the evaluation after the last step."""

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


class CtrlCAsTrainWrapsUp(TrainerCallback):
    """Sends this process SIGINT when train() logs its summary, after its last chance to save."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "train_runtime" in logs:
            os.kill(os.getpid(), signal.SIGINT)


class CtrlCWhileSaving(Trainer):
    """Sends this process SIGINT once the model of a checkpoint is written, before the rest of it."""

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            os.kill(os.getpid(), signal.SIGINT)


def train(tmp_path, trainer_class, callbacks=(), resume=None, **settings):
    args = XSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=0.1, optim="sgd",
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, sam_method="xsam",
        alpha_search_interval=3, **settings,
    )  # fmt: skip
    model = TinyClassifier(dropout=0.1)
    data = as_dataset(make_data(16))
    trainer = trainer_class(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("trainer_class", [XSAMTrainer, Trainer])
def test_ctrl_c_saves_the_step_reached_and_resuming_there_ends_as_the_uninterrupted_run(tmp_path, trainer_class):
    whole = train(tmp_path / "whole", trainer_class)
    with pytest.raises(TrainingInterrupted) as interrupted:
        train(tmp_path / "cut", trainer_class, [SaveOnInterruptCallback(), CtrlC(after_step=4)])
    checkpoint = interrupted.value.checkpoint
    assert (checkpoint, interrupted.value.step) == (str(tmp_path / "cut" / "checkpoint-5"), 5)
    assert get_last_checkpoint(str(tmp_path / "cut")) == checkpoint  # what the scripts resume from by themselves
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = train(tmp_path / "cut", trainer_class, [SaveOnInterruptCallback()], resume=checkpoint)
    assert torch.equal(flat(whole), flat(resumed))


def test_sigterm_saves_the_step_reached_and_says_which_signal(tmp_path):
    whole = train(tmp_path / "whole", XSAMTrainer)
    with pytest.raises(TrainingInterrupted) as interrupted:
        train(tmp_path / "cut", XSAMTrainer, [SaveOnInterruptCallback(), CtrlC(4, signal.SIGTERM)])
    assert (interrupted.value.step, interrupted.value.signum) == (5, signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    resumed = train(tmp_path / "cut", XSAMTrainer, resume=interrupted.value.checkpoint)
    assert torch.equal(flat(whole), flat(resumed))


@pytest.mark.parametrize("eval_strategy", ["steps", "epoch"])
def test_ctrl_c_during_the_final_evaluation_saves_the_last_step(tmp_path, eval_strategy):
    settings = {"eval_strategy": eval_strategy, "eval_steps": 8}  # 4 steps an epoch: the last step ends epoch 2
    whole = train(tmp_path / "whole", XSAMTrainer, **settings)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        train(tmp_path / "cut", XSAMTrainer, [SaveOnInterruptCallback(), CtrlCInFinalEvaluation()], **settings)
    assert isinstance(interrupted.value, TrainingInterrupted), "stopped without a checkpoint"
    assert interrupted.value.checkpoint == str(tmp_path / "cut" / "checkpoint-8")
    resumed = train(tmp_path / "cut", XSAMTrainer, resume=interrupted.value.checkpoint, **settings)
    assert torch.equal(flat(whole), flat(resumed))


def test_ctrl_c_while_train_wraps_up_returns_the_finished_run(tmp_path):
    whole = train(tmp_path / "whole", XSAMTrainer)
    wrapped_up = train(tmp_path / "late", XSAMTrainer, [SaveOnInterruptCallback(), CtrlCAsTrainWrapsUp()])
    assert torch.equal(flat(whole), flat(wrapped_up))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_while_the_checkpoint_is_written_waits_for_it_to_be_whole(tmp_path):
    whole = train(tmp_path / "whole", Trainer)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        train(tmp_path / "cut", CtrlCWhileSaving, [SaveOnInterruptCallback(), CtrlC(after_step=4)])
    assert isinstance(interrupted.value, TrainingInterrupted), "stopped in the middle of the checkpoint"
    checkpoint = interrupted.value.checkpoint
    assert get_last_checkpoint(str(tmp_path / "cut")) == checkpoint
    assert (Path(checkpoint) / "trainer_state.json").is_file()
    resumed = train(tmp_path / "cut", Trainer, resume=checkpoint)
    assert torch.equal(flat(whole), flat(resumed))


def test_a_second_ctrl_c_raises_at_once_and_puts_the_handler_back(tmp_path):
    callback = SaveOnInterruptCallback()
    args = XSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    os.kill(os.getpid(), signal.SIGINT)
    assert callback.interrupted
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored_and_training_runs_to_the_end(tmp_path):
    whole = train(tmp_path / "whole", XSAMTrainer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: `python train.py &` in a shell script
    ignored = train(tmp_path / "ignored", XSAMTrainer, [SaveOnInterruptCallback(), CtrlC(after_step=4)])
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert get_last_checkpoint(str(tmp_path / "ignored")) is None  # nothing saved: the run was not stopped
    assert torch.equal(flat(whole), flat(ignored))

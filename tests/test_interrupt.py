"""Ctrl-C with SaveOnInterruptCallback: the checkpoint of the interrupted step, and a resume from it that ends as
the uninterrupted run, for XSAMTrainer and for the plain Trainer."""

import os
import signal

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from helpers import TinyClassifier, as_dataset, flat, make_data
from hf_xsam import SaveOnInterruptCallback, TrainingInterrupted, XSAMTrainer, XSAMTrainingArguments


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Each test starts with Python's own Ctrl-C handler, whatever the suite was started under (a shell script's
    background job starts with SIGINT ignored), and leaves the handler it found."""
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, found)


class CtrlC(TrainerCallback):
    """Sends this process SIGINT at the start of the optimizer step after ``after_step``."""

    def __init__(self, after_step):
        self.after_step = after_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.after_step:
            os.kill(os.getpid(), signal.SIGINT)


def train(tmp_path, trainer_class, callbacks=(), resume=None):
    args = XSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=0.1, optim="sgd",
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, sam_method="xsam",
        alpha_search_interval=3,
    )  # fmt: skip
    model = TinyClassifier(dropout=0.1)
    trainer = trainer_class(model=model, args=args, train_dataset=as_dataset(make_data(16)), callbacks=list(callbacks))
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


def test_a_second_ctrl_c_raises_at_once_and_puts_the_handler_back(tmp_path):
    callback = SaveOnInterruptCallback()
    args = XSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_begin(args, None, None)
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

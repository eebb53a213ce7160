"""Ctrl-C or SIGTERM during a script: the checkpoint of the interrupted step, one line naming it, exit status 130 or
143, and a resume from it that ends as the uninterrupted run; also with the output piped to a reader that is gone
(``| tee`` stopped by the same Ctrl-C), and with a partial checkpoint newer than the last whole one."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _common import newest_whole_checkpoint

SCRIPTS = Path(__file__).resolve().parent.parent.parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}  # fmt: skip
# the embedded number corpus, 48 pairs, a tiny Marian: 6 steps an epoch, 30 in all
FLAGS = ["--num_embedded_train", "48", "--num_embedded_eval", "8", "--d_model", "16", "--ffn_dim", "32",
         "--num_layers", "1", "--num_heads", "2", "--vocab_size", "120", "--max_target_length", "24",
         "--per_device_train_batch_size", "8", "--max_steps", "30", "--logging_steps", "1", "--eval_strategy", "no",
         "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]  # fmt: skip


def translate(output_dir, *extra):
    command = [sys.executable, str(SCRIPTS / "translate.py"), "--output_dir", str(output_dir), *FLAGS, *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The model of the uninterrupted run."""
    output_dir = tmp_path_factory.mktemp("whole")
    finished = translate(output_dir)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return load_file(output_dir / "model.safetensors")


def assert_same_model(a, output_dir):
    b = load_file(output_dir / "model.safetensors")
    assert a.keys() == b.keys() and all((a[key] == b[key]).all() for key in a)


def interrupt(tmp_path, output, *extra):
    """Start the script and return it at its first logged loss, its stdout a pipe (``output``: its stderr)."""
    command = [sys.executable, str(SCRIPTS / "translate.py"), "--output_dir", str(tmp_path / "cut"), *FLAGS, *extra]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=output, text=True)
    for line in process.stdout:  # the first logged loss: training is under way
        if "'loss'" in line:
            break
    return process


def last_line(tmp_path, process, status):
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_resume_ends_as_the_whole_run(tmp_path, whole):
    with open(tmp_path / "stderr.txt", "w") as errors:
        process = interrupt(tmp_path, errors)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=300)
    last = last_line(tmp_path, process, 130)
    assert last.startswith("translate.py: interrupted at step "), last
    checkpoint = last.split("saved the checkpoint ", 1)[1].split(". Resume with", 1)[0]
    assert Path(checkpoint).parent == tmp_path / "cut" and 0 < int(checkpoint.rsplit("-", 1)[1]) < 30
    assert f"Resume with --resume_from_checkpoint {checkpoint}, or run the same command again" in last
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # stopped: no final model, no card

    resumed = translate(tmp_path / "cut", "--resume_from_checkpoint", checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_model(whole, tmp_path / "cut")


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_past_a_partial_newer_one(tmp_path, whole):
    with open(tmp_path / "stderr.txt", "w") as errors:
        process = interrupt(tmp_path, errors)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=300)
    last = last_line(tmp_path, process, 143)
    assert last.startswith("translate.py: terminated (SIGTERM) at step "), last
    checkpoint = Path(last.split("saved the checkpoint ", 1)[1].split(". Resume with", 1)[0])
    assert (checkpoint / "trainer_state.json").is_file()
    # a save cut short (a kill, a full disk) at a later step: the model and the arguments, no trainer state
    partial = tmp_path / "cut" / f"checkpoint-{int(checkpoint.name.rsplit('-', 1)[1]) + 1}"
    partial.mkdir()
    for name in ("model.safetensors", "training_args.bin"):
        (partial / name).write_bytes((checkpoint / name).read_bytes())

    again = translate(tmp_path / "cut")  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"translate.py: warning: skipping {partial}: it is incomplete" in again.stderr
    assert_same_model(whole, tmp_path / "cut")


def test_ctrl_c_saves_the_checkpoint_when_the_reader_of_the_output_is_gone(tmp_path):
    process = interrupt(tmp_path, subprocess.STDOUT, "--disable_tqdm", "false")  # `2>&1 | tee log`
    process.stdout.close()  # tee, stopped by the same Ctrl-C
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    checkpoint = newest_whole_checkpoint(str(tmp_path / "cut"))
    assert checkpoint is not None
    assert 0 < int(checkpoint.rsplit("-", 1)[1]) < 30


def test_the_newest_whole_checkpoint_skips_partial_ones(tmp_path, capsys):
    for step, whole_one in ((4, True), (12, True), (16, False), (100, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if whole_one:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-200").write_text("a file, not a checkpoint")
    assert newest_whole_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-12")
    assert capsys.readouterr().err.count("it is incomplete") == 2

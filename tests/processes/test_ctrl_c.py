"""Ctrl-C during a script: the checkpoint of the interrupted step, one line naming it, exit status 130, and a
resume from it that ends as the uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

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


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_resume_ends_as_the_whole_run(tmp_path):
    command = [sys.executable, str(SCRIPTS / "translate.py"), "--output_dir", str(tmp_path / "cut"), *FLAGS]
    with open(tmp_path / "stderr.txt", "w") as errors:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in process.stdout:  # the first logged loss: training is under way
            if "'loss'" in line:
                process.send_signal(signal.SIGINT)
                break
        process.communicate(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("translate.py: interrupted at step "), stderr[-3000:]
    checkpoint = last.split("saved the checkpoint ", 1)[1].split(". Resume with", 1)[0]
    assert Path(checkpoint).parent == tmp_path / "cut" and 0 < int(checkpoint.rsplit("-", 1)[1]) < 30
    assert f"Resume with --resume_from_checkpoint {checkpoint}, or run the same command again" in last
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # stopped: no final model, no card

    resumed = translate(tmp_path / "cut", "--resume_from_checkpoint", checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = translate(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all((a[key] == b[key]).all() for key in a)

"""What a user sees when a script refuses to run: the scripts run as processes, their stderr and exit status read."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent.parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(script, *args, launcher=(sys.executable,)):
    command = [*launcher, str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def one_line_refusal(result, script):
    """The refusal is exactly one line on stderr, ``<script>: error: ...``, with exit status 2 and nothing else."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ")
    assert result.stdout == ""  # no dump of the arguments, no logs
    return lines[0]


def test_a_bad_value_is_one_line_naming_the_flag_and_what_is_allowed(tmp_path):
    line = one_line_refusal(launch("classify_images.py", "--output_dir", tmp_path / "out", "--rho", "-1"),
                            "classify_images.py")  # fmt: skip
    assert line == "classify_images.py: error: Invalid --rho: -1.0; it must be a number > 0"
    assert not (tmp_path / "out").exists()


def test_an_unknown_choice_is_one_line_naming_the_flag_and_the_choices(tmp_path):
    line = one_line_refusal(launch("translate.py", "--output_dir", tmp_path, "--sam_method", "foo"), "translate.py")
    # argparse's own wording (its quoting of the choices differs between Python versions)
    assert "argument --sam_method" in line and "invalid choice: 'foo'" in line
    assert all(choice in line.split("choose from", 1)[1] for choice in ("xsam", "sam", "none"))


@pytest.mark.parametrize(
    "script, flags",
    [
        ("translate.py", ["--learning_rat", "0.01"]),
        ("classify_images.py", ["--model_name", "x"]),  # would have switched off the embedded defaults
    ],
)
def test_abbreviated_flags_are_refused(tmp_path, script, flags):
    line = one_line_refusal(launch(script, "--output_dir", tmp_path / "out", *flags), script)
    assert line.endswith(f"unrecognized arguments: {' '.join(flags)} (flags are spelled out in full; see --help)")


@pytest.mark.parametrize(
    "script, flags, run_flags",
    [
        ("classify_images.py", ["--model_name_or_path", "some/model"], "--do_train and/or --do_eval"),
        ("translate.py", ["--train_file", "train.jsonl", "--source_lang", "en", "--target_lang", "fr"],
         "--do_train and/or --do_eval and/or --do_predict"),
    ],
)  # fmt: skip
def test_model_or_data_flags_without_anything_to_do_are_refused(tmp_path, script, flags, run_flags):
    line = one_line_refusal(launch(script, "--output_dir", tmp_path / "out", *flags), script)
    assert f"Nothing to do: pass {run_flags}" in line
    assert not (tmp_path / "out").exists()  # no card claiming a fine-tune


@pytest.mark.parametrize("script", ["classify_images.py", "translate.py"])
def test_a_model_missing_offline_is_one_message_naming_it(tmp_path, script):
    result = launch(script, "--model_name_or_path", "nobody-xyz/made-up-model", "--do_train", "--max_steps", "1",
                    "--output_dir", tmp_path / "out", "--report_to", "none", "--use_cpu")  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: Could not load the model 'nobody-xyz/made-up-model': ")
    assert "this machine is offline (HF_HUB_OFFLINE)" in last
    assert result.stderr.count("nobody-xyz/made-up-model': ") == 1


def test_a_language_missing_from_the_data_is_one_line_saying_what_is_there(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"translation": {"en": "one", "fr": "un"}}\n')
    result = launch("translate.py", "--train_file", tmp_path / "train.jsonl", "--source_lang", "de",
                    "--target_lang", "fr", "--do_train", "--output_dir", tmp_path / "out", "--report_to", "none")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "translate.py: error: --source_lang 'de' is not in the dataset; found languages in the `translation` "
        "column: en, fr"
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_a_refusal_is_printed_once(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()))  # fmt: skip
    result = launch("classify_images.py", "--rho", "-1", "--use_cpu", "--output_dir", tmp_path, launcher=torchrun)
    assert result.returncode != 0
    assert result.stderr.count("classify_images.py: error: Invalid --rho: -1.0") == 1, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # both ranks stopped with status 2; torchrun reports the first

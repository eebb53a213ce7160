"""What a user sees when a script refuses to run: the scripts run as processes, their stderr and exit status read."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent.parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(script, *args, launcher=(sys.executable,), cwd=None):
    command = [*launcher, str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)


def one_line_refusal(result, script):
    """The refusal is exactly one line on stderr, ``<script>: error: ...``, with exit status 2 and nothing else."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ")
    assert result.stdout == ""  # no dump of the arguments, no logs
    return lines[0]


@pytest.mark.parametrize("script", ["classify_images.py", "sft.py"])
def test_a_bad_value_is_one_line_naming_the_flag_and_what_is_allowed(tmp_path, script):
    line = one_line_refusal(launch(script, "--output_dir", tmp_path / "out", "--rho", "-1"), script)
    assert line == f"{script}: error: Invalid --rho: -1.0; it must be a number > 0"  # no FutureWarning before it
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_to_resume_from_is_one_line(tmp_path):
    result = launch("translate.py", "--output_dir", tmp_path / "out", "--resume_from_checkpoint", tmp_path / "nope")
    line = one_line_refusal(result, "translate.py")
    assert (
        line
        == f"translate.py: error: --resume_from_checkpoint '{tmp_path / 'nope'}' is not a folder (a checkpoint-<step> folder)"
    )


def vit_checkpoint(folder, hidden_size):
    """A checkpoint as the Trainer saves one (weights, config, trainer state) of a tiny ViT with 10 labels."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.trainer_callback import TrainerState

    config = ViTConfig(image_size=8, patch_size=4, hidden_size=hidden_size, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    TrainerState(global_step=1, max_steps=2).save_to_json(str(folder / "trainer_state.json"))
    return folder


@pytest.mark.parametrize(
    "files, problem",
    [
        (["notes.txt"], "is not a checkpoint: it has no trainer_state.json"),
        (["trainer_state.json", "optimizer.pt"], "holds no model weights"),
    ],
)
def test_a_folder_that_is_not_a_checkpoint_is_one_line_before_any_model(tmp_path, files, problem):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    result = launch("translate.py", "--output_dir", tmp_path / "out", "--resume_from_checkpoint", folder)
    line = one_line_refusal(result, "translate.py")  # before logging, data and model: nothing on stdout
    assert line.startswith(f"translate.py: error: --resume_from_checkpoint '{folder}' {problem}")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_kind_of_model_is_one_line_naming_it(tmp_path):
    checkpoint = vit_checkpoint(tmp_path / "checkpoint-1", hidden_size=16)
    result = launch("translate.py", "--output_dir", tmp_path / "out", "--resume_from_checkpoint", checkpoint)
    line = one_line_refusal(result, "translate.py")
    assert line == (
        f"translate.py: error: --resume_from_checkpoint '{checkpoint}' holds a 'vit' model "
        "(ViTForImageClassification); this script trains encoder-decoder models (Marian, T5, BART, NLLB)"
    )


def test_a_checkpoint_of_another_model_is_one_line_with_the_loaders_message(tmp_path):
    from helpers import TINY_VIT

    checkpoint = vit_checkpoint(tmp_path / "checkpoint-1", hidden_size=8)  # the run's ViT has hidden_size 16
    result = launch("classify_images.py", "--output_dir", tmp_path / "out", "--resume_from_checkpoint", checkpoint,
                    *TINY_VIT, "--max_steps", 2, "--report_to", "none", "--use_cpu")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"classify_images.py: error: Cannot resume from {checkpoint}: ")
    assert "ViTForImageClassification" in last and "'loss'" not in result.stdout


@pytest.mark.parametrize("script, folder", [("classify_images.py", "xsam-vit-digits"),
                                            ("translate.py", "xsam-marian-numbers-en-fr")])  # fmt: skip
def test_a_second_run_into_the_default_folder_says_how_to_overwrite_it(tmp_path, script, folder):
    # what the first, finished run left there: a model and its card, no checkpoint (save_strategy "no")
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "README.md").write_text("the full run's card")
    line = one_line_refusal(launch(script, cwd=tmp_path), script)
    assert line == (
        f"{script}: error: --output_dir '{folder}' already holds files (an earlier run's model?) and no checkpoint "
        "to resume; training would replace them. Pass --overwrite_output_dir to train into it anyway, or another "
        "--output_dir"
    )
    assert (tmp_path / folder / "README.md").read_text() == "the full run's card"


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("")
    line = one_line_refusal(launch("classify_images.py", "--output_dir", tmp_path / "taken"), "classify_images.py")
    assert line == f"classify_images.py: error: --output_dir '{tmp_path / 'taken'}' is a file, not a folder"


def writable(folder):
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def test_an_output_dir_that_cannot_be_written_stops_the_run_before_training(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if writable(folder):  # root writes anyway: take a folder the kernel refuses to everyone
        folder = Path("/sys")
        if not folder.is_dir() or writable(folder):
            pytest.skip("no folder that this user cannot write")
    result = launch("translate.py", "--output_dir", folder)
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"translate.py: error: --output_dir '{folder}': cannot write in '{folder}' (")
    assert line.endswith("nothing has been trained. Pass a folder you can write.")
    assert "Traceback" not in result.stderr and "'loss'" not in result.stdout


def test_a_train_dir_without_images_is_one_line(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no image here")
    result = launch("classify_images.py", "--train_dir", tmp_path / "train", "--do_train", "--output_dir",
                    tmp_path / "out", "--report_to", "none", "--use_cpu")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"classify_images.py: error: --train_dir '{tmp_path / 'train'}' holds no images: it must hold one subfolder "
        "per class with image files (.png, .jpg, ...) in them"
    )


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


@pytest.mark.parametrize("script", ["classify_images.py", "translate.py", "sft.py"])
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


def test_accelerate_asked_for_two_cpu_processes_but_starting_one_warns(tmp_path):
    accelerate = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                  "--main_process_port", str(free_port()))  # fmt: skip
    result = launch("translate.py", "--rho", "-1", "--output_dir", tmp_path, launcher=accelerate)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("translate.py: ")]
    assert len(lines) == 2 and lines[1].startswith("translate.py: error: Invalid --rho"), result.stderr[-3000:]
    assert lines[0].startswith(
        "translate.py: warning: accelerate launch was asked for several processes but started one"
    )
    assert "scripts/accelerate_configs/multi_cpu.yaml" in lines[0]

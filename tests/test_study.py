"""The generalization study: label noise, the per-run record, resuming, tables and curves."""

import json
import statistics
import sys
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, Features, Value

import classify_images
import selection
import study
from helpers import TINY_VIT
from label_noise import add_label_noise
from tasks import image_run_name


def labelled(n: int, num_classes: int = 10) -> Dataset:
    features = Features({"label": ClassLabel(num_classes=num_classes), "index": Value("int64")})
    return Dataset.from_dict({"label": [i % num_classes for i in range(n)], "index": list(range(n))}, features)


@pytest.mark.parametrize("n, fraction, changed", [(200, 0.3, 60), (101, 0.25, 25), (50, 0.0, 0), (7, 0.5, 4)])
def test_label_noise_changes_exactly_the_fraction_to_other_classes(n, fraction, changed):
    data = labelled(n)
    noisy = add_label_noise(data, "label", fraction, seed=1)
    flipped = [i for i, (a, b) in enumerate(zip(data["label"], noisy["label"])) if a != b]
    assert len(flipped) == changed  # a changed label never lands back on its own class
    assert noisy["index"] == data["index"] and noisy.features == data.features
    assert noisy["label"] == add_label_noise(data, "label", fraction, seed=1)["label"]
    if changed > 10:
        assert noisy["label"] != add_label_noise(data, "label", fraction, seed=2)["label"]


def test_label_noise_draws_every_other_class():
    data = labelled(3000, num_classes=3)
    noisy = add_label_noise(data, "label", 0.9, seed=0)
    moves = {(a, b) for a, b in zip(data["label"], noisy["label"]) if a != b}
    assert moves == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}


def test_label_noise_is_validated():
    with pytest.raises(ValueError, match=r"Invalid label_noise: 1.0; it must be in \[0, 1\)"):
        add_label_noise(labelled(4), "label", 1.0, seed=0)
    with pytest.raises(ValueError, match=r"Invalid label_noise: -0.1"):
        classify_images.DataTrainingArguments(label_noise=-0.1)


def test_classify_images_adds_noise_to_the_training_split_only(tmp_path, monkeypatch):
    seen = {}
    build_trainer = classify_images.build_trainer

    def keep_datasets(trainer_class, **kwargs):
        seen.update(kwargs)
        return build_trainer(trainer_class, **kwargs)

    monkeypatch.setattr(classify_images, "build_trainer", keep_datasets)
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "classify_images.py",
            "--output_dir",
            str(out),
            *TINY_VIT,
            "--max_steps",
            "1",
            "--eval_strategy",
            "no",
            "--report_to",
            "none",
            "--seed",
            "3",
            "--label_noise",
            "0.4",
            "--label_noise_seed",
            "5",
        ],
    )
    classify_images.main()

    clean = classify_images.digits_dataset(seed=3)
    trained_on = seen["train_dataset"].dataset["label"]  # the images under the per-image augmentation
    assert sum(a != b for a, b in zip(clean["train"]["label"], trained_on)) == round(0.4 * 1497)
    assert seen["eval_dataset"].with_format(None)["label"] == clean["validation"]["label"]
    results = json.loads((out / "train_results.json").read_text())
    assert (results["label_noise"], results["label_noise_seed"]) == (0.4, 5)
    assert "40% symmetric label noise (seed 5)" in (out / "README.md").read_text()


def fake_training(calls):
    """Stands in for the script: writes the files a run leaves, with curves fixed by method and seed."""

    def run(command, **kwargs):
        flags = dict(zip(command[::1], command[1:]))
        out, method, seed = Path(flags["--output_dir"]), flags["--sam_method"], int(flags["--seed"])
        calls.append(command)
        accuracy = {"none": [0.5, 0.4], "sam": [0.6, 0.7], "xsam": [0.6, 0.8]}[method]
        history = []
        for epoch, value in enumerate(accuracy, start=1):
            logs = {"loss": 1.0 / epoch, "epoch": float(epoch), "step": 10 * epoch}
            if method != "none":
                logs["xsam/passes"] = 2.0
                logs["xsam/search_forwards"] = [1.5, 0.5][epoch - 1] if method == "xsam" else 0.0
            if method == "xsam":
                logs["xsam/alpha"] = [1.5, 2.0][epoch - 1]
            history += [
                logs,
                {"eval_validation_accuracy": value + seed / 100, "epoch": float(epoch)},
                {"eval_train_accuracy": 0.9, "epoch": float(epoch)},
            ]
        (out / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 20}))
        (out / "eval_results.json").write_text(json.dumps({"eval_accuracy": accuracy[-1] + seed / 100}))

    return run


def test_study_records_every_run_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(selection.subprocess, "run", fake_training(calls))
    argv = [
        "--task",
        "digits",
        "--methods",
        "none",
        "xsam",
        "--seeds",
        "0",
        "1",
        "--label_noise",
        "0",
        "0.5",
        "--output_dir",
        str(tmp_path),
        "--name",
        "tiny",
        "--",
        "--num_train_epochs",
        "2",
    ]
    study.main(argv)
    assert len(calls) == 8
    assert sum(command[command.index("--label_noise") + 1] == "0.5" for command in calls) == 4
    assert all("--num_train_epochs" in command and "--eval_strategy" in command for command in calls)

    runs = json.loads((tmp_path / "tiny.json").read_text())["runs"]
    assert len(runs) == 8
    xsam = next(r for r in runs if (r["method"], r["seed"], r["label_noise"]) == ("xsam", 1, 0.5))
    assert xsam["curve"] == [0.61, 0.81] and xsam["best_accuracy"] == 0.81 and xsam["best_epoch"] == 2
    assert xsam["alpha"] == [1.5, 2.0] and xsam["train_curve"] == [0.9, 0.9] and xsam["train_loss"] == [1.0, 0.5]
    none = next(r for r in runs if (r["method"], r["seed"]) == ("none", 0))
    assert (none["final_accuracy"], none["best_accuracy"], none["best_epoch"]) == (0.4, 0.5, 1)

    lines = (tmp_path / "tiny.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| 0")]
    assert len(rows) == 4 + 2 + 2  # (noise, method) rows, then xsam - none and alpha per noise level
    spread = statistics.stdev([0.8, 0.81])
    assert rows[3] == (
        f"| 0.5 | 0.05 | xsam | 0.805 ± {spread:.3f} | 0.805 ± {spread:.3f} | 2.0 ± 0.0 | "
        "0.900 ± 0.000 | 2.33 | " + rows[3].split(" | ")[8] + " | 2 |"
    )  # cost: 2 passes (3 units each) and 1 search forward (1 unit) per step, over the base's 3 units
    assert rows[2].split(" | ")[2:3] + rows[2].split(" | ")[7:8] == ["none", "1.00"]
    assert rows[5] == "| 0.5 | 0.05 | xsam − none | 0.400 ± 0.000 | 2 of 2 | 0.300 ± 0.000 | 2 of 2 |"
    assert rows[7] == "| 0.5 | 0.05 | xsam | 1.75 | 1.75 | 1.75 | 1.5 to 2.0 | 50% (alpha 2) | 0.50 |"
    assert (tmp_path / "tiny.png").stat().st_size > 0 and (tmp_path / "tiny-cost.png").stat().st_size > 0

    study.main(argv)
    assert len(calls) == 8  # every run was recorded: nothing trains again
    (tmp_path / image_run_name(0.5, 0.05, "none", 1) / "study_run.json").unlink()
    study.main([*argv[:-3], "--report_only"])
    assert len(calls) == 8 and len(json.loads((tmp_path / "tiny.json").read_text())["runs"]) == 7
    study.main(argv)
    assert len(calls) == 9 and calls[-1][calls[-1].index("--seed") + 1] == "1"


def test_study_runs_the_script_end_to_end(tmp_path):
    argv = [
        "--task",
        "digits",
        "--methods",
        "xsam",
        "--seeds",
        "0",
        "--label_noise",
        "0.5",
        "--output_dir",
        str(tmp_path),
        "--",
        *TINY_VIT,
        "--num_train_epochs",
        "2",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "16",
        "--per_device_train_batch_size",
        "16",
    ]
    study.main(argv)
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert len(run["curve"]) == len(run["train_curve"]) == len(run["alpha"]) == 2
    assert run["final_accuracy"] == run["curve"][-1] and 1 <= run["best_epoch"] <= 2
    assert all(0.0 <= alpha <= 2.0 for alpha in run["alpha"])
    trained = json.loads((tmp_path / image_run_name(0.5, 0.05, "xsam", 0) / "train_results.json").read_text())
    assert trained["label_noise"] == 0.5 and trained["train_samples"] == 32

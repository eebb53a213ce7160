"""The transfer study: its draws of the target task, its choices on validation accuracy only, and its report."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import Image as PILImage

import selection
import transfer_study

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_like(folder: Path, per_class_train: int = 12, per_class_test: int = 3) -> Path:
    """A CIFAR-10-shaped pair of parquet files: ``img`` (4x4 RGB; red channel = the row's index) and ``label``."""
    features = Features({"img": Image(), "label": ClassLabel(names=NAMES)})
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = [i % 10 for i in range(10 * per_class)]
        images = [PILImage.new("RGB", (4, 4), (i % 256, i // 256, 0)) for i in range(len(labels))]
        Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(folder / f"{split}.parquet")
    return folder


def read(path: Path) -> Dataset:
    return load_dataset("parquet", data_files=str(path), split="train")


def source_rows(split: Dataset) -> list[int]:
    """Which row of the source each image came from (its red and green channels)."""
    return [int(np.asarray(image)[0, 0, 0]) + 256 * int(np.asarray(image)[0, 0, 1]) for image in split["img"]]


def test_draws_are_disjoint_balanced_of_the_new_classes_and_fixed_by_the_seed(tmp_path):
    data = cifar_like(tmp_path)
    paths = transfer_study.draw_splits(data, 4, 3, seed=0, folder=tmp_path / "s0")
    train, validation, test = (read(paths[split]) for split in ("train", "validation", "test"))
    assert train.features["label"].names == ["dog", "frog", "horse", "ship", "truck"]
    assert sorted(train["label"]) == sorted(list(range(5)) * 4)
    assert sorted(validation["label"]) == sorted(list(range(5)) * 3)
    assert len(test) == 5 * 3  # every test image of the new classes
    # labels follow the images: source row r has CIFAR label r % 10, the new label r % 10 - 5
    for split in (train, validation):
        assert all(row % 10 - 5 == label for row, label in zip(source_rows(split), split["label"]))
    assert not set(source_rows(train)) & set(source_rows(validation))

    again = transfer_study.draw_splits(data, 4, 3, seed=0, folder=tmp_path / "s0-again")
    other = transfer_study.draw_splits(data, 4, 3, seed=1, folder=tmp_path / "s1")
    assert source_rows(read(again["train"])) == source_rows(train)
    assert set(source_rows(read(other["train"]))) != set(source_rows(train))


def fake_training(calls: list[list[str]]):
    """Stands in for the script: validation and test accuracy fixed by configuration, lr, rho and seed."""

    def run(command, **kwargs):
        flags = dict(zip(command, command[1:]))
        calls.append(command)
        out = Path(flags["--output_dir"])
        out.mkdir(parents=True)
        method, lr, seed = flags["--sam_method"], float(flags["--learning_rate"]), int(flags["--seed"])
        rho = float(flags.get("--rho", 0))
        # AdamW: lr 1e-3 is best on validation, 1e-4 on test (a choice made on test would differ)
        val = {1e-4: 0.5, 1e-3: 0.6}[lr] if method == "none" else 0.55 + rho
        test = {1e-4: 0.9, 1e-3: 0.7}[lr] if method == "none" else 0.72 - rho
        history = []
        for epoch in (1, 2):
            logs = {"loss": 1.0 / epoch, "epoch": float(epoch), "step": 4 * epoch}
            if method != "none":
                logs.update({"xsam/passes": 2.0, "xsam/search_forwards": 1.5, "xsam/alpha": 1.0 + epoch / 2})
            history += [logs, {"eval_accuracy": val + seed / 100 - (epoch == 1) / 10, "epoch": float(epoch)}]
        (out / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 8}))
        (out / "all_results.json").write_text(json.dumps({"predict_accuracy": test + seed / 100, "train_runtime": 1}))
        (out / "model.safetensors").write_text("weights")

    return run


def test_choices_are_made_on_validation_and_runs_are_not_repeated(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(selection.subprocess, "run", fake_training(calls))
    argv = [
        "--data_dir",
        str(cifar_like(tmp_path)),
        "--model",
        "some/checkpoint",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    argv += ["--sizes", "2", "--val_per_class", "1", "--seeds", "0", "1", "--configs", "sam", "xsam"]
    argv += ["--lrs", "1e-4", "1e-3", "--rhos", "0.01", "0.1", "--name", "tiny", "--", "--num_train_epochs", "2"]
    transfer_study.main(argv)
    assert len(calls) == 2 * 2 + 2 * 2 * 2  # AdamW's lrs, then each configuration's rhos, two seeds each
    sharp = [command for command in calls if "none" not in command]
    assert all(command[command.index("--learning_rate") + 1] == "0.001" for command in sharp)  # AdamW's choice
    assert all(command[-2:] == ["--num_train_epochs", "2"] for command in calls)
    assert not list((tmp_path / "out").glob("*/model/*.safetensors"))  # the study keeps numbers, not weights

    runs = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert selection.choose(runs, 2, "adamw") == (1e-3, None)
    assert selection.choose(runs, 2, "xsam") == (1e-3, 0.1)  # highest validation, lowest test
    record = next(r for r in runs if (r["config"], r["lr"], r["seed"]) == ("adamw", 1e-3, 1))
    assert record["val_curve"] == pytest.approx([0.51, 0.61]) and record["val_best_epoch"] == 2
    assert record["test_accuracy"] == pytest.approx(0.71)

    lines = (tmp_path / "out" / "tiny.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| 2 |")]
    assert len(rows) == 2 + 2 + 2 + 3 + 3  # every setting's validation, the chosen ones on test, their training
    spread = statistics.stdev([0.62, 0.63])
    assert rows[-4] == (
        f"| 2 | xsam | 0.001 | 0.1 | 2 | 0.625 ± {spread:.3f} | -0.080 (0 of 2) | 2.00 | 2.50x | "
        + rows[-4].split(" | ")[-1]
    )  # cost: 2 passes (3 units each) and 1.5 search forwards (1 unit) per step, over AdamW's 3 units

    assert rows[-1] == "| 2 | xsam | 0.500 | 0.000 |  | 1.75 (1.5 to 2) |"

    transfer_study.main(argv)
    assert len(calls) == 12  # every run was recorded: nothing trains again

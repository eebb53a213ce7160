"""The translation transfer study: its English-Spanish draws, its choices on validation BLEU only, and its report."""

import json
from pathlib import Path

import pytest
from num2words import num2words

import selection
import translation_transfer


def read(path: Path) -> list[dict]:
    return [json.loads(line)["translation"] for line in path.read_text().splitlines()]


def test_draws_are_disjoint_english_to_spanish_and_fixed_by_the_seed(tmp_path):
    paths = translation_transfer.draw_splits(30, 10, 50, seed=0, folder=tmp_path / "s0")
    train, validation, test = (read(paths[split]) for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (30, 10, 50)
    assert all(sorted(pair) == ["en", "es"] for pair in train + validation + test)
    numbers = translation_transfer.draw_numbers(40, 0, exclude=set(translation_transfer.draw_numbers(50, 1_000_003)))
    assert [pair["es"] for pair in train + validation] == [num2words(n, lang="es") for n in numbers]
    assert [pair["en"] for pair in train + validation] == [num2words(n, lang="en") for n in numbers]
    assert all(0 < n < 1_000_000 for n in numbers)
    sources = {split: {pair["en"] for pair in pairs} for split, pairs in zip(paths, (train, validation, test))}
    assert len(sources["train"] | sources["validation"] | sources["test"]) == 90  # distinct and disjoint

    again = translation_transfer.draw_splits(30, 10, 50, seed=0, folder=tmp_path / "s0-again")
    other = translation_transfer.draw_splits(30, 10, 50, seed=1, folder=tmp_path / "s1")
    assert read(again["train"]) == train and read(again["validation"]) == validation
    assert read(other["train"]) != train
    assert read(other["test"]) == test  # one test set for every seed
    assert not {pair["en"] for pair in read(other["train"]) + read(other["validation"])} & sources["test"]


def fake_script(calls: list[list[str]]):
    """Stands in for scripts/translate.py: pretraining writes a config; BLEU is fixed by configuration, lr, rho and
    seed."""

    def run(command, **kwargs):
        flags = dict(zip(command, command[1:]))
        calls.append(command)
        out = Path(flags["--output_dir"])
        out.mkdir(parents=True)
        if "--model_name_or_path" not in flags:  # the pretraining run
            (out / "config.json").write_text("{}")
            return
        if "--do_train" not in command:  # the pretrained model scored before fine-tuning
            (out / "all_results.json").write_text(json.dumps({"predict_bleu": 1.0, "predict_chrf": 10.0}))
            return
        method, lr, seed = flags["--sam_method"], float(flags["--learning_rate"]), int(flags["--seed"])
        rho = float(flags.get("--rho", 0))
        # AdamW: lr 1e-3 is best on validation, 3e-4 on test (a choice made on test would differ)
        val = {3e-4: 50.0, 1e-3: 60.0}[lr] if method == "none" else 55.0 + 100 * rho
        test = {3e-4: 90.0, 1e-3: 70.0}[lr] if method == "none" else 72.0 - 100 * rho
        history = []
        for epoch in (1, 2):
            logs = {"loss": 1.0 / epoch, "epoch": float(epoch), "step": 4 * epoch}
            if method != "none":
                logs.update({"xsam/passes": 2.0, "xsam/search_forwards": 1.5, "xsam/alpha": 1.0 + epoch / 2})
            history.append(logs)
        (out / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 8}))
        results = {"eval_bleu": val + seed, "eval_chrf": 80.0, "predict_bleu": test + seed, "predict_chrf": 85.0}
        (out / "all_results.json").write_text(json.dumps({**results, "train_runtime": 1}))
        (out / "model.safetensors").write_text("weights")

    return run


def test_choices_are_made_on_validation_and_runs_are_not_repeated(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(selection.subprocess, "run", fake_script(calls))
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--sizes", "20", "--val_pairs", "5", "--test_pairs", "8", "--seeds", "0", "1"]
    argv += ["--configs", "sam", "xsam", "--lrs", "3e-4", "1e-3", "--rhos", "0.01", "0.1", "--name", "tiny"]
    argv += ["--", "--num_train_epochs", "2"]
    translation_transfer.main(argv)
    assert len(calls) == 1 + 1 + 2 * 2 + 2 * 2 * 2  # pretrain, score it, AdamW's lrs, each configuration's rhos
    assert "--model_name_or_path" not in calls[0] and calls[0][calls[0].index("--sam_method") + 1] == "none"
    runs_of = [command for command in calls[1:] if "--do_train" in command]
    assert all(command[command.index("--model_name_or_path") + 1] == str(out / "pretrained") for command in calls[1:])
    assert all(command[command.index("--target_lang") + 1] == "es" for command in calls[1:])
    sharp = [command for command in runs_of if "none" not in command]
    assert all(command[command.index("--learning_rate") + 1] == "0.001" for command in sharp)  # AdamW's choice
    assert all(command[-2:] == ["--num_train_epochs", "2"] for command in calls[1:])
    assert not list(out.glob("*/model/*.safetensors"))  # the study keeps numbers, not weights

    saved = json.loads((out / "tiny.json").read_text())
    runs = saved["runs"]
    assert saved["not_fine_tuned"] == {"test_bleu": 1.0, "test_chrf": 10.0}
    assert selection.choose(runs, 20, "adamw") == (1e-3, None)
    assert selection.choose(runs, 20, "xsam") == (1e-3, 0.1)  # highest validation, lowest test
    record = next(r for r in runs if (r["config"], r["lr"], r["seed"]) == ("adamw", 1e-3, 1))
    assert record["val_final"] == pytest.approx(61.0) and record["test_bleu"] == pytest.approx(71.0)

    lines = (out / "tiny.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| 20 |")]
    assert len(rows) == 2 + 2 + 2 + 3  # every setting's validation, then the chosen ones on test
    assert any("BLEU 1.00 and chrF 10.00" in line for line in lines)  # the model before fine-tuning
    assert rows[-1].startswith("| 20 | xsam | 0.001 | 0.1 | 2 | 62.50 ± 0.71 | -8.00 (0 of 2) | 85.00 ± 0.00 | ")
    assert "| 2.00 | 2.50x |" in rows[-1]  # 2 passes (3 units each) and 1.5 search forwards (1 unit), AdamW 3

    translation_transfer.main(argv)
    assert len(calls) == 14  # every run was recorded: nothing trains again

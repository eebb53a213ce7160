"""The translation study: configurations, the per-run record, resuming, tables, and one real run on a tiny slice."""

import json
import statistics
from pathlib import Path

import pytest

import selection
import translation_study as ts
from configs import CONFIGS, parse_configs, rho_free
from tasks import MULTI30K_FILES, translation_run_name

# a tiny Marian and tokenizer: the real run takes seconds
TINY_MARIAN = ["--d_model", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32", "--vocab_size", "60"]


def write_data(folder: Path, n_train: int = 24) -> Path:
    """A few German-English pairs in the three files of the Multi30k folder."""
    nouns = [("Hund", "dog"), ("Mann", "man"), ("Junge", "boy"), ("Vogel", "bird")]
    verbs = [("läuft", "runs"), ("schläft", "sleeps"), ("springt", "jumps")]
    pairs = [
        {"translation": {"de": f"Ein {de_n} {de_v}.", "en": f"A {en_n} {en_v}."}}
        for (de_n, en_n) in nouns
        for (de_v, en_v) in verbs
    ]
    folder.mkdir()
    for split, name in MULTI30K_FILES.items():
        rows = (pairs * 2)[:n_train] if split == "train" else pairs[:4]
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_configurations_are_parsed_and_validated():
    configs = parse_configs(["cheap=--sam_method xsam --sam_interval 2 --alpha_search_interval 0"])
    assert list(configs) == ["cheap"]  # a study's own, beside the table's
    assert configs["cheap"] == ["--sam_method", "xsam", "--sam_interval", "2", "--alpha_search_interval", "0"]
    assert rho_free(CONFIGS["none"]) and not rho_free(configs["cheap"])
    for spec in ("cheap", "xsam=--rho 0.1", "adamw=--rho 0.1", "two words=--rho 0.1", "cheap=rho"):
        with pytest.raises(ValueError, match="Invalid --config"):
            parse_configs([spec])


def test_bad_data_and_methods_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MULTI30K_DIR", raising=False)
    with pytest.raises(ValueError, match="pass --data_dir or set MULTI30K_DIR"):
        ts.main(["--output_dir", str(tmp_path / "out")])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / MULTI30K_FILES["train"]).write_text("")
    with pytest.raises(ValueError, match=r"Invalid --data_dir .*val.de-en.jsonl, test_2016_flickr.de-en.jsonl not"):
        ts.main(["--data_dir", str(tmp_path / "data")])
    with pytest.raises(ValueError, match="Invalid --methods adam: not one of none, sam, xsam"):
        ts.main(["--data_dir", str(tmp_path / "data"), "--methods", "adam"])


def last(command: list[str], flag: str) -> str:
    """The value the script uses: a repeated flag's last one."""
    return command[len(command) - 1 - command[::-1].index(flag) + 1]


def fake_training(calls):
    """Stands in for the script: writes the files a run leaves, with curves fixed by configuration and seed."""

    def run(command, **kwargs):
        flags = dict(zip(command, command[1:]))
        out = Path(flags["--output_dir"])
        calls.append(command)
        if "--model_name_or_path" in flags:  # the test set with the best checkpoint
            out.mkdir()
            best = json.loads((Path(flags["--model_name_or_path"]) / "bleu.json").read_text())
            (out / "predict_results.json").write_text(json.dumps({"predict_bleu": best, "predict_chrf": 2 * best}))
            return
        config = {"none": "none", "xsam": "xsam", "sam": "sam"}[flags["--sam_method"]]
        seed = int(flags["--seed"])
        if "--sam_interval" in flags:
            config = "cheap"
        bleu = {"none": [10, 14, 12], "sam": [9, 13, 14], "xsam": [9, 14, 15], "cheap": [10, 13, 13]}[config]
        history = []
        for epoch, value in enumerate(bleu, start=1):
            logs = {"loss": 3.0 / epoch, "epoch": float(epoch)}
            if config in ("xsam", "cheap"):
                logs["xsam/alpha"] = [1.0, 2.0, 2.0][epoch - 1]
            evals = {"eval_bleu": value + seed, "eval_chrf": 3 * value, "eval_loss": [3, 2, 2.5][epoch - 1]}
            history += [logs, {**evals, "epoch": float(epoch)}]
        checkpoint = out / "checkpoint-best"
        checkpoint.mkdir()
        (checkpoint / "bleu.json").write_text(json.dumps(max(bleu) + seed + 0.5))
        state = {"log_history": history, "best_model_checkpoint": str(checkpoint)}
        (out / "trainer_state.json").write_text(json.dumps(state))
        results = {"predict_bleu": bleu[-1] + seed + 0.25, "predict_chrf": 40.0}
        (out / "predict_results.json").write_text(json.dumps(results))

    return run


def test_study_records_every_run_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(selection.subprocess, "run", fake_training(calls))
    data = write_data(tmp_path / "data")
    argv = [
        "--data_dir",
        str(data),
        "--methods",
        "none",
        "xsam",
        "--seeds",
        "0",
        "1",
        "--rho",
        "0.05",
        "0.1",
        "--config",
        "cheap=--sam_method xsam --sam_interval 2",
        "--output_dir",
        str(tmp_path / "out"),
        "--name",
        "tiny",
        "--",
        "--num_train_epochs",
        "3",
        "--num_beams",
        "2",
    ]
    ts.main(argv)
    # per seed: AdamW once, xsam and cheap at each rho; each run is a training call and a best-checkpoint call
    assert len(calls) == 2 * (1 + 2 * 2) * 2
    trainings = [c for c in calls if "--do_train" in c]
    assert all(last(c, "--num_train_epochs") == "3" and last(c, "--save_strategy") == "best" for c in trainings)
    assert all("--rho" not in c for c in trainings if last(c, "--sam_method") == "none")
    best_calls = [c for c in calls if "--model_name_or_path" in c]
    assert all("--do_train" not in c and last(c, "--num_beams") == "2" for c in best_calls)

    runs = json.loads((tmp_path / "out" / "tiny.json").read_text())["runs"]
    xsam = next(r for r in runs if (r["config"], r["seed"], r["rho"]) == ("xsam", 1, 0.1))
    assert xsam["val_bleu"] == [10, 15, 16] and xsam["best_val_bleu"] == 16 and xsam["best_epoch"] == 3
    assert (xsam["test_bleu"], xsam["best_test_bleu"], xsam["best_test_chrf"]) == (16.25, 16.5, 33.0)
    assert xsam["alpha"] == [1.0, 2.0, 2.0] and xsam["lowest_val_loss_epoch"] == 2
    none = next(r for r in runs if (r["config"], r["seed"]) == ("none", 0))
    assert none["rho"] is None and (none["best_epoch"], none["test_bleu"], none["best_test_bleu"]) == (2, 12.25, 14.5)

    lines = (tmp_path / "out" / "tiny.md").read_text().splitlines()
    spread = statistics.stdev([15.25, 16.25])
    assert f"| 0.1 | xsam | 15.75 ± {spread:.2f} | 40.00 ± 0.00 | 16.00 ± {spread:.2f} | 32.00 ± 1.41 |" in (
        "\n".join(lines)
    )
    assert "| - | none | 12.75 ± 0.71 | 40.00 ± 0.00 | 15.00 ± 0.71 | 30.00 ± 1.41 | 2.0 ± 0.0 | 2.0 ± 0.0 |" in (
        "\n".join(lines)
    )
    # xsam ends 3 BLEU above AdamW on both seeds, 1 above at the best epoch; cheap +1 and -1
    assert "| 0.05 | xsam − none | 3.00 ± 0.00 | 2 of 2 | 1.00 ± 0.00 | 2 of 2 |" in lines
    assert "| 0.1 | cheap − none | 1.00 ± 0.00 | 2 of 2 | -1.00 ± 0.00 | 0 of 2 |" in lines
    assert not any("− sam" in line for line in lines)  # SAM did not run
    assert "| 0.05 | cheap | 1.67 | 1.67 | 1.67 | 1.0 to 2.0 | 67% (2) |" in lines
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0

    ts.main(argv)
    assert len(calls) == 20  # every run was recorded: nothing trains again
    (tmp_path / "out" / translation_run_name("none", None, 1) / "study_run.json").unlink()
    ts.main([*argv[:-5], "--report_only"])
    assert len(calls) == 20 and len(json.loads((tmp_path / "out" / "tiny.json").read_text())["runs"]) == 9


def test_study_runs_the_script_end_to_end(tmp_path):
    data = write_data(tmp_path / "data")
    argv = ["--data_dir", str(data), "--methods", "xsam", "--seeds", "0", "--output_dir", str(tmp_path / "out")]
    ts.main([*argv, "--", *TINY_MARIAN, "--num_train_epochs", "1", "--per_device_train_batch_size", "8"])
    run = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert len(run["val_bleu"]) == len(run["val_loss"]) == len(run["alpha"]) == len(run["train_loss"]) == 1
    assert 0.0 <= run["alpha"][0] <= 2.0 and run["best_epoch"] == 1
    # one epoch: the best checkpoint is the final model, so both translations of the test set agree
    assert (run["best_test_bleu"], run["best_test_chrf"]) == (run["test_bleu"], run["test_chrf"])
    trained = json.loads((tmp_path / "out" / translation_run_name("xsam", 0.05, 0) / "train_results.json").read_text())
    assert trained["train_samples"] == 24

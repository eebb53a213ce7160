"""One table of configurations (benchmarks/configs.py): every tool gives a name the same flags, the docs list them,
and runs recorded before the table are still read, under today's names."""

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest

import benchmark
import selection
import study
import study_report
import transfer_study
import translation_study
import translation_transfer
from configs import CONFIGS, TRANSFER_RENAMED
from tasks import image_run_name, translation_run_name
from test_study import fake_training as fake_image_training
from test_transfer_study import cifar_like
from test_transfer_study import fake_training as fake_fine_tuning
from test_translation_study import fake_training as fake_translation_training
from test_translation_study import write_data
from test_translation_transfer import fake_script as fake_translation_fine_tuning

ROOT = Path(__file__).resolve().parent.parent
PAPER = {"--sam_method": "xsam", "--extrapolate_after_drop": "0", "--alpha_max": "2"}


def used(command: list[str], flag: str) -> str | None:
    """The value the script uses: a repeated flag's last one."""
    values = [value for name, value in itertools.pairwise(command) if name == flag]
    return values[-1] if values else None


@pytest.mark.parametrize("tool", [study, study_report, transfer_study, translation_transfer])
def test_every_tool_names_its_configurations_from_the_one_table(tool):
    assert tool.CONFIGS is CONFIGS


def test_xsam_is_the_papers_rule_and_xsam_default_the_packages_in_every_tool(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(selection.subprocess, "run", fake_image_training(calls))
    study.main(["--task", "digits", "--methods", "xsam", "--seeds", "0", "--output_dir", str(tmp_path / "images")])
    monkeypatch.setattr(selection.subprocess, "run", fake_translation_training(calls))
    data = write_data(tmp_path / "multi30k")
    translation_study.main(
        ["--data_dir", str(data), "--methods", "xsam", "--seeds", "0", "--output_dir", str(tmp_path)]
    )
    transfer = ["--sizes", "2", "--seeds", "0", "--configs", "xsam", "xsam-default", "--lrs", "1e-3", "--rhos", "0.1"]
    monkeypatch.setattr(selection.subprocess, "run", fake_fine_tuning(calls))
    cifar = cifar_like(tmp_path)
    transfer_study.main([*transfer, "--data_dir", str(cifar), "--model", "m", "--output_dir", str(tmp_path / "t")])
    monkeypatch.setattr(selection.subprocess, "run", fake_translation_fine_tuning(calls))
    translation_transfer.main(
        [*transfer, "--val_pairs", "2", "--test_pairs", "3", "--output_dir", str(tmp_path / "tt")]
    )

    runs = {}
    for command in calls:
        out = Path(used(command, "--output_dir"))
        if used(command, "--sam_method") == "xsam":  # the run's folder (the transfer studies train into its model/)
            runs[out.parent if out.name == "model" else out] = command
    paper = [folder for folder in runs if "xsam-default" not in folder.name]
    default = [folder for folder in runs if "xsam-default" in folder.name]
    assert len(paper) == 4 and len(default) == 2  # the two studies, the two transfer studies
    for folder in paper:
        assert {flag: used(runs[folder], flag) for flag in PAPER} == PAPER, folder
    for folder in default:  # the package's defaults: nothing pinned
        assert used(runs[folder], "--extrapolate_after_drop") is None and used(runs[folder], "--alpha_max") is None


def test_the_benchmarks_schedules_are_configurations_of_the_table():
    assert "xsam" not in benchmark.CONFIGS  # its XSAM step without a search is xsam-nosearch
    shared = set(benchmark.CONFIGS) & set(CONFIGS)
    assert shared == {"sam", "asam"}
    for name in shared:  # the timed step's settings are the configuration's flags
        flags = CONFIGS[name]
        given = {flag[2:]: {"true": True}.get(value, value) for flag, value in zip(flags[::2], flags[1::2])}
        assert benchmark.CONFIGS[name][0] == given, name
    for name, (unit, plain_share, search) in benchmark.SCHEDULES.items():
        flags = dict(itertools.pairwise(CONFIGS[name]))
        settings = benchmark.CONFIGS[unit][0]
        assert float(flags.get("--sam_start_ratio", 0)) == plain_share, name
        assert int(flags.get("--sam_interval", 1)) == settings.get("sam_interval", 1), name
        assert (flags.get("--sam_reuse") == "true") == settings.get("sam_reuse", False), name
        assert (flags.get("--alpha_search") == "coarse_to_fine") == (search == "xsam-search-coarse"), name
        assert flags["--extrapolate_after_drop"] == "0" and flags["--alpha_max"] == "2", name  # the paper's rule


def test_docs_give_every_name_its_flags():
    text = (ROOT / "docs" / "study.md").read_text().split("## Configuration names", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    listed = {re.findall(r"`([^`]*)`", name)[0]: re.findall(r"`([^`]*)`", flags)[0] for name, flags, *_ in rows}
    assert listed == {name: shlex.join(flags) for name, flags in CONFIGS.items()}


def test_study_folders_recorded_before_the_table_are_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr(selection.subprocess, "run", None)  # nothing may train
    # two runs of docs/study/digits.json as the first version of the study recorded them (no step count)
    recorded = json.loads((ROOT / "docs" / "study" / "digits.json").read_text())["runs"]
    for method in ("none", "xsam"):
        record = next(r for r in recorded if (r["method"], r["label_noise"], r["seed"]) == (method, 0.4, 0))
        folder = tmp_path / "images" / image_run_name(0.4, 0.05, method, 0)
        folder.mkdir(parents=True)
        (folder / "study_run.json").write_text(json.dumps(record))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1410}))
    argv = ["--task", "digits", "--methods", "none", "xsam", "--label_noise", "0.4", "--seeds", "0", "--report_only"]
    study.main([*argv, "--output_dir", str(tmp_path / "images"), "--name", "old"])
    runs = json.loads((tmp_path / "images" / "old.json").read_text())["runs"]
    assert sorted((r["method"], r["steps"]) for r in runs) == [("none", 1410), ("xsam", 1410)]
    assert (
        "| 0.4 | 0.05 | xsam | 0.847 ± 0.000 | 0.863 ± 0.000 | 24.0 ± 0.0 |"
        in (tmp_path / "images" / "old.md").read_text()
    )

    # and two of docs/study/multi30k.json, whose xsam passed --extrapolate_after_drop 0 with AdamW: the paper's rule
    recorded = json.loads((ROOT / "docs" / "study" / "multi30k.json").read_text())["runs"]
    keys = [("xsam", 0.05, 0), ("none", None, 0)]
    for config, rho, seed in keys:
        record = next(r for r in recorded if (r["config"], r["rho"], r["seed"]) == (config, rho, seed))
        folder = tmp_path / "multi30k" / translation_run_name(config, rho, 0)
        folder.mkdir(parents=True)
        (folder / "study_run.json").write_text(json.dumps(record))
    argv = ["--methods", "none", "xsam", "--seeds", "0", "--report_only", "--output_dir", str(tmp_path / "multi30k")]
    translation_study.main(argv)  # no data: only training reads it
    xsam, none = (next(r for r in recorded if (r["config"], r["rho"], r["seed"]) == key) for key in keys)
    difference = xsam["test_bleu"] - none["test_bleu"]
    assert (
        f"| 0.05 | xsam − none | {difference:.2f} ± 0.00 | 1 of 1 |"
        in (tmp_path / "multi30k" / "results.md").read_text()
    )


def legacy(folder: Path, old: str) -> None:
    """Make a finished transfer run look as before the table: its record without flags, under the old name."""
    record = json.loads((folder / "study_run.json").read_text())
    del record["flags"]
    (folder / "study_run.json").write_text(json.dumps({**record, "config": old}))
    folder.rename(folder.with_name(folder.name.replace(TRANSFER_RENAMED[old], old)))


def test_transfer_runs_recorded_under_the_old_names_are_found_and_renamed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(selection.subprocess, "run", fake_fine_tuning(calls))
    argv = [
        "--data_dir",
        str(cifar_like(tmp_path)),
        "--model",
        "m",
        "--output_dir",
        str(tmp_path / "out"),
        "--sizes",
        "2",
    ]
    argv += ["--seeds", "0", "--lrs", "1e-3", "--rhos", "0.1", "--configs", "xsam-default", "--name", "tiny"]
    transfer_study.main(argv)
    assert len(calls) == 2
    legacy(tmp_path / "out" / "n2-xsam-default-lr0.001-rho0.1-seed0", "xsam")
    transfer_study.main(argv)
    assert len(calls) == 2  # found under its old name: not trained again
    runs = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert sorted(r["config"] for r in runs) == ["adamw", "xsam-default"]
    assert "| 2 | xsam-default | 0.001 | 0.1 | 1 |" in (tmp_path / "out" / "tiny.md").read_text()
    with pytest.raises(ValueError, match="recorded as xsam before benchmarks/configs.py, which is xsam-default now"):
        transfer_study.main([*argv[:-4], "--configs", "xsam"])

    monkeypatch.setattr(selection.subprocess, "run", fake_translation_fine_tuning(calls))
    argv = [
        "--output_dir",
        str(tmp_path / "mt"),
        "--sizes",
        "5",
        "--val_pairs",
        "2",
        "--test_pairs",
        "3",
        "--seeds",
        "0",
    ]
    argv += ["--lrs", "1e-3", "--rhos", "0.1", "--configs", "xsam-late50-i2-reuse", "--name", "tiny"]
    translation_transfer.main(argv)
    assert len(calls) == 2 + 4  # pretraining, its score, AdamW, the cheap schedule
    legacy(tmp_path / "mt" / "n5-xsam-late50-i2-reuse-lr0.001-rho0.1-seed0", "cheap")
    translation_transfer.main(argv)
    assert len(calls) == 6
    runs = json.loads((tmp_path / "mt" / "tiny.json").read_text())["runs"]
    assert sorted(r["config"] for r in runs) == ["adamw", "xsam-late50-i2-reuse"]

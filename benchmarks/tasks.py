"""The tasks a study runs (``--task`` of benchmarks/study.py), each with what is specific to it.

- ``digits`` and ``cifar10``: image classification with ``scripts/classify_images.py``, compared on test
  accuracy; settings label noise x rho x configuration x seed. It evaluates every epoch, on the evaluation split and
  on some training images as trained on (noisy labels), and keeps per run: final accuracy, best accuracy and its
  epoch, both curves, the training loss and XSAM's alpha per epoch, the passes and search forwards per step.
- ``multi30k``: translation with ``scripts/translate.py`` (a Marian model and a tokenizer built from scratch on the
  first ``--max_train_samples`` pairs of Multi30k De->En), compared on test BLEU; settings rho x configuration x
  seed. It evaluates every epoch on ``val.de-en.jsonl`` (loss, BLEU, chrF with greedy decoding), keeps the
  checkpoint of the best validation BLEU, and translates ``test_2016_flickr.de-en.jsonl`` twice: with the final
  weights and with the best checkpoint's (a second call of the script). Per run: both test scores, the validation
  curves, the training loss and XSAM's alpha per epoch.

A task gives its script, its flags before the user's (data and sizing, ``defaults``) and after them (what every run
needs for the report, ``study_flags``), its metric and the order of the report's rows, a run's record (``study_run.json`` in the run's folder, with the
wall time) and folder name, and its summary (benchmarks/study_report.py). A run's setting holds its configuration's
name under ``config_key`` and otherwise script flags (``seed``, ``rho``, ``label_noise``).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import study_report
from selection import logged_cost, run_script

__all__ = [
    "TASKS",
    "MULTI30K_FILES",
    "Task",
    "ImageTask",
    "TranslationTask",
    "image_run_name",
    "translation_run_name",
]

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# the Multi30k release as JSON lines ({"translation": {"de": ..., "en": ...}}), in the folder --data_dir names
MULTI30K_FILES = {
    "train": "train.de-en.jsonl",
    "validation": "val.de-en.jsonl",
    "test": "test_2016_flickr.de-en.jsonl",
}
# what every run needs for the report, after the task's and the user's flags
_CURVES = [
    "--overwrite_output_dir",  # each run trains afresh into its folder, which holds its log.txt
    "true",
    "--eval_strategy",
    "epoch",
    "--logging_strategy",
    "epoch",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]
# the flags of the training run that the translation of the test set with the best checkpoint must repeat
_PREDICT_FLAGS = ("--source_lang", "--target_lang", "--max_source_length", "--max_target_length", "--num_beams")


def _last(flags: list[str], flag: str) -> str:
    """The value the script uses: a repeated flag's last one."""
    return [value for name, value in itertools.pairwise(flags) if name == flag][-1]


def image_run_name(label_noise: float, rho: float, method: str, seed: int) -> str:
    """The folder of one image run inside the study's output folder."""
    return f"noise{label_noise:g}-rho{rho:g}-{method}-seed{seed}"


def translation_run_name(config: str, rho: float | None, seed: int) -> str:
    """The folder of one translation run inside the study's output folder (no rho for a configuration without)."""
    return f"{config}-seed{seed}" if rho is None else f"rho{rho:g}-{config}-seed{seed}"


def _image_summary(log_history: list[dict], final_accuracy: float) -> dict:
    """Curves and their summary from a run's ``trainer_state.json`` log history (epoch-wise logs)."""

    def by_epoch(key: str) -> list[dict]:
        return sorted((log for log in log_history if key in log), key=lambda log: log["epoch"])

    evals = by_epoch("eval_validation_accuracy")
    curve = [log["eval_validation_accuracy"] for log in evals]
    best = max(range(len(curve)), key=curve.__getitem__)
    train_logs = [log for log in log_history if "loss" in log]
    cost = logged_cost(train_logs)
    return {
        "final_accuracy": final_accuracy,
        "best_accuracy": curve[best],
        "best_epoch": round(evals[best]["epoch"]),
        "curve": curve,
        "train_curve": [log["eval_train_accuracy"] for log in by_epoch("eval_train_accuracy")],
        "train_loss": [log["loss"] for log in train_logs],
        "alpha": [log["xsam/alpha"] for log in train_logs if "xsam/alpha" in log],
        **({"passes": cost[0], "search_forwards": cost[1]} if cost else {}),
    }


def _translation_summary(log_history: list[dict]) -> dict:
    """Validation curves, their best epoch, training loss and alpha from a run's epoch-wise log history."""
    evals = sorted((log for log in log_history if "eval_bleu" in log), key=lambda log: log["epoch"])
    train_logs = sorted((log for log in log_history if "loss" in log), key=lambda log: log["epoch"])
    bleu = [log["eval_bleu"] for log in evals]
    loss = [log["eval_loss"] for log in evals]
    best = max(range(len(bleu)), key=bleu.__getitem__)
    lowest = min(range(len(loss)), key=loss.__getitem__)
    return {
        "val_bleu": bleu,
        "val_chrf": [log["eval_chrf"] for log in evals],
        "val_loss": loss,
        "best_val_bleu": bleu[best],
        "best_epoch": round(evals[best]["epoch"]),
        "lowest_val_loss_epoch": round(evals[lowest]["epoch"]),
        "train_loss": [log["loss"] for log in train_logs],
        "alpha": [log["xsam/alpha"] for log in train_logs if "xsam/alpha" in log],
    }


@dataclass(frozen=True)
class ImageTask:
    """Image classification with ``scripts/classify_images.py``; ``data``: the task reads CIFAR-10's
    ``train.parquet`` and ``test.parquet`` (column ``img``) from ``--data_dir`` (else the script's digits)."""

    name: str
    defaults: list[str]
    data: bool = False
    script: ClassVar[Path] = SCRIPTS / "classify_images.py"
    metric: ClassVar[str] = "accuracy"
    rows: ClassVar[str] = "table"  # the report's rows in the order of benchmarks/configs.py
    config_key: ClassVar[str] = "method"
    label_noise: ClassVar[bool] = True
    study_flags: ClassVar[list[str]] = [*_CURVES, "--save_strategy", "no"]
    output_dir: ClassVar[str] = "runs/study"
    data_env: ClassVar[str | None] = None

    def data_flags(self, data_dir: str | None) -> list[str]:
        if not self.data:
            return []
        if data_dir is None:
            raise ValueError(f"No data: --task {self.name} needs --data_dir, the folder of its parquet files")
        files = ["--train_file", f"{data_dir}/train.parquet", "--validation_file", f"{data_dir}/test.parquet"]
        return [*files, "--image_column_name", "img"]

    def setting(self, config: str, seed: int, rho: float, rho_free: bool, label_noise: float) -> dict:
        """A run's setting; a configuration without rho keeps the study's first rho (in its folder name too)."""
        return {"method": config, "seed": seed, "label_noise": label_noise, "rho": rho}

    def run_name(self, setting: dict) -> str:
        return image_run_name(**setting)

    def train(self, flags: list[str], setting: dict, out: Path) -> dict:
        """Run the script with ``flags`` into ``out`` and record the run."""
        wall_s = run_script(self.script, flags, out / "log.txt")
        state = json.loads((out / "trainer_state.json").read_text())
        final = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
        result = {
            "task": self.name,
            **setting,
            "wall_s": wall_s,
            "steps": state["global_step"],
            **_image_summary(state["log_history"], final),
        }
        (out / "study_run.json").write_text(json.dumps(result, indent=1))
        return result

    def recorded(self, out: Path) -> dict:
        result = json.loads((out / "study_run.json").read_text())
        if "steps" not in result:  # recorded before the step count was: the run's trainer state has it
            result["steps"] = json.loads((out / "trainer_state.json").read_text())["global_step"]
        return result

    def summary(self, results: list[dict], order: list[str], configs: dict, grid_end: dict) -> str:
        return study_report.accuracy_summary(results, order, configs, grid_end)

    def plot(self, results: list[dict], order: list[str], stem: Path) -> None:
        study_report.plot_accuracy(results, order, Path(f"{stem}.png"))
        study_report.plot_cost(results, order, Path(f"{stem}-cost.png"))


@dataclass(frozen=True)
class TranslationTask:
    """Translation with ``scripts/translate.py`` on the three files of ``MULTI30K_FILES`` in ``--data_dir`` (default
    ``$MULTI30K_DIR``)."""

    name: str
    defaults: list[str]
    script: ClassVar[Path] = SCRIPTS / "translate.py"
    metric: ClassVar[str] = "BLEU"
    rows: ClassVar[str] = "methods"  # the report's rows in the order of --methods
    config_key: ClassVar[str] = "config"
    label_noise: ClassVar[bool] = False
    study_flags: ClassVar[list[str]] = [
        *_CURVES,
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--predict_with_generate",
        "--save_strategy",
        "best",
        "--metric_for_best_model",
        "bleu",
        "--save_total_limit",
        "1",
        "--save_only_model",
        "true",
    ]
    output_dir: ClassVar[str] = "runs/translation-study"
    data_env: ClassVar[str | None] = "MULTI30K_DIR"

    def data_flags(self, data_dir: str | None) -> list[str]:
        if data_dir is None:
            raise ValueError("No data: pass --data_dir or set MULTI30K_DIR to the folder of the Multi30k JSON lines")
        missing = [name for name in MULTI30K_FILES.values() if not (Path(data_dir) / name).is_file()]
        if missing:
            raise ValueError(f"Invalid --data_dir {str(data_dir)!r}: {', '.join(missing)} not found there")
        return [
            arg for split, name in MULTI30K_FILES.items() for arg in (f"--{split}_file", str(Path(data_dir) / name))
        ]

    def setting(self, config: str, seed: int, rho: float, rho_free: bool, label_noise: None) -> dict:
        """A run's setting; a configuration without rho has rho None."""
        return {"config": config, "rho": None if rho_free else rho, "seed": seed}

    def run_name(self, setting: dict) -> str:
        return translation_run_name(**setting)

    def train(self, flags: list[str], setting: dict, out: Path) -> dict:
        """Train with ``flags`` into ``out``, translate the test set with the best checkpoint, record the run."""
        wall_s = run_script(self.script, flags, out / "log.txt")
        state = json.loads((out / "trainer_state.json").read_text())
        final = json.loads((out / "predict_results.json").read_text())
        repeated = [arg for flag in _PREDICT_FLAGS if flag in flags for arg in (flag, _last(flags, flag))]
        best_flags = [
            "--model_name_or_path",
            state["best_model_checkpoint"],
            "--test_file",
            _last(flags, "--test_file"),
        ]
        best_flags += [*repeated, "--do_predict", "--predict_with_generate", "--per_device_eval_batch_size", "100"]
        run_script(
            self.script, [*best_flags, "--report_to", "none", "--output_dir", str(out / "best")], out / "log_best.txt"
        )
        best = json.loads((out / "best" / "predict_results.json").read_text())
        result = {
            **setting,
            "wall_s": wall_s,
            "test_bleu": final["predict_bleu"],
            "test_chrf": final["predict_chrf"],
            "best_test_bleu": best["predict_bleu"],
            "best_test_chrf": best["predict_chrf"],
            **_translation_summary(state["log_history"]),
        }
        (out / "study_run.json").write_text(json.dumps(result, indent=1))
        return result

    def recorded(self, out: Path) -> dict:
        return json.loads((out / "study_run.json").read_text())

    def summary(self, results: list[dict], order: list[str], configs: dict, grid_end: dict) -> str:
        return study_report.bleu_summary(results, order, configs, grid_end)

    def plot(self, results: list[dict], order: list[str], stem: Path) -> None:
        study_report.plot_bleu(results, order, Path(f"{stem}.png"))


Task = ImageTask | TranslationTask

TASKS: dict[str, Task] = {
    # the script's embedded digits and ViT; no augmentation or dropout, so that AdamW can memorise the noise
    "digits": ImageTask("digits", ["--min_crop_scale", "1", "--dropout", "0", "--eval_train_samples", "500"]),
    "cifar10": ImageTask(
        "cifar10",
        [
            *("--do_train", "--do_eval", "--image_size", "32", "--patch_size", "4", "--hidden_size", "96"),
            *("--num_hidden_layers", "4", "--intermediate_size", "192", "--learning_rate", "1e-3"),
            *("--weight_decay", "0.05", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05"),
            *("--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256"),
            *("--min_crop_scale", "0.8", "--eval_train_samples", "1000"),
        ],
        data=True,
    ),
    # the sizing probed on one core (docs/study.md, "Translation: Multi30k with little data")
    "multi30k": TranslationTask(
        "multi30k",
        [
            *("--source_lang", "de", "--target_lang", "en", "--max_train_samples", "2000"),
            *("--max_eval_samples", "300", "--vocab_size", "4000", "--max_source_length", "64"),
            *("--max_target_length", "64", "--per_device_train_batch_size", "32"),
            *("--per_device_eval_batch_size", "100", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine"),
            *("--warmup_steps", "0.05", "--weight_decay", "0.01", "--num_train_epochs", "20"),
        ],
    ),
}

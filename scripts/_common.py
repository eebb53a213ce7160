"""What the hf_xsam example scripts share: parsing, logging, checkpoint detection, metrics and the Hub.

Each script keeps the order of the transformers example scripts in its own ``main()``; this module only
holds the steps that would otherwise be copied word for word between them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

__all__ = [
    "parse_arguments",
    "setup_logging",
    "detect_last_checkpoint",
    "build_trainer",
    "save_model",
    "record_metrics",
    "finish",
]

logger = logging.getLogger(__name__)


def parse_arguments(
    parser: HfArgumentParser,
    data_and_model_options: set[str],
    embedded_defaults: dict[str, Any],
    argv: Sequence[str] | None = None,
) -> tuple[Any, ...]:
    """Parse the command line, or a JSON file given as the only argument, into the parser's dataclasses.

    When none of ``data_and_model_options`` is given, the script runs on its embedded data and model, and
    ``embedded_defaults`` replace the dataclass defaults; options given explicitly still win (``--help`` shows
    the dataclass defaults and lists the embedded ones after the options). A multi-process launch that
    transformers would not set up as data parallel (CPU without ``--use_cpu``) is refused.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.epilog = (
        f"With none of {', '.join('--' + name for name in sorted(data_and_model_options))}, the script runs on its "
        f"embedded data, with these defaults: {', '.join(f'--{k} {v}' for k, v in embedded_defaults.items())}."
    )
    if len(argv) == 1 and argv[0].endswith(".json"):
        values = json.loads(Path(argv[0]).read_text())
        if not data_and_model_options & values.keys():
            values = {**embedded_defaults, **values}
        parsed = parser.parse_dict(values)
    else:
        given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
        actions = [action for action in parser._actions if action.dest in data_and_model_options]
        flags = {flag for action in actions for flag in action.option_strings}
        if not given & (flags | {"-h", "--help"}):
            parser.set_defaults(**embedded_defaults)
        parsed = parser.parse_args_into_dataclasses(args=argv)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    training_args = next(each for each in parsed if isinstance(each, TrainingArguments))
    if launched > training_args.world_size:
        raise ValueError(
            f"{launched} processes were launched, but they would each train alone: on CPU, transformers sets up "
            "data parallel training only with --use_cpu. Pass --use_cpu, or launch a single process."
        )
    return parsed


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger) -> None:
    """Log to stdout at the Trainer's per-process level, as the transformers example scripts do."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for each in (script_logger, logger):
        each.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    script_logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"distributed training: {training_args.parallel_mode.value != 'not_parallel'}, "
        f"16-bits training: {training_args.fp16 or training_args.bf16}"
    )


def detect_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint``, else the newest one in ``--output_dir``."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    last_checkpoint = get_last_checkpoint(training_args.output_dir)
    if last_checkpoint is not None:
        logger.info(
            f"Checkpoint detected, resuming training at {last_checkpoint}. To train afresh, pass another "
            "`--output_dir`."
        )
    return last_checkpoint


def build_trainer(trainer_class: type[Trainer], **kwargs: Any) -> Trainer:
    """``trainer_class(**kwargs)``, explaining a failure to create the Hub repository (``--push_to_hub``).

    The Trainer creates the repository when it is built, so an offline machine or a missing token stops the
    run before any training.
    """
    try:
        return trainer_class(**kwargs)
    except Exception as err:
        if not _raised_in(err, "init_hf_repo"):
            raise
        raise RuntimeError(
            f"--push_to_hub: creating the Hub repository failed ({type(err).__name__}: {err}); nothing has been "
            "trained yet. Log in (`hf auth login`) and check the connection, or run without --push_to_hub and "
            "upload --output_dir later with `hf upload`."
        ) from err


def save_model(trainer: Trainer) -> None:
    """``trainer.save_model()``. With ``--push_to_hub`` it also uploads; a failed upload only warns, since
    :func:`finish` uploads again once the metrics and the model card are written."""
    try:
        trainer.save_model()
    except Exception as err:
        if not _raised_in(err, "push_to_hub"):
            raise
        logger.warning(
            f"Uploading to the Hub failed ({type(err).__name__}: {err}); the model is saved in "
            f"{os.path.abspath(trainer.args.output_dir)}. The upload is tried again at the end."
        )


def record_metrics(trainer: Trainer, split: str, metrics: dict[str, float], num_samples: int) -> None:
    """Log and save ``metrics`` (``{split}_results.json``) with the number of samples they cover."""
    metrics[f"{split}_samples"] = num_samples
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)


def finish(trainer: Trainer, **card_kwargs: Any) -> None:
    """Write the model card, and push model, processor and card when ``--push_to_hub`` is on.

    The push goes through ``Trainer.push_to_hub``. The model is saved before the upload starts, so a failed
    upload (offline, no token) leaves everything in ``--output_dir``; the error says so.
    """
    args = trainer.args
    if not args.push_to_hub:
        trainer.create_model_card(**card_kwargs)
        return
    try:
        trainer.push_to_hub(**card_kwargs)
    except Exception as err:
        raise RuntimeError(
            f"Pushing to the Hub failed ({type(err).__name__}: {err}). The model, its processor, the metrics and "
            f"the model card are saved in {os.path.abspath(args.output_dir)}; upload them later with "
            f"`hf upload {trainer.hub_model_id or Path(args.output_dir).name} {args.output_dir}` once online and "
            "logged in (`hf auth login`)."
        ) from err


def _raised_in(err: BaseException, function_name: str) -> bool:
    return any(frame.name == function_name for frame in traceback.extract_tb(err.__traceback__))

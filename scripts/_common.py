"""What the hf_xsam example scripts share: parsing, logging, checkpoint detection, metrics and the Hub.

Each script keeps the order of the transformers example scripts in its own ``main()``; this module only
holds the steps that would otherwise be copied word for word between them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import datasets
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

__all__ = [
    "UsageError",
    "HubUnavailable",
    "run",
    "parse_arguments",
    "from_hub",
    "setup_logging",
    "detect_last_checkpoint",
    "build_trainer",
    "save_model",
    "record_metrics",
    "finish",
]

logger = logging.getLogger(__name__)

# Errors of the Hub client and of the network under it (huggingface_hub's transport errors, its offline mode and
# cache misses, the `datasets` library's ConnectionError, and requests' errors where a library still uses it).
HUB_ERRORS: tuple[type[BaseException], ...] = (
    hub_errors.HTTPError,
    hub_errors.OfflineModeIsEnabled,
    hub_errors.LocalEntryNotFoundError,
    hub_errors.LocalTokenNotFoundError,
    ConnectionError,
)
try:
    import requests

    HUB_ERRORS += (requests.RequestException,)
except ImportError:  # pragma: no cover - requests is optional for huggingface_hub >= 1
    pass


class UsageError(ValueError):
    """A command line the script cannot run, or data and models that do not fit it (a column or language that is
    not there): :func:`run` prints it as one line and exits with status 2."""


class HubUnavailable(RuntimeError):
    """Something to load from the Hub that cannot be had: :func:`run` prints it as one line and exits with 1."""


def run(main: Callable[[], None]) -> None:
    """Run a script's ``main()``; a :class:`UsageError` or :class:`HubUnavailable` ends it with one line on stderr.

    Under ``torchrun`` or ``accelerate launch`` only the process of rank 0 prints it; every process exits with the
    same status. Any other exception keeps its traceback.
    """
    try:
        main()
    except UsageError as err:
        _refuse(str(err), status=2)
    except HubUnavailable as err:
        _refuse(str(err), status=1)


def _refuse(message: str, status: int) -> NoReturn:
    if os.environ.get("RANK", "0") == "0":
        print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


def _raise_usage_error(message: str) -> NoReturn:
    raise UsageError(message)


def parse_arguments(
    parser: HfArgumentParser,
    data_and_model_options: set[str],
    embedded_defaults: dict[str, Any],
    argv: Sequence[str] | None = None,
    run_flags: Sequence[str] = ("do_train", "do_eval"),
) -> tuple[Any, ...]:
    """Parse the command line, or a JSON file given as the only argument, into the parser's dataclasses.

    When none of ``data_and_model_options`` is given, the script runs on its embedded data and model, and
    ``embedded_defaults`` replace the dataclass defaults; options given explicitly still win (``--help`` shows
    the dataclass defaults and lists the embedded ones after the options).

    Raises :class:`UsageError` (one line, naming the flag) for an unknown or abbreviated flag, an invalid value,
    none of ``run_flags`` switched on, and a multi-process launch that transformers would not set up as data
    parallel (CPU without ``--use_cpu``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.allow_abbrev = False  # `--model_name x` must not pass for --model_name_or_path
    parser.error = _raise_usage_error  # one line instead of the usage dump, see `run`
    parser.epilog = (
        f"With none of {', '.join('--' + name for name in sorted(data_and_model_options))}, the script runs on its "
        f"embedded data, with these defaults: {', '.join(f'--{k} {v}' for k, v in embedded_defaults.items())}."
    )
    try:
        parsed = _parse(parser, data_and_model_options, embedded_defaults, argv)
    except UsageError:
        raise
    except ValueError as err:  # a dataclass's validation: "Invalid rho: ..." names the field; name the flag
        dests = {action.dest for action in parser._actions}
        message = re.sub(r"^Invalid (\w+)", lambda m: f"Invalid --{m[1]}" if m[1] in dests else m[0], str(err))
        raise UsageError(message) from err
    training_args = next(each for each in parsed if isinstance(each, TrainingArguments))
    if not any(getattr(training_args, flag) for flag in run_flags):
        raise UsageError(
            f"Nothing to do: pass {' and/or '.join('--' + flag for flag in run_flags)} (only the embedded run, "
            f"with none of {', '.join('--' + name for name in sorted(data_and_model_options))}, switches them on "
            "itself)"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > training_args.world_size:
        raise UsageError(
            f"{launched} processes were launched, but they would each train alone: on CPU, transformers sets up "
            "data parallel training only with --use_cpu. Pass --use_cpu, or launch a single process."
        )
    return parsed


def _parse(
    parser: HfArgumentParser, data_and_model_options: set[str], embedded_defaults: dict[str, Any], argv: list[str]
) -> tuple[Any, ...]:
    if len(argv) == 1 and argv[0].endswith(".json"):
        values = json.loads(Path(argv[0]).read_text())
        if not data_and_model_options & values.keys():
            values = {**embedded_defaults, **values}
        return parser.parse_dict(values)
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    actions = [action for action in parser._actions if action.dest in data_and_model_options]
    flags = {flag for action in actions for flag in action.option_strings}
    if not given & (flags | {"-h", "--help"}):
        parser.set_defaults(**embedded_defaults)
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (flags are spelled out in full; see --help)")
    return tuple(parsed)


@contextlib.contextmanager
def from_hub(what: str) -> Iterator[None]:
    """Turn a failure to get ``what`` (e.g. ``"the model 'org/name'"``) from the Hub into :class:`HubUnavailable`.

    The failure is recognised by the types of the exceptions in the chain (huggingface_hub's and the network's),
    and the message says why: offline and not in the cache, the Hub not reachable, or no such repository.
    """
    try:
        yield
    except Exception as err:
        reason = _hub_failure(err)
        if reason is None:
            raise
        raise HubUnavailable(f"Could not load {what}: {reason}") from err


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _hub_failure(err: BaseException) -> str | None:
    """Why the Hub could not deliver, judged by the exception types in ``err``'s chain; None if it is not that."""
    chain = list(_chain(err))
    if any(isinstance(each, (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError)) for each in chain):
        return (
            "there is no such local folder, and no such repository on the Hub that this token may read "
            "(check the name; pass --token for a private or gated one)"
        )
    if any(isinstance(each, hub_errors.RevisionNotFoundError) for each in chain):
        return "the repository has no such revision (--model_revision)"
    if any(isinstance(each, hub_errors.HFValidationError) for each in chain):
        return "it is neither a local folder nor a valid Hub repository id"
    if not any(isinstance(each, HUB_ERRORS) for each in chain):
        return None
    if hub_constants.HF_HUB_OFFLINE:
        return (
            "this machine is offline (HF_HUB_OFFLINE) and it is not in the local cache; download it once while online "
            "(`hf download`), or pass a local folder"
        )
    return (
        "the Hub could not be reached and it is not in the local cache; check the connection, or pass a local folder"
    )


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
    except HUB_ERRORS as err:
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
    except HUB_ERRORS as err:
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
    except HUB_ERRORS as err:
        raise RuntimeError(
            f"Pushing to the Hub failed ({type(err).__name__}: {err}). The model, its processor, the metrics and "
            f"the model card are saved in {os.path.abspath(args.output_dir)}; upload them later with "
            f"`hf upload {trainer.hub_model_id or Path(args.output_dir).name} {args.output_dir}` once online and "
            "logged in (`hf auth login`)."
        ) from err

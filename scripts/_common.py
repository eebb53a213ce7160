"""What the hf_xsam example scripts share: the start of ``main()`` (parsing, checks, logging, the checkpoint to
resume, the seed), loading data, the trainer, training and saving, the model card and the Hub, and the error
contract (:func:`run`).

Each script keeps the order of the transformers example scripts in its own ``main()``; this module holds the steps
that would otherwise be copied between them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets
import transformers
from datasets import DatasetDict, load_dataset
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME

from hf_xsam import SaveOnInterruptCallback, TrainingInterrupted
from hf_xsam.resume import ResumeError

__all__ = [
    "UsageError",
    "RunError",
    "Terminated",
    "OutputDirArguments",
    "HubUnavailable",
    "run",
    "start",
    "parse_arguments",
    "check_output_dir",
    "from_hub",
    "setup_logging",
    "detect_last_checkpoint",
    "newest_whole_checkpoint",
    "check_checkpoint",
    "load_data",
    "pick_splits",
    "shared_tokenizer",
    "built_from_config",
    "dataset_identity",
    "build_trainer",
    "train_and_save",
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


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside the command line (the Hub, the file system): :func:`run`
    prints it as one line and exits with status 1."""


class HubUnavailable(RunError):
    """Something to load from the Hub that cannot be had."""


@dataclass
class OutputDirArguments:
    """What to do with an ``--output_dir`` that already holds something (the transformers examples' flag, which
    transformers 5 dropped from ``TrainingArguments``)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into --output_dir even when it holds files but no checkpoint to resume (an earlier run's "
            "model and card are then replaced), and train afresh rather than resume from a checkpoint there."
        },
    )


def run(main: Callable[[], None]) -> None:
    """Run a script's ``main()``, ending a failure the user can fix with one line on stderr.

    :class:`UsageError` exits with status 2, :class:`RunError` with 1, and Ctrl-C (SIGINT) or SIGTERM with 130 or 143,
    after the line that names the checkpoint saved at the interrupted step (:class:`~hf_xsam.SaveOnInterruptCallback`)
    and how to resume; outside training SIGTERM stops the script as Ctrl-C does. Under ``torchrun`` or
    ``accelerate launch`` only the process of rank 0 prints, every process exits with the same status, and SIGTERM
    keeps its own action. Writes to stdout and stderr never raise (:class:`_NeverRaises`): with ``| tee``, Ctrl-C
    stops tee too, and the closed pipe must not prevent the checkpoint. Any other exception keeps its traceback.
    """
    with _streams_that_never_raise(), _sigterm_raises():
        try:
            main()
        except UsageError as err:
            _refuse(str(err), status=2)
        except RunError as err:
            _refuse(str(err), status=1)
        except TrainingInterrupted as err:
            _stop(
                f"{_STOPPED_BY[err.signum]} at step {err.step}; saved the checkpoint {err.checkpoint}. Resume with "
                f"--resume_from_checkpoint {err.checkpoint}, or run the same command again: it resumes from the newest "
                "checkpoint in --output_dir",
                status=128 + err.signum,
            )
        except KeyboardInterrupt as err:
            signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
            _stop(f"{_STOPPED_BY[signum]}; nothing saved since the last checkpoint", status=128 + signum)


_STOPPED_BY = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt`` (see :func:`run`)."""


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in a single process, in the main thread, unless it is ignored."""
    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _NeverRaises:
    """A text stream whose writes never raise: after the first failure (the reader of the pipe is gone) the file
    descriptor is pointed at /dev/null, so every other writer holding the stream (logging, progress bars) goes on
    too, and so does the flush at exit."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor: dropping is enough
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _streams_that_never_raise() -> Iterator[None]:
    found = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _NeverRaises(sys.stdout), _NeverRaises(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):  # a closed pipe found now, not by the flush at exit (status 120)
            stream.flush()
        sys.stdout, sys.stderr = found


def _say(message: str) -> None:
    """Print ``<script>: message`` as one line on stderr, from the process of rank 0 only; a closed stderr does not
    raise."""
    if os.environ.get("RANK", "0") == "0":
        with contextlib.suppress(OSError):
            print(f"{os.path.basename(sys.argv[0])}: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _refuse(message: str, status: int) -> NoReturn:
    _stop(f"error: {message}", status)


def _stop(message: str, status: int) -> NoReturn:
    _say(message)
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

    Warns in one line when ``accelerate launch`` was asked for several processes but started one, which then trains
    alone. Raises :class:`UsageError` (one line, naming the flag) for an unknown or abbreviated flag, an invalid value,
    none of ``run_flags`` switched on, and a multi-process launch that transformers would not set up as data
    parallel (CPU without ``--use_cpu``).
    """
    if "WORLD_SIZE" not in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ:
        # accelerate's single-process launcher sets MASTER_ADDR only when asked for several processes or machines
        _say(
            "warning: accelerate launch was asked for several processes but started one (its --cpu flag and CPU "
            "configs run a single process), which trains alone. For several CPU processes, launch with --config_file "
            "scripts/accelerate_configs/multi_cpu.yaml and pass --use_cpu.",
        )
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


def start(
    parser: HfArgumentParser,
    data_and_model_options: set[str],
    embedded_defaults: dict[str, Any],
    script_logger: logging.Logger,
    run_flags: Sequence[str] = ("do_train", "do_eval"),
    models: tuple[Mapping[Any, Any], str] | None = None,
) -> tuple[Any, ...]:
    """Steps 1 to 4 of a script: parse (:func:`parse_arguments`), check that ``--output_dir`` can be written, set up
    logging, find the checkpoint to resume from (:func:`detect_last_checkpoint`) and check it
    (:func:`check_checkpoint`, with ``models``: the configs the script trains and what it calls them), seed.

    Returns the parsed dataclasses followed by the checkpoint to resume from (or None).
    """
    parsed = parse_arguments(parser, data_and_model_options, embedded_defaults, run_flags=run_flags)
    training_args = next(each for each in parsed if isinstance(each, TrainingArguments))
    overwrite = any(each.overwrite_output_dir for each in parsed if isinstance(each, OutputDirArguments))
    check_output_dir(training_args.output_dir)
    if training_args.do_train and os.path.isdir(training_args.output_dir) and not overwrite:
        _checkpoint_to_resume(training_args.output_dir)  # refuse before any log line
    resume = training_args.resume_from_checkpoint
    if resume is not None:
        check_checkpoint(resume, "--resume_from_checkpoint", models)
    setup_logging(training_args, script_logger)
    script_logger.info(f"Training/evaluation parameters {training_args}")
    last_checkpoint = detect_last_checkpoint(training_args, overwrite)
    if last_checkpoint is not None and resume is None:
        check_checkpoint(last_checkpoint, "the newest checkpoint in --output_dir,", models)
    set_seed(training_args.seed)
    return (*parsed, last_checkpoint)


def check_output_dir(output_dir: str) -> None:
    """Check, before anything is trained, that ``output_dir`` is a folder this process can write, or can create.

    Raises :class:`UsageError` when it (or a part of its path) is a file, :class:`RunError` when it cannot be written.
    """
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == os.path.abspath(output_dir) else f"lies under the file {existing!r}"
        raise UsageError(f"--output_dir {output_dir!r} {what}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RunError(
            f"--output_dir {output_dir!r}: cannot write in {existing!r} ({err.strerror}); nothing has been trained. "
            "Pass a folder you can write."
        ) from err


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


def detect_last_checkpoint(training_args: TrainingArguments, overwrite_output_dir: bool = False) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint``, else the newest one in ``--output_dir`` (none
    with ``overwrite_output_dir``).

    As in the transformers examples, a run that trains refuses (:class:`UsageError`) an ``--output_dir`` that holds
    files but no checkpoint, an earlier run's model that it would replace, unless ``overwrite_output_dir``.
    """
    output_dir = training_args.output_dir
    if not (training_args.do_train and os.path.isdir(output_dir)) or overwrite_output_dir:
        return training_args.resume_from_checkpoint
    last_checkpoint = _checkpoint_to_resume(output_dir)
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if last_checkpoint is not None:
        logger.info(
            f"Checkpoint detected, resuming training at {last_checkpoint}. To train afresh, pass another "
            "`--output_dir` or `--overwrite_output_dir`."
        )
    return last_checkpoint


def _checkpoint_to_resume(output_dir: str) -> str | None:
    """The newest whole checkpoint in ``output_dir``; :class:`UsageError` if there is none but there are other
    files."""
    last_checkpoint = newest_whole_checkpoint(output_dir)
    if last_checkpoint is None and os.listdir(output_dir):
        raise UsageError(
            f"--output_dir {output_dir!r} already holds files (an earlier run's model?) and no checkpoint to resume; "
            "training would replace them. Pass --overwrite_output_dir to train into it anyway, or another --output_dir"
        )
    return last_checkpoint


def check_checkpoint(folder: str, what: str, models: tuple[Mapping[Any, Any], str] | None = None) -> None:
    """Check, before any model is built, that ``folder`` (named in messages as ``what``) is a checkpoint the
    Trainer saved: a folder with ``trainer_state.json`` and model weights, and, with ``models`` (a mapping keyed
    by config classes, such as ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING``, and what the script trains), a model
    of one of those kinds. Raises :class:`UsageError` naming what is missing or found.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"{what} {folder!r} is not a folder (a checkpoint-<step> folder)")
    names = os.listdir(folder)
    if TRAINER_STATE_NAME not in names:
        raise UsageError(
            f"{what} {folder!r} is not a checkpoint: it has no {TRAINER_STATE_NAME} (pass a checkpoint-<step> "
            "folder that a run saved)"
        )
    # model.safetensors and its index, pytorch_model.bin, FSDP's pytorch_model_fsdp_0, PEFT's adapter_model.*
    if not any(name.startswith(("model", "pytorch_model", "adapter_model")) for name in names):
        raise UsageError(f"{what} {folder!r} holds no model weights: it is not a whole checkpoint")
    if models is None or CONFIG_NAME not in names:
        return
    mapping, kind = models
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UsageError(f"{what} {folder!r}: its {CONFIG_NAME} cannot be read ({err})") from err
    if type(config) not in mapping:
        raise UsageError(
            f"{what} {folder!r} holds a {config.model_type!r} model "
            f"({', '.join(config.architectures or ['unknown'])}); this script trains {kind}"
        )


def newest_whole_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the highest step that holds ``trainer_state.json``;
    each newer one that does not is named in a warning."""
    steps = {}
    for name in os.listdir(output_dir):
        found = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if found and os.path.isdir(os.path.join(output_dir, name)):
            steps[int(found[1])] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        if os.path.isfile(os.path.join(steps[step], TRAINER_STATE_NAME)):
            return steps[step]
        _say(
            f"warning: skipping {steps[step]}: it is incomplete (no {TRAINER_STATE_NAME}; its save was cut short). "
            "Delete it once you no longer need it."
        )
    return None


def load_data(
    dataset_name: str | None,
    dataset_config_name: str | None,
    files: dict[str, str | None],
    cache_dir: str | None = None,
    token: str | None = None,
) -> DatasetDict:
    """A dataset from the Hub, or local files by split (parquet, else JSON lines, by the first file's extension).

    Raises :class:`HubUnavailable` when the Hub cannot deliver, :class:`UsageError` for a file that is not there.
    """
    if dataset_name is not None:
        with from_hub(f"the dataset {dataset_name!r}"):
            return load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    files = {split: path for split, path in files.items() if path}
    for split, path in files.items():
        if not os.path.isfile(path):
            flag = "--train_file" if split == "train" else f"--{split}_file"
            raise UsageError(f"{flag} {path!r} does not exist")
    builder = "parquet" if next(iter(files.values())).endswith(".parquet") else "json"
    return load_dataset(builder, data_files=files, cache_dir=cache_dir)


def pick_splits(
    data: DatasetDict, training_args: TrainingArguments, wanted: dict[str, tuple[str, str, int | None]]
) -> dict[str, datasets.Dataset]:
    """The splits the run needs, each cut to its first ``limit`` rows.

    ``wanted`` maps a role (``"train"``) to the split's name in ``data``, the flag that needs it (``"do_train"``) and
    the limit (None: all); roles whose flag is off are left out. A missing split is a :class:`UsageError`.
    """
    splits = {}
    for role, (name, flag, limit) in wanted.items():
        if not getattr(training_args, flag):
            continue
        if name not in data:
            raise UsageError(f"--{flag} needs a {name!r} split; the data has {', '.join(data)}")
        splits[role] = data[name] if limit is None else data[name].select(range(min(limit, len(data[name]))))
    return splits


def shared_tokenizer(
    training_args: TrainingArguments, train: Callable[[], PreTrainedTokenizerBase]
) -> PreTrainedTokenizerBase:
    """A tokenizer trained by ``train()`` on the main process and saved in ``--output_dir``; the other processes load
    that copy, so that every process uses the same vocabulary."""
    with training_args.main_process_first(desc="training the tokenizer", local=False):
        if training_args.process_index == 0:
            tokenizer = train()
            tokenizer.save_pretrained(training_args.output_dir)
            return tokenizer
        return AutoTokenizer.from_pretrained(training_args.output_dir)


def built_from_config(model: PreTrainedModel, training_args: TrainingArguments, what: str) -> PreTrainedModel:
    """Mark ``model``, built from a config, as trained from scratch, and log its size."""
    # the Trainer's card calls a model "fine-tuned from" its name unless the name is a folder
    model.config._name_or_path = training_args.output_dir
    logger.info(f"Built {what} from a config: {model.num_parameters():,} parameters")
    return model


def dataset_identity(
    embedded: tuple[str, str] | None, dataset_name: str | None, paths: Sequence[str | None], local_type: str
) -> tuple[str, str]:
    """The dataset's name and type for the model card's metadata (``model-index``): ``embedded`` (name, type) for
    the script's own data, else the Hub id, else the first local file or folder and ``local_type``."""
    if embedded is not None:
        return embedded
    if dataset_name is not None:
        return dataset_name, dataset_name
    return os.path.basename(os.path.normpath(next(path for path in paths if path))), local_type


def build_trainer(trainer_class: type[Trainer], **kwargs: Any) -> Trainer:
    """``trainer_class(**kwargs)`` with :class:`~hf_xsam.SaveOnInterruptCallback`, explaining a failure to create
    the Hub repository (``--push_to_hub``).

    The Trainer creates the repository when it is built, so an offline machine or a missing token stops the
    run before any training.
    """
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), SaveOnInterruptCallback()]
    try:
        return trainer_class(**kwargs)
    except HUB_ERRORS as err:
        raise RunError(
            f"--push_to_hub: creating the Hub repository failed ({type(err).__name__}: {err}); nothing has been "
            "trained yet. Log in (`hf auth login`) and check the connection, or run without --push_to_hub and "
            "upload --output_dir later with `hf upload`."
        ) from err


def train_and_save(
    trainer: Trainer, last_checkpoint: str | None, num_samples: int, extra_metrics: dict[str, Any] | None = None
) -> None:
    """Train (resuming from ``last_checkpoint``), save the model and its processor, the train metrics (with
    ``extra_metrics``) and the trainer state."""
    try:
        train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    except ResumeError as err:  # the engine's or the loader's message: the weights of another model, a damaged file
        raise UsageError(str(err)) from err
    save_model(trainer)
    record_metrics(trainer, "train", {**train_result.metrics, **(extra_metrics or {})}, num_samples)
    trainer.save_state()


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


def card_about(
    task: str, model: Any, finetuned_from: str | None, dataset: str, sizes: dict[str, int], unit: str
) -> dict[str, str]:
    """The model card's description, intended uses and data sections, from what the script knows.

    >>> card_about("translates en to fr", None, "t5-small", "wmt16", {"train": 9, "validation": 2}, "pairs")["data"]
    'wmt16: 9 training pairs, 2 validation pairs.'
    """
    origin = f"fine-tuned from {finetuned_from}" if finetuned_from else "trained from scratch"
    size = f" ({model.num_parameters():,} parameters)" if hasattr(model, "num_parameters") else ""
    kind = type(model).__name__ if model is not None else "A model"
    split_names = {"train": "training", "validation": "validation", "test": "test"}
    counts = ", ".join(f"{count:,} {split_names.get(split, split)} {unit}" for split, count in sizes.items())
    return {
        "model_description": f"{kind}{size}, {origin} with hf_xsam; it {task}.",
        "intended_uses": f"The model {task}, for inputs like its training data ({dataset}). Check it on your own "
        "data before relying on it: the results above are on its evaluation split only.",
        "training_data": f"{dataset}: {counts}.",
    }


def finish(trainer: Trainer, about: dict[str, str] | None = None, **card_kwargs: Any) -> None:
    """Write the model card, and push model, processor and card when ``--push_to_hub`` is on.

    ``about`` fills the card's description, uses and data sections (:func:`card_about`).

    The push goes through ``Trainer.push_to_hub``. The model is saved before the upload starts, so a failed
    upload (offline, no token) leaves everything in ``--output_dir``; the error says so.
    """
    args = trainer.args
    card_kwargs = {**(about or {}), **card_kwargs}
    if not args.push_to_hub:
        trainer.create_model_card(**card_kwargs)
        return
    try:
        trainer.push_to_hub(**card_kwargs)
    except HUB_ERRORS as err:
        raise RunError(
            f"Pushing to the Hub failed ({type(err).__name__}: {err}). The model, its processor, the metrics and "
            f"the model card are saved in {os.path.abspath(args.output_dir)}; upload them later with "
            f"`hf upload {trainer.hub_model_id or Path(args.output_dir).name} {args.output_dir}` once online and "
            "logged in (`hf auth login`)."
        ) from err

"""`Trainer` and `Seq2SeqTrainer` that take XSAM steps.

Example:
    >>> import torch
    >>> from datasets import Dataset
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_xsam import XSAMTrainer, XSAMTrainingArguments
    >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=32, num_labels=2)
    >>> data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [0, 1] * 4})
    >>> args = XSAMTrainingArguments(output_dir="/tmp/xsam-doctest", max_steps=2, per_device_train_batch_size=4,
    ...                              report_to="none", rho=0.05)
    >>> trainer = XSAMTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=data)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...'train_loss': ...}
    >>> 0.0 <= trainer.xsam.alpha <= 2.0
    True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer, TrainerCallback

from .arguments import XSAMSeq2SeqTrainingArguments, XSAMTrainingArguments
from .config import XSAMConfig
from .distributed import all_reduce_mean_, forget_unsynchronised_use_
from .engine import XSAM, XSAMStepStats, check_one_device
from .model_card import add_xsam_section
from .parameters import Mode
from .resume import has_full_weights, load_model_weights
from .skipping import guard_optimizer_step, nonfinite
from .state import STATE_NAME, read_state_file, write_state_file
from .summary import describe_run

__all__ = ["XSAMTrainerMixin", "XSAMTrainer", "XSAMSeq2SeqTrainer"]

logger = logging.getLogger(__name__)

# What the trainer sums over the micro-batches of sharpness-aware steps between two logs, in this order: theta
# (radians), the ascent loss and the sharpness (measured: summed over finite micro-batches only, losses normalised
# per micro-batch as the Trainer's loss is, so their sum per step compares with `loss`), and the counts of
# non-finite and stalled micro-batches.
STEP_TOTALS = ("theta", "ascent_loss", "sharpness", "nonfinite", "stalled")
MEASURED_TOTALS = ("theta", "ascent_loss", "sharpness")


class EpochLoop(TrainerCallback):
    """The index of the Trainer's epoch loop, for the per-epoch alpha search.

    ``state.epoch`` lags it on an epoch's first step where the data has no length (an iterable data set that runs
    out): the Trainer counts that epoch's progress against ``max_steps``, so the step after the last of an epoch
    still reads the previous one.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.epoch = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the first epoch of a run, or of a resumed one, is the one the state is in
        self.epoch = math.floor(state.epoch or 0) if self.epoch is None else self.epoch + 1


class XSAMTrainerMixin:
    """Overrides `training_step` to take an XSAM step; everything else is the Trainer's.

    Each pass runs through the parent's `training_step`, so loss scaling (fp16), gradient-accumulation
    normalisation, custom `compute_loss` and label smoothing behave as with the plain Trainer. Only the first
    pass of a micro-batch counts for the Trainer's bookkeeping: the later passes run inside
    :meth:`xsam_extra_pass`, which puts back what `compute_loss` records (``xsam_protected_attributes``). The
    engine's state (alpha and the search schedule) is saved with every checkpoint and restored on resume.
    """

    args: XSAMConfig
    default_args_class: type = XSAMTrainingArguments
    # Attributes that `compute_loss` may change and that the extra passes must leave as the first pass left them
    # (see :meth:`xsam_extra_pass`); TRL trainers keep their metrics in `_metrics` and count the tokens trained on
    # in `_total_train_tokens`.
    xsam_protected_attributes: tuple[str, ...] = ("_metrics", "_total_train_tokens")
    # Hub tags of the trainer itself, on the model card beside the step rule's (TRL's trainers: "trl" and the method)
    card_tags: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the training arguments by name in the parent's signature (the second parameter of Trainer, the third of
        # TRL's DPOTrainer); the Trainer's default when none are given, with the XSAM settings
        given = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        if given.get("args") is None:
            kwargs["args"] = self.default_args_class(output_dir="trainer_output")
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, XSAMConfig):
            raise TypeError(
                f"{type(self).__name__} needs {self.default_args_class.__name__} (training arguments with the XSAM "
                f"settings), got {type(self.args).__name__}"
            )
        self._check_supported()
        tags = list(self.args.step_rule.tags)
        if tags and hasattr(self.model, "add_model_tags"):  # so that `model.push_to_hub` from any path carries them
            self.model.add_model_tags(tags)
        self._xsam_extra_pass = False
        self._xsam_warned: set[str] = set()
        self._xsam_epoch_loop = EpochLoop()
        self.add_callback(self._xsam_epoch_loop)
        self._xsam_new_run()

    def _xsam_new_run(self) -> None:
        """Forget the engine and the figures of an earlier run (a resume restores its state afterwards)."""
        self.xsam: XSAM | None = None
        self._xsam_described = False  # the run's one-line summary is logged at its first step
        self._xsam_pending_state: dict[str, Any] | None = None
        # sums since the last log: STEP_TOTALS (a tensor, no host sync), the number of sharpness-aware micro-batches
        # and steps, and alpha over those steps; the cost of every optimizer step: steps, forward-backward passes,
        # and the engine's search forwards at the last log
        self._xsam_totals: torch.Tensor | None = None
        self._xsam_measured: torch.Tensor | None = None  # which entries of the totals are measurements
        self._xsam_micro_batches = 0
        self._xsam_steps = 0
        self._xsam_alpha_sum = 0.0
        self._xsam_cost_steps = 0
        self._xsam_passes = 0
        self._xsam_search_forwards_logged = 0
        # set on the last micro-batch of an XSAM step: whether its optimizer step must be skipped
        self._xsam_skip: torch.Tensor | None = None
        # plain steps (sam_start_ratio, sam_interval) skipped as non-finite since the last log: a tensor, no host sync
        self._xsam_plain_skipped: torch.Tensor | int = 0

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; every run builds its engine for the model it trains and starts a new schedule."""
        self._xsam_new_run()
        return super().train(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # construction-time checks

    def _check_supported(self) -> None:
        if not self.args.step_rule.sharpness_aware:
            return
        if self.is_deepspeed_enabled:
            raise ValueError(
                "XSAM is not supported with DeepSpeed: DeepSpeed owns the gradients the XSAM step must read and "
                "rewrite. Use FSDP (`--fsdp full_shard`) or plain data parallel (`accelerate launch` / `torchrun`) "
                "instead."
            )
        if self.is_fsdp_enabled:
            self._check_fsdp_supported()
        if self.model is not None:
            check_one_device(self.model.parameters())
        model_computes_loss = bool(self.label_names) or self.can_return_loss
        custom_loss = self.compute_loss_func is not None or type(self).compute_loss is not Trainer.compute_loss
        if not (model_computes_loss or custom_loss):
            raise ValueError(
                f"XSAM needs a loss to differentiate, but {type(self.model).__name__}.forward takes no labels "
                "argument: pass `label_names`, `compute_loss_func`, or override `compute_loss`."
            )

    def _check_fsdp_supported(self) -> None:
        plugin = self.accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "XSAM supports FSDP2 only (its gradients are sharded DTensors the engine can reduce over): set "
                "`fsdp_config={'fsdp_version': 2}`, or use plain data parallel."
            )
        if self.args.sam_perturbation != "global":
            raise ValueError(
                "sam_perturbation='local' is not supported with FSDP: FSDP reduce-scatters every gradient, so no "
                "worker holds its own full gradient to ascend with. Use `--sam_perturbation global`."
            )
        sync_each_batch = self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        if self.args.gradient_accumulation_steps > 1 and not sync_each_batch:
            raise ValueError(
                "XSAM with FSDP and gradient_accumulation_steps > 1 needs every micro-batch's gradient reduced: set "
                "`accelerator_config={'gradient_accumulation_kwargs': {'sync_each_batch': True}}`."
            )

    # ----------------------------------------------------------------------------------------------
    # the step

    def _xsam_engine(self, model: nn.Module) -> XSAM:
        if self.xsam is None:
            workers = self.accelerator.num_processes
            # FSDP averages (reduce-scatters) every gradient itself; the engine only sums over shards
            mode = Mode.choose(workers=workers, fsdp=self.is_fsdp_enabled, perturbation=self.args.sam_perturbation)
            self.xsam = XSAM(
                model.parameters(),
                self.args,
                modules=model.modules(),
                reduce_gradients=all_reduce_mean_ if mode in (Mode.DDP_LOCAL, Mode.DDP_GLOBAL) else None,
                reduce_losses=(lambda losses: all_reduce_mean_([losses])) if workers > 1 else None,
                optimizer=self.optimizer,
                mode=mode,
            )
            if self._xsam_pending_state is not None:
                for note in self.xsam.load_state_dict(self._xsam_pending_state):
                    logger.warning(f"Resuming with other XSAM settings: {note}")
                self._xsam_pending_state = None
            if self.accelerator.scaler is None:  # with fp16 the GradScaler skips non-finite steps itself
                guard_optimizer_step(self.optimizer, self._xsam_take_skip)
        return self.xsam

    def _xsam_take_skip(self) -> torch.Tensor | None:
        skip, self._xsam_skip = self._xsam_skip, None
        return skip

    @contextlib.contextmanager
    def xsam_extra_pass(self) -> Iterator[None]:
        """Context of the passes after the first of a micro-batch: the ascent passes and the alpha search.

        Only the first pass is "the" pass for the Trainer and its subclasses. While this context is open,
        ``self._xsam_extra_pass`` is True, and on exit the attributes named in ``xsam_protected_attributes`` are
        put back as they were on entry (deep copies), so metrics and counters that ``compute_loss`` records see
        the first pass only. Override it (calling ``super()``) to protect state kept another way.
        """
        names = [name for name in self.xsam_protected_attributes if hasattr(self, name)]
        saved = {name: copy.deepcopy(getattr(self, name)) for name in names}
        self._xsam_extra_pass = True
        try:
            yield
        finally:
            self._xsam_extra_pass = False
            for name, value in saved.items():
                setattr(self, name, value)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One XSAM step on one (micro-)batch; returns the loss at the current weights, as `Trainer` does.

        The steps before ``sam_start_ratio`` and between those of ``sam_interval`` are the Trainer's own (with
        ``sam_reuse``, their gradient receives the kept direction once it is complete).
        """
        if not self._xsam_described:
            self._xsam_described = True
            summary = describe_run(self.args, self.optimizer, self.state.max_steps, self.state.num_train_epochs)
            logger.info(f"hf_xsam: {summary}")
        if not self.args.step_rule.sharpness_aware:
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self._xsam_engine(model)
        if not self.args.sharpness_aware_step(self.state.global_step, self.state.max_steps):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._count_cost(passes=1)
            if self.accelerator.sync_gradients:
                if self.args.sam_reuse:
                    engine.reuse_direction_()
                if self.accelerator.scaler is None:  # a non-finite plain step is skipped as a sharpness-aware one is
                    self._xsam_skip = nonfinite([p.grad for p in model.parameters() if p.grad is not None])
                    self._xsam_plain_skipped = self._xsam_plain_skipped + self._xsam_skip
            return loss
        parent_training_step = super().training_step
        # entered after the first pass, closed after the step: every later pass is an extra one
        extra_passes = contextlib.ExitStack()

        def forward_backward() -> torch.Tensor:
            loss = parent_training_step(model, inputs, num_items_in_batch)
            if not self._xsam_extra_pass:
                extra_passes.enter_context(self.xsam_extra_pass())
            return loss

        def loss_only() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch)

        def mean_loss() -> torch.Tensor:
            # without num_items_in_batch the loss is this micro-batch's own mean, not its share of the step's tokens
            with self.compute_loss_context_manager():
                return self.compute_loss(model, self._prepare_inputs(inputs))

        # Under DDP every pass runs without DDP's own all-reduce: the engine reduces what it needs itself.
        # FSDP keeps its reduce-scatter on every backward (the "global" perturbation).
        sync_context = contextlib.nullcontext() if self.is_fsdp_enabled else self.accelerator.no_sync(model)
        with sync_context, extra_passes:
            stats = engine.step(
                forward_backward,
                loss_only,
                step=self.state.global_step,
                epoch=self._xsam_epoch_loop.epoch
                if self._xsam_epoch_loop.epoch is not None
                else math.floor(self.state.epoch or 0),
                accumulate=not self.accelerator.sync_gradients,
                mean_loss=mean_loss if num_items_in_batch is not None else None,
            )
        self._record_xsam_stats(stats)
        self._count_cost(passes=self.args.step_rule.passes(self.args.ascent_steps))
        if self.accelerator.sync_gradients:
            self._xsam_skip = stats.skip
            # the step's passes, all under no_sync, must not count as uses in the next synchronised backward
            forget_unsynchronised_use_(model)
        return stats.loss

    # ----------------------------------------------------------------------------------------------
    # logging

    def _count_cost(self, passes: int) -> None:
        self._xsam_passes += passes
        if self.accelerator.sync_gradients:
            self._xsam_cost_steps += 1

    def _record_xsam_stats(self, stats: XSAMStepStats) -> None:
        step = {
            "theta": stats.theta,
            "ascent_loss": stats.ascent_loss,
            "sharpness": stats.ascent_loss - stats.loss,
            "nonfinite": stats.nonfinite,
            "stalled": stats.stalled,
        }
        values = torch.stack([step[name] for name in STEP_TOTALS]).float()
        if self._xsam_totals is None:
            self._xsam_totals = torch.zeros_like(values)
            self._xsam_measured = torch.tensor([name in MEASURED_TOTALS for name in STEP_TOTALS], device=values.device)
        # a non-finite micro-batch counts as such, its measurements not at all
        self._xsam_totals += torch.where(self._xsam_measured & stats.nonfinite, 0.0, values)
        self._xsam_micro_batches += 1
        if self.accelerator.sync_gradients:
            self._xsam_steps += 1
            self._xsam_alpha_sum += self.xsam.alpha

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._xsam_warned:
            self._xsam_warned.add(key)
            logger.warning(message)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the `xsam/*` figures, averaged since the last training log, to training logs.

        ``xsam/passes`` and ``xsam/search_forwards`` are the forward-backward passes and the alpha search's forward
        passes per optimizer step (the base optimizer alone: one pass per micro-batch); the other figures average
        over the sharpness-aware steps since the last log, and are absent when there was none;
        ``xsam/sharpness_aware_steps`` counts those steps (the model card's mean alpha weighs each log by it).
        """
        if "loss" in logs and self._xsam_cost_steps > 0:
            engine_forwards = self.xsam.search_forwards if self.xsam is not None else 0
            logs["xsam/passes"] = self._xsam_passes / self._xsam_cost_steps
            logs["xsam/search_forwards"] = (
                engine_forwards - self._xsam_search_forwards_logged
            ) / self._xsam_cost_steps
            self._xsam_search_forwards_logged = engine_forwards
            self._xsam_passes = self._xsam_cost_steps = 0
        if "loss" in logs and self._xsam_steps > 0:
            totals = dict(zip(STEP_TOTALS, self.accelerator.reduce(self._xsam_totals, reduction="mean").tolist()))
            nonfinite = totals["nonfinite"]
            finite = self._xsam_micro_batches - nonfinite
            logs["xsam/alpha"] = self._xsam_alpha_sum / self._xsam_steps
            logs["xsam/sharpness_aware_steps"] = self._xsam_steps  # what the card's mean alpha weighs each log by
            logs["xsam/theta"] = math.degrees(totals["theta"] / max(finite, 1.0))
            logs["xsam/ascent_loss"] = totals["ascent_loss"] / self._xsam_steps
            logs["xsam/sharpness"] = totals["sharpness"] / self._xsam_steps
            logs["xsam/nonfinite"] = nonfinite
            if nonfinite:
                self._warn_once(
                    "nonfinite",
                    "XSAM: a pass gave a non-finite gradient; its optimizer step was skipped "
                    "(weights and optimizer state untouched). `xsam/nonfinite` counts such micro-batches.",
                )
            if totals["stalled"]:
                self._warn_once(
                    "stalled",
                    f"XSAM: the ascent of rho={self.args.rho:g} did not move the weights "
                    "(below their float resolution); the step fell back to SAM's direction. Use a larger "
                    "rho.",
                )
            self._xsam_totals.zero_()
            self._xsam_micro_batches = 0
            self._xsam_steps = 0
            self._xsam_alpha_sum = 0.0
        if "loss" in logs and isinstance(self._xsam_plain_skipped, torch.Tensor):
            skipped = int(self._xsam_plain_skipped.item())
            self._xsam_plain_skipped = 0
            logs["xsam/nonfinite"] = logs.get("xsam/nonfinite", 0.0) + skipped
            if skipped:
                self._warn_once(
                    "nonfinite-plain",
                    "XSAM: a plain step (sam_start_ratio / sam_interval) had a non-finite gradient; it was skipped "
                    "(weights and optimizer state untouched). `xsam/nonfinite` counts it.",
                )
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # model card

    def create_model_card(
        self,
        *args: Any,
        dataset_name: str | list[str] | None = None,
        model_description: str | None = None,
        intended_uses: str | None = None,
        training_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        """The model card of `transformers.Trainer`, with ``card_tags``, the step rule's tags, and a section on the
        XSAM settings and results.

        ``args`` and ``kwargs`` are those of `Trainer.create_model_card`. The card is the Trainer's also where the
        parent class writes another (TRL's trainers): it names the base model where there is one
        (``finetuned_from``), lists the hyperparameters, and puts the evaluation results into the Hub metadata
        (``model-index``) when ``tasks`` and ``dataset`` are given. ``dataset_name`` is TRL's name for ``dataset``
        (TRL's trainers pass it). ``model_description``, ``intended_uses`` and ``training_data`` replace the
        Trainer's "More information needed" in those sections (see :func:`hf_xsam.model_card.add_xsam_section`).
        """
        card = inspect.signature(Trainer.create_model_card).bind(self, *args, **kwargs).arguments
        del card["self"]
        tags = card.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card["tags"] = tags + [tag for tag in (*self.card_tags, *self.args.step_rule.tags) if tag not in tags]
        if dataset_name is not None:
            card.setdefault("dataset", dataset_name)
        Trainer.create_model_card(self, **card)
        if self.is_world_process_zero():
            about = {"description": model_description, "uses": intended_uses, "data": training_data}
            add_xsam_section(os.path.join(self.args.output_dir, "README.md"), self, about)

    # ----------------------------------------------------------------------------------------------
    # checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = self.xsam.state_dict() if self.xsam is not None else self._xsam_pending_state
        if self.args.should_save and state is not None:
            write_state_file(output_dir, {**state, "settings": self._xsam_settings()})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if os.path.lexists(os.path.join(checkpoint, STATE_NAME)):
            self._xsam_pending_state = read_state_file(checkpoint, self.state.global_step, self.state.epoch)
            if self._xsam_pending_state["settings"] is not None and self.is_world_process_zero():
                for note in self._xsam_changed_settings(self._xsam_pending_state["settings"]):
                    logger.warning(f"Resuming with other XSAM settings: {note}")
        elif self.args.step_rule.sharpness_aware:
            # every sharpness-aware run saves it (the engine exists from the first step): it was lost, or the
            # checkpoint is of a run with sam_method="none"
            logger.warning(
                f"{checkpoint} has no {STATE_NAME}: the XSAM schedule starts afresh, with alpha "
                f"{self.args.initial_alpha:g}" + (" until a new search" if self.args.searches_alpha else "")
            )

    def _xsam_settings(self) -> dict[str, Any]:
        """What a checkpoint records of the run: every XSAM setting, and ``max_steps`` (where the late start falls)."""
        settings = {field.name: getattr(self.args, field.name) for field in dataclasses.fields(XSAMConfig)}
        return {**settings, "max_steps": self.state.max_steps}

    def _xsam_changed_settings(self, saved: dict[str, Any]) -> list[str]:
        """One line per XSAM setting that differs from the checkpoint's run, with both values; and where the
        sharpness-aware steps now start, when ``sam_start_ratio`` or ``max_steps`` moved that step."""
        current = self._xsam_settings()
        notes = [
            f"{name} was {saved[name]!r} in the checkpoint's run, is {value!r} now"
            for name, value in current.items()
            if name != "max_steps" and name in saved and saved[name] != value
        ]
        before, after = saved.get("sam_start_ratio"), self.args.sam_start_ratio
        old_steps, new_steps = saved.get("max_steps"), current["max_steps"]
        if isinstance(before, (int, float)) and isinstance(old_steps, int) and (before or after):
            old_start = math.ceil(before * old_steps)
            new_start = self.args.sam_start_step(new_steps)
            if old_start != new_start:
                notes.append(
                    f"the sharpness-aware steps start at step {new_start} (sam_start_ratio {after:g} of {new_steps} "
                    f"steps), not at step {old_start} ({before:g} of {old_steps} steps) as in the checkpoint's run"
                )
        return notes

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's resume, but the weights go through the model's key conversion, all or an error."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not self._loads_full_weights(model, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_model_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not self._loads_full_weights(model, self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_model_weights(model, self.state.best_model_checkpoint)

    def _loads_full_weights(self, model: nn.Module, folder: str) -> bool:
        plain = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        return plain and isinstance(model, PreTrainedModel) and has_full_weights(folder)


class XSAMTrainer(XSAMTrainerMixin, Trainer):
    """`transformers.Trainer` whose optimizer steps are XSAM steps (see :class:`XSAMTrainerMixin`)."""


class XSAMSeq2SeqTrainer(XSAMTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` whose optimizer steps are XSAM steps (see :class:`XSAMTrainerMixin`)."""

    default_args_class = XSAMSeq2SeqTrainingArguments

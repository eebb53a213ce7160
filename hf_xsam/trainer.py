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
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer

from .arguments import XSAMSeq2SeqTrainingArguments, XSAMTrainingArguments
from .config import XSAMConfig
from .distributed import all_reduce_mean_
from .engine import XSAM, XSAMStepStats
from .model_card import XSAM_TAGS, add_xsam_section

__all__ = ["XSAMTrainerMixin", "XSAMTrainer", "XSAMSeq2SeqTrainer", "XSAM_STATE_NAME"]

XSAM_STATE_NAME = "xsam_state.json"
# Sums since the last log: theta (degrees), ascent loss and sharpness over finite micro-batches (losses
# normalised per micro-batch as the Trainer's loss is, so their sum per step compares with `loss`), and
# the counts of finite and of non-finite micro-batches.
_TOTALS = 5


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
    # (see :meth:`xsam_extra_pass`); TRL trainers keep their metrics in `_metrics`.
    xsam_protected_attributes: tuple[str, ...] = ("_metrics",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) < 2 and kwargs.get("args") is None:
            kwargs["args"] = self.default_args_class(output_dir="trainer_output")
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, XSAMConfig):
            raise TypeError(
                f"{type(self).__name__} needs {self.default_args_class.__name__} (training arguments with the XSAM "
                f"settings), got {type(self.args).__name__}"
            )
        self._check_supported()
        if hasattr(self.model, "add_model_tags"):  # so that `model.push_to_hub` from any path carries the tags
            self.model.add_model_tags(XSAM_TAGS)
        self._xsam_extra_pass = False
        self.xsam: XSAM | None = None
        self._xsam_pending_state: dict[str, Any] | None = None
        self._xsam_totals: torch.Tensor | None = None
        self._xsam_steps = 0
        self._xsam_alpha_sum = 0.0

    # ----------------------------------------------------------------------------------------------
    # construction-time checks

    def _check_supported(self) -> None:
        if self.args.sam_method == "none":
            return
        if self.is_deepspeed_enabled:
            raise ValueError(
                "XSAM is not supported with DeepSpeed: DeepSpeed owns the gradients the XSAM step must read and "
                "rewrite. Use FSDP (`--fsdp full_shard`) or plain data parallel (`accelerate launch` / `torchrun`) "
                "instead."
            )
        if self.is_fsdp_enabled:
            self._check_fsdp_supported()
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
            distributed = self.accelerator.num_processes > 1
            # FSDP averages (reduce-scatters) every gradient itself; the engine only sums over shards
            reduce_gradients = all_reduce_mean_ if distributed and not self.is_fsdp_enabled else None
            self.xsam = XSAM(
                model.parameters(),
                self.args,
                modules=model.modules(),
                reduce_gradients=reduce_gradients,
                reduce_losses=(lambda losses: all_reduce_mean_([losses])) if distributed else None,
            )
            if self._xsam_pending_state is not None:
                self.xsam.load_state_dict(self._xsam_pending_state)
                self._xsam_pending_state = None
        return self.xsam

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

    def _sharpness_aware_step_due(self) -> bool:
        return self.args.sam_method != "none" and self.state.global_step % self.args.sam_interval == 0

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One XSAM step on one (micro-)batch; returns the loss at the current weights, as `Trainer` does."""
        if not self._sharpness_aware_step_due():
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self._xsam_engine(model)
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

        # Under DDP every pass runs without DDP's own all-reduce: the engine reduces what it needs itself.
        # FSDP keeps its reduce-scatter on every backward (the "global" perturbation).
        sync_context = contextlib.nullcontext() if self.is_fsdp_enabled else self.accelerator.no_sync(model)
        with sync_context, extra_passes:
            stats = engine.step(
                forward_backward,
                loss_only,
                step=self.state.global_step,
                epoch=math.floor(self.state.epoch or 0),
                accumulate=not self.accelerator.sync_gradients,
            )
        self._record_xsam_stats(stats)
        return stats.loss

    # ----------------------------------------------------------------------------------------------
    # logging

    def _record_xsam_stats(self, stats: XSAMStepStats) -> None:
        finite = ~stats.nonfinite
        values = torch.stack(
            [
                torch.rad2deg(stats.theta.float()),
                stats.ascent_loss.float(),
                (stats.ascent_loss - stats.loss).float(),
                finite.float(),
                stats.nonfinite.float(),
            ]
        )
        values = torch.where(finite | (torch.arange(_TOTALS, device=values.device) == _TOTALS - 1), values, 0.0)
        if self._xsam_totals is None:
            self._xsam_totals = torch.zeros(_TOTALS, device=values.device)
        self._xsam_totals += values
        if self.accelerator.sync_gradients:
            self._xsam_steps += 1
            self._xsam_alpha_sum += self.xsam.alpha

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the `xsam/*` figures, averaged since the last training log, to training logs."""
        if "loss" in logs and self._xsam_steps > 0:
            totals = self.accelerator.reduce(self._xsam_totals, reduction="mean").tolist()
            theta, ascent_loss, sharpness, finite, nonfinite = totals
            logs["xsam/alpha"] = self._xsam_alpha_sum / self._xsam_steps
            logs["xsam/theta"] = theta / max(finite, 1.0)
            logs["xsam/ascent_loss"] = ascent_loss / self._xsam_steps
            logs["xsam/sharpness"] = sharpness / self._xsam_steps
            logs["xsam/nonfinite"] = nonfinite
            self._xsam_totals.zero_()
            self._xsam_steps = 0
            self._xsam_alpha_sum = 0.0
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # model card

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's model card, plus the `xsam` tags and a section on the XSAM settings and results."""
        tags = kwargs.pop("tags", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        kwargs["tags"] = tags + [tag for tag in XSAM_TAGS if tag not in tags]
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            add_xsam_section(os.path.join(self.args.output_dir, "README.md"), self)

    # ----------------------------------------------------------------------------------------------
    # checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = self.xsam.state_dict() if self.xsam is not None else self._xsam_pending_state
        if self.args.should_save and state is not None:
            with open(os.path.join(output_dir, XSAM_STATE_NAME), "w") as f:
                json.dump(state, f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, XSAM_STATE_NAME) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        with open(path) as f:
            state = json.load(f)
        if self.xsam is not None:
            self.xsam.load_state_dict(state)
        else:
            self._xsam_pending_state = state


class XSAMTrainer(XSAMTrainerMixin, Trainer):
    """`transformers.Trainer` whose optimizer steps are XSAM steps (see :class:`XSAMTrainerMixin`)."""


class XSAMSeq2SeqTrainer(XSAMTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` whose optimizer steps are XSAM steps (see :class:`XSAMTrainerMixin`)."""

    default_args_class = XSAMSeq2SeqTrainingArguments

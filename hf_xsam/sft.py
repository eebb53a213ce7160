"""TRL's `SFTTrainer` and `SFTConfig` with XSAM steps (needs ``pip install hf_xsam[trl]``).

`SFTTrainer.compute_loss` records the token count, the entropy and the token accuracy of every call. Only the
first pass of a micro-batch counts: the ascent passes and the alpha search leave these metrics as the first pass
left them (see :meth:`~hf_xsam.XSAMTrainerMixin.xsam_extra_pass`). With LoRA only the adapters take part, and the
engine's saved copy is one copy of the adapters.

Example:
    >>> from datasets import Dataset
    >>> from peft import LoraConfig
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    >>> from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer
    >>> words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "one": 2, "plus": 3, "is": 4, "two": 5}, "<pad>"))
    >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>")
    >>> data = Dataset.from_dict({"prompt": ["one plus one is"] * 8, "completion": [" two"] * 8})
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id))
    >>> args = XSAMSFTConfig(output_dir="/tmp/xsam-sft-doctest", max_steps=2, per_device_train_batch_size=4,
    ...                      bf16=False, use_cpu=True, report_to="none", rho=0.05)
    >>> trainer = XSAMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
    ...                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...'train_loss': ...}
    >>> "xsam" in trainer.model.model_tags
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from transformers import Trainer
from transformers.utils import is_torch_bf16_gpu_available, logging
from trl import SFTConfig, SFTTrainer

from .config import XSAMConfig
from .model_card import add_xsam_section
from .trainer import XSAMTrainerMixin

__all__ = ["XSAMSFTConfig", "XSAMSFTTrainer"]

logger = logging.get_logger(__name__)


@dataclass
class XSAMSFTConfig(XSAMConfig, SFTConfig):
    """`trl.SFTConfig` plus the XSAM settings (see :class:`~hf_xsam.XSAMConfig`).

    Two of TRL's defaults are adapted: ``bf16`` (left unset) is on only where a GPU supports it, where TRL would
    switch it on and transformers then refuse the machine; TRL's ``gradient_checkpointing`` reaches transformers
    under its current name, ``activation_checkpointing``, so that neither warns.

    Example:
        >>> from hf_xsam import XSAMSFTConfig
        >>> args = XSAMSFTConfig(output_dir="out", sam_method="sam", rho=0.02, bf16=False, use_cpu=True)
        >>> args.search_radius, args.gradient_checkpointing  # TRL's defaults stay
        (0.04, True)
    """

    def __post_init__(self) -> None:
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.bf16 is None and not self.fp16:
            self.bf16 = not self.use_cpu and is_torch_bf16_gpu_available()
            if not self.bf16:
                logger.warning_once("bf16 is off: no GPU with bf16 here (pass --bf16 true --use_cpu to use it on CPU)")
        super().__post_init__()


class XSAMSFTTrainer(XSAMTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` whose optimizer steps are XSAM steps (see :class:`~hf_xsam.XSAMTrainerMixin`).

    The extra passes leave SFT's metrics (`num_tokens`, `entropy`, `mean_token_accuracy`, `aux_loss`) as the
    first pass of the micro-batch left them.
    """

    default_args_class = XSAMSFTConfig
    xsam_protected_attributes = ("_metrics", "_total_train_tokens")

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: Any = None,
        model_description: str | None = None,
        intended_uses: str | None = None,
        training_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        """The Trainer's model card with TRL's tags, the step rule's tags and the XSAM section (as
        :meth:`XSAMTrainerMixin.create_model_card`), in place of TRL's card.

        TRL's card names a base model even for a model trained from scratch and carries no results; the Trainer's
        names the base model when there is one (``finetuned_from``) and puts the evaluation results into the Hub
        metadata (``model-index``) when ``tasks`` and ``dataset`` are given. ``dataset_name`` is TRL's name for
        ``dataset``.
        """
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in ("trl", "sft", *self.args.step_rule.tags) if tag not in tags]
        kwargs.setdefault("dataset", dataset_name)
        Trainer.create_model_card(self, model_name=model_name, tags=tags, **kwargs)
        if self.is_world_process_zero():
            about = {"description": model_description, "uses": intended_uses, "data": training_data}
            add_xsam_section(os.path.join(self.args.output_dir, "README.md"), self, about)

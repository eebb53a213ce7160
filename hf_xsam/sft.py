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

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import XSAMConfig
from .trainer import XSAMTrainerMixin
from .trl_defaults import TRLDefaults

__all__ = ["XSAMSFTConfig", "XSAMSFTTrainer"]


@dataclass
class XSAMSFTConfig(TRLDefaults, XSAMConfig, SFTConfig):
    """`trl.SFTConfig` plus the XSAM settings (see :class:`~hf_xsam.XSAMConfig`).

    Two of TRL's defaults are adapted (see :class:`~hf_xsam.trl_defaults.TRLDefaults`): ``bf16`` (left unset) is on
    only where a GPU supports it, and TRL's ``gradient_checkpointing`` reaches transformers under its current name,
    ``activation_checkpointing``.

    Example:
        >>> from hf_xsam import XSAMSFTConfig
        >>> args = XSAMSFTConfig(output_dir="out", sam_method="sam", rho=0.02, bf16=False, use_cpu=True)
        >>> args.search_radius, args.gradient_checkpointing  # TRL's defaults stay
        (0.04, True)
    """


class XSAMSFTTrainer(XSAMTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` whose optimizer steps are XSAM steps (see :class:`~hf_xsam.XSAMTrainerMixin`).

    The extra passes leave SFT's metrics (`num_tokens`, `entropy`, `mean_token_accuracy`, `aux_loss`) as the
    first pass of the micro-batch left them. The model card is the Trainer's (as :class:`~hf_xsam.XSAMTrainer`'s),
    tagged ``trl`` and ``sft``.
    """

    default_args_class = XSAMSFTConfig
    card_tags = ("trl", "sft")

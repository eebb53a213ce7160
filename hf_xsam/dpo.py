"""TRL's `DPOTrainer` and `DPOConfig` with XSAM steps (needs ``pip install hf_xsam[trl]``).

`DPOTrainer.compute_loss` runs the policy on the chosen and the rejected completions in one forward, and the
reference model on both (without gradient) unless ``precompute_ref_log_probs`` read its log-probabilities from the
data. XSAM calls it on every pass: each ascent pass and each forward of the alpha search runs the reference again,
on the same batch and with the same weights (the XSAM step perturbs the trained parameters only: with LoRA, the
reference is the model with its adapters off, and the adapters are what moves). ``precompute_ref_log_probs=True``
computes the reference once per example before training instead. Only the first pass of a micro-batch counts for
DPO's metrics (rewards, log-probabilities, token counts; see :meth:`~hf_xsam.XSAMTrainerMixin.xsam_extra_pass`).

Example:
    >>> import copy
    >>> from datasets import Dataset
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    >>> from hf_xsam import XSAMDPOConfig, XSAMDPOTrainer
    >>> words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "one": 2, "plus": 3, "is": 4, "two": 5}, "<pad>"))
    >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>")
    >>> data = Dataset.from_dict({"prompt": ["one plus one is"] * 8, "chosen": [" two"] * 8, "rejected": [" one"] * 8})
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id))
    >>> args = XSAMDPOConfig(output_dir="/tmp/xsam-dpo-doctest", max_steps=2, per_device_train_batch_size=4,
    ...                      use_cpu=True, report_to="none", rho=0.05)
    >>> trainer = XSAMDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
    ...                          processing_class=tokenizer)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...'train_loss': ...}
    >>> sorted(trainer.model.model_tags)
    ['dpo', 'sharpness-aware-minimization', 'trl', 'xsam']
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer

from .config import XSAMConfig
from .trainer import XSAMTrainerMixin
from .trl_defaults import TRLDefaults

__all__ = ["XSAMDPOConfig", "XSAMDPOTrainer"]


@dataclass
class XSAMDPOConfig(TRLDefaults, XSAMConfig, DPOConfig):
    """`trl.DPOConfig` plus the XSAM settings (see :class:`~hf_xsam.XSAMConfig`), with TRL's defaults adapted as
    :class:`~hf_xsam.XSAMSFTConfig` adapts them.

    Example:
        >>> from hf_xsam import XSAMDPOConfig
        >>> args = XSAMDPOConfig(output_dir="out", rho=0.02, beta=0.2, precompute_ref_log_probs=True, use_cpu=True)
        >>> args.search_radius, args.beta, args.bf16
        (0.04, 0.2, False)
    """


class XSAMDPOTrainer(XSAMTrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` whose optimizer steps are XSAM steps (see :class:`~hf_xsam.XSAMTrainerMixin`).

    Its model card is the Trainer's (as :class:`~hf_xsam.XSAMTrainer`'s), tagged ``trl`` and ``dpo``.
    """

    default_args_class = XSAMDPOConfig
    card_tags = ("trl", "dpo")

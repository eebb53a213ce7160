"""What hf_xsam's TRL configs (`XSAMSFTConfig`, `XSAMDPOConfig`) change of the defaults TRL's configs share.

Example:
    >>> from hf_xsam import XSAMSFTConfig
    >>> args = XSAMSFTConfig(output_dir="out", use_cpu=True)
    >>> args.bf16, args.activation_checkpointing  # no bf16 on a CPU; TRL's checkpointing under its current name
    (False, True)
"""

from __future__ import annotations

from transformers.utils import is_torch_bf16_gpu_available, logging

__all__ = ["TRLDefaults"]

logger = logging.get_logger(__name__)


class TRLDefaults:
    """Mixed in before a TRL config (a `trl` ``_BaseConfig``), it adapts two of TRL's defaults.

    ``bf16`` (left unset) is on only where a GPU supports it, where TRL would switch it on and transformers then
    refuse the machine; TRL's ``gradient_checkpointing`` reaches transformers under its current name,
    ``activation_checkpointing``, so that neither warns.
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

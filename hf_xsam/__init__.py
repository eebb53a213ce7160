"""hf_xsam: XSAM (eXplicit Sharpness-Aware Minimization) for the Hugging Face Trainer.

`XSAMSFTTrainer`, `XSAMSFTConfig` (TRL's SFT), `XSAMDPOTrainer` and `XSAMDPOConfig` (TRL's DPO) are imported on
first use, so that hf_xsam does not need trl.
"""

from importlib import import_module
from importlib.util import find_spec
from typing import Any

from .arguments import XSAMSeq2SeqTrainingArguments, XSAMTrainingArguments
from .config import XSAMConfig
from .engine import XSAM
from .interrupt import SaveOnInterruptCallback, TrainingInterrupted
from .plots import XSAMPlotCallback
from .trainer import XSAMSeq2SeqTrainer, XSAMTrainer, XSAMTrainerMixin

__all__ = [
    "XSAM",
    "XSAMConfig",
    "SaveOnInterruptCallback",
    "TrainingInterrupted",
    "XSAMPlotCallback",
    "XSAMSeq2SeqTrainer",
    "XSAMSeq2SeqTrainingArguments",
    "XSAMTrainer",
    "XSAMTrainerMixin",
    "XSAMTrainingArguments",
]
__version__ = "0.1.0"

# the TRL trainers and configs, by the module that holds them
_TRL_EXPORTS = {
    "XSAMDPOConfig": "dpo",
    "XSAMDPOTrainer": "dpo",
    "XSAMSFTConfig": "sft",
    "XSAMSFTTrainer": "sft",
}
if find_spec("trl") is not None:  # `from hf_xsam import *` must work without trl
    __all__ += list(_TRL_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _TRL_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(f".{_TRL_EXPORTS[name]}", __name__)
    except ImportError as err:
        if err.name is None or not err.name.startswith("trl"):
            raise
        raise ImportError(f"{name} needs TRL: `pip install hf_xsam[trl]` (or `pip install trl`)") from err
    return getattr(module, name)

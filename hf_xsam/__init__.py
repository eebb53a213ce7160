"""hf_xsam: XSAM (eXplicit Sharpness-Aware Minimization) for the Hugging Face Trainer."""

from .arguments import XSAMSeq2SeqTrainingArguments, XSAMTrainingArguments
from .config import XSAMConfig
from .engine import XSAM
from .plots import XSAMPlotCallback
from .trainer import XSAMSeq2SeqTrainer, XSAMTrainer, XSAMTrainerMixin

__all__ = [
    "XSAM",
    "XSAMConfig",
    "XSAMPlotCallback",
    "XSAMSeq2SeqTrainer",
    "XSAMSeq2SeqTrainingArguments",
    "XSAMTrainer",
    "XSAMTrainerMixin",
    "XSAMTrainingArguments",
]
__version__ = "0.1.0"

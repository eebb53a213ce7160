"""hf_xsam: XSAM (eXplicit Sharpness-Aware Minimization) for the Hugging Face Trainer."""

from .arguments import XSAMArguments, XSAMSeq2SeqTrainingArguments, XSAMTrainingArguments
from .engine import XSAM
from .plots import XSAMPlotCallback
from .trainer import XSAMSeq2SeqTrainer, XSAMTrainer, XSAMTrainerMixin

__all__ = [
    "XSAM",
    "XSAMArguments",
    "XSAMPlotCallback",
    "XSAMSeq2SeqTrainer",
    "XSAMSeq2SeqTrainingArguments",
    "XSAMTrainer",
    "XSAMTrainerMixin",
    "XSAMTrainingArguments",
]
__version__ = "0.1.0"

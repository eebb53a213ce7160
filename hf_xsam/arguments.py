"""Training arguments with the XSAM settings, usable from Python and as command-line flags.

Example:
    >>> from hf_xsam import XSAMTrainingArguments
    >>> args = XSAMTrainingArguments(output_dir="out", rho=0.05, ascent_steps=2, report_to="none")
    >>> args.search_radius  # rho_max=None means 2 * rho
    0.1
    >>> args.sam_method
    'xsam'
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .config import XSAMConfig

__all__ = ["XSAMTrainingArguments", "XSAMSeq2SeqTrainingArguments"]


@dataclass
class XSAMTrainingArguments(XSAMConfig, TrainingArguments):
    """`transformers.TrainingArguments` plus the XSAM settings (see :class:`~hf_xsam.XSAMConfig`)."""


@dataclass
class XSAMSeq2SeqTrainingArguments(XSAMConfig, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` plus the XSAM settings (see :class:`~hf_xsam.XSAMConfig`)."""

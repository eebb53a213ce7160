"""Training arguments with the XSAM settings, usable from Python and as command-line flags.

Example:
    >>> from hf_xsam import XSAMTrainingArguments
    >>> args = XSAMTrainingArguments(output_dir="out", rho=0.05, ascent_steps=2, report_to="none")
    >>> args.rho_max  # None means 2 * rho
    >>> args.sam_method
    'xsam'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .engine import PERTURBATIONS, SAM_METHODS, validate_settings

__all__ = ["XSAMArguments", "XSAMTrainingArguments", "XSAMSeq2SeqTrainingArguments"]


@dataclass
class XSAMArguments:
    """The XSAM fields shared by :class:`XSAMTrainingArguments` and :class:`XSAMSeq2SeqTrainingArguments`."""

    sam_method: str = field(
        default="xsam",
        metadata={
            "help": "Sharpness-aware method: 'xsam' (searched alpha), 'sam' (alpha fixed at 1, standard k-step SAM) "
            "or 'none' (the base optimizer alone, one pass per step).",
            "choices": list(SAM_METHODS),
        },
    )
    rho: float = field(default=0.05, metadata={"help": "Total ascent radius, split over `ascent_steps`."})
    ascent_steps: int = field(default=1, metadata={"help": "Number of ascent steps k (k + 1 passes per step)."})
    rho_max: float | None = field(
        default=None, metadata={"help": "Radius at which the alpha search evaluates the loss; None means 2 * rho."}
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "Alpha used until the first search, and always when the search is off (1 = SAM, 0 = v0)."},
    )
    alpha_max: float = field(default=2.0, metadata={"help": "Largest alpha of the search grid 0..alpha_max."})
    alpha_step: float = field(default=0.1, metadata={"help": "Spacing of the alpha search grid."})
    alpha_search_interval: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps between alpha searches; None searches on the first step of every epoch "
            "(as in the paper), 0 never searches."
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={"help": "Take the sharpness-aware step every N optimizer steps and a plain step otherwise."},
    )
    sam_perturbation: str = field(
        default="local",
        metadata={
            "help": "Data parallel: 'local' each worker ascends with its own gradient and the XSAM directions are "
            "averaged once per step; 'global' gradients are averaged before the ascent (equal to one device on "
            "the global batch, one more all-reduce per pass).",
            "choices": list(PERTURBATIONS),
        },
    )
    sam_eps: float = field(default=1e-12, metadata={"help": "Epsilon of every normalisation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_settings(
            sam_method=self.sam_method,
            rho=self.rho,
            ascent_steps=self.ascent_steps,
            rho_max=self.rho_max,
            alpha=self.alpha,
            alpha_max=self.alpha_max,
            alpha_step=self.alpha_step,
            alpha_search_interval=self.alpha_search_interval,
            sam_interval=self.sam_interval,
            sam_perturbation=self.sam_perturbation,
            sam_eps=self.sam_eps,
        )

    @property
    def xsam_settings(self) -> dict[str, object]:
        """The XSAM fields as a dict (for logs and model cards)."""
        return {name: getattr(self, name) for name in XSAMArguments.__dataclass_fields__}


@dataclass
class XSAMTrainingArguments(XSAMArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the XSAM settings (see :class:`XSAMArguments`)."""


@dataclass
class XSAMSeq2SeqTrainingArguments(XSAMArguments, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` plus the XSAM settings (see :class:`XSAMArguments`)."""

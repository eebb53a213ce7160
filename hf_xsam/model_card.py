"""The XSAM section of the model card (placeholder until the model-card work lands)."""

from __future__ import annotations

from typing import Any

__all__ = ["XSAM_TAGS", "add_xsam_section"]

XSAM_TAGS = ["xsam", "sharpness-aware-minimization"]


def add_xsam_section(card_path: str, trainer: Any) -> None:
    """Append the XSAM settings and results to the model card at ``card_path``."""
    raise NotImplementedError

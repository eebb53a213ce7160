"""The engine's checkpoint file: validated on load, written atomically.

A damaged file must stop a resume with an error that names the file and the field, never feed a NaN alpha
or a schedule from the future into training.

Example:
    >>> import os, tempfile
    >>> from hf_xsam.state import read_state_file, write_state_file
    >>> folder = tempfile.mkdtemp()
    >>> write_state_file(folder, {"alpha": 1.3, "last_search_step": 4, "last_search_epoch": 1})
    >>> read_state_file(folder, global_step=6)["alpha"]
    1.3
    >>> with open(os.path.join(folder, "xsam_state.json"), "w") as f:
    ...     _ = f.write('{"alpha": NaN}')
    >>> read_state_file(folder, global_step=6)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: .../xsam_state.json is damaged: alpha is nan; it must be a finite number...
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

__all__ = ["STATE_NAME", "validate_state", "read_state_file", "write_state_file"]

STATE_NAME = "xsam_state.json"


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_state(state: Any, global_step: int | None = None) -> dict[str, Any]:
    """Check what :meth:`XSAM.state_dict` saved; raise ``ValueError`` naming the first bad field.

    Args:
        state: the loaded JSON value.
        global_step: the optimizer step of the checkpoint; a search recorded after it is refused.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    alpha = state.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha is {alpha!r}; it must be a finite number")
    for name in ("last_search_step", "last_search_epoch"):
        value = state.get(name)
        if value is not None and not _count(value):
            raise ValueError(f"{name} is {value!r}; it must be null or an integer >= 0")
    step = state.get("last_search_step")
    if step is not None and global_step is not None and step > global_step:
        raise ValueError(f"last_search_step is {step}, after the checkpoint's own step {global_step}")
    history = state.get("search_history", [])
    if not isinstance(history, list) or not all(isinstance(entry, Mapping) for entry in history):
        raise ValueError("search_history must be a list of objects")
    count = state.get("search_count", len(history))
    if not _count(count):
        raise ValueError(f"search_count is {count!r}; it must be an integer >= 0")
    return {**state, "alpha": float(alpha), "search_history": list(history), "search_count": count}


def read_state_file(folder: str, global_step: int | None = None) -> dict[str, Any]:
    """Load and validate ``folder/xsam_state.json``; errors name the file."""
    path = os.path.join(folder, STATE_NAME)
    try:
        with open(path) as f:
            state = json.load(f)
        return validate_state(state, global_step)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} is damaged: {error}. Resume from another checkpoint, or delete the file to "
            "start the XSAM schedule afresh"
        ) from None


def write_state_file(folder: str, state: Mapping[str, Any]) -> None:
    """Write ``folder/xsam_state.json`` through a temporary file and a rename, so a crash never leaves half."""
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".xsam_state.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(temporary, os.path.join(folder, STATE_NAME))
    except BaseException:
        os.unlink(temporary)
        raise

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
    hf_xsam.state.ResumeError: .../xsam_state.json is damaged: alpha is nan; it must be a finite number...
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["STATE_NAME", "SearchState", "ResumeError", "validate_state", "read_state_file", "write_state_file"]

STATE_NAME = "xsam_state.json"
# The searches kept in `search_history` (enough for the model card and the plots); older ones are counted only.
SEARCH_HISTORY_LENGTH = 64


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from: a damaged state file, or the weights of another model."""


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _real(value: Any) -> bool:
    """A number a float can hold (NaN and infinities too; not an int too large for a float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _finite(value: Any) -> bool:
    return _real(value) and math.isfinite(value)


def _shown(entry: Mapping[str, Any], name: str) -> str:
    return f"{entry[name]!r}" if name in entry else "missing"


def _validate_search(index: int, entry: Any) -> dict[str, Any]:
    """One ``search_history`` record: what the model card and the plots read from it must be there and sane."""
    where = f"search_history[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} is {type(entry).__name__}; it must be an object")
    if not _finite(entry.get("alpha")):
        raise ValueError(f"{where}.alpha is {_shown(entry, 'alpha')}; it must be a finite number")
    if not _real(entry.get("theta")):  # NaN where the search saw a non-finite gradient
        raise ValueError(f"{where}.theta is {_shown(entry, 'theta')}; it must be a number")
    if "step" in entry and not _count(entry["step"]):
        raise ValueError(f"{where}.step is {entry['step']!r}; it must be an integer >= 0")
    for name in ("losses", "alphas"):
        values = entry.get(name, [])
        if not isinstance(values, list) or not all(_real(value) for value in values):
            raise ValueError(f"{where}.{name} must be a list of numbers")
    return dict(entry)


@dataclass
class SearchState:
    """What the alpha searches have decided so far; the engine's part of a checkpoint.

    The fields are what :meth:`to_dict` saves and :meth:`from_dict` validates and restores.

    >>> state = SearchState(alpha=1.3, last_search_step=4, last_search_epoch=1, search_count=1)
    >>> SearchState.from_dict(state.to_dict()) == state
    True
    """

    alpha: float = 1.0
    last_search_step: int | None = None
    last_search_epoch: int | None = None
    search_count: int = 0
    search_history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=SEARCH_HISTORY_LENGTH))
    first_search_loss: float | None = None
    """The loss at ``w0`` of the first search: ``extrapolate_after_drop``'s reference (absent in older files)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-serialisable values."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"search_history": list(self.search_history)}

    def record_search(self, step: int, epoch: int, record: dict[str, Any]) -> None:
        """Note a search of optimizer step ``step`` in epoch ``epoch``, and its record (kept in the history)."""
        self.last_search_step, self.last_search_epoch = step, epoch
        self.search_count += 1
        self.search_history.append({**record, "step": step})

    @classmethod
    def from_dict(cls, state: Any, global_step: int | None = None, epoch: float | None = None) -> SearchState:
        """Check what :meth:`to_dict` saved; raise ``ValueError`` naming the first bad field.

        Args:
            state: the loaded JSON value.
            global_step: the optimizer step of the checkpoint; a search recorded after it is refused.
            epoch: the (fractional) epoch of the checkpoint; a search recorded in a later epoch is refused.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
        alpha = state.get("alpha", 1.0)
        if not _finite(alpha):
            raise ValueError(f"alpha is {alpha!r}; it must be a finite number")
        last_step, last_epoch = state.get("last_search_step"), state.get("last_search_epoch")
        for name, value in (("last_search_step", last_step), ("last_search_epoch", last_epoch)):
            if value is not None and not _count(value):
                raise ValueError(f"{name} is {value!r}; it must be null or an integer >= 0")
        if last_step is not None and global_step is not None and last_step > global_step:
            raise ValueError(f"last_search_step is {last_step}, after the checkpoint's own step {global_step}")
        if last_epoch is not None and epoch is not None and last_epoch > math.floor(epoch):
            raise ValueError(f"last_search_epoch is {last_epoch}, after the checkpoint's own epoch {epoch:g}")
        if (last_step is None) != (last_epoch is None):
            raise ValueError(
                f"last_search_step is {last_step!r} and last_search_epoch {last_epoch!r}; both are null (no search "
                "yet) or both are set"
            )
        history = state.get("search_history", [])
        if not isinstance(history, list):
            raise ValueError(f"search_history is {type(history).__name__}; it must be a list of objects")
        history = [_validate_search(index, entry) for index, entry in enumerate(history)]
        count = state.get("search_count", len(history))
        if not _count(count) or count < len(history):
            raise ValueError(
                f"search_count is {count!r}; it must be an integer >= the {len(history)} searches in search_history"
            )
        first_loss = state.get("first_search_loss")  # extrapolate_after_drop's reference; absent in older files
        if first_loss is not None and not _finite(first_loss):
            raise ValueError(f"first_search_loss is {first_loss!r}; it must be null or a finite number")
        return cls(
            alpha=float(alpha),
            last_search_step=last_step,
            last_search_epoch=last_epoch,
            search_count=count,
            search_history=deque(history, maxlen=SEARCH_HISTORY_LENGTH),
            first_search_loss=None if first_loss is None else float(first_loss),
        )


def validate_state(state: Any, global_step: int | None = None, epoch: float | None = None) -> dict[str, Any]:
    """Check a saved state file's value: the run's settings and the :class:`SearchState`; raise ``ValueError`` naming
    the first bad field.

    Returns:
        The saved fields, checked, with their defaults where an older file lacks them.
    """
    search = SearchState.from_dict(state, global_step, epoch)
    settings = state.get("settings")  # the run's XSAM settings and max_steps; absent in older files
    if settings is not None and not isinstance(settings, Mapping):
        raise ValueError(f"settings is {type(settings).__name__}; it must be null or an object")
    return {"settings": None if settings is None else dict(settings), **search.to_dict()}


def read_state_file(folder: str, global_step: int | None = None, epoch: float | None = None) -> dict[str, Any]:
    """Load and validate ``folder/xsam_state.json`` (see :func:`validate_state`); errors name the file."""
    path = os.path.join(folder, STATE_NAME)
    try:
        with open(path) as f:
            state = json.load(f)
        return validate_state(state, global_step, epoch)
    except OSError as error:  # a directory in its place, no permission
        raise ResumeError(f"{path} cannot be read: {error.strerror}. Resume from another checkpoint") from None
    except RecursionError:
        raise ResumeError(
            f"{path} is damaged: its JSON is nested too deeply to be a state file. Resume from another checkpoint, "
            "or delete the file to start the XSAM schedule afresh"
        ) from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ResumeError(
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

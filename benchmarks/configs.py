"""The configurations the studies compare, by name: one table, one meaning per name.

Every entry is the flags a configuration gives ``scripts/classify_images.py`` or ``scripts/translate.py`` after the
task's and the user's. ``benchmarks/study.py`` (every ``--task``), ``benchmarks/translation_study.py``,
``benchmarks/transfer_study.py`` and ``benchmarks/translation_transfer.py`` name their configurations from it;
``benchmarks/benchmark.py``'s timed steps have names of their own that none of these use (``xsam-nosearch``...),
and its schedules are entries of this table. docs/study.md ("Configuration names") lists them.

- ``xsam`` is XSAM with the paper's rule: the grid 0..2 searched once per epoch with any optimizer
  (``--alpha_max 2``) and no cap while the loss is high (``--extrapolate_after_drop 0``); ``xsam-default`` is
  what ``--sam_method xsam`` gives alone (the package's defaults: the grid ends at 1 with SGD, and alpha stays at
  most 1 until the loss has fallen 5%). With AdamW the two differ only in that cap.
- The other ``xsam-*`` entries are the paper's rule with one thing changed, named by it.
- ``none`` and ``adamw`` are the base optimizer alone (``adamw`` is the transfer studies' name: they fine-tune with
  AdamW).

A study may add configurations of its own (``--config NAME=FLAGS``) under a name that is not in the table.

Example:
    >>> CONFIGS["xsam"]
    ['--sam_method', 'xsam', '--extrapolate_after_drop', '0', '--alpha_max', '2']
    >>> parse_configs(["cheap=--sam_method xsam --sam_interval 2"])
    {'cheap': ['--sam_method', 'xsam', '--sam_interval', '2']}
"""

from __future__ import annotations

import itertools
import shlex

__all__ = [
    "CONFIGS",
    "TRANSFER_DEFAULTS",
    "TRANSFER_CHOICES",
    "TRANSFER_RENAMED",
    "parse_configs",
    "rho_free",
    "grid_top",
]

_PAPER = ["--sam_method", "xsam", "--extrapolate_after_drop", "0"]
_XSAM = [*_PAPER, "--alpha_max", "2"]
_CHEAP = [*_XSAM, "--alpha_search", "coarse_to_fine"]
# the order is the reports' order of rows and colours: new entries go at the end
CONFIGS = {
    "none": ["--sam_method", "none"],
    "sam": ["--sam_method", "sam"],
    "xsam": _XSAM,
    "xsam-default": ["--sam_method", "xsam"],
    # accuracy per cost (docs/study.md, "Accuracy per cost"): the cheap search, late starts, intervals with reuse
    "xsam-c2f": _CHEAP,
    "xsam-late50": [*_CHEAP, "--sam_start_ratio", "0.5"],
    "xsam-late75": [*_CHEAP, "--sam_start_ratio", "0.75"],
    "xsam-late50-i2": [*_CHEAP, "--sam_start_ratio", "0.5", "--sam_interval", "2"],
    # the README's cheap schedule
    "xsam-late50-i2-reuse": [*_CHEAP, "--sam_start_ratio", "0.5", "--sam_interval", "2", "--sam_reuse", "true"],
    "xsam-i2-reuse": [*_CHEAP, "--sam_interval", "2", "--sam_reuse", "true"],
    "xsam-i4-reuse": [*_CHEAP, "--sam_interval", "4", "--sam_reuse", "true"],
    "xsam-amax1": [*_PAPER, "--alpha_max", "1"],
    "xsam-amax3": [*_PAPER, "--alpha_max", "3"],
    "xsam-amax4": [*_PAPER, "--alpha_max", "4"],
    # the adaptive ascent (docs/method.md, "The adaptive ascent"): ASAM, and XSAM climbing as ASAM does
    "asam": ["--sam_method", "sam", "--sam_adaptive", "true"],
    "xsam-asam": [*_XSAM, "--sam_adaptive", "true"],
    "adamw": ["--sam_method", "none"],
    "xsam-i4": [*_CHEAP, "--sam_interval", "4"],
}
# what the transfer studies compare unless told otherwise: AdamW, SAM, XSAM as a user gets it, the cheap schedule
TRANSFER_DEFAULTS = ["adamw", "sam", "xsam-default", "xsam-late50-i2-reuse"]
# the transfer studies' names before this table, as their records (docs/study/transfer*.json, run folders) hold
# them; a record written since names its flags
TRANSFER_RENAMED = {"xsam": "xsam-default", "cheap": "xsam-late50-i2-reuse"}


def parse_configs(specs: list[str]) -> dict[str, list[str]]:
    """The configurations given as ``NAME=FLAGS`` (``--config`` of a study), under names the table does not use."""
    configs: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name.isidentifier() or name in CONFIGS or name in configs or not flags.strip()[:2] == "--":
            raise ValueError(
                f"Invalid --config {spec!r}: it must be NAME=FLAGS with a new name (letters, digits, _; not a name of "
                'benchmarks/configs.py) and flags of the script, e.g. cheap="--sam_method xsam --sam_interval 2"'
            )
        configs[name] = shlex.split(flags)
    return configs


def rho_free(flags: list[str]) -> bool:
    """Whether a configuration trains without sharpness-aware steps (its runs do not depend on rho)."""
    return any(a == "--sam_method" and b == "none" for a, b in itertools.pairwise(flags))


def grid_top(flags: list[str]) -> float:
    """The top of the alpha grid that the script's flags give (the last ``--alpha_max``; else 1 with SGD, else 2).

    >>> grid_top(["--optim", "sgd"]), grid_top(["--optim", "sgd", "--alpha_max", "2"]), grid_top([])
    (1.0, 2.0, 2.0)
    """
    values = [value for flag, value in itertools.pairwise(flags) if flag == "--alpha_max"]
    if values:
        return float(values[-1])
    return 1.0 if ("--optim", "sgd") in itertools.pairwise(flags) else 2.0


# what the transfer studies can compare: AdamW, the baseline, and the configurations whose rho they choose
TRANSFER_CHOICES = [name for name, flags in CONFIGS.items() if name == "adamw" or not rho_free(flags)]

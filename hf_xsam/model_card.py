"""The XSAM section of a model card: the settings, what alpha and the sharpness did, and the citation.

`XSAMTrainer.create_model_card` (and so `push_to_hub`) writes the Trainer's card, then calls
:func:`add_xsam_section`, which adds the section and the Hub metadata (``library_name: transformers``, tags
``xsam`` and ``sharpness-aware-minimization``). :func:`xsam_section` builds the same markdown from plain values,
for cards written another way (see ``model_cards/template.md``).

Example:
    >>> from hf_xsam.model_card import xsam_section
    >>> logs = [{"step": 10, "epoch": 1.0, "loss": 2.0, "xsam/alpha": 1.3, "xsam/theta": 12.0, "xsam/sharpness": 0.1}]
    >>> text = xsam_section({"sam_method": "xsam", "rho": 0.05}, logs, {"alpha": 1.3, "search_history": []})
    >>> "| rho | 0.05 |" in text and "Final alpha: 1.3" in text
    True
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard

__all__ = ["XSAM_TAGS", "XSAM_CITATION", "PAPER_URL", "xsam_section", "add_xsam_section"]

XSAM_TAGS = ["xsam", "sharpness-aware-minimization"]
PAPER_URL = "https://arxiv.org/abs/2603.10048"
XSAM_CITATION = """@inproceedings{chen2026xsam,
  title     = {Revisiting Sharpness-Aware Minimization: A More Faithful and Effective Implementation},
  author    = {Chen, J. and Zhou, Z.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2603.10048},
  archivePrefix = {arXiv}
}"""
SECTION_START = "<!-- hf_xsam section start -->"
SECTION_END = "<!-- hf_xsam section end -->"
MAX_ROWS = 10
# settings that only the alpha search of `sam_method="xsam"` reads: a SAM card does not list them
SEARCH_SETTINGS = ("rho_max", "alpha", "alpha_max", "alpha_step", "alpha_search_interval")

_METHODS = {
    "xsam": "XSAM: each step climbs `rho` along the gradient, then steps along the direction at angle "
    "`alpha * theta` from the ascent direction towards the gradient there, with `alpha` searched for the "
    "largest loss at radius `rho_max`",
    "sam": "SAM (XSAM with alpha fixed at 1): each step climbs `rho` along the gradient and steps with the "
    "gradient found there",
}
_PLAIN = (
    "This model was trained without sharpness-aware minimization: plain training, one forward and backward pass "
    "per step with the base optimizer alone (`sam_method=none`, the baseline of hf_xsam's scripts). No XSAM "
    "setting took part."
)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _settings_table(settings: Mapping[str, Any]) -> list[str]:
    shown = dict(settings)
    if shown.get("sam_method") == "sam":
        shown = {key: value for key, value in shown.items() if key not in SEARCH_SETTINGS}
    rho = shown.get("rho")
    if "rho_max" in shown and shown["rho_max"] is None and rho is not None:
        shown["rho_max"] = f"{_fmt(2 * rho)} (2 * rho)"
    if "alpha_search_interval" in shown:
        interval = shown["alpha_search_interval"]
        shown["alpha_search_interval"] = {None: "first step of every epoch", 0: "never"}.get(interval, interval)
    return ["| setting | value |", "| --- | --- |"] + [f"| {key} | {_fmt(value)} |" for key, value in shown.items()]


def _mean_alpha(train_logs: list[Mapping[str, Any]]) -> float | None:
    """Mean alpha per optimizer step: each log's mean, weighted by the steps it covers."""
    total = weight = 0.0
    previous = 0
    for log in train_logs:
        steps = max(log.get("step", previous + 1) - previous, 1)
        previous = log.get("step", previous + steps)
        total += steps * log["xsam/alpha"]
        weight += steps
    return total / weight if weight else None


def _evenly(rows: list[Any], count: int) -> list[Any]:
    if len(rows) <= count:
        return rows
    return [rows[round(i * (len(rows) - 1) / (count - 1))] for i in range(count)]


def xsam_section(
    settings: Mapping[str, Any],
    log_history: Sequence[Mapping[str, Any]] = (),
    engine_state: Mapping[str, Any] | None = None,
) -> str:
    """The markdown of the XSAM section.

    Args:
        settings: the XSAM settings, e.g. ``XSAMTrainingArguments.xsam_settings``.
        log_history: training logs with the ``xsam/*`` figures, e.g. ``trainer.state.log_history``.
        engine_state: ``XSAM.state_dict()`` of the run (final alpha and the searches), if any.

    Returns:
        The section, between HTML comments that let :func:`add_xsam_section` replace it.
    """
    method = settings.get("sam_method", "xsam")
    if method == "none":
        return "\n".join([SECTION_START, "## Training", "", _PLAIN, "", "| setting | value |", "| --- | --- |",
                          "| sam_method | none |", SECTION_END]) + "\n"  # fmt: skip
    lines = [
        SECTION_START,
        "## Training with XSAM",
        "",
        f"This model was trained with hf_xsam using {_METHODS.get(method, method)} "
        f"([Chen and Zhou, ICLR 2026]({PAPER_URL})). XSAM is eXplicit Sharpness-Aware Minimization, "
        'not "X-SAM" (arXiv:2601.10251).',
        "",
        "### Settings",
        "",
        *_settings_table(settings),
        "",
    ]
    train_logs = [log for log in log_history if "xsam/sharpness" in log]
    if train_logs or engine_state:
        lines += ["### What XSAM did", ""]
    if engine_state and method == "xsam":
        searches = engine_state.get("search_history", [])
        mean_alpha = _mean_alpha([log for log in train_logs if "xsam/alpha" in log])
        lines.append(
            f"- Final alpha: {_fmt(engine_state['alpha'])}"
            + (f"; mean alpha over training: {mean_alpha:.3g}" if mean_alpha is not None else "")
            + f"; {engine_state.get('search_count', len(searches))} alpha searches."
        )
        if searches:
            shown = _evenly(searches, MAX_ROWS)
            lines.append(
                "- Alpha chosen by the searches (step: alpha): "
                + ", ".join(f"{search.get('step', '?')}: {_fmt(search['alpha'])}" for search in shown)
                + (" (evenly spaced selection)" if len(shown) < len(searches) else "")
                + "."
            )
    if train_logs:
        sharpness = [log["xsam/sharpness"] for log in train_logs]
        lines += [
            f"- Sharpness (loss at the ascent point minus loss): {sharpness[0]:.4g} at the first log, "
            f"{sharpness[-1]:.4g} at the last, {sum(sharpness) / len(sharpness):.4g} on average.",
            "",
        ]
        columns = {"step": "step", "epoch": "epoch", "loss": "loss", "xsam/sharpness": "sharpness"}
        if method == "xsam":  # SAM's alpha is 1 throughout
            columns["xsam/alpha"] = "alpha"
        columns["xsam/theta"] = "theta (deg)"
        keys = tuple(columns)
        lines += ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
        for log in _evenly(train_logs, MAX_ROWS):
            cells = [log.get(key, "") for key in keys]
            lines.append("| " + " | ".join(_fmt(cell) for cell in cells) + " |")
    else:
        lines.append("No training step was logged, so there are no XSAM figures.")
    lines += ["", "### Citation", "", "```bibtex", XSAM_CITATION, "```", SECTION_END]
    return "\n".join(lines) + "\n"


def add_xsam_section(card_path: str, trainer: Any) -> None:
    """Add the XSAM section and Hub metadata to the model card at ``card_path``; rerunning replaces the section.

    Args:
        card_path: the card written by ``Trainer.create_model_card`` (``README.md`` of the output folder).
        trainer: an ``XSAMTrainer`` or ``XSAMSeq2SeqTrainer``; its settings, logs and engine state are read.
    """
    card = ModelCard.load(card_path)
    card.data.library_name = card.data.library_name or "transformers"
    settings = trainer.args.xsam_settings
    tags = list(card.data.tags or [])
    tags += [tag for tag in XSAM_TAGS if tag not in tags]
    if settings["sam_method"] == "none":  # a baseline was not trained with sharpness-aware minimization
        tags = [tag for tag in tags if tag != "sharpness-aware-minimization"]
    card.data.tags = tags
    for result in card.data.eval_results or []:  # the Trainer writes a missing split or config as "None"
        if result.dataset_split == "None":
            result.dataset_split = None
        if result.dataset_config == "None":
            result.dataset_config = None
    engine = getattr(trainer, "xsam", None)
    section = xsam_section(settings, trainer.state.log_history, engine.state_dict() if engine is not None else None)
    text = _warmup_as_set(card.text, trainer)
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.text = text
    card.save(card_path)


def _warmup_as_set(text: str, trainer: Any) -> str:
    """The Trainer's card lists ``warmup_steps`` as steps; below 1 it is a ratio of the training steps: say so."""
    warmup = trainer.args.warmup_steps
    if not 0 < warmup < 1:
        return text
    total = trainer.state.max_steps
    steps = f" ({trainer.args.get_warmup_steps(total)} of the {total} training steps)" if total else ""
    line = f"- lr_scheduler_warmup_ratio: {warmup:g}{steps}"
    return re.sub(r"^- lr_scheduler_warmup_steps: .*$", line, text, count=1, flags=re.M)

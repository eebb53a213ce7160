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

from huggingface_hub import EvalResult, ModelCard

from .ascent import ASCENTS, AdaptiveAscent
from .rules import STEP_RULES, StepRule

__all__ = ["XSAM_TAGS", "XSAM_CITATION", "PAPER_URL", "xsam_section", "add_xsam_section"]

XSAM_TAGS = list(STEP_RULES["xsam"].tags)
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
# the trainer's figure: sharpness-aware optimizer steps since the last training log
SAM_STEPS = "xsam/sharpness_aware_steps"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _step_rule(settings: Mapping[str, Any]) -> StepRule:
    """The step rule of ``settings``: ``sam_method``'s, climbing with ASAM's ascent where ``sam_adaptive`` is on (as
    ``XSAMConfig.step_rule`` gives it; the table shows its ``sam_adaptive_eta``)."""
    rule = STEP_RULES[settings.get("sam_method", "xsam")]
    return rule.with_ascent(AdaptiveAscent()) if settings.get("sam_adaptive") else rule


def _settings_table(settings: Mapping[str, Any]) -> list[str]:
    """The settings the step rule reads (``StepRule.settings``), as they were set."""
    rule = _step_rule(settings)
    names = ["sam_method", *rule.settings]
    if not settings.get("sam_reuse"):
        names = [name for name in names if name != "sam_reuse_scale"]
    shown = {name: settings[name] for name in names if name in settings}
    rho = shown.get("rho")
    if "rho_max" in shown and shown["rho_max"] is None and rho is not None:
        shown["rho_max"] = f"{_fmt(2 * rho)} (2 * rho)"
    if "alpha_max" in shown and shown["alpha_max"] is None:  # settings given without the run's optimizer
        shown["alpha_max"] = "None (2; 1 with SGD)"
    if "alpha_search_interval" in shown:
        interval = shown["alpha_search_interval"]
        shown["alpha_search_interval"] = {None: "first step of every epoch", 0: "never"}.get(interval, interval)
    return ["| setting | value |", "| --- | --- |"] + [f"| {key} | {_fmt(value)} |" for key, value in shown.items()]


def _step_weighted_mean(train_logs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Mean of ``key`` per optimizer step: each log's mean, weighted by the steps it covers."""
    total = weight = 0.0
    previous = 0
    for log in train_logs:
        steps = max(log.get("step", previous + 1) - previous, 1)
        previous = log.get("step", previous + steps)
        if key in log:
            total += steps * log[key]
            weight += steps
    return total / weight if weight else None


def _mean_alpha(train_logs: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean alpha per sharpness-aware step: each log's alpha (its mean over the sharpness-aware steps it covers)
    weighted by their number, ``xsam/sharpness_aware_steps``. Plain steps (``sam_start_ratio``, ``sam_interval``) take
    no alpha and weigh nothing. Logs written before that figure was logged are weighted by the optimizer steps they
    cover."""
    if not all(SAM_STEPS in log for log in train_logs if "xsam/alpha" in log):
        return _step_weighted_mean(train_logs, "xsam/alpha")
    counted = [(log["xsam/alpha"], log[SAM_STEPS]) for log in train_logs if "xsam/alpha" in log]
    weight = sum(steps for _, steps in counted)
    return sum(alpha * steps for alpha, steps in counted) / weight if weight else None


def _mean_cost(log_history: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """Forward-backward passes and search forwards per optimizer step, over the training logs that have them."""
    train_logs = [log for log in log_history if "xsam/passes" in log]
    if not train_logs:
        return None
    return _step_weighted_mean(train_logs, "xsam/passes"), _step_weighted_mean(train_logs, "xsam/search_forwards")


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
    rule = _step_rule(settings)
    if not rule.sharpness_aware:
        return "\n".join([SECTION_START, "## Training", "", f"This model was trained with hf_xsam using {rule.card}.",
                          "", *_settings_table(settings), SECTION_END]) + "\n"  # fmt: skip
    lines = [
        SECTION_START,
        "## Training with XSAM",
        "",
        f"This model was trained with hf_xsam using {rule.card} "
        f"([Chen and Zhou, ICLR 2026]({PAPER_URL})). XSAM is eXplicit Sharpness-Aware Minimization, "
        'not "X-SAM" (arXiv:2601.10251).',
        "",
        "### Settings",
        "",
        *_settings_table(settings),
        "",
    ]
    cost = _mean_cost(log_history)
    if cost is not None:
        lines += [
            f"Cost: {cost[0]:.3g} forward-backward passes and {cost[1]:.3g} forward passes of the alpha search per "
            "optimizer step, on average over the logged steps (the base optimizer alone: one pass per micro-batch).",
            "",
        ]
    train_logs = [log for log in log_history if "xsam/sharpness" in log]
    if train_logs or engine_state:
        lines += ["### What XSAM did", ""]
    if engine_state and rule.searches_alpha:
        searches = engine_state.get("search_history", [])
        mean_alpha = _mean_alpha(train_logs)
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
        if rule.fixed_alpha is None:  # a fixed alpha says nothing per step
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


def add_xsam_section(card_path: str, trainer: Any, about: Mapping[str, str] | None = None) -> None:
    """Add the XSAM section and Hub metadata to the model card at ``card_path``; rerunning replaces the section.

    It also tidies what the Trainer wrote: every evaluation metric goes into ``model-index`` (the Trainer keeps only
    those it knows: BLEU but not chrF), counters such as ``Num Tokens`` leave the results, an empty "Training
    results" heading goes, the optimizer line reads as the ``optim`` flag, and the sections the Trainer leaves as
    "More information needed" get the text of ``about`` where it has some.

    Args:
        card_path: the card written by ``Trainer.create_model_card`` (``README.md`` of the output folder).
        trainer: an ``XSAMTrainer`` or ``XSAMSeq2SeqTrainer``; its settings, logs and engine state are read.
        about: text for the Trainer's placeholder sections, by key: ``"description"`` (Model description),
            ``"uses"`` (Intended uses & limitations), ``"data"`` (Training and evaluation data).
    """
    card = ModelCard.load(card_path)
    card.data.library_name = card.data.library_name or "transformers"
    engine = getattr(trainer, "xsam", None)
    # alpha_max as the run used it (None means 2, or 1 with SGD)
    top = engine.alpha_max if engine is not None else trainer.args.top_alpha(trainer.optimizer)
    settings = {**trainer.args.xsam_settings, "alpha_max": top}
    rule = trainer.args.step_rule
    # the tags of the rule the model was trained with, and none that another rule would give
    every_rule = [other.with_ascent(ascent) for other in STEP_RULES.values() for ascent in ASCENTS]
    other_rules_tags = {tag for other in every_rule for tag in other.tags} - set(rule.tags)
    tags = [tag for tag in card.data.tags or [] if tag not in other_rules_tags]
    card.data.tags = tags + [tag for tag in rule.tags if tag not in tags]
    for result in card.data.eval_results or []:  # the Trainer writes a missing split or config as "None"
        if result.dataset_split == "None":
            result.dataset_split = None
        if result.dataset_config == "None":
            result.dataset_config = None
    _add_missing_metrics(card, trainer.state.log_history)
    section = xsam_section(settings, trainer.state.log_history, engine.state_dict() if engine is not None else None)
    text = _tidy_trainer_text(_warmup_as_set(card.text, trainer), trainer.args, about or {})
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


# what the Trainer's card calls its placeholder sections, by the key of ``about`` (see add_xsam_section)
PLACEHOLDER_SECTIONS = {
    "description": "Model description",
    "uses": "Intended uses & limitations",
    "data": "Training and evaluation data",
}
# evaluation log entries that are not results: timings, counters, the generation length, TRL's entropy
NOT_RESULTS = (
    "loss",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "gen_len",
    "num_tokens",
    "epoch",
    "entropy",
)


def _tidy_trainer_text(text: str, args: Any, about: Mapping[str, str]) -> str:
    """The Trainer's card text with the placeholders of ``about`` filled, no counter among the results, no empty
    "Training results" heading and the optimizer named as the ``optim`` flag names it."""
    for key, heading in PLACEHOLDER_SECTIONS.items():
        if about.get(key):
            text = text.replace(f"## {heading}\n\nMore information needed", f"## {heading}\n\n{about[key].strip()}")
    text = re.sub(r"^- Num Tokens: .*\n", "", text, flags=re.M)
    text = re.sub(r"### Training results\n\s*\n(?=#)", "", text)
    optim = getattr(args.optim, "value", args.optim)

    def optimizer_line(match: re.Match) -> str:
        extra = match[3] if match[3] != "No additional optimizer arguments" else ""
        return f"- optimizer: {optim} (betas {match[1]}, epsilon {match[2]}{', ' + extra if extra else ''})"

    pattern = (
        r"^- optimizer: Use OptimizerNames\.\w+ with betas=(\([^)]*\)) and epsilon=(\S+) and optimizer_args=(.*)$"
    )
    return re.sub(pattern, optimizer_line, text, flags=re.M)


def _add_missing_metrics(card: ModelCard, log_history: Sequence[Mapping[str, Any]]) -> None:
    """Put every result of the last evaluation into ``model-index`` beside those the Trainer put there (same task
    and dataset), and take counters out of it."""
    results = list(card.data.eval_results or [])
    if not results:
        return
    evaluations = [log for log in log_history if any(key.startswith("eval_") for key in log)]
    last = evaluations[-1] if evaluations else {}
    known = {result.metric_type for result in results}
    template = results[0]
    for key, value in last.items():
        name = key.removeprefix("eval_")
        if not key.startswith("eval_") or name in known or name.endswith(NOT_RESULTS) or not isinstance(value, float):
            continue
        results.append(
            EvalResult(
                task_type=template.task_type,
                task_name=template.task_name,
                dataset_type=template.dataset_type,
                dataset_name=template.dataset_name,
                dataset_config=template.dataset_config,
                dataset_split=template.dataset_split,
                dataset_args=template.dataset_args,
                metric_type=name,
                metric_name=name.replace("_", " ").title() if name != "chrf" else "chrF",
                metric_value=value,
            )
        )
    card.data.eval_results = [result for result in results if not result.metric_type.endswith(NOT_RESULTS)] or None
    names = [result.metric_type for result in card.data.eval_results or []]
    card.data.metrics = [
        *(card.data.metrics or []),
        *(name for name in names if name not in (card.data.metrics or [])),
    ]

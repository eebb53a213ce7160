"""The XSAM section of model cards: built from plain values, added by the trainer, and the Jinja template."""

import re
from pathlib import Path

import pytest
from datasets import Dataset
from huggingface_hub import ModelCard, ModelCardData
from transformers import BertConfig, BertForSequenceClassification

from helpers import training_args
from hf_xsam import XSAMConfig, XSAMTrainer
from hf_xsam.model_card import SECTION_START, XSAM_CITATION, XSAM_TAGS, add_xsam_section, xsam_section
from hf_xsam.rules import SEARCH_SETTINGS

ROOT = Path(__file__).parent.parent
TEMPLATE = ROOT / "model_cards" / "template.md"

LOGS = [
    {"step": 2, "epoch": 0.5, "loss": 2.0, "xsam/alpha": 1.0, "xsam/theta": 20.0, "xsam/sharpness": 0.3},
    {"step": 4, "epoch": 1.0, "eval_loss": 1.9},
    {"step": 8, "epoch": 2.0, "loss": 1.0, "xsam/alpha": 1.6, "xsam/theta": 30.0, "xsam/sharpness": 0.1},
]
STATE = {"alpha": 1.6, "search_history": [{"alpha": 1.0, "step": 0}, {"alpha": 1.6, "step": 4}]}


def tiny_trainer(tmp_path, **overrides):
    config = BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=2
    )
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]] * 4, "labels": [0, 1] * 4})
    settings = dict(max_steps=4, per_device_train_batch_size=4, rho=0.07, alpha_search_interval=2)
    settings.update(overrides)
    trainer = XSAMTrainer(
        model=BertForSequenceClassification(config), args=training_args(tmp_path, **settings), train_dataset=data
    )
    trainer.train()
    return trainer


def test_section_reports_settings_alpha_sharpness_and_citation():
    text = xsam_section(
        {"sam_method": "xsam", "rho": 0.05, "rho_max": None, "alpha_search_interval": None}, LOGS, STATE
    )
    assert "| rho | 0.05 |" in text
    assert "| rho_max | 0.1 (2 * rho) |" in text
    assert "| alpha_search_interval | first step of every epoch |" in text
    # mean alpha weights each log by the steps it covers: (2 * 1.0 + 6 * 1.6) / 8
    assert "Final alpha: 1.6; mean alpha over training: 1.45; 2 alpha searches." in text
    assert "0: 1, 4: 1.6" in text
    assert "0.3 at the first log, 0.1 at the last, 0.2 on average" in text
    assert "| 8 | 2 | 1 | 0.1 | 1.6 | 30 |" in text
    assert XSAM_CITATION in text and "arxiv.org/abs/2603.10048" in text
    assert 'not "X-SAM"' in text


def test_mean_alpha_averages_over_the_sharpness_aware_steps_only():
    # issue 26: steps 1-6 plain (a late start), then four sharpness-aware steps with alphas 2, 0, 0, 0, one per log:
    # the first log covered 7 optimizer steps, which gave a card's mean of (7 * 2) / 10 = 1.4 instead of 0.5
    logs = [
        {"step": s, "loss": 1.0, "xsam/alpha": a, "xsam/sharpness_aware_steps": 1, "xsam/sharpness": 0.1}
        for s, a in zip(range(7, 11), [2.0, 0.0, 0.0, 0.0])
    ]
    text = xsam_section({"sam_method": "xsam"}, logs, {"alpha": 0.0, "search_history": []})
    assert "mean alpha over training: 0.5;" in text
    # sam_interval 2, one log per 4 steps: 2 sharpness-aware steps at alpha 2, then 2 at 0, then 1 at 0.5
    counts = [{**log, "xsam/sharpness_aware_steps": n} for log, n in zip(logs, [2, 2, 1])]
    counts = [{**log, "xsam/alpha": a} for log, a in zip(counts, [2.0, 0.0, 0.5])]
    text = xsam_section({"sam_method": "xsam"}, counts, {"alpha": 0.5, "search_history": []})
    assert "mean alpha over training: 0.9;" in text


def test_section_keeps_at_most_ten_rows_including_the_last():
    logs = [{"step": s, "loss": 1.0, "xsam/alpha": 1.0, "xsam/sharpness": s / 100} for s in range(1, 101)]
    text = xsam_section({"sam_method": "xsam"}, logs)
    rows = text.split("| step |", 1)[1].splitlines()[2:12]
    assert [row.split(" | ")[0] for row in rows] == [f"| {s}" for s in (1, 12, 23, 34, 45, 56, 67, 78, 89, 100)]


SETTINGS = XSAMConfig().xsam_settings


def test_baseline_section_says_plain_training_and_lists_no_xsam_setting():
    text = xsam_section({**SETTINGS, "sam_method": "none"}, LOGS, STATE)
    assert "plain training" in text and "without sharpness-aware minimization" in text
    assert "| sam_method | none |" in text
    assert "| rho |" not in text and "| alpha" not in text and "What XSAM did" not in text
    assert "Training with XSAM" not in text


def test_sam_section_lists_no_alpha_search_setting():
    text = xsam_section({**SETTINGS, "sam_method": "sam"}, LOGS, STATE)
    assert "| rho | 0.05 |" in text and "| ascent_steps | 1 |" in text
    assert not [name for name in SEARCH_SETTINGS if f"| {name} |" in text]
    assert "Final alpha" not in text
    xsam_text = xsam_section(SETTINGS, LOGS, STATE)
    assert all(f"| {name} |" in xsam_text for name in SEARCH_SETTINGS)


@pytest.mark.parametrize("method", ["xsam", "sam", "none"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_section_lists_the_adaptive_ascent_where_the_rule_climbs_with_it(method, adaptive):
    text = xsam_section({**SETTINGS, "sam_method": method, "sam_adaptive": adaptive, "sam_adaptive_eta": 0.0}, LOGS)
    climbs = adaptive and method != "none"
    assert ("| sam_adaptive | True |\n| sam_adaptive_eta | 0 |" in text) == climbs
    assert ("| sam_adaptive" in text) == climbs, "the settings of an ascent the rule does not take are not listed"
    assert ("the ascent is adaptive (ASAM, Kwon et al. 2021)" in text) == climbs


@pytest.mark.parametrize("adaptive", [False, True])
def test_trainer_card_has_xsam_metadata_and_section(tmp_path, adaptive):
    trainer = tiny_trainer(tmp_path, sam_adaptive=adaptive, sam_adaptive_eta=0.05)
    trainer.create_model_card(model_name="tiny")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert set(XSAM_TAGS) <= set(card.data.tags)
    assert ("asam" in card.data.tags) == adaptive
    assert ("| sam_adaptive_eta | 0.05 |" in card.text) == adaptive
    assert ("the ascent is adaptive" in card.text) == adaptive
    assert "| rho | 0.07 |" in card.text and "| alpha_search_interval | 2 |" in card.text
    assert f"Final alpha: {trainer.xsam.alpha:.4g}" in card.text
    assert "2 alpha searches" in card.text

    add_xsam_section(str(tmp_path / "README.md"), trainer)  # again: the section is replaced, not repeated
    trainer.create_model_card(model_name="tiny")
    assert ModelCard.load(tmp_path / "README.md").text.count(SECTION_START) == 1


def test_trainer_card_of_the_baseline_does_not_claim_sharpness_aware_training(tmp_path):
    trainer = tiny_trainer(tmp_path, sam_method="none")
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    assert "| sam_method | none |" in card.text and "plain training" in card.text
    assert "xsam" not in card.data.tags and "sharpness-aware-minimization" not in card.data.tags


def test_a_card_rewritten_for_another_run_drops_the_adaptive_ascents_tag(tmp_path):
    asam = tiny_trainer(tmp_path, sam_method="sam", sam_adaptive=True)
    asam.create_model_card(model_name="tiny")
    assert "asam" in ModelCard.load(tmp_path / "README.md").data.tags
    sam = tiny_trainer(tmp_path, sam_method="sam")
    add_xsam_section(str(tmp_path / "README.md"), sam)
    tags = ModelCard.load(tmp_path / "README.md").data.tags
    assert "asam" not in tags and "sharpness-aware-minimization" in tags


def test_trainer_card_prints_a_warmup_ratio_as_a_ratio(tmp_path):
    trainer = tiny_trainer(tmp_path, warmup_steps=0.25, max_steps=8)
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert "- lr_scheduler_warmup_ratio: 0.25 (2 of the 8 training steps)" in text  # ceil(0.25 * 8)
    assert "lr_scheduler_warmup_steps" not in text

    trainer = tiny_trainer(tmp_path, warmup_steps=3)
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert "- lr_scheduler_warmup_steps: 3" in text and "warmup_ratio" not in text


@pytest.mark.parametrize("method", ["sam", "xsam"])
def test_template_renders_a_card_with_the_section(method):
    data = ModelCardData(library_name="transformers", tags=XSAM_TAGS, license="apache-2.0")
    section = xsam_section({"sam_method": method}, LOGS, STATE)
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name="my-model", model_summary="A model.", xsam_section=section
    )
    parsed = ModelCard(str(card))
    assert parsed.data.tags == XSAM_TAGS and parsed.data.library_name == "transformers"
    assert "# my-model" in parsed.text and f"| sam_method | {method} |" in parsed.text


def test_the_card_example_of_model_cards_readme_runs(tmp_path, monkeypatch):
    readme = (ROOT / "model_cards" / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example.replace("model_cards/template.md", str(TEMPLATE)), "README card example", "exec"), {})
    card = ModelCard.load(tmp_path / "my-model" / "README.md")
    assert set(XSAM_TAGS) <= set(card.data.tags) and "Final alpha: 1.3" in card.text

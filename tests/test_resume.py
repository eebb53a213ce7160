"""Resuming: the weights of every model type, damaged state files, and settings changed since the checkpoint."""

import json
import logging
import math
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)

from helpers import TinyClassifier, as_dataset, make_data, training_args
from hf_xsam import XSAM, XSAMTrainer
from hf_xsam.state import STATE_NAME, read_state_file, write_state_file

SEQ2SEQ = dict(vocab_size=20, pad_token_id=0, decoder_start_token_id=0)
MODELS = {
    "vit": lambda labels=2: ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            num_labels=labels,
        )
    ),
    "bert": lambda labels=2: BertForSequenceClassification(
        BertConfig(
            vocab_size=20,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            num_labels=labels,
        )
    ),
    "marian": lambda labels=2: MarianMTModel(
        MarianConfig(
            d_model=8,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=8,
            decoder_ffn_dim=8,
            max_position_embeddings=16,
            **SEQ2SEQ,
        )
    ),
    "t5": lambda labels=2: T5ForConditionalGeneration(
        T5Config(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, **SEQ2SEQ)
    ),
}


def build(kind, seed, **kwargs):
    torch.manual_seed(seed)
    return MODELS[kind](**kwargs)


def dataset(kind):
    generator = torch.Generator().manual_seed(0)
    if kind == "vit":
        return Dataset.from_dict(
            {"pixel_values": torch.randn(8, 3, 8, 8, generator=generator).tolist(), "labels": [0, 1] * 4}
        )
    tokens = torch.randint(1, 20, (8, 5), generator=generator).tolist()
    if kind == "bert":
        return Dataset.from_dict({"input_ids": tokens, "labels": [0, 1] * 4})
    return Dataset.from_dict({"input_ids": tokens, "labels": tokens})


def args_for(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=4,
        learning_rate=0.05,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        rho=0.1,
    )
    settings.update(overrides)
    return training_args(tmp_path, **settings)


class WeightsAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, tmp_path_factory):
    """A model trained 2 steps and its checkpoint."""
    kind, out = request.param, tmp_path_factory.mktemp(request.param)
    model = build(kind, seed=0)
    XSAMTrainer(model=model, args=args_for(out), train_dataset=dataset(kind)).train()
    return kind, model, out / "checkpoint-2"


def test_resume_restores_every_weight(trained, tmp_path):
    kind, model, checkpoint = trained
    start = WeightsAtStart()
    trainer = XSAMTrainer(
        model=build(kind, seed=1), args=args_for(tmp_path), train_dataset=dataset(kind), callbacks=[start]
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    expected = model.state_dict()
    assert start.weights.keys() == expected.keys()
    assert all(torch.equal(start.weights[name], expected[name]) for name in expected)


def test_a_checkpoint_of_another_model_stops_the_resume(tmp_path):
    XSAMTrainer(model=build("vit", seed=0), args=args_for(tmp_path / "a"), train_dataset=dataset("vit")).train()
    other = XSAMTrainer(
        model=build("vit", seed=0, labels=3), args=args_for(tmp_path / "b"), train_dataset=dataset("vit")
    )
    with pytest.raises(ValueError, match="Cannot resume from .*checkpoint-2.*ViTForImageClassification"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A TinyClassifier run of 4 steps (2 an epoch, searching every epoch) with a checkpoint at step 3."""
    out = tmp_path_factory.mktemp("tiny")
    args = args_for(out, max_steps=4, save_steps=3, optim="sgd", per_device_train_batch_size=4)
    XSAMTrainer(model=TinyClassifier(), args=args, train_dataset=as_dataset(make_data(n=8))).train()
    return out / "checkpoint-3"


def resume(checkpoint, tmp_path, state=None, raw=None, **settings):
    """Resume from a copy of ``checkpoint`` whose state file holds ``state`` (or the text ``raw``)."""
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, folder)
    if raw is not None:
        (folder / STATE_NAME).write_text(raw)
    elif state is not None:
        write_state_file(str(folder), state)
    args = args_for(tmp_path, max_steps=4, save_strategy="no", optim="sgd", **settings)
    trainer = XSAMTrainer(model=TinyClassifier(), args=args, train_dataset=as_dataset(make_data(n=8)))
    trainer.train(resume_from_checkpoint=str(folder))
    return trainer


@pytest.mark.parametrize(
    "raw, match",
    [
        ('{"alpha": 1.3, "last_search', "xsam_state.json is damaged: Unterminated string"),
        ('{"alpha": NaN}', "xsam_state.json is damaged: alpha is nan"),
        ('{"alpha": "big"}', "xsam_state.json is damaged: alpha is 'big'"),
        ('{"alpha": 1.0, "last_search_step": 99}', "last_search_step is 99, after the checkpoint's own step 3"),
        ('{"alpha": 1.0, "last_search_epoch": -1}', "last_search_epoch is -1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"alpha": ' + "9" * 400 + "}", "xsam_state.json is damaged: alpha is 9999"),
        ('{"alpha": 1.0, "search_history": ' + "[" * 10**5 + "]" * 10**5 + "}", "xsam_state.json .*nested too deep"),
        ('{"alpha": 1.0, "search_history": [{"theta": 3.0}]}', r"damaged: search_history\[0\]\.alpha is missing"),
        ('{"alpha": 1.0, "search_history": [{"alpha": 1.0}]}', r"damaged: search_history\[0\]\.theta is missing"),
        (
            '{"alpha": 1.0, "search_history": [{"alpha": 1.0, "theta": 2.0, "losses": [[1.0]]}]}',
            r"search_history\[0\]\.losses must be a list of numbers",
        ),
        # the checkpoint is at epoch 1.5 (step 3, two steps an epoch)
        (
            '{"alpha": 1.0, "last_search_step": 2, "last_search_epoch": 8}',
            "damaged: last_search_epoch is 8, after the checkpoint's own epoch 1.5",
        ),
        ('{"alpha": 1.0, "last_search_step": 2}', "damaged: last_search_step is 2 and last_search_epoch None"),
        ('{"alpha": 1.0, "search_count": 0, "search_history": [{"alpha": 1.0, "theta": 2.0}]}', "search_count is 0"),
    ],
)
def test_a_damaged_state_file_stops_the_resume_naming_file_and_field(checkpoint, tmp_path, raw, match):
    with pytest.raises(ValueError, match=match):
        resume(checkpoint, tmp_path, raw=raw)


def test_a_directory_in_place_of_the_state_file_stops_the_resume(checkpoint, tmp_path):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, folder)
    (folder / STATE_NAME).unlink()
    (folder / STATE_NAME).mkdir()
    args = args_for(tmp_path, max_steps=4, save_strategy="no", optim="sgd")
    trainer = XSAMTrainer(model=TinyClassifier(), args=args, train_dataset=as_dataset(make_data(n=8)))
    with pytest.raises(ValueError, match=r"checkpoint-3/xsam_state.json cannot be read: Is a directory"):
        trainer.train(resume_from_checkpoint=str(folder))


@pytest.mark.parametrize("sam_method, warnings", [("xsam", 1), ("none", 0)])
def test_a_missing_state_file_starts_the_schedule_afresh_with_one_warning(
    checkpoint, tmp_path, caplog, sam_method, warnings
):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, folder)
    (folder / STATE_NAME).unlink()
    args = args_for(tmp_path, max_steps=4, save_strategy="no", optim="sgd", sam_method=sam_method)
    trainer = XSAMTrainer(model=TinyClassifier(), args=args, train_dataset=as_dataset(make_data(n=8)))
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        trainer.train(resume_from_checkpoint=str(folder))
    notes = [r.message for r in caplog.records if STATE_NAME in r.message]
    assert len(notes) == warnings
    if warnings:
        assert "checkpoint-3 has no xsam_state.json: the XSAM schedule starts afresh" in notes[0]
        # as a fresh engine: alpha 1 until its first search, which comes at once (step 3)
        assert [search["step"] for search in trainer.xsam.search_history] == [3]
        assert trainer.xsam.search_count == 1


def test_a_state_with_a_nonfinite_search_round_trips(tmp_path):
    state = {
        "alpha": 1.0,
        "last_search_step": 0,
        "last_search_epoch": 0,
        "search_count": 1,
        "search_history": [{"alpha": 1.0, "theta": float("nan"), "losses": [], "step": 0}],
    }
    write_state_file(str(tmp_path), state)
    loaded = read_state_file(str(tmp_path), global_step=1, epoch=0.5)
    assert math.isnan(loaded["search_history"][0].pop("theta"))
    assert loaded["search_history"] == [{"alpha": 1.0, "losses": [], "step": 0}]


def test_state_file_is_written_atomically(tmp_path, monkeypatch):
    write_state_file(str(tmp_path), {"alpha": 1.2})
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_state_file(str(tmp_path), {"alpha": 1.7})
    monkeypatch.undo()
    assert read_state_file(str(tmp_path))["alpha"] == 1.2
    assert [p.name for p in tmp_path.iterdir()] == [STATE_NAME]


@pytest.mark.parametrize(
    "settings, saved_alpha, used_alpha, searches_again",
    [
        (dict(rho=0.1), 0.7, 0.7, False),  # the search is on and 0.7 is on the grid: continue with it
        (dict(rho=0.1, alpha_step=0.25), 0.7, 1.0, True),  # not on the new grid: search again
        (dict(rho=0.1, sam_method="sam"), 0.7, 1.0, False),  # SAM is alpha 1
        (dict(rho=0.1, alpha=1.3, alpha_search_interval=0), 0.7, 1.3, False),  # the fixed alpha wins
    ],
)
def test_settings_win_over_the_saved_alpha(settings, saved_alpha, used_alpha, searches_again):
    engine = XSAM([torch.nn.Parameter(torch.ones(2))], **settings)
    notes = engine.load_state_dict({"alpha": saved_alpha, "last_search_step": 2, "last_search_epoch": 1})
    assert engine.alpha == used_alpha
    assert engine.search_due(step=3, epoch=1) == searches_again
    if used_alpha == saved_alpha:
        assert notes == []
    else:
        assert (
            len(notes) == 1 and f"saved alpha {saved_alpha:g}" in notes[0] and f"alpha is {used_alpha:g}" in notes[0]
        )


def test_changed_settings_on_resume_are_logged_once(checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        trainer = resume(
            checkpoint, tmp_path, state={"alpha": 0.7, "last_search_step": 2, "last_search_epoch": 1}, sam_method="sam"
        )
    assert trainer.xsam.alpha == 1.0
    notes = [r.message for r in caplog.records if "saved alpha" in r.message]
    assert len(notes) == 1 and "0.7" in notes[0] and "sam_method='sam'" in notes[0]


def test_every_changed_xsam_setting_is_logged_once_with_both_values(checkpoint, tmp_path, caplog):
    changed = dict(
        rho=0.2,
        sam_interval=2,
        sam_reuse=True,
        alpha_search="coarse_to_fine",
        sam_perturbation="global",
        sam_adaptive=True,
        sam_adaptive_eta=0.1,
    )
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        resume(checkpoint, tmp_path, **changed)
    notes = [r.message for r in caplog.records if "Resuming with other XSAM settings" in r.message]
    # the checkpoint's run: rho 0.1 and the defaults
    before = dict(
        rho=0.1,
        sam_interval=1,
        sam_reuse=False,
        alpha_search="grid",
        sam_perturbation="local",
        sam_adaptive=False,
        sam_adaptive_eta=0.01,
    )
    for name, value in changed.items():
        lines = [note for note in notes if f" {name} was " in note]
        assert len(lines) == 1, (name, notes)
        assert f"{name} was {before[name]!r}" in lines[0] and f"is {value!r} now" in lines[0]
    assert len(notes) == len(changed), notes


def test_resuming_with_more_steps_says_where_the_late_start_moves(tmp_path, caplog):
    args = args_for(tmp_path / "run", max_steps=4, save_steps=3, optim="sgd", sam_start_ratio=0.5)
    XSAMTrainer(model=TinyClassifier(), args=args, train_dataset=as_dataset(make_data(n=8))).train()
    longer = args_for(tmp_path / "longer", max_steps=8, save_strategy="no", optim="sgd", sam_start_ratio=0.5)
    trainer = XSAMTrainer(model=TinyClassifier(), args=longer, train_dataset=as_dataset(make_data(n=8)))
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    notes = [r.message for r in caplog.records if "Resuming with other XSAM settings" in r.message]
    # ceil(0.5 * 4) = 2 in the checkpoint's run, ceil(0.5 * 8) = 4 now; no setting changed
    assert len(notes) == 1 and "start at step 4" in notes[0] and "not at step 2" in notes[0], notes


def test_resume_with_the_same_settings_logs_no_change(checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        resume(checkpoint, tmp_path)
    assert not [r.message for r in caplog.records if "Resuming with other XSAM settings" in r.message]


def test_resume_with_the_same_settings_continues_the_schedule(checkpoint, tmp_path):
    saved = read_state_file(str(checkpoint))
    trainer = resume(checkpoint, tmp_path)
    assert trainer.xsam.search_count == saved["search_count"]
    assert trainer.xsam.alpha == saved["alpha"]


@pytest.mark.parametrize(
    "schedule",
    [
        dict(sam_interval=3),
        dict(sam_start_ratio=0.5, sam_interval=2),
        dict(extrapolate_after_drop=0.05, alpha_search="coarse_to_fine"),
        dict(sam_method="sam", sam_interval=2),
        dict(gradient_accumulation_steps=2, sam_interval=2),
        # ASAM's ascent: T = |w0| + eta of each step's own start, whether the run was resumed or not
        dict(sam_adaptive=True, sam_adaptive_eta=0.05, rho=1.0, ascent_steps=2, sam_interval=2),
    ],
)
def test_resume_at_and_around_the_schedule_boundaries_equals_the_uninterrupted_run(tmp_path, schedule):
    """Steps 3 and 4 of 8: the first sharpness-aware step of a late start, a plain and an aware step of an interval."""

    def run(out, resume=None):
        settings = dict(max_steps=8, per_device_train_batch_size=4, learning_rate=0.2, rho=0.2, seed=3)
        settings.update(alpha_search_interval=2, save_strategy="steps", save_steps=1, **schedule)
        model = TinyClassifier()
        trainer = XSAMTrainer(model=model, args=training_args(out, **settings), train_dataset=as_dataset(make_data()))
        trainer.train(resume_from_checkpoint=resume)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer.xsam.alpha

    weights, alpha = run(tmp_path / "full")
    for step in (3, 4):
        resumed = tmp_path / f"from{step}"
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
        resumed_weights, resumed_alpha = run(resumed, resume=str(resumed / f"checkpoint-{step}"))
        assert torch.allclose(resumed_weights, weights, rtol=0, atol=1e-12) and resumed_alpha == alpha

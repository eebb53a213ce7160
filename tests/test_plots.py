"""hf_xsam.plots: the PNGs, the callback on a real XSAMTrainer, and life without matplotlib."""

import importlib.util
import logging

import pytest
import torch
from transformers import TrainerControl, TrainerState, ViTConfig, ViTForImageClassification

from helpers import training_args
from hf_xsam import XSAMTrainer
from hf_xsam.plots import ALPHA_PNG, ALPHA_SEARCH_PNG, XSAMPlotCallback, save_xsam_plots
from landscape import plot_landscape

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
GRID = [0.0, 0.5, 1.0, 1.5, 2.0]
HISTORY = [
    {"step": 0, "alpha": 1.5, "theta": 40.0, "losses": [2.0, 2.1, 2.3, 2.4, 2.2]},
    {"step": 10, "alpha": 1.0, "theta": 35.0, "losses": [1.0, 1.1, 1.2, 1.1, 1.0]},
    {"step": 20, "alpha": 1.0, "theta": float("nan"), "losses": []},  # a search that saw a non-finite gradient
]
LOGS = [{"step": s, "loss": 1.0, "xsam/alpha": a, "xsam/theta": 40.0 - s} for s, a in ((5, 1.5), (15, 1.0), (25, 1.0))]


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_save_xsam_plots_writes_both_pngs(tmp_path):
    written = save_xsam_plots(str(tmp_path), HISTORY, GRID, LOGS)
    assert sorted(written) == sorted([str(tmp_path / ALPHA_SEARCH_PNG), str(tmp_path / ALPHA_PNG)])
    assert is_png(tmp_path / ALPHA_SEARCH_PNG) and is_png(tmp_path / ALPHA_PNG)


def test_without_searches_only_the_logged_alpha_is_drawn(tmp_path):
    assert save_xsam_plots(str(tmp_path), [], [], LOGS) == [str(tmp_path / ALPHA_PNG)]
    assert not (tmp_path / ALPHA_SEARCH_PNG).exists()


def test_searches_without_losses_draw_no_search_curve(tmp_path):
    assert save_xsam_plots(str(tmp_path), HISTORY[-1:], GRID, []) == [str(tmp_path / ALPHA_PNG)]


def test_nothing_to_draw_writes_nothing(tmp_path):
    assert save_xsam_plots(str(tmp_path), [], GRID, [{"step": 1, "loss": 1.0}]) == []
    assert not list(tmp_path.glob("*.png"))


def test_plot_landscape(tmp_path):
    xs = torch.linspace(-1, 1, 9)
    grid = (xs[None, :] ** 2 + 0.5 * xs[:, None]).tolist()
    path = tmp_path / "landscape.png"
    plot_landscape(grid, 1.0, {"g0": (0.5, 0.0), "g1": (0.3, 0.4)}, {"rho": 0.5}, str(path), "t", {"max": (0.1, 0.5)})
    assert is_png(path)


def tiny_trainer(tmp_path, **settings) -> XSAMTrainer:
    config = ViTConfig(
        image_size=4,
        patch_size=2,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        num_labels=2,
    )
    torch.manual_seed(0)
    data = [{"pixel_values": torch.randn(1, 4, 4), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, **settings)
    return XSAMTrainer(model=ViTForImageClassification(config), args=args, train_dataset=data)


def test_callback_draws_a_real_run(tmp_path):
    trainer = tiny_trainer(tmp_path, alpha_search_interval=2)
    trainer.add_callback(XSAMPlotCallback(trainer))
    trainer.train()
    assert len(trainer.xsam.search_history) == 2
    assert is_png(tmp_path / ALPHA_SEARCH_PNG) and is_png(tmp_path / ALPHA_PNG)


def test_callback_before_any_xsam_step_draws_nothing(tmp_path):
    trainer = tiny_trainer(tmp_path, sam_method="none")
    XSAMPlotCallback(trainer).on_train_end(trainer.args, TrainerState(), TrainerControl())
    assert not list(tmp_path.glob("*.png"))


def test_only_the_main_process_draws(tmp_path):
    trainer = tiny_trainer(tmp_path)
    state = TrainerState(is_world_process_zero=False, log_history=LOGS)
    XSAMPlotCallback(trainer).on_save(trainer.args, state, TrainerControl())
    assert not list(tmp_path.glob("*.png"))


def test_without_matplotlib_the_callback_warns_once_and_draws_nothing(tmp_path, monkeypatch, caplog):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    trainer = tiny_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_xsam.plots"):
        callback = XSAMPlotCallback(trainer)
    assert "matplotlib is not installed" in caplog.text
    callback.on_train_end(trainer.args, TrainerState(log_history=LOGS), TrainerControl())
    assert not list(tmp_path.glob("*.png"))

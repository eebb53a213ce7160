"""``extrapolate_after_drop``: on the plateau at the start of training the search keeps SAM (issue 21).

On the plateau every direction of the search plane is about as sharp: the losses along the arc rise by a hair to
the grid's end (2.448 ... 2.451 in the issue), and the paper's rule takes alpha = 2 at every search. With SGD
that held the tiny ViT of the digits study at chance level for 100 epochs (docs/method.md, "XSAM with SGD").
"""

import math

import pytest
import torch
from datasets import Dataset

from helpers import SequentialXSAMTrainer
from hf_xsam import XSAM, XSAMConfig, XSAMTrainingArguments
from hf_xsam.rules import STEP_RULES
from hf_xsam.state import validate_state

RHO = 0.1
THETA = math.atan(10.0 * RHO)  # L(w) = w_x + 10 w_x w_y: 45 degrees between v0 and v1 at w0 = 0
GRID = [round(0.1 * i, 10) for i in range(21)]
ISSUE_PLATEAU = [2.448 + 0.003 * i / 20 for i in range(21)]  # the arc of issue 21, above a loss of 2.303


def plateau_problem(level: list[float]):
    """Two weights at w0 = 0 whose search sees the issue's plateau arc, shifted so that the loss at w0 is
    ``level[0]`` (a list, so the test can move it between steps)."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward_backward():
        loss = w[0] + 10.0 * w[0] * w[1]
        loss.backward()
        return loss.detach()

    def loss_only():
        if float(w.norm()) < 1e-12:
            return torch.tensor(level[0], dtype=torch.float64)
        alpha = math.atan2(float(w[1]), float(w[0])) / THETA
        index = round(alpha / 0.1)
        assert abs(alpha - 0.1 * index) < 1e-9 and abs(float(w.norm()) - 2 * RHO) < 1e-9, "off the search arc"
        return torch.tensor(ISSUE_PLATEAU[index] - 2.303 + level[0], dtype=torch.float64)

    return w, forward_backward, loss_only


def searched_alphas(levels: list[float], **settings) -> tuple[list[float], XSAM]:
    """The alpha of each search, one search per step, with the loss at w0 at the given levels."""
    level = [levels[0]]
    w, forward_backward, loss_only = plateau_problem(level)
    engine = XSAM([w], rho=RHO, alpha_search_interval=1, **settings)
    alphas = []
    for step, value in enumerate(levels):
        level[0] = value
        w.grad = None
        engine.step(forward_backward, loss_only, step=step)
        assert w.tolist() == [0.0, 0.0], "weights restored exactly"
        alphas.append(engine.alpha)
    return alphas, engine


# the loss at w0: the start, 2% lower (still the plateau), 6.6% lower (training has started), back up
LEVELS = [2.303, 2.257, 2.15, 2.303]


def test_the_paper_rule_takes_the_arc_edge_on_the_plateau_at_every_search():
    alphas, engine = searched_alphas(LEVELS, extrapolate_after_drop=0.0)
    assert alphas == [2.0] * 4
    assert "loss0" not in engine.search_history[-1], "the paper's rule evaluates the arc only"
    assert engine.search_forwards == 4 * 21


def test_the_default_keeps_sam_until_the_loss_has_fallen_five_percent():
    assert XSAMConfig().extrapolate_after_drop == 0.05
    alphas, engine = searched_alphas(LEVELS)
    assert alphas == [1.0, 1.0, 2.0, 1.0]
    history = list(engine.search_history)
    assert [h.get("capped") for h in history] == [2.0, 2.0, None, 2.0]
    assert [h["loss0"] for h in history] == pytest.approx(LEVELS)
    assert engine.first_search_loss == pytest.approx(2.303)
    assert engine.search_forwards == 4 * 22, "one more forward per search: the loss at w0"


def test_an_alpha_at_most_one_is_never_capped():
    level = [2.303]
    w, forward_backward, _ = plateau_problem(level)
    falling = [2.451 - 0.003 * i / 20 for i in range(21)]  # the largest loss at alpha 0
    engine = XSAM([w], rho=RHO)
    engine.step(
        forward_backward,
        lambda: torch.tensor(
            level[0] if float(w.norm()) < 1e-12 else falling[round(math.atan2(float(w[1]), float(w[0])) / THETA / 0.1)]
        ),
        step=0,
    )
    assert engine.alpha == 0.0 and "capped" not in engine.search_history[-1]


def test_the_reference_loss_is_saved_with_the_state_and_restored():
    _, engine = searched_alphas(LEVELS[:2])
    state = engine.state_dict()
    assert state["first_search_loss"] == pytest.approx(2.303)
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    resumed = XSAM([w], rho=RHO, alpha_search_interval=1)
    assert resumed.load_state_dict(state) == []
    assert resumed.first_search_loss == state["first_search_loss"]
    old = {k: v for k, v in state.items() if k != "first_search_loss"}  # a checkpoint from before the setting
    resumed.load_state_dict(old)
    assert resumed.first_search_loss is None, "the next search becomes the reference"
    with pytest.raises(ValueError, match=r"first_search_loss is 'x'; it must be null or a finite number"):
        resumed.load_state_dict({**state, "first_search_loss": "x"})


def arc_search(at_w0: list[float], arc, **settings) -> XSAM:
    """One search per step on the two weights of ``plateau_problem``: the loss at w0 is ``at_w0[step]``, the loss at
    the grid point alpha of the arc ``arc(alpha)`` (any grid step)."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    step = [0]

    def forward_backward():
        loss = w[0] + 10.0 * w[0] * w[1]
        loss.backward()
        return loss.detach()

    def loss_only():
        if float(w.norm()) < 1e-12:
            return torch.tensor(at_w0[step[0]], dtype=torch.float64)
        return torch.tensor(arc(math.atan2(float(w[1]), float(w[0])) / THETA), dtype=torch.float64)

    engine = XSAM([w], rho=RHO, alpha_search_interval=1, **settings)
    for step[0] in range(len(at_w0)):
        w.grad = None
        engine.step(forward_backward, loss_only, step=step[0])
    return engine


def rising(alpha: float) -> float:
    return 2.448 + 0.003 * alpha / 2  # the issue's plateau arc: the grid's end wins


@pytest.mark.parametrize("alpha_step, capped", [(0.15, 0.9), (0.35, 0.7), (0.6, 0.6), (0.25, 1.0)])
def test_the_cap_takes_the_best_point_at_or_below_one_when_one_is_not_on_the_grid(alpha_step, capped):
    # issue 26: the grid point nearest 1 was 1.05, 1.05 and 1.2 for the first three
    engine = arc_search([2.303], rising, alpha_step=alpha_step)
    assert engine.search_history[-1]["capped"] > 1
    assert engine.alpha == pytest.approx(capped)


def test_the_cap_never_takes_a_point_whose_loss_was_not_finite():
    engine = arc_search([2.303], lambda alpha: math.nan if 0.95 < alpha < 1.05 else rising(alpha))
    assert engine.search_history[-1]["capped"] == 2.0
    assert engine.alpha == 0.9, "the best finite loss at or below 1 (the loss at 1 was NaN)"


@pytest.mark.parametrize("first", [math.nan, math.inf])
def test_a_nonfinite_first_loss_is_not_the_reference_the_next_finite_one_is(first):
    # the loss at w0: non-finite, the start, 6.6% lower (training has started)
    engine = arc_search([first, 2.303, 2.15], rising)
    assert [h["alpha"] for h in engine.search_history] == [1.0, 1.0, 2.0]
    assert engine.first_search_loss == pytest.approx(2.303)
    assert validate_state(engine.state_dict())["first_search_loss"] == pytest.approx(2.303), (
        "the checkpoint can be resumed"
    )


def test_a_negative_reference_caps_until_the_loss_has_fallen_by_the_fraction_of_its_magnitude():
    # threshold -1 - 0.05 * |-1| = -1.05: -1.02 is still the start, -1.06 has fallen
    engine = arc_search([-1.0, -1.02, -1.06], lambda alpha: rising(alpha) - 3.0)
    assert [h["alpha"] for h in engine.search_history] == [1.0, 1.0, 2.0]
    assert [h.get("capped") for h in engine.search_history] == [2.0, 2.0, None]


class ConstantLogits(torch.nn.Module):
    """The same logits at every token: every token with the same label has the same loss."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.2, 0.1]))

    def forward(self, input_ids, labels=None):
        return {"logits": self.bias.expand(*input_ids.shape, 4)}


def token_normalised_loss(outputs, labels, num_items_in_batch=None):
    """The sum of the token losses over the step's token count (causal LMs, SFT), or the mean without one."""
    logits = outputs["logits"]
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / (labels.ne(-100).sum() if num_items_in_batch is None else num_items_in_batch)


def test_the_cap_compares_losses_not_shares_of_the_step_tokens(tmp_path):
    # issue 26: gradient accumulation 2, the search on the first micro-batch: 16 of the step's 18 tokens, then 2 of
    # 18. With the weights fixed (lr 0) the per-token loss is the same at both searches, and so must the cap be.
    valid = [16, 2, 2, 16]
    data = Dataset.from_dict({"input_ids": [[0] * 16] * 4, "labels": [[1] * n + [-100] * (16 - n) for n in valid]})
    args = XSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.0, optim="sgd", lr_scheduler_type="constant", alpha_search_interval=1, rho=0.1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    model = ConstantLogits()
    trainer = SequentialXSAMTrainer(
        model=model, args=args, train_dataset=data, compute_loss_func=token_normalised_loss
    )
    trainer.train()
    per_token = float(-torch.log_softmax(model.bias.detach(), 0)[1])
    history = list(trainer.xsam.search_history)
    assert [h["loss0"] for h in history] == pytest.approx([per_token, per_token], rel=1e-6)
    first, second = (h.get("capped") for h in history)
    assert first == second
    assert trainer.xsam.first_search_loss == pytest.approx(per_token, rel=1e-6)


@pytest.mark.parametrize("value", [-0.1, 1.0, math.nan, "0.05"])
def test_bad_extrapolate_after_drop_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"Invalid extrapolate_after_drop: .*; it must be a number in \[0, 1\)"):
        XSAMConfig(extrapolate_after_drop=value)


def test_extrapolate_after_drop_is_a_training_argument_that_the_xsam_rule_reads(tmp_path):
    args = XSAMTrainingArguments(output_dir=str(tmp_path), extrapolate_after_drop=0.0)
    assert args.xsam_settings["extrapolate_after_drop"] == 0.0
    assert "extrapolate_after_drop" in STEP_RULES["xsam"].settings
    assert "extrapolate_after_drop" not in STEP_RULES["sam"].settings


# ------------------------------------------------------------------------------------------------------------
# alpha_max=None: SAM's direction at most with SGD (issue 21, docs/method.md "XSAM with SGD")


def one_sgd_step(lr: float = 0.05, **settings) -> tuple[float, float, XSAM]:
    """One SGD step on ``L(w) = w_x + 10 w_x w_y`` from ``w0 = 0`` (``L(w0) = 0``) with the search seeing the issue's
    plateau arc: the chosen alpha and the loss after the step."""
    w, forward_backward, loss_only = plateau_problem([2.303])
    optimizer = torch.optim.SGD([w], lr=lr)
    engine = XSAM([w], rho=RHO, optimizer=optimizer, **settings)
    engine.step(forward_backward, loss_only, step=0)
    optimizer.step()
    with torch.no_grad():
        return engine.alpha, float(w[0] + 10.0 * w[0] * w[1]), engine


def test_with_sgd_the_paper_grid_steps_orthogonally_to_the_gradient_and_makes_no_progress():
    # theta is 45 degrees: u(2) is 90 degrees from v0, the gradient at w0 (the stall of issue 21, in two weights)
    alpha, loss, engine = one_sgd_step(alpha_max=2.0, extrapolate_after_drop=0.0)
    assert (alpha, engine.alpha_max) == (2.0, 2.0)
    assert abs(loss) < 1e-12, "no descent along u(2): the step is orthogonal to the gradient"


def test_with_sgd_the_default_grid_stops_at_sam_and_the_step_descends():
    assert XSAMConfig().alpha_max is None
    alpha, loss, engine = one_sgd_step()
    assert engine.alpha_max == 1.0 and engine.alpha_grid == GRID[:11]
    assert alpha == 1.0 and "capped" not in engine.search_history[-1], "the arc's highest point of a grid to 1"
    # d = g_k = (1, 1): w = -lr (1, 1), L = -lr (1 - 10 lr)
    assert loss == pytest.approx(-0.05 * (1 - 0.5))


def test_with_an_adaptive_optimizer_or_none_the_default_grid_is_the_papers():
    w = torch.nn.Parameter(torch.zeros(2))
    for optimizer in (torch.optim.AdamW([w]), None):
        engine = XSAM([w], rho=RHO, optimizer=optimizer)
        assert engine.alpha_max == 2.0 and engine.alpha_grid == GRID


@pytest.mark.parametrize(
    ("optim", "alpha_max", "top"), [("sgd", None, 1.0), ("adamw_torch", None, 2.0), ("sgd", 2.0, 2.0)]
)
def test_the_trainer_gives_its_optimizer_to_the_engine_and_the_card_records_the_top(tmp_path, optim, alpha_max, top):
    from test_model_card import tiny_trainer

    trainer = tiny_trainer(tmp_path, optim=optim, alpha_max=alpha_max, learning_rate=0.05)
    assert trainer.xsam.alpha_max == top and max(trainer.xsam.alpha_grid) == top
    assert max(h["alpha"] for h in trainer.xsam.search_history) <= top
    trainer.create_model_card()
    assert f"| alpha_max | {top:g} |" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("value", [-1.0, math.inf, "2"])
def test_bad_alpha_max_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"Invalid alpha_max: .*; it must be None \(2, or 1 with SGD\) or a number"):
        XSAMConfig(alpha_max=value)


def test_a_step_too_coarse_for_the_sgd_grid_is_refused_up_front():
    with pytest.raises(ValueError, match="one-point search grid"):
        XSAMConfig(alpha_step=1.5)


def test_a_card_from_settings_alone_says_what_a_default_alpha_max_means():
    from hf_xsam.model_card import xsam_section

    assert "| alpha_max | None (2; 1 with SGD) |" in xsam_section(XSAMConfig().xsam_settings, [], None)
    assert "| alpha_max | 1.5 |" in xsam_section(XSAMConfig(alpha_max=1.5).xsam_settings, [], None)


def test_a_resume_onto_sgd_of_an_alpha_past_one_searches_again():
    w = torch.nn.Parameter(torch.zeros(2))
    adamw_run = XSAM([w], rho=RHO, optimizer=torch.optim.AdamW([w]))
    adamw_run.alpha = 1.5
    resumed = XSAM([w], rho=RHO, optimizer=torch.optim.SGD([w], lr=0.1))
    notes = resumed.load_state_dict(adamw_run.state_dict())
    assert notes == [
        "saved alpha 1.5 not used (it is not on the search grid 0..1 step 0.1; searching again): alpha is 1"
    ]
    assert resumed.alpha == 1.0 and resumed.last_search_step is None

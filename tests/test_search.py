"""The alpha-search strategies: pure functions on constructed curves, and the engine on a model whose loss along
the search arc is known."""

import math
import random
from collections import Counter

import pytest
import torch
from transformers import HfArgumentParser

from helpers import TinyClassifier, flat, flat_loss, make_data
from hf_xsam import XSAM, XSAMConfig, XSAMTrainingArguments
from hf_xsam.model_card import xsam_section
from hf_xsam.plots import save_xsam_plots
from hf_xsam.search import _fibonacci, best_index, coarse_to_fine_search, grid_search
from reference import xsam_direction

GRID = [round(0.1 * i, 10) for i in range(21)]


def expected_choice(alphas, curve):
    """The project's rule, written out: largest finite loss, then alpha closest to 1, then the smaller alpha."""
    finite = [i for i in range(len(curve)) if math.isfinite(curve[i])]
    if not finite:
        return None
    return sorted(finite, key=lambda i: (-curve[i], round(abs(alphas[i] - 1.0), 9), alphas[i]))[0]


def counting(curve):
    """An ``evaluate`` over ``curve`` that counts how often each index is evaluated."""
    counts = Counter()

    def evaluate(indices):
        counts.update(indices)
        return [curve[i] for i in indices]

    return evaluate, counts


def unimodal(rng: random.Random, n: int) -> list[float]:
    """Rises strictly to a top (flat over 1 to n points, at a random place), falls strictly after it."""
    width = min(n, rng.choice([1, 1, 1, 2, 3, rng.randint(1, n)]))
    start = rng.randint(0, n - width)
    top = rng.uniform(-1, 3)
    curve = [top] * n
    for i in range(start - 1, -1, -1):
        curve[i] = curve[i + 1] - rng.choice([rng.uniform(1e-6, 1), 1e-7])
    for i in range(start + width, n):
        curve[i] = curve[i - 1] - rng.choice([rng.uniform(1e-6, 1), 1e-7])
    return curve


# --------------------------------------------------------------------------------------------------
# pure functions


def test_coarse_to_fine_equals_grid_on_random_unimodal_curves_with_flat_tops():
    rng = random.Random(0)
    for trial in range(3000):
        n = 21 if trial % 2 == 0 else rng.randint(2, 45)
        step = rng.choice([0.1, 0.25, 0.05, 0.3])
        alphas = [round(step * i, 10) for i in range(n)]
        curve = unimodal(rng, n)
        evaluate, counts = counting(curve)
        index, seen = coarse_to_fine_search(alphas, evaluate)
        assert index == expected_choice(alphas, curve) == grid_search(alphas, counting(curve)[0])[0], (alphas, curve)
        assert max(counts.values()) == 1, "every grid point is evaluated at most once"
        assert seen == {i: curve[i] for i in counts}
        if n == 21:
            assert len(seen) <= 9


@pytest.mark.parametrize("peak", range(21))
def test_coarse_to_fine_finds_every_peak_position_of_21_points_in_at_most_9_evaluations(peak):
    curve = [-(abs(i - peak) ** 1.5) for i in range(21)]
    evaluate, counts = counting(curve)
    index, seen = coarse_to_fine_search(GRID, evaluate)
    assert index == peak and len(seen) <= 9 and sum(counts.values()) == len(seen)


def test_coarse_to_fine_keeps_the_higher_of_two_peaks_like_early_training():
    # early in training the arc often has a high peak near alpha 0.5 and a lower one near 1.6; a bracket started
    # from the whole grid (a plain Fibonacci search) climbs the lower one
    rng = random.Random(2)
    for _ in range(3000):
        high, low = rng.uniform(0.3, 0.7), rng.uniform(1.4, 1.9)
        height, width = rng.uniform(0.5, 1.0), rng.uniform(0.3, 0.6)
        second, second_width = height * rng.uniform(0.1, 0.7), rng.uniform(0.15, 0.4)
        curve = [
            2 + height * math.exp(-(((a - high) / width) ** 2)) + second * math.exp(-(((a - low) / second_width) ** 2))
            for a in GRID
        ]
        evaluate, counts = counting(curve)
        index, seen = coarse_to_fine_search(GRID, evaluate)
        assert index == grid_search(GRID, counting(curve)[0])[0] and GRID[index] < 1.0, curve
        assert len(seen) <= 9 and max(counts.values()) == 1


def test_coarse_to_fine_on_two_peaks_where_a_whole_grid_fibonacci_search_climbs_the_lower_one():
    # the shape of a first search at rho 0.2 (docs/search.md): 3.116 at alpha 0.5, down to 2.26, a second peak
    # past 1.5; a Fibonacci search over the whole grid first compares alpha 1.2 with 2.0 and keeps the right part
    curve = [
        2.26 + 0.856 * math.exp(-(((a - 0.5) / 0.35) ** 2)) + 0.09 * math.exp(-(((a - 1.7) / 0.4) ** 2)) for a in GRID
    ]
    whole_grid: dict[int, float] = {}
    _fibonacci(GRID, whole_grid, counting(curve)[0], 1.0, -1, len(GRID))
    assert GRID[best_index(whole_grid, GRID)] == 1.7
    assert (
        GRID[coarse_to_fine_search(GRID, counting(curve)[0])[0]]
        == 0.5
        == GRID[grid_search(GRID, counting(curve)[0])[0]]
    )


@pytest.mark.parametrize(
    "curve, expected_alpha",
    [
        ([0.5] * 21, 1.0),  # flat (theta ~ 0: every point is v1): SAM
        ([0.0] * 3 + [1.0] * 6 + [0.0] * 12, 0.8),  # flat top left of 1: its end closest to 1
        ([0.0] * 13 + [1.0] * 5 + [0.0] * 3, 1.3),  # flat top right of 1
        ([0.0] * 5 + [1.0] * 11 + [0.0] * 5, 1.0),  # flat top around 1
    ],
)
def test_flat_tops_end_where_the_grid_does(curve, expected_alpha):
    for search in (grid_search, coarse_to_fine_search):
        index, _ = search(GRID, counting(curve)[0])
        assert GRID[index] == expected_alpha


def test_tie_at_equal_distance_from_one_keeps_the_smaller_alpha():
    assert GRID[best_index({5: 2.0, 15: 2.0, 10: 1.0}, GRID)] == 0.5
    quarter = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    curve = [0.0, 0.0, 0.0, 3.0, 1.0, 3.0, 0.0]  # 0.75 and 1.25: both 0.25 from 1
    assert quarter[grid_search(quarter, counting(curve)[0])[0]] == 0.75


def test_on_any_curve_coarse_to_fine_returns_the_best_point_it_evaluated():
    rng = random.Random(1)
    for _ in range(2000):
        curve = [rng.choice([rng.random(), rng.randint(0, 3)]) for _ in range(21)]  # often several peaks and ties
        index, seen = coarse_to_fine_search(GRID, counting(curve)[0])
        evaluated = sorted(seen)
        assert index == evaluated[expected_choice([GRID[i] for i in evaluated], [seen[i] for i in evaluated])]
        assert index in seen and len(seen) <= 9


def test_nonfinite_losses_are_never_chosen():
    curve = [float(i) for i in range(21)]
    curve[20] = float("inf")
    curve[19] = float("nan")
    for search in (grid_search, coarse_to_fine_search):
        index, seen = search(GRID, counting(curve)[0])
        assert index is not None and math.isfinite(curve[index])
    assert grid_search(GRID, counting(curve)[0])[0] == 18
    index, seen = grid_search(GRID, lambda indices: [math.nan] * len(indices))
    assert index is None and len(seen) == 21
    assert coarse_to_fine_search(GRID, lambda indices: [math.inf] * len(indices))[0] is None


def test_grid_search_evaluates_everything_in_one_call():
    calls = []
    grid_search(GRID, lambda indices: calls.append(list(indices)) or [0.0] * len(indices))
    assert calls == [list(range(21))]


# --------------------------------------------------------------------------------------------------
# the engine on a loss whose values along the search arc are known

RHO, COUPLING = 0.1, 10.0
THETA = math.atan(COUPLING * RHO)  # 45 degrees between v0 = g0 / ||g0|| = e_x and v1 = g1 / ||g1||


def arc_problem(curve):
    """A 2-parameter problem: L(w) = w_x + c w_x w_y (g0 = e_x at 0, g1 at rho e_x at 45 degrees), and a loss for
    the search that is ``curve[i]`` at the grid point ``alpha_i`` of the arc."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    calls = []

    def forward_backward():
        loss = w[0] + COUPLING * w[0] * w[1]
        loss.backward()
        return loss.detach()

    def loss_only():
        alpha = math.atan2(float(w[1]), float(w[0])) / THETA
        index = round(alpha / 0.1)
        assert abs(alpha - 0.1 * index) < 1e-9 and abs(float(w.norm()) - 2 * RHO) < 1e-9, "off the search arc"
        calls.append(index)
        return torch.tensor(curve[index], dtype=torch.float64)

    return w, forward_backward, loss_only, calls


def float32(values):
    """The engine reports search losses in float32: curves made of float32 values come back unchanged."""
    return torch.tensor(values, dtype=torch.float32).tolist()


CURVES = {
    "peak at 1.7": float32([-((0.1 * i - 1.7) ** 2) for i in range(21)]),
    "peak at 0": float32([-0.1 * i for i in range(21)]),
    "peak at 2": float32([math.log(1 + i) for i in range(21)]),
    "flat": [2.5] * 21,
    "flat top 0.2-0.6": [min(0.0, -(2 - i), -(i - 6)) for i in range(21)],
}


@pytest.mark.parametrize("name", CURVES)
def test_engine_coarse_to_fine_equals_grid_on_unimodal_arcs(name):
    curve = CURVES[name]
    chosen = {}
    for strategy in ("grid", "coarse_to_fine"):
        w, forward_backward, loss_only, calls = arc_problem(curve)
        engine = XSAM([w], rho=RHO, alpha_search=strategy, extrapolate_after_drop=0.0)
        engine.step(forward_backward, loss_only, step=0)
        assert w.tolist() == [0.0, 0.0], "weights restored exactly"
        record = engine.search_history[-1]
        assert record["theta"] == pytest.approx(45.0)
        chosen[strategy] = engine.alpha
        if strategy == "grid":
            assert record["losses"] == curve and "alphas" not in record
        else:
            assert len(calls) == len(set(calls)) <= 9, "each point once, at most 9 of 21"
            assert record["alphas"] == [GRID[i] for i in sorted(calls)]
            assert record["losses"] == [curve[i] for i in sorted(calls)]
    assert chosen["grid"] == chosen["coarse_to_fine"] == GRID[expected_choice(GRID, curve)]


def test_engine_coarse_to_fine_on_two_peaks_returns_an_evaluated_maximum_and_records_what_it_saw():
    curve = [-abs(i - 3) for i in range(10)] + [-abs(i - 16) + 0.5 for i in range(10, 21)]  # peaks at 0.3 and 1.6
    w, forward_backward, loss_only, calls = arc_problem(curve)
    engine = XSAM([w], rho=RHO, alpha_search="coarse_to_fine", extrapolate_after_drop=0.0)
    engine.step(forward_backward, loss_only, step=3)
    record = engine.search_history[-1]
    assert record["step"] == 3
    assert record["alphas"] == [GRID[i] for i in sorted(set(calls))] and len(calls) <= 9
    assert record["losses"] == [curve[round(a * 10)] for a in record["alphas"]]
    assert engine.alpha in record["alphas"] and engine.alpha == record["alpha"]
    assert curve[round(engine.alpha * 10)] == max(record["losses"])


def test_engine_coarse_to_fine_decides_on_the_losses_averaged_over_workers():
    local = float32([-((0.1 * i - 0.3) ** 2) for i in range(21)])  # this worker alone would choose 0.3
    other = float32(
        [-3 * (0.1 * i - 1.6) ** 2 for i in range(21)]
    )  # the other worker's losses, known to the fake reduce
    w, forward_backward, loss_only, calls = arc_problem(local)
    seen_other = []

    def reduce_losses(losses):
        # calls so far minus this batch = the indices of this batch, in order
        if len(losses) == 1 and not calls:
            return  # the workers' non-finite flag, reduced before the search evaluates anything
        indices = calls[len(calls) - len(losses) :]
        seen_other.append(indices)
        losses.copy_((losses + torch.tensor([other[i] for i in indices], dtype=losses.dtype)) / 2)

    engine = XSAM([w], rho=RHO, alpha_search="coarse_to_fine", reduce_losses=reduce_losses, extrapolate_after_drop=0.0)
    engine.step(forward_backward, loss_only, step=0)
    average = [(a + b) / 2 for a, b in zip(local, other)]
    assert engine.alpha == GRID[expected_choice(GRID, average)] == 1.3
    record = engine.search_history[-1]
    assert record["losses"] == pytest.approx([average[round(a * 10)] for a in record["alphas"]], rel=1e-6)


def test_engine_keeps_alpha_when_every_search_loss_is_nonfinite():
    w, forward_backward, _, _ = arc_problem([0.0] * 21)
    for strategy in ("grid", "coarse_to_fine"):
        engine = XSAM([w], rho=RHO, alpha=0.7, alpha_search=strategy, extrapolate_after_drop=0.0)
        engine.step(forward_backward, lambda: torch.tensor(math.nan), step=0)
        w.grad = None
        assert engine.alpha == 0.7 and w.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "settings", [dict(rho=0.3), dict(rho=0.3, ascent_steps=2, rho_max=0.5, alpha_max=1.5, alpha_step=0.25)]
)
def test_engine_coarse_to_fine_matches_the_float64_reference_where_its_curve_is_unimodal(settings):
    model = TinyClassifier()
    batch = make_data()
    expected, expected_alpha, losses = xsam_direction(
        flat_loss(model, batch),
        flat(model),
        rho=settings["rho"],
        k=settings.get("ascent_steps", 1),
        search=True,
        rho_max=settings.get("rho_max"),
        alpha_max=settings.get("alpha_max", 2.0),
        alpha_step=settings.get("alpha_step", 0.1),
    )
    peak = losses.index(max(losses))
    assert all(a < b for a, b in zip(losses[:peak], losses[1 : peak + 1])), "this batch's curve rises to its peak"
    assert all(a > b for a, b in zip(losses[peak:], losses[peak + 1 :])), "and falls after it"

    def closures():
        def forward_backward():
            loss = model(**batch)["loss"]
            loss.backward()
            return loss.detach()

        return forward_backward, lambda: model(**batch)["loss"]

    engine = XSAM(model.parameters(), alpha_search="coarse_to_fine", **settings, extrapolate_after_drop=0.0)
    engine.step(*closures(), step=0)
    direction = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert engine.alpha == pytest.approx(expected_alpha)
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)
    record = engine.search_history[-1]
    reference = dict(zip([round(i * settings.get("alpha_step", 0.1), 10) for i in range(len(losses))], losses))
    # the engine reports losses in float32
    assert record["losses"] == pytest.approx([reference[a] for a in record["alphas"]], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# the setting, the plots and the card


def test_bad_alpha_search_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"Invalid alpha_search: 'binary'; choose one of grid, coarse_to_fine"):
        XSAMConfig(alpha_search="binary")
    with pytest.raises(ValueError, match="Invalid alpha_search"):
        XSAM([torch.nn.Parameter(torch.ones(1))], alpha_search="Ternary")


def test_alpha_search_is_a_command_line_flag_with_choices(tmp_path):
    parser = HfArgumentParser(XSAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--alpha_search", "coarse_to_fine"])
    assert args.alpha_search == "coarse_to_fine" and args.xsam_settings["alpha_search"] == "coarse_to_fine"
    assert XSAMConfig().alpha_search == "grid"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--alpha_search", "binary"])


def test_partial_search_records_are_plotted_and_carded(tmp_path):
    pytest.importorskip("matplotlib")
    history = [
        {"step": 0, "alpha": 1.2, "theta": 30.0, "alphas": [0.8, 1.0, 1.2, 1.3], "losses": [1.0, 1.1, 1.3, 1.2]},
        {"step": 5, "alpha": 1.0, "theta": float("nan"), "losses": []},
    ]
    written = save_xsam_plots(str(tmp_path), history, GRID, [])
    assert str(tmp_path / "xsam_alpha_search.png") in written
    text = xsam_section(
        XSAMConfig(alpha_search="coarse_to_fine").xsam_settings, [], {"alpha": 1.2, "search_history": history}
    )
    assert "| alpha_search | coarse_to_fine |" in text and "0: 1.2" in text


def test_agreement_script_noise_and_unimodality():
    from search_agreement import add_label_noise, is_unimodal

    examples = [{"labels": torch.tensor(i % 10)} for i in range(200)]
    original = [int(e["labels"]) for e in examples]
    assert add_label_noise(examples, 0.4, 10, seed=0) == 80
    changed = [i for i, e in enumerate(examples) if int(e["labels"]) != original[i]]
    assert len(changed) == 80 and all(0 <= int(e["labels"]) < 10 for e in examples)
    assert is_unimodal([1, 2, 3, 3, 2]) and is_unimodal([5, 5, 5]) and is_unimodal([3, 2, 1])
    assert not is_unimodal([1, 2, 2, 3, 1]) and not is_unimodal([1, 3, 2, 3, 1]) and not is_unimodal([2, 1, 2])

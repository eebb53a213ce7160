"""The XSAM engine against the float64 reference of docs/method.md, special cases and edge cases."""

import copy
import math

import pytest
import torch

from helpers import TinyClassifier, flat, flat_loss, make_data, trainable
from hf_xsam import XSAM, XSAMConfig
from hf_xsam.config import MAX_GRID_POINTS, MAX_RADIUS
from hf_xsam.geometry import (
    addcmul_scaled_,
    global_dot,
    global_norm,
    global_norms,
    mul_add_scaled_,
    slerp_coefficients,
)
from reference import gradient, orthogonal_part, reused_direction, sgd_step, xsam_direction


def closures(model, batch):
    def forward_backward():
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    def loss_only():
        return model(**batch)["loss"]

    return forward_backward, loss_only


def engine_direction(model, batch, **settings):
    """Weights before, the direction left in .grad, and weights after one engine step."""
    model.zero_grad()
    engine = XSAM(model.parameters(), modules=model.modules(), **settings)
    before = [p.detach().clone() for p in model.parameters()]
    engine.step(*closures(model, batch), step=0)
    after = [p.detach().clone() for p in model.parameters()]
    direction = torch.cat([p.grad.reshape(-1) for p in trainable(model)])
    return before, direction, after, engine


@pytest.mark.parametrize(
    "settings",
    [
        dict(rho=0.1, ascent_steps=1, alpha=1.0, alpha_search_interval=0),  # SAM
        dict(rho=0.1, ascent_steps=3, alpha=1.0, alpha_search_interval=0),  # 3-step SAM
        dict(rho=0.1, ascent_steps=1, alpha=0.0, alpha_search_interval=0),  # v0 ("SGD+")
        dict(rho=0.2, ascent_steps=2, alpha=1.6, alpha_search_interval=0),  # fixed alpha past g_k
        dict(rho=0.3, ascent_steps=1, extrapolate_after_drop=0.0),  # searched alpha, the paper's rule
        dict(rho=0.3, ascent_steps=2, rho_max=0.5, alpha_max=1.5, alpha_step=0.25, extrapolate_after_drop=0.0),
        dict(rho=0.3, ascent_steps=1),  # the default: a first search caps alpha at 1
        dict(rho=0.3, ascent_steps=2, rho_max=0.5, alpha_max=1.5, alpha_step=0.25),
        dict(sam_method="sam", rho=1.0, ascent_steps=1, sam_adaptive=True),  # ASAM
        dict(sam_method="sam", rho=0.5, ascent_steps=2, sam_adaptive=True, sam_adaptive_eta=0.0),  # eta 0, k = 2
        dict(rho=1.0, ascent_steps=1, sam_adaptive=True, extrapolate_after_drop=0.0),  # XSAM + ASAM, searched
        dict(
            rho=0.5,
            ascent_steps=2,
            rho_max=1.5,
            alpha_max=1.5,
            alpha_step=0.25,
            sam_adaptive=True,
            sam_adaptive_eta=0.1,
        ),
        dict(rho=0.5, ascent_steps=1, alpha=0.4, alpha_search_interval=0, sam_adaptive=True),  # fixed alpha
    ],
)
def test_direction_matches_reference(settings):
    model = TinyClassifier()
    batch = make_data()
    w0 = flat(model)
    expected, expected_alpha, expected_losses = xsam_direction(
        flat_loss(model, batch),
        w0,
        rho=settings["rho"],
        k=settings["ascent_steps"],
        alpha=settings.get("alpha", 1.0),
        search=settings.get("sam_method", "xsam") == "xsam" and settings.get("alpha_search_interval") != 0,
        rho_max=settings.get("rho_max"),
        alpha_max=settings.get("alpha_max", 2.0),
        alpha_step=settings.get("alpha_step", 0.1),
        cap_at_one=settings.get("extrapolate_after_drop", XSAMConfig().extrapolate_after_drop) > 0,
        adaptive_eta=settings.get("sam_adaptive_eta", 0.01) if settings.get("sam_adaptive") else None,
    )
    before, direction, after, engine = engine_direction(model, batch, **settings)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "weights must be restored exactly"
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)
    assert engine.alpha == pytest.approx(expected_alpha)
    # the losses along the arc: the search radius too
    searched = engine.search_history[-1]["losses"] if engine.search_history else []
    assert searched == pytest.approx(expected_losses, rel=1e-6)  # the engine keeps losses in float32


def test_several_sgd_steps_with_searches_match_reference():
    model = TinyClassifier()
    data = make_data(n=12)
    batches = [{k: v[i : i + 4] for k, v in data.items()} for i in (0, 4, 8)]
    engine = XSAM(model.parameters(), rho=0.5, ascent_steps=2, alpha_search_interval=2, extrapolate_after_drop=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    w, alpha = flat(model), 1.0
    for step in range(6):
        batch = batches[step % 3]
        search = step % 2 == 0
        d, alpha, _ = xsam_direction(flat_loss(model, batch), w, rho=0.5, k=2, alpha=alpha, search=search)
        w = sgd_step(w, d, lr=0.5)
        optimizer.zero_grad()
        engine.step(*closures(model, batch), step=step)
        optimizer.step()
        assert engine.alpha == pytest.approx(alpha)
        torch.testing.assert_close(flat(model), w, rtol=1e-9, atol=1e-12)


def test_alpha_one_is_sam_by_hand():
    model = TinyClassifier()
    batch = make_data()
    loss, w0, rho = flat_loss(model, batch), flat(model), 0.05
    g0 = gradient(loss, w0)
    g1 = gradient(loss, w0 + rho * g0 / g0.norm())
    _, direction, _, _ = engine_direction(model, batch, rho=rho, alpha=1.0, alpha_search_interval=0)
    torch.testing.assert_close(direction, g1, rtol=1e-9, atol=1e-12)


def test_parallel_v0_v1_falls_back_to_v1():
    # for L = ||w||^2 / 2 every gradient is w itself: g_k is parallel to g0, theta = 0
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))

    def forward_backward():
        loss = 0.5 * (w**2).sum()
        loss.backward()
        return loss.detach()

    engine = XSAM([w], rho=0.5, alpha=1.7, alpha_search_interval=0)
    stats = engine.step(forward_backward, step=0)
    g1 = torch.tensor([3.0, 4.0], dtype=torch.float64) * (1 + 0.5 / 5.0)
    torch.testing.assert_close(w.grad, g1)
    assert float(stats.theta) < 1e-3
    assert w.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_adaptive_ascent_moves_a_weight_at_zero_only_with_eta(eta):
    """ASAM's ``T = |w0| + eta`` is 0 at a weight at zero when eta is 0 (davda54/sam's ``adaptive=True``): the ascent
    leaves it where it is; eta > 0 moves it. The ascent points and the direction are the reference's."""
    model = TinyClassifier()
    with torch.no_grad():
        model.fc1.bias.zero_()
        model.fc2.weight[0, :3] = 0.0
    batch = make_data()
    w0, rho = flat(model), 0.5
    at_zero = w0 == 0
    points = []
    forward_backward, _ = closures(model, batch)

    def recording():
        points.append(flat(model))
        return forward_backward()

    engine = XSAM(
        model.parameters(), sam_method="sam", rho=rho, ascent_steps=2, sam_adaptive=True, sam_adaptive_eta=eta
    )
    engine.step(recording, step=0)
    loss = flat_loss(model, batch)
    expected, _, _ = xsam_direction(loss, w0, rho=rho, k=2, adaptive_eta=eta)
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected, rtol=1e-9, atol=1e-12
    )
    # the first ascent point by hand: w0 + (rho / k) T^2 g0 / ||T g0||
    t, g0 = w0.abs() + eta, gradient(loss, w0)
    torch.testing.assert_close(points[1], w0 + rho / 2 * t * t * g0 / (t * g0).norm(), rtol=1e-9, atol=1e-12)
    assert len(points) == 3 and torch.equal(flat(model), w0)
    assert (g0[at_zero] != 0).all() and at_zero.sum() == 9
    for point in points[1:]:
        if eta == 0:
            assert torch.equal(point[at_zero], w0[at_zero]), "T = 0: a weight at zero does not move"
        else:
            assert (point[at_zero] != 0).all()
        assert (point[~at_zero] != w0[~at_zero]).all()


def test_adaptive_ascent_with_eta_zero_at_all_zero_weights_stalls_to_the_gradient():
    """Every weight at zero and eta 0: ``T = 0``, so the ascent cannot move; it stalls (no NaN from ``0 / ||T g||``)
    and the direction is the gradient at ``w0`` (SAM's fallback, ``u = v1``)."""
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def forward_backward():
        loss = ((w - target) ** 4).sum()
        loss.backward()
        return loss.detach()

    engine = XSAM([w], rho=1.0, sam_adaptive=True, sam_adaptive_eta=0.0)
    stats = engine.step(forward_backward, lambda: ((w - target) ** 4).sum(), step=0)
    torch.testing.assert_close(w.grad, -4 * target**3)
    assert bool(stats.stalled) and not bool(stats.nonfinite) and float(stats.theta) == 0.0
    assert torch.equal(w.detach(), torch.zeros(3)) and math.isfinite(engine.alpha)


def test_zero_gradients_give_zero_direction_and_no_nan():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward_backward():
        loss = (w * 0).sum() + 1.0
        loss.backward()
        return loss.detach()

    engine = XSAM([w], rho=0.1)
    stats = engine.step(forward_backward, lambda: (w * 0).sum() + 1.0, step=0)
    assert torch.equal(w.grad, torch.zeros(2))
    assert w.tolist() == [1.0, -2.0]
    assert not stats.nonfinite and math.isfinite(float(stats.theta))
    assert math.isfinite(engine.alpha)


def test_frozen_parameters_do_not_move_and_direction_matches_reference():
    model = TinyClassifier()
    model.fc1.requires_grad_(False)
    batch = make_data()
    frozen = model.fc1.weight.detach().clone()
    expected, _, _ = xsam_direction(flat_loss(model, batch), flat(model), rho=0.1, alpha=0.5)
    _, direction, _, _ = engine_direction(model, batch, rho=0.1, alpha=0.5, alpha_search_interval=0)
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)
    assert model.fc1.weight.grad is None and torch.equal(model.fc1.weight, frozen)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_statistics_are_those_of_one_pass(momentum):
    model = TinyClassifier(batchnorm=True, bn_momentum=momentum)
    batch = make_data()
    one_pass = copy.deepcopy(model)
    one_pass(**batch)
    engine_direction(model, batch, rho=0.1, ascent_steps=2)
    for name, buffer in one_pass.norm.named_buffers():
        assert torch.equal(buffer, getattr(model.norm, name)), name


def test_dropout_search_uses_one_mask_and_leaves_the_random_stream():
    model = TinyClassifier(dropout=0.5)
    batch = make_data()
    # at a tiny search radius every grid point is w0: equal losses iff every alpha saw the same masks
    torch.manual_seed(0)
    engine = XSAM(model.parameters(), rho=0.1, rho_max=1e-9)
    engine.step(*closures(model, batch), step=0)
    after_search = torch.rand(1)
    losses = engine.search_history[-1]["losses"]
    assert max(losses) - min(losses) < 1e-6

    torch.manual_seed(0)
    model.zero_grad()
    XSAM(model.parameters(), rho=0.1, rho_max=1e-9, alpha_search_interval=0).step(*closures(model, batch), step=0)
    assert torch.equal(torch.rand(1), after_search), "the search must not consume training randomness"


@pytest.mark.parametrize("failing_call", [2, 3])
def test_exception_inside_a_later_pass_restores_the_weights(failing_call):
    model = TinyClassifier()
    batch = make_data()
    before = [p.detach().clone() for p in model.parameters()]
    calls = 0
    forward_backward, loss_only = closures(model, batch)

    def failing(fn):
        def wrapped():
            nonlocal calls
            calls += 1
            if calls == failing_call:
                raise RuntimeError("boom")
            return fn()

        return wrapped

    engine = XSAM(model.parameters(), rho=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        # call 2 is the pass at the ascent point, call 3 the first loss of the alpha search
        engine.step(failing(forward_backward), failing(loss_only), step=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nonfinite_gradient_poisons_direction_and_restores_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward_backward():
        loss = (w * torch.tensor([float("inf"), 1.0])).sum()
        loss.backward()
        return loss.detach()

    engine = XSAM([w], rho=0.1, alpha=0.7)
    stats = engine.step(forward_backward, lambda: w.sum(), step=0)
    assert bool(stats.nonfinite)
    assert not torch.isfinite(w.grad).all()
    assert w.tolist() == [1.0, 2.0]
    assert engine.alpha == 0.7, "a non-finite step must not move alpha"


@pytest.mark.parametrize(
    "settings, reference",
    [
        (dict(rho=0.1), dict(rho=0.1)),
        # ASAM's ascent: T = |w0| + eta of the step's start for both steps of both micro-batches
        (
            dict(rho=1.0, ascent_steps=2, sam_adaptive=True, sam_adaptive_eta=0.05),
            dict(rho=1.0, k=2, adaptive_eta=0.05),
        ),
    ],
)
def test_accumulation_sums_per_micro_batch_directions(settings, reference):
    model = TinyClassifier()
    data = make_data(n=8)
    halves = [{k: v[:4] for k, v in data.items()}, {k: v[4:] for k, v in data.items()}]
    expected = sum(xsam_direction(flat_loss(model, h), flat(model), alpha=1.3, **reference)[0] for h in halves)
    engine = XSAM(model.parameters(), alpha=1.3, alpha_search_interval=0, **settings)
    engine.step(*closures(model, halves[0]), accumulate=True)
    engine.step(*closures(model, halves[1]), accumulate=False)
    direction = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)


def test_reuse_keeps_the_orthogonal_part_of_adaptive_directions_under_accumulation():
    """sam_reuse with ASAM's ascent and two micro-batches: the plain step after the sharpness-aware one adds the mean
    over the micro-batches of each direction's part orthogonal to its first gradient (the ascent must leave that
    gradient as it was, or scale it by a positive number), measured against that gradient."""
    model = TinyClassifier()
    data = make_data(n=8)
    halves = [{k: v[:4] for k, v in data.items()}, {k: v[4:] for k, v in data.items()}]
    w0, scale = flat(model), 5.0  # a scale above the kept part's size: the reused part is the kept one itself
    engine = XSAM(
        model.parameters(),
        rho=1.0,
        sam_adaptive=True,
        sam_adaptive_eta=0.05,
        alpha=1.3,
        alpha_search_interval=0,
        sam_interval=2,
        sam_reuse=True,
        sam_reuse_scale=scale,
    )
    engine.step(*closures(model, halves[0]), accumulate=True)
    engine.step(*closures(model, halves[1]))
    losses = [flat_loss(model, h) for h in halves]
    directions = [xsam_direction(loss, w0, rho=1.0, alpha=1.3, adaptive_eta=0.05)[0] for loss in losses]
    sharpness_aware = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(sharpness_aware, sum(directions), rtol=1e-9, atol=1e-12)
    kept = sum(orthogonal_part(d, gradient(loss, w0)) for d, loss in zip(directions, losses)) / 2
    assert 0.05 < float(kept.norm()) < scale  # the test measures the kept part's size too
    # the plain step after it, on the whole batch
    model.zero_grad()
    model(**data)["loss"].backward()
    engine.reuse_direction_()
    expected = reused_direction(gradient(flat_loss(model, data), w0), kept, scale)
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected, rtol=1e-9, atol=1e-12
    )


def test_accumulation_updates_parameters_that_only_an_earlier_micro_batch_reached():
    """Micro-batch 1 reaches only ``a``, the last only ``b``: each gets its own direction at every step, as the
    Trainer's accumulation gives it (no direction held back in a buffer, none released later in a burst)."""
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64))
    engine = XSAM([a, b], rho=0.1, alpha=1.4, alpha_search_interval=0)

    def closure(param, power):
        def forward_backward():
            loss = (param**power).sum()
            loss.backward()
            return loss.detach()

        return forward_backward

    def on_a(w):
        return (w[:2] ** 4).sum()

    def on_b(w):
        return (w[2:] ** 2 + w[2:] ** 4).sum()

    w = torch.cat([a.detach(), b.detach()])
    for step in range(3):
        expected = sum(xsam_direction(loss, w, rho=0.1, alpha=1.4)[0] for loss in (on_a, on_b))
        engine.step(closure(a, 4), step=step, accumulate=True)
        engine.step(lambda: closure(b, 2)() + closure(b, 4)(), step=step)
        assert a.grad is not None and b.grad is not None, f"step {step}"
        torch.testing.assert_close(torch.cat([a.grad, b.grad]), expected, rtol=1e-9, atol=1e-12)
        with torch.no_grad():  # SGD
            for p in (a, b):
                p -= 0.05 * p.grad
                p.grad = None
        w = sgd_step(w, expected, 0.05)


def test_search_schedule_and_state_round_trip():
    w = torch.nn.Parameter(torch.ones(2))
    per_epoch = XSAM([w], rho=0.1)
    assert per_epoch.search_due(step=0, epoch=0)
    per_epoch.last_search_step, per_epoch.last_search_epoch = 0, 0
    assert not per_epoch.search_due(step=5, epoch=0) and per_epoch.search_due(step=6, epoch=1)
    every_three = XSAM([w], rho=0.1, alpha_search_interval=3)
    every_three.load_state_dict({"alpha": 0.4, "last_search_step": 2, "last_search_epoch": 0})
    assert not every_three.search_due(step=4, epoch=9) and every_three.search_due(step=5, epoch=0)
    assert every_three.state_dict()["alpha"] == 0.4
    assert not XSAM([w], rho=0.1, alpha_search_interval=0).search_due(step=0, epoch=0)
    assert not XSAM([w], rho=0.1, alpha_search_interval=0).search_due(step=0, epoch=0)


def test_geometry_against_flat_vectors():
    xs = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    ys = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    fx, fy = torch.cat([x.reshape(-1) for x in xs]), torch.cat([y.reshape(-1) for y in ys])
    torch.testing.assert_close(global_norm(xs), fx.norm())
    torch.testing.assert_close(global_dot(xs, ys), fx @ fy)
    torch.testing.assert_close(global_norms(xs, ys), torch.stack([fx.norm(), fy.norm()]))
    scale = torch.tensor(-0.3, dtype=torch.float64)
    for add in (addcmul_scaled_, mul_add_scaled_):  # the CPU's kernel and the accelerators'
        sums, scratch = [y.clone() for y in ys], [x.clone() for x in xs]
        add(sums, scratch, scale)
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in sums]), fy - 0.3 * fx, rtol=1e-15, atol=1e-15)
    theta = torch.tensor(0.8, dtype=torch.float64)
    for alpha in (0.0, 0.5, 1.0, 1.7):
        c0, c1 = slerp_coefficients(theta, alpha)
        # u(alpha) is a unit vector at angle alpha * theta from v0
        v0, v1 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.stack([torch.cos(theta), torch.sin(theta)])
        u = c0 * v0 + c1 * v1
        torch.testing.assert_close(u, torch.stack([torch.cos(alpha * theta), torch.sin(alpha * theta)]))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rho", 0.0, "Invalid rho: 0.0"),
        ("ascent_steps", 0, "Invalid ascent_steps: 0"),
        ("alpha_step", -0.1, "Invalid alpha_step"),
        ("rho_max", -1.0, "Invalid rho_max"),
        ("alpha_search_interval", -2, "Invalid alpha_search_interval"),
        ("sam_eps", 0.0, "Invalid sam_eps"),
        ("sam_eps", 1.0, r"Invalid sam_eps: 1.0; it must be a small number"),
        ("alpha_max", 0.0, "Invalid alpha_max / alpha_step: 0.0 / 0.1 give a one-point search grid"),
        ("alpha_step", 2.5, r"Invalid alpha_max / alpha_step: None \(1 with SGD\) / 2.5 give a one-point search grid"),
        ("alpha", float("nan"), "Invalid alpha: nan"),
        ("sam_method", "none", "Invalid sam_method: 'none' takes no XSAM step"),
        ("sam_perturbation", "both", "Invalid sam_perturbation: 'both'; choose one of local, global"),
        ("sam_adaptive_eta", -0.01, r"Invalid sam_adaptive_eta: -0.01; it must be a finite number in \[0, 1e\+18\]"),
        ("sam_adaptive_eta", float("nan"), "Invalid sam_adaptive_eta: nan"),
        ("sam_adaptive_eta", float("inf"), "Invalid sam_adaptive_eta: inf"),
        ("sam_adaptive_eta", 1e19, r"Invalid sam_adaptive_eta: 1e\+19"),
        ("sam_adaptive_eta", "0.1", "Invalid sam_adaptive_eta: '0.1'"),
        ("sam_adaptive_eta", True, "Invalid sam_adaptive_eta: True"),
        ("sam_adaptive", "true", "Invalid sam_adaptive: 'true'; it must be True or False"),
        ("sam_adaptive", 1, "Invalid sam_adaptive: 1; it must be True or False"),
    ],
)
def test_invalid_settings_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        XSAM([torch.nn.Parameter(torch.ones(1))], **{field: value})


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(alpha_max=1e9), r"Invalid alpha_max / alpha_step: 1000000000.0 / 0.1 give a grid of more than 1001"),
        (dict(alpha_step=1e-12), r"Invalid alpha_max / alpha_step: None \(2\) / 1e-12 give a grid of more than 1001"),
        (dict(alpha_step=1e-6), r"Invalid alpha_max / alpha_step: None \(2\) / 1e-06 give a grid of more than 1001"),
        (dict(rho=10**400), r"Invalid rho: 10000000000.*; it must be a number > 0"),
        (dict(rho=1e308), r"Invalid rho: 1e\+308; a radius must be at most 1e\+18"),
        (dict(rho_max=1e308), r"Invalid rho_max: 1e\+308; a radius must be at most 1e\+18"),
        (dict(rho=6e17), r"Invalid rho_max: None \(2 \* rho = 1.2e\+18\)"),
    ],
)
def test_settings_that_would_hang_or_overflow_are_refused_at_construction(settings, match):
    """A grid too large to evaluate (it used to be built first, then hang) and radii whose squares overflow."""
    with pytest.raises(ValueError, match=match):
        XSAMConfig(**settings)


def test_the_largest_settings_allowed_still_work():
    config = XSAMConfig(alpha_max=100.0, alpha_step=0.1, rho=1e18 / 2)
    assert len(config.alpha_grid()) == MAX_GRID_POINTS and config.search_radius == MAX_RADIUS


def test_no_trainable_parameter_is_refused():
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        XSAM([torch.ones(2)])


@pytest.mark.parametrize("workers", [None, "local", "global"])
def test_step_without_search_reads_nothing_back(monkeypatch, workers):
    """The hot path never turns a tensor into a Python value (a host-device sync on accelerators); with workers
    (a reducer that leaves the tensors as they are) neither, when every parameter has a gradient."""
    model = TinyClassifier(dtype=torch.float32, batchnorm=True)
    batch = make_data()
    settings = dict(sam_perturbation=workers, reduce_gradients=lambda tensors: None) if workers else {}
    engine = XSAM(
        model.parameters(), rho=0.1, ascent_steps=2, alpha_search_interval=0, modules=model.modules(), **settings
    )
    forward_backward, loss_only = closures(model, batch)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the XSAM step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    engine.step(forward_backward, loss_only, step=0, accumulate=True)
    engine.step(forward_backward, loss_only, step=0)
    monkeypatch.undo()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

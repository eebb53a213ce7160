"""benchmarks/diagnostics.py: the ball maximum, the probe, the engine's directions and the plane slice."""

import math

import pytest
import torch
from torch import nn

from diagnostics import LossProbe, ball_maximum, cosine, engine_direction, plane_basis, plane_slice


class Regression(nn.Module):
    """A tiny model with a Hugging Face style output (``.loss``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(3, 4, dtype=torch.float64)
        self.out = nn.Linear(4, 1, dtype=torch.float64)

    def forward(self, x, labels):
        prediction = self.out(torch.tanh(self.hidden(x))).squeeze(-1)
        return type("Output", (), {"loss": ((prediction - labels) ** 2).mean()})()


def probe() -> LossProbe:
    generator = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(8, 3, generator=generator, dtype=torch.float64),
        "labels": torch.randn(8, generator=generator, dtype=torch.float64),
    }
    return LossProbe(Regression(), batch)


def test_cosine():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(torch.zeros(2), torch.ones(2)) == 0.0


def test_ball_maximum_of_a_linear_function_is_on_the_boundary_along_its_gradient():
    b = torch.tensor([1.0, -2.0, 2.0])
    e, loss = ball_maximum(lambda e: (float(b @ e), b.clone()), radius=0.5, starts=[torch.zeros(3)], steps=20)
    assert cosine(e, b) == pytest.approx(1.0)
    assert float(e.norm()) == pytest.approx(0.5)
    assert loss == pytest.approx(1.5)


def test_ball_maximum_of_a_quadratic_finds_the_top_eigenvector_from_a_random_start():
    a = torch.tensor([3.0, 1.0, -2.0])
    e, loss = ball_maximum(lambda e: (float((a * e * e).sum()), 2 * a * e), 1.0, [torch.tensor([0.1, 0.5, 0.5])])
    assert loss == pytest.approx(3.0, rel=1e-3)
    assert abs(cosine(e, torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(1.0, abs=1e-3)


def test_ball_maximum_matches_a_dense_search_in_two_dimensions():
    def value(x, y):
        return torch.sin(3 * x) + torch.cos(2 * y) + x * y

    def f(e):
        x, y = e[0].double(), e[1].double()
        return float(value(x, y)), torch.stack([3 * torch.cos(3 * x) + y, -2 * torch.sin(2 * y) + x]).float()

    starts = [torch.zeros(2), torch.tensor([-0.5, 0.5]), torch.tensor([0.3, -0.6])]
    _, loss = ball_maximum(f, 1.0, starts, steps=200)
    radii = torch.linspace(0, 1, 201, dtype=torch.float64)
    angles = torch.linspace(0, 2 * math.pi, 1441, dtype=torch.float64)
    r, t = torch.meshgrid(radii, angles, indexing="ij")
    dense = float(value(r * torch.cos(t), r * torch.sin(t)).max())
    assert loss == pytest.approx(dense, abs=1e-3)


def test_probe_restores_the_weights_exactly_and_returns_the_autograd_gradient():
    p = probe()
    before = [w.clone() for w in p.params]
    e = torch.randn(p.numel, dtype=torch.float64)
    loss, grad = p.loss_and_grad(e)
    assert all(torch.equal(w, b) for w, b in zip(p.params, before))
    assert p.loss(e) == pytest.approx(loss)
    assert all(w.grad is None for w in p.params)
    with torch.no_grad():
        torch._foreach_add_(p.params, p.split(e))
    p.forward_loss().backward()
    expected = torch.cat([w.grad.reshape(-1) for w in p.params]).float()
    torch.testing.assert_close(grad, expected)


def test_engine_direction_for_sam_is_the_gradient_at_the_ascent_point():
    p = probe()
    rho = 0.1
    _, g0 = p.loss_and_grad()
    _, g1 = p.loss_and_grad(rho * g0.double() / g0.double().norm())
    direction, engine, _ = engine_direction(p, rho=rho, sam_method="sam")
    torch.testing.assert_close(direction, g1, rtol=1e-5, atol=1e-7)
    assert engine.alpha == 1.0
    assert all(w.grad is None for w in p.params)
    assert all(torch.equal(w, b) for w, b in zip(p.params, p.w0))


def test_engine_direction_searches_alpha_on_its_first_step():
    _, engine, _ = engine_direction(probe(), rho=0.1)
    assert len(engine.search_history) == 1
    assert engine.alpha in engine.alpha_grid


def test_plane_basis_is_orthonormal_and_starts_along_v0():
    v0, v1 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    e0, e1 = plane_basis(v0, v1)
    torch.testing.assert_close(e0, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(e1, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="parallel"):
        plane_basis(v0, 3 * v0)


def test_plane_slice_rows_follow_e1_and_columns_e0():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    grid = plane_slice(lambda e: float(e[0] + 10 * e[1]), e0, e1, extent=1.0, points=3)
    torch.testing.assert_close(grid, torch.tensor([[-11.0, -10.0, -9.0], [-1.0, 0.0, 1.0], [9.0, 10.0, 11.0]]))

"""A 2-D slice of the loss landscape with the directions drawn on it (PNG, needs matplotlib).

Used by ``direction_quality.py``; a research picture, not on any training path.

Produces: docs/diagnostics.md (the loss landscape pictures).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["plot_landscape"]


def plot_landscape(
    losses: Sequence[Sequence[float]],
    extent: float,
    arrows: dict[str, tuple[float, float]],
    circles: dict[str, float],
    path: str,
    title: str = "",
    points: dict[str, tuple[float, float]] | None = None,
    paths: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> None:
    """A 2-D loss slice (``losses[i][j]`` at ``x = xs[j], y = xs[i]`` on ``[-extent, extent]^2``) with directions.

    Args:
        losses: the grid, e.g. from :func:`diagnostics.plane_slice`.
        extent: half-width of the grid.
        arrows: label -> end point ``(x, y)`` of an arrow from the origin.
        circles: label -> radius of a circle around the origin.
        path: the PNG to write.
        title: the figure title.
        points: label -> ``(x, y)`` of a marked point.
        paths: label -> points drawn as a dotted line with small markers (e.g. the alpha-search grid).
    """
    import numpy as np
    from matplotlib.figure import Figure

    grid = np.asarray(losses, dtype=float)
    xs = np.linspace(-extent, extent, grid.shape[1])
    fig = Figure(figsize=(6.4, 6.6), layout="constrained")
    ax = fig.subplots()
    filled = ax.contourf(xs, xs, grid, levels=30, cmap="magma")
    ax.contour(xs, xs, grid, levels=12, colors="white", linewidths=0.4, alpha=0.5)
    fig.colorbar(filled, ax=ax, label="batch loss")
    angles = np.linspace(0, 2 * np.pi, 200)
    for i, (label, radius) in enumerate(circles.items()):
        circle = radius * np.cos(angles), radius * np.sin(angles)
        ax.plot(*circle, ls=("--", ":")[i % 2], color="white", lw=1, label=label)
    for i, (label, (x, y)) in enumerate(arrows.items()):
        color = f"C{i}"
        ax.annotate("", xy=(x, y), xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2})
        ax.plot([], [], color=color, lw=2, label=label)
    for i, (label, (x, y)) in enumerate((points or {}).items()):
        ax.plot(x, y, marker="**Pd"[i % 4], ms=12, color="cyan", mec="black", ls="none", label=label)
    for label, path_points in (paths or {}).items():
        ax.plot(*zip(*path_points), ".:", color="white", ms=4, lw=0.8, label=label)
    ax.plot(0, 0, "wo", ms=4)
    ax.set_aspect("equal")
    ax.set_xlabel("along v0 (ascent direction)")
    ax.set_ylabel("along v1, orthogonalised")
    ax.set_title(title)
    # a dark legend, so that the white circles and points show in it as on the slice
    fig.legend(loc="outside lower center", ncols=2, fontsize="small", facecolor="0.3", labelcolor="white")
    fig.savefig(path, dpi=120)

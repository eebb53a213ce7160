"""Pictures of what XSAM did: the alpha-search curves and alpha over training (PNG, needs matplotlib).

:class:`XSAMPlotCallback` writes ``xsam_alpha_search.png`` and ``xsam_alpha.png`` into ``output_dir`` at
every checkpoint and at the end of training. Without matplotlib (``pip install hf_xsam[plots]``) it warns
once and does nothing. The plotting functions use matplotlib's object API only (no pyplot, no global
backend change), so they are safe in notebooks and headless jobs.

Example:
    >>> import os, tempfile
    >>> from hf_xsam.plots import save_xsam_plots
    >>> history = [{"step": 0, "alpha": 1.5, "theta": 30.0, "losses": [1.0, 1.2, 1.3, 1.25]}]
    >>> logs = [{"step": 10, "xsam/alpha": 1.5, "xsam/theta": 31.0}]
    >>> with tempfile.TemporaryDirectory() as out:
    ...     sorted(os.path.basename(p) for p in save_xsam_plots(out, history, [0.0, 0.5, 1.0, 1.5], logs))
    ['xsam_alpha.png', 'xsam_alpha_search.png']
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = [
    "ALPHA_PNG",
    "ALPHA_SEARCH_PNG",
    "XSAMPlotCallback",
    "plot_alpha",
    "plot_alpha_search",
    "save_xsam_plots",
]

logger = logging.getLogger(__name__)

ALPHA_SEARCH_PNG = "xsam_alpha_search.png"
ALPHA_PNG = "xsam_alpha.png"


def _figure(columns: int, width: float = 5.0, height: float = 3.8) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width * columns, height), layout="constrained")


def plot_alpha_search(search_history: Sequence[dict[str, Any]], alpha_grid: Sequence[float], path: str) -> bool:
    """Loss versus alpha at every search (left) and the same curves rescaled to [0, 1] (right).

    Colour follows the optimizer step of the search; a dot marks the chosen alpha. A search that evaluated part
    of the grid (``alpha_search="coarse_to_fine"``) is drawn at the alphas it evaluated (its ``"alphas"``) with
    markers. Searches that saw a non-finite gradient (no losses) are left out. Returns whether a file was
    written.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    def alphas_of(search: dict[str, Any]) -> Sequence[float]:
        return search.get("alphas", alpha_grid)

    searches = [s for s in search_history if s.get("losses") and len(s["losses"]) == len(alphas_of(s))]
    if not searches:
        return False
    steps = [s.get("step", i) for i, s in enumerate(searches)]
    norm = Normalize(min(steps), max(max(steps), min(steps) + 1))
    cmap = colormaps["viridis"]
    fig = _figure(2)
    raw, shape = fig.subplots(1, 2)
    for search, step in zip(searches, steps):
        alphas, losses = list(alphas_of(search)), search["losses"]
        low, high = min(losses), max(losses)
        scaled = [(v - low) / (high - low) if high > low else 0.0 for v in losses]
        best = alphas.index(search["alpha"]) if search.get("alpha") in alphas else losses.index(high)
        style = ".-" if "alphas" in search else "-"
        for ax, values in ((raw, losses), (shape, scaled)):
            ax.plot(alphas, values, style, color=cmap(norm(step)), lw=1.2, ms=3, alpha=0.8)
            ax.plot(alphas[best], values[best], "o", color=cmap(norm(step)), ms=4)
    for ax in (raw, shape):
        ax.axvline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("alpha  (0 = ascent direction v0, 1 = SAM's g_k)")
    raw.set_ylabel("loss at w0 + rho_max u(alpha)")
    shape.set_ylabel("rescaled loss (min 0, max 1)")
    raw.set_title(f"XSAM alpha search ({len(searches)} searches)")
    shape.set_title("curve shapes; dot = chosen alpha")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=shape, label="optimizer step")
    fig.savefig(path, dpi=120)
    return True


def plot_alpha(search_history: Sequence[dict[str, Any]], log_history: Sequence[dict[str, Any]], path: str) -> bool:
    """Alpha over training (left) and the angle theta between v0 and v1 (right).

    Alpha is drawn as chosen by each search and held until the next (steps), and as logged (``xsam/alpha``,
    averaged over each logging interval). Returns whether a file was written.
    """
    logged = [e for e in log_history if "xsam/alpha" in e]
    searches = [s for s in search_history if "step" in s]
    if not logged and not searches:
        return False
    fig = _figure(2)
    left, right = fig.subplots(1, 2)
    if searches:
        last = max([s["step"] for s in searches] + [e["step"] for e in logged])
        xs = [s["step"] for s in searches] + [last]
        left.step(xs, [s["alpha"] for s in searches] + [searches[-1]["alpha"]], where="post", label="searched alpha")
    if logged:
        left.plot([e["step"] for e in logged], [e["xsam/alpha"] for e in logged], ".", label="logged xsam/alpha")
    left.axhline(1.0, color="grey", ls="--", lw=0.8, label="SAM (alpha = 1)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("alpha")
    left.set_title("XSAM alpha over training")
    left.legend(fontsize="small")
    thetas = [e for e in logged if "xsam/theta" in e]
    right.plot([e["step"] for e in thetas], [e["xsam/theta"] for e in thetas], ".-", color="C2", label="logged")
    right.plot([s["step"] for s in searches], [s["theta"] for s in searches], "x", color="C3", label="at searches")
    right.set_xlabel("optimizer step")
    right.set_ylabel("theta (degrees)")
    right.set_title("angle between v0 (ascent) and v1 (g_k)")
    right.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def save_xsam_plots(
    output_dir: str,
    search_history: Sequence[dict[str, Any]],
    alpha_grid: Sequence[float],
    log_history: Sequence[dict[str, Any]],
) -> list[str]:
    """Writes :data:`ALPHA_SEARCH_PNG` and :data:`ALPHA_PNG` into ``output_dir`` where there is something to draw.

    Returns the paths written.
    """
    os.makedirs(output_dir, exist_ok=True)
    written = []
    search_path, alpha_path = os.path.join(output_dir, ALPHA_SEARCH_PNG), os.path.join(output_dir, ALPHA_PNG)
    if plot_alpha_search(search_history, alpha_grid, search_path):
        written.append(search_path)
    if plot_alpha(search_history, log_history, alpha_path):
        written.append(alpha_path)
    return written


class XSAMPlotCallback(TrainerCallback):
    """Saves :data:`ALPHA_SEARCH_PNG` and :data:`ALPHA_PNG` into ``args.output_dir`` on every save and at the end.

    The model card links these files when they exist. Only the main process writes. Without matplotlib
    the callback logs one warning and does nothing.

    Args:
        trainer: the :class:`~hf_xsam.XSAMTrainer` whose engine (``trainer.xsam``) holds the search history.

    Example:
        >>> from hf_xsam.plots import XSAMPlotCallback
        >>> # trainer = XSAMTrainer(...); trainer.add_callback(XSAMPlotCallback(trainer)); trainer.train()
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.enabled = importlib.util.find_spec("matplotlib") is not None
        if not self.enabled:
            logger.warning("matplotlib is not installed: XSAMPlotCallback draws nothing (pip install hf_xsam[plots])")

    def _save(self, args: TrainingArguments, state: TrainerState) -> None:
        engine = getattr(self.trainer, "xsam", None)
        if not (self.enabled and state.is_world_process_zero):
            return
        history = engine.search_history if engine is not None else []
        grid = engine.alpha_grid if engine is not None else []
        save_xsam_plots(args.output_dir, history, grid, state.log_history)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._save(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._save(args, state)

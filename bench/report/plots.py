"""The leaderboard's plots (matplotlib, Agg, PNG): accuracy against cost per task, the
distribution of influence scores per query, and the layer-wise influence share.

* ``accuracy_vs_cost_{task}.png``: each headline accuracy metric (those of
  headline metrics (:mod:`bench.metrics`), else the first others) against fit+score
  seconds (log x), one point per estimator with its 95 % bootstrap intervals on both axes;
  the LDS noise ceiling as a dashed line.
* ``score_ccdf_{task}_{estimator}.png``: the log-log complementary CDF of |score(q, ·)| for
  a few queries (Grosse et al. 2023, Sec. 5.3: influence is heavy-tailed), with the power-law
  exponent α of P(|s| ≥ x) ∝ x^{1-α} fitted on the tail by maximum likelihood, the tail's
  start x_min chosen by the Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman 2009,
  eqs. 3.1 and 3.9). ``power_law.csv`` lists the median α over queries.
* ``layer_share_{task}_{estimator}.png``: the share of Σ_m |score_l(q, m)| that each layer l
  carries, averaged over the queries of each type (Grosse et al. 2023, Fig. 19 in
  miniature), from the ``layer_scores.pt`` of estimators run with ``per_layer: true``.

Figures are built on :class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend);
the lowest seed of each task and estimator is plotted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from bench.metrics import is_cost, is_headline
from bench.report.tables import CEILING, estimator_order, metric_order

MAX_QUERIES = 6  # queries drawn in a CCDF plot
MAX_PANELS = 6  # metrics drawn in an accuracy-vs-cost plot (the headline ones first)


def slug(text: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def power_law_fit(x: np.ndarray, min_tail: int = 10,
                  candidates: int = 50) -> tuple[float, float, int]:
    """Continuous power-law fit of the tail of positive values (Clauset et al. 2009).

    For each candidate x_min (quantiles of ``x`` leaving at least ``min_tail`` points),
    α = 1 + n / Σ ln(x_i / x_min) over the n points ≥ x_min; the x_min whose fitted CCDF is
    closest to the empirical one (KS distance) wins.

    Args:
        x: ``[N]`` values; non-positive and non-finite ones are dropped.

    Returns:
        ``(alpha, x_min, n_tail)``; NaNs and 0 when fewer than ``min_tail`` positive values.
    """
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < min_tail:
        return float("nan"), float("nan"), 0
    top = 1.0 - min_tail / x.size
    grid = np.unique(np.quantile(x, np.linspace(0.0, top, candidates), method="lower"))
    best = (np.inf, float("nan"), float("nan"), 0)
    for xmin in grid:
        tail = x[x >= xmin]
        logs = np.log(tail / xmin).sum()
        if tail.size < min_tail or logs <= 0:
            continue
        alpha = 1.0 + tail.size / logs
        empirical = np.arange(tail.size) / tail.size  # CDF just below each sorted point
        fitted = 1.0 - (tail / xmin) ** (1.0 - alpha)
        distance = np.max(np.abs(empirical - fitted))
        if distance < best[0]:
            best = (distance, float(alpha), float(xmin), int(tail.size))
    return best[1], best[2], best[3]


def ccdf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted positive values, P(X ≥ value))`` of ``x``."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x) & (x > 0)]
    return x, 1.0 - np.arange(x.size) / x.size


def score_ccdf_figure(scores: torch.Tensor, title: str) -> tuple[Figure, np.ndarray]:
    """The CCDF of |scores| of a few queries, and every query's fitted α.

    Args:
        scores: ``[Q, N]``.

    Returns:
        ``(figure, alphas [Q])``.
    """
    magnitude = scores.abs().double().numpy()
    fits = [power_law_fit(row) for row in magnitude]
    alphas = np.array([f[0] for f in fits])
    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    ax = fig.add_subplot()
    shown = np.unique(np.linspace(0, len(magnitude) - 1, MAX_QUERIES).round().astype(int))
    for q in shown:
        xs, ps = ccdf(magnitude[q])
        if xs.size == 0:
            continue
        (line,) = ax.loglog(xs, ps, lw=1.2, label=f"query {q}: α={alphas[q]:.2f}")
        alpha, xmin, n_tail = fits[q]
        if np.isfinite(alpha):
            grid = np.geomspace(xmin, xs[-1], 20)
            ax.loglog(grid, n_tail / xs.size * (grid / xmin) ** (1 - alpha), ls="--", lw=0.8,
                      color=line.get_color())
    median = np.nanmedian(alphas) if np.isfinite(alphas).any() else float("nan")
    ax.set(xlabel="|influence score|", ylabel="P(|score| ≥ x)",
           title=f"{title}\nmedian power-law α over {len(alphas)} queries: {median:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, alphas


def layer_share(layer_scores: torch.Tensor, query_types: list[str] | None) -> pd.DataFrame:
    """Share of Σ_m |score| per layer, averaged over the queries of each type.

    Args:
        layer_scores: ``[L, Q, N]``.
        query_types: ``Q`` labels, or None (one type, ``all``).

    Returns:
        ``[types, L]`` shares (rows sum to 1), types sorted.
    """
    mass = layer_scores.abs().double().sum(-1).numpy()  # [L, Q]
    share = mass / np.maximum(mass.sum(0, keepdims=True), np.finfo(float).tiny)
    types = np.array(query_types if query_types is not None else ["all"] * share.shape[1])
    return pd.DataFrame({t: share[:, types == t].mean(1) for t in sorted(set(types))}).T


def layer_share_figure(share: pd.DataFrame, layers: list[str], title: str) -> Figure:
    """Stacked horizontal bars: one per query type, one segment per layer."""
    fig = Figure(figsize=(7.0, 1.6 + 0.5 * len(share)), dpi=100)
    ax = fig.add_subplot()
    left = np.zeros(len(share))
    for i, name in enumerate(layers):
        ax.barh(list(share.index), share[i], left=left, label=name)
        left += share[i].to_numpy()
    ax.set(xlim=(0, 1), xlabel="share of Σ|score| per layer", title=title)
    ax.legend(fontsize=7, title="layer", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def accuracy_vs_cost_figure(cells: pd.DataFrame, task: str) -> Figure | None:
    """Each accuracy metric of ``task`` against fit+score seconds, log x, with intervals."""
    here = cells[cells["task"] == task]
    metrics = [m for m in metric_order(here["metric"]) if not is_cost(m)]
    headline = [m for m in metrics if is_headline(m)]
    metrics = (headline or metrics)[:MAX_PANELS]
    cost = here[here["metric"] == "seconds"].set_index("estimator")
    if not metrics or cost.empty:
        return None
    columns = min(len(metrics), 3)
    rows = -(-len(metrics) // columns)
    fig = Figure(figsize=(4.5 * columns, 4.0 * rows), dpi=100)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, columns, k + 1)
        acc = here[here["metric"] == metric].set_index("estimator")
        for name in estimator_order(acc.index):
            if name == CEILING:
                ax.axhline(acc.loc[name, "mean"], ls="--", color="grey", lw=1, label=CEILING)
                continue
            if name not in cost.index:
                continue
            y, x = acc.loc[name], cost.loc[name]
            ax.errorbar(x["mean"], y["mean"], yerr=_err(y), xerr=_err(x), fmt="o", capsize=3,
                        label=name)
            ax.annotate(name, (x["mean"], y["mean"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel="fit + score seconds", ylabel=metric, title=f"{task}: {metric}")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _err(cell: pd.Series) -> np.ndarray:
    """``[[below], [above]]`` error bar lengths from an interval (0 where undefined)."""
    lo, hi, mean = cell["lo"], cell["hi"], cell["mean"]
    below = mean - lo if np.isfinite(lo) else 0.0
    above = hi - mean if np.isfinite(hi) else 0.0
    return np.array([[max(below, 0.0)], [max(above, 0.0)]])


def run_plots(out_dir: Path, scores: torch.Tensor | None, title: str) -> list[Path]:
    """A single run's plots in ``out_dir``: ``score_ccdf.png`` and, when the run saved
    ``layer_scores.pt``, ``layer_share.png``."""
    written = []
    if scores is not None and scores.numel():
        fig, _ = score_ccdf_figure(scores, title)
        written.append(_save(fig, Path(out_dir) / "score_ccdf.png"))
    layer_file = Path(out_dir) / "layer_scores.pt"
    if layer_file.exists():
        saved = torch.load(layer_file, weights_only=True)
        share = layer_share(saved["layer_scores"], saved["query_types"])
        fig = layer_share_figure(share, saved["layers"], title)
        written.append(_save(fig, Path(out_dir) / "layer_share.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def all_plots(cells: pd.DataFrame, frame: pd.DataFrame, out: Path) -> list[Path]:
    """Every leaderboard plot into ``out`` (and ``power_law.csv``); returns the files."""
    written = []
    for task in sorted(cells["task"].unique()):
        fig = accuracy_vs_cost_figure(cells, task)
        if fig is not None:
            written.append(_save(fig, out / f"accuracy_vs_cost_{slug(task)}.png"))
    fits = []
    for (task, estimator), group in frame.groupby(["task", "estimator"], sort=True):
        run = group.sort_values("seed")["run"].iloc[0]
        title = f"{task} / {estimator} / seed {run.seed}"
        name = f"{slug(task)}_{slug(estimator)}"
        scores_file = run.path / "scores.pt"
        if scores_file.exists():
            fig, alphas = score_ccdf_figure(torch.load(scores_file, weights_only=True), title)
            written.append(_save(fig, out / f"score_ccdf_{name}.png"))
            finite = alphas[np.isfinite(alphas)]
            fits.append({"task": task, "estimator": estimator, "seed": run.seed,
                         "queries_fitted": finite.size,
                         "alpha_median": np.median(finite) if finite.size else np.nan,
                         "alpha_q25": np.quantile(finite, 0.25) if finite.size else np.nan,
                         "alpha_q75": np.quantile(finite, 0.75) if finite.size else np.nan})
        layer_file = run.path / "layer_scores.pt"
        if layer_file.exists():
            saved = torch.load(layer_file, weights_only=True)
            share = layer_share(saved["layer_scores"], saved["query_types"])
            fig = layer_share_figure(share, saved["layers"], title)
            written.append(_save(fig, out / f"layer_share_{name}.png"))
    if fits:
        pd.DataFrame(fits).to_csv(out / "power_law.csv", index=False, float_format="%.6g",
                                  lineterminator="\n")
    return written

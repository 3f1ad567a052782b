"""Hydra callbacks: an experiment's sweep writes its own results table when it ends.

An experiment file (``conf/experiment/*.yaml``) registers :class:`BuildLeaderboard` under
``hydra.callbacks``; when the multirun finishes, the records of its sweep directory go
through the leaderboard code (:func:`bench.report.leaderboard.build`) into ``out``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class BuildLeaderboard(Callback):
    """Builds ``LEADERBOARD.md``, ``leaderboard.csv`` and plots of a finished sweep.

    Args:
        out: the folder the tables and plots go to (e.g. ``results/ekfac_vs_lissa``).
        plots: also draw the plots.
        bootstrap: bootstrap resamples of the confidence intervals.
        compare: row pairs ``[A, B]`` whose paired difference A − B is reported
            (:func:`bench.report.stats.differences`).
    """

    def __init__(self, out: str, plots: bool = True, bootstrap: int = 2000,
                 compare: list | None = None):
        self.out = Path(out)
        self.plots = bool(plots)
        self.bootstrap = int(bootstrap)
        self.compare = [(str(a), str(b)) for a, b in (compare or [])]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bench.report.leaderboard import build

        sweep_dir = Path(config.hydra.sweep.dir)
        argv = [str(sweep_dir), "--out", str(self.out)]
        argv += [part for a, b in self.compare for part in ("--compare", a, b)]
        try:
            build([sweep_dir], self.out, n_boot=self.bootstrap, plots=self.plots, argv=argv,
                  compare=self.compare, strict=False)
        except (FileNotFoundError, ValueError) as err:
            log.error("No results table for %s: %s", sweep_dir, err)
            return
        log.info("Results of %s written to %s (rebuild: tda-bench-leaderboard %s)", sweep_dir,
                 self.out, " ".join(argv))

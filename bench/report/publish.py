"""Publishing the leaderboard to Weights & Biases: ``tda-bench-leaderboard --wandb-project``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def log_leaderboard(out: Path, project: str, cells: pd.DataFrame | None = None) -> None:
    """Logs ``leaderboard.csv`` as the table ``leaderboard``, every task's tables of
    ``LEADERBOARD.md`` as ``{task}/headline`` and ``{task}/diagnostics`` (from ``cells``,
    :func:`bench.report.tables.task_tables`), and the PNGs of ``out`` (the accuracy-vs-cost
    plots) as images ``plots/<name>`` to one W&B run (job type ``leaderboard``), written
    under ``$WANDB_DIR`` (default: the working directory), never inside ``out``."""
    import wandb

    from bench.report.tables import task_tables

    table = pd.read_csv(out / "leaderboard.csv", keep_default_na=False)
    run = wandb.init(project=project, name="leaderboard", job_type="leaderboard",
                     mode=os.environ.get("WANDB_MODE", "offline"),
                     dir=os.environ.get("WANDB_DIR", os.getcwd()),
                     settings=wandb.Settings(console="off", silent=True))
    try:
        payload = {"leaderboard": wandb.Table(dataframe=table.astype(str))}
        for task in sorted(cells["task"].unique()) if cells is not None else []:
            for part, frame in task_tables(task, cells).items():
                payload[f"{task}/{part}"] = wandb.Table(dataframe=frame)
        payload.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))})
        run.log(payload)
    finally:
        run.finish()

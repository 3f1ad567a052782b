"""Publishing the leaderboard to Weights & Biases: ``tda-bench-leaderboard --wandb-project``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def log_leaderboard(out: Path, project: str) -> None:
    """Logs ``leaderboard.csv`` as the table ``leaderboard`` and the PNGs of ``out`` as
    images ``plots/<name>`` to one W&B run (job type ``leaderboard``), written under
    ``$WANDB_DIR`` (default: the working directory), never inside ``out``."""
    import wandb

    table = pd.read_csv(out / "leaderboard.csv", keep_default_na=False)
    run = wandb.init(project=project, name="leaderboard", job_type="leaderboard",
                     mode=os.environ.get("WANDB_MODE", "offline"),
                     dir=os.environ.get("WANDB_DIR", os.getcwd()),
                     settings=wandb.Settings(console="off", silent=True))
    try:
        payload = {"leaderboard": wandb.Table(dataframe=table.astype(str))}
        payload.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))})
        run.log(payload)
    finally:
        run.finish()

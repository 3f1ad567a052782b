"""Ours against the field's implementations: each (tda-bench estimator, peer) pair on the
same trained models, queries and ground truth.

    python -m studies.peers                  # digits_logreg, digits_mlp, facts; seeds 0 1 2
    python -m studies.peers --quick          # tiny tasks, one seed (checks the script)
    python -m studies.peers --tasks facts --seeds 0

Needs the peers extra (``pip install -e ".[peers]"``). Every run is a ``python -m bench``
subprocess at the estimators' defaults (``OMP_NUM_THREADS=1``, one thread, W&B off; ekfac and
kfac without their factor cache, so that fit seconds are a fit), and writes
``results/peers.md``:

1. Per task and pair, over the seeds both ran: the Pearson correlation of the full score
   matrices ``[n_queries, n_train]``; the paired difference ours − peer of each headline metric
   (LDS, LOO, PBRF, MRR, recall@10, tail-patch) with the 95 % two-way bootstrap interval of
   :func:`bench.report.stats.differences`; fit + score seconds of each and their ratio; peak
   memory of each. A pair the leaderboard skips (``conf/experiment/leaderboard.yaml``) is
   listed with its reason, not run.
2. Matched settings: ekfac and kfac against kronfluence's at the empirical Fisher and damping
   0.01 (the same curvature), on digits_mlp and facts.
3. Timing: ekfac and kronfluence_ekfac at their defaults, run alternately ``--timing-runs``
   times per task (no tail-patch), median fit + score seconds and their ratio, with the load
   average before and after.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import stats  # noqa: E402
from bench.report.records import collect, label_runs, metric_names  # noqa: E402
from studies.common import compose, run_bench  # noqa: E402

TASKS = ["digits_logreg", "digits_mlp", "facts"]
# (ours, peer): ours is tda-bench's estimator of the peer's method (kronfluence_diagonal has
# none; it is shown beside ekfac)
PAIRS = [("ekfac", "kronfluence_ekfac"), ("kfac", "kronfluence_kfac"),
         ("ekfac", "kronfluence_diagonal"), ("grad_dot", "kronfluence_identity"),
         ("grad_dot", "dattri_grad_dot"), ("grad_cos", "dattri_grad_cos"),
         ("tracin", "dattri_tracin"), ("explicit", "dattri_explicit"),
         ("lissa", "dattri_lissa"), ("arnoldi", "dattri_arnoldi"), ("trak", "traker"),
         ("trak", "dattri_trak")]
NO_CACHE = {"ekfac": ["estimator.cache_dir=null"], "kfac": ["estimator.cache_dir=null"]}
MATCHED = ["estimator.fisher=empirical", "estimator.damping=0.01"]
NO_TAIL_PATCH = ["fact_metrics.with_tail_patch=false"]  # where only scores and seconds matter
QUICK = {
    "digits_mlp": ["task.n_train=120", "task.n_queries=12", "task.epochs=3", "task.lds.subsets=8",
                   "task.lds.seeds=1", "task.pbrf.n=4"],
    "digits_logreg": ["task.n_train=120", "task.n_queries=12", "task.lds.subsets=8",
                      "task.loo.n=10", "task.pbrf.n=4"],
    "facts": ["task.world.n_entities=12", "task.world.n_prior_docs=4", "task.world.n_queries=6",
              "task.model.layers=1", "task.model.width=32", "task.model.heads=2",
              "task.model.intermediate=64", "task.train.epochs=2", "fact_metrics.k=3"],
}
QUICK_ESTIMATOR = {"lissa": ["estimator.depth=20"], "dattri_lissa": ["estimator.depth=20"],
                   "arnoldi": ["estimator.iterations=20", "estimator.rank=10"],
                   "dattri_arnoldi": ["estimator.iterations=20", "estimator.rank=10"]}


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def commit() -> str:
    """The checkout's commit, ``+dirty`` when the tree has changes."""
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                           text=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")


class Study:
    """The runs of the study, under ``workdir`` (one folder per task, estimator and seed)."""

    def __init__(self, workdir: Path, cache_dir: Path, quick: bool):
        self.workdir, self.cache_dir, self.quick = workdir, cache_dir, quick
        self.skip = dict(compose(["experiment=leaderboard"]).skip)
        self.failed: dict[tuple[str, str], str] = {}

    def overrides(self, task: str, estimator: str) -> list[str]:
        extra = NO_CACHE.get(estimator, [])
        if self.quick:
            extra = [*extra, *QUICK[task], *QUICK_ESTIMATOR.get(estimator, [])]
        return extra

    def run(self, folder: str, task: str, estimator: str, seed: int, extra: list[str]) -> dict:
        """One job (reused when its record exists); its metrics, or {} when it failed."""
        out = self.workdir / folder / f"{task}_{estimator}_seed{seed}"
        if (out / "metrics.json").exists():
            return {"ok": True, "out": out}
        command = [f"task={task}", f"estimator={estimator}", f"seed={seed}", "logger=none",
                   "progress=false", "num_threads=1", *self.overrides(task, estimator), *extra]
        print(f"[{load()}] {' '.join(command)}", flush=True)
        done = run_bench(command, out, self.cache_dir)
        if done.status != "ok":
            self.failed[(task, estimator)] = f"{done.status}: {done.reason}"
            print(f"  -> {done.status}: {done.reason}", flush=True)
            return {"ok": False}
        return {"ok": True, "out": out, "seconds": fit_score(done.record)}


def fit_score(record: dict) -> float:
    return float(record["fit_seconds"]) + float(record["score_seconds"])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    keep = torch.isfinite(a) & torch.isfinite(b)
    return torch.corrcoef(torch.stack([a[keep], b[keep]]).double())[0, 1].item()


def frame_of(folder: Path):
    """The labelled records of a folder, each row named by its plain estimator (the study's
    own overrides, e.g. ``cache_dir=null``, do not split rows)."""
    frame = label_runs(collect([folder]))
    frame["estimator"] = [run.record["estimator"] for run in frame["run"]]
    return frame


def pair_table(study: Study, task: str, seeds: list[int], folder: str) -> list[str]:
    """The markdown rows of one task's pairs."""
    root = study.workdir / folder
    frame = frame_of(root)
    frame = frame[frame["task"] == task]
    metrics = metric_names(list(frame["run"]))
    diffs = stats.differences(frame, metrics, PAIRS, strict=False)
    lines = []
    for ours, peer in PAIRS:
        reason = study.skip.get(f"{task}/{peer}") or study.failed.get((task, peer))
        if reason:
            lines.append(f"| {ours} | {peer} | not run: {reason} | | | | |")
            continue
        runs = {e: {int(r.seed): r for r in frame[frame["estimator"] == e]["run"]}
                for e in (ours, peer)}
        common = sorted(set(runs[ours]) & set(runs[peer]))
        if not common:
            lines.append(f"| {ours} | {peer} | not run: {study.failed.get((task, ours), '?')} "
                         "| | | | |")
            continue
        r = [pearson(torch.load(runs[ours][s].path / "scores.pt"),
                     torch.load(runs[peer][s].path / "scores.pt")) for s in common]
        rows = diffs[(diffs["task"] == task) & (diffs["a"] == ours) & (diffs["b"] == peer)]
        cells = [f"{m} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                 for m, d, lo, hi in zip(rows["metric"], rows["diff"], rows["lo"], rows["hi"],
                                         strict=True)]
        t = {e: np.mean([fit_score(runs[e][s].record) for s in common]) for e in (ours, peer)}
        mem = {e: np.mean([runs[e][s].record["peak_rss_mb"] for s in common])
               for e in (ours, peer)}
        lines.append(f"| {ours} | {peer} | {np.mean(r):.6f} | {'<br>'.join(cells)} | "
                     f"{t[ours]:.2f} / {t[peer]:.2f} | {t[ours] / t[peer]:.3f} | "
                     f"{mem[ours]:.0f} / {mem[peer]:.0f} |")
    return lines


def main_table(study: Study, tasks: list[str], seeds: list[int]) -> list[str]:
    out = ["## 1. Every pair at the estimators' defaults", "",
           "Pearson: of the full score matrices, mean over seeds. Paired difference: ours − "
           "peer, mean over seeds [95 % two-way bootstrap interval over seeds and queries]. "
           "Seconds: fit + score, mean over seeds (ours / peer) and their ratio. Memory: peak "
           "RSS of fit + score in MB (ours / peer). At the defaults the K-FAC pairs differ by "
           "definition, not implementation: each library samples its own targets for the true "
           "Fisher, and `damping: null` adds λ₂ in ours only (section 2 matches them).", ""]
    for task in tasks:
        for seed in seeds:
            for ours, peer in PAIRS:
                if f"{task}/{peer}" in study.skip:
                    continue
                for estimator in (ours, peer):
                    if f"{task}/{estimator}" not in study.skip:
                        study.run("defaults", task, estimator, seed, [])
        out += [f"### {task}", "", "| ours | peer | Pearson | paired difference (ours − peer) "
                "| seconds | ratio | peak MB |", "|---|---|---|---|---|---|---|",
                *pair_table(study, task, seeds, "defaults"), ""]
    return out


def matched_table(study: Study, tasks: list[str], seeds: list[int]) -> list[str]:
    out = ["## 2. kronfluence at matched settings", "",
           f"`{' '.join(MATCHED)}` for both (kronfluence gets damping_factor = λ₂ + 0.01, the "
           "same damped curvature): Pearson of the score matrices, mean over seeds.", "",
           "| task | ours | peer | Pearson | seconds (ours / peer) |", "|---|---|---|---|---|"]
    for task in [t for t in tasks if t != "digits_logreg"]:
        for ours, peer in PAIRS[:2]:
            r, t = [], []
            for seed in seeds:
                a = study.run("matched", task, ours, seed, [*MATCHED, *NO_TAIL_PATCH])
                b = study.run("matched", task, peer, seed, [*MATCHED, *NO_TAIL_PATCH])
                if a["ok"] and b["ok"]:
                    r.append(pearson(torch.load(a["out"] / "scores.pt"),
                                     torch.load(b["out"] / "scores.pt")))
                    t.append((seconds_of(a["out"]), seconds_of(b["out"])))
            if r:
                out.append(f"| {task} | {ours} | {peer} | {np.mean(r):.8f} | "
                           f"{np.mean([x[0] for x in t]):.2f} / "
                           f"{np.mean([x[1] for x in t]):.2f} |")
    return [*out, ""]


def seconds_of(out: Path) -> float:
    import json

    return fit_score(json.loads((out / "metrics.json").read_text()))


def timing_table(study: Study, tasks: list[str], runs: int) -> list[str]:
    out = ["## 3. Timing: ekfac against kronfluence_ekfac, same run", "",
           f"Defaults (true Fisher, `damping: null`), seed 0, {runs} alternating runs each, "
           "`fact_metrics.with_tail_patch=false`; fit + score seconds (median) and the ratio of "
           "the medians (the check: ≤ 0.5).", "",
           "| task | ekfac (s) | kronfluence_ekfac (s) | ratio | load before | load after |",
           "|---|---|---|---|---|---|"]
    for task in [t for t in tasks if t != "digits_logreg"]:
        before, times = load(), {"ekfac": [], "kronfluence_ekfac": []}
        for k in range(runs):
            for estimator in times:
                extra = [*NO_TAIL_PATCH, "save_scores=false"]
                done = study.run(f"timing{k}", task, estimator, 0, extra)
                if done["ok"]:
                    times[estimator].append(seconds_of(done["out"]))
        if all(times.values()):
            a, b = (statistics.median(times[e]) for e in times)
            out.append(f"| {task} | {a:.2f} | {b:.2f} | {a / b:.3f} | {before} | {load()} |")
    return [*out, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--timing-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/peers.md"))
    parser.add_argument("--workdir", type=Path, default=Path("outputs/studies/peers"))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tda-bench's cache (default: the config's cache_dir)")
    parser.add_argument("--quick", action="store_true", help="tiny tasks (checks the script)")
    args = parser.parse_args(argv)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    study = Study(args.workdir, args.cache_dir, args.quick)
    started, sha = load(), commit()
    body = [*main_table(study, tasks, seeds), *matched_table(study, tasks, seeds),
            *timing_table(study, tasks, args.timing_runs)]
    header = ["# tda-bench against kronfluence, dattri and TRAK", "",
              f"`python -m studies.peers --tasks {args.tasks} --seeds {args.seeds} "
              f"--timing-runs {args.timing_runs}{' --quick' if args.quick else ''}` at commit "
              f"{sha}; kronfluence 1.0.1, dattri 0.3.0, traker 0.3.2, torch "
              f"{torch.__version__}; one thread per run (`OMP_NUM_THREADS=1`) on a shared "
              f"2-core CPU host, load average {started} at the start and {load()} at the end. "
              "Pairs and settings: docs/estimators.md#peers.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join([*header, *body]).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

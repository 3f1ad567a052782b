"""Attribution at LM scale on one CPU machine: peak memory, tokens/s per stage, kronfluence.

    python -m studies.perf.lm_scale --out results/perf.md            # the whole benchmark
    python -m studies.perf.lm_scale --quick                          # tiny models (checks it)

Two models of GPT-2-small size are saved locally with random initialisation (nothing comes
from a hub), each with its word-level tokenizer over a 116-word vocabulary (120 tokens):
``gpt2`` (GPT2Config defaults: 768 wide, 12 blocks, transformers' Conv1D layers) and
``llama`` (hidden 768, 12 layers, MLP 3,072, every layer an ``nn.Linear``). The corpus is
``--docs`` documents of ``--tokens`` tokens, the queries ``--queries`` prompts of
``--query-tokens`` tokens whose last ``--target-tokens`` are the target, words drawn with a
fixed seed. Every tda-bench run is a fresh ``python -m bench task=hf_lm`` process with the
defaults (no memory flag: the default memory budget), its own cache (no factors shared
between runs), ``OMP_NUM_THREADS`` and ``num_threads`` = ``--threads``; its peak RSS is the
child's ``ru_maxrss`` (os.wait4), its seconds come from ``metrics.json``. ``trackstar`` runs
with ``estimator.optimizer_correction=false`` (a given model has no Adam state).

kronfluence 1.0.1 (``--kronfluence``, in a venv that has it) runs on the Llama-shaped model
with the same documents, queries, threads and settings as tda-bench's ``ekfac
estimator.query_rank=32``: EK-FAC over the blocks' linear layers (its
``get_influence_tracked_modules``), the true Fisher, the summed token NLL as training loss,
log p(target) as measurement, damping 0.1 × mean eigenvalue per module
(``damping_factor=None``, tda-bench's ``damping: null``), query rank 32 (its randomized
``svd_lowrank``, as tda-bench's ``query_svd: randomized``), all queries in one pass over the
training set (``query_gradient_accumulation_steps``). Its fit is ``fit_all_factors``, its
score ``compute_pairwise_scores``; the ratio compares (fit + score) tokens/s measured in
this same run. Its scores are the negative of tda-bench's (its sign convention); the
Pearson correlation of tda-bench's and −kronfluence's scores is reported.

Memory sweeps (``--sweep``), ekfac ``query_rank=32`` on the GPT-2-shaped model. Every
GPT-2 ekfac run shares one factor cache (``<workdir>/factors/gpt2``; the cache key is the
model's and the corpus's content, not the queries), so the main run fits and caches the
factors and the query sweep, ``--sweep-queries`` query counts over the same corpus
(``ekfac r=32 cached``), is scoring only: its peak RSS is the score stage's, against Q·r
(``--sweep-budget``: one ``memory_budget_mb`` for every Q, and ``--sweep-chunk``: one
``estimator.chunk_size``, since the scoring chunk otherwise grows to fill the budget, so
that only the query store changes between the points). The budget must not bind at the
largest Q: a binding budget shrinks the chunks to hold the peak at baseline + budget, and
the peak is then flat in Q, not linear (10,000 MB does not bind on the GPT-2 model).
``--sweep-docs`` corpus sizes fit their own factors under the main run's memory budget (so
that only n_train changes): peak RSS against n_train, beside the main run. Results go to
the ``lm-scale`` section of ``--out`` and, run by run, to ``<workdir>/lm_scale.jsonl`` (a
rerun skips the runs found there; drivers with different ``--models``/``--estimators`` may
share a workdir, and ``--report`` only rewrites the section from it). Each row carries the
commit it ran (``--commit``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from studies.perf.lm_scale_report import write_section

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 116
ESTIMATORS = {  # name -> (estimator, overrides)
    "grad_dot": ("grad_dot", []),
    "ekfac": ("ekfac", []),
    "ekfac r=32": ("ekfac", ["estimator.query_rank=32"]),
    "ekfac r=32 cached": ("ekfac", ["estimator.query_rank=32"]),  # factors from the cache
    "kfac": ("kfac", []),
    "trackstar": ("trackstar", ["estimator.optimizer_correction=false"]),
}


def words() -> list[str]:
    return [f"w{i}" for i in range(VOCAB)]


def build_data(folder: Path, docs: int, queries: int, tokens: int, query_tokens: int,
               target_tokens: int, seed: int = 0) -> None:
    """``corpus.jsonl`` and ``queries.jsonl`` of seeded random words (one token each)."""
    import random

    rng = random.Random(seed)
    vocab = words()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(docs):  # bos + words + eos = tokens
            text = " ".join(rng.choice(vocab) for _ in range(tokens - 2))
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for _ in range(queries):
            prompt = " ".join(rng.choice(vocab) for _ in range(query_tokens - 1 - target_tokens))
            target = " ".join(rng.choice(vocab) for _ in range(target_tokens))
            f.write(json.dumps({"prompt": prompt, "target": target,
                                "proponents": [f"d{rng.randrange(docs)}"]}) + "\n")


def build_model(folder: Path, arch: str, quick: bool) -> None:
    """A random-init model and its word-level tokenizer, saved with ``save_pretrained``."""
    if (folder / "config.json").exists():
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + words())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    size = {"hidden": 64, "layers": 2, "mlp": 256, "heads": 4} if quick else \
        {"hidden": 768, "layers": 12, "mlp": 3072, "heads": 12}
    torch.manual_seed(0)
    common = {"vocab_size": len(vocab), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        config = GPT2Config(n_embd=size["hidden"], n_layer=size["layers"], n_head=size["heads"],
                            n_inner=size["mlp"], n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["mlp"],
                             num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                             num_key_value_heads=size["heads"], max_position_embeddings=256,
                             tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_child(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """``(exit status, peak RSS MiB, wall seconds)`` of a child process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, usage.ru_maxrss / 1024.0, time.perf_counter() - start


def bench_run(args, work: Path, model: str, label: str, data: Path, extra: list[str]) -> dict:
    """One ``python -m bench task=hf_lm`` run (own cache, default memory budget; GPT-2 ekfac
    runs share their factor cache)."""
    name = f"{model}-{label.replace(' ', '').replace('=', '')}-{data.name}"
    estimator, overrides = ESTIMATORS[label]
    if model == "gpt2" and estimator == "ekfac":
        extra = [*extra, f"estimator.cache_dir={work / 'factors' / 'gpt2'}"]
    run_dir = work / "runs" / name
    cmd = [sys.executable, "-m", "bench", "task=hf_lm", f"task.model={work / model}",
           f"task.corpus={data / 'corpus.jsonl'}", f"task.queries={data / 'queries.jsonl'}",
           f"task.max_length={args.tokens}", f"estimator={estimator}", *overrides, *extra,
           "logger=none", "progress=false", f"num_threads={args.threads}",
           "fact_metrics.with_tail_patch=false", f"cache_dir={work / 'cache' / name}",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TDA_BENCH_DEBUG": "1"}
    load = os.getloadavg()[0]
    code, peak, wall = run_child(cmd, env, work / f"{name}.log")
    row = {"model": model, "estimator": label, "data": data.name, "exit": code,
           "peak_rss_mb": peak, "wall_s": wall, "load": load, "commit": args.commit}
    metrics = run_dir / "metrics.json"
    if code == 0 and metrics.exists():
        record = json.loads(metrics.read_text())
        row.update({k: record.get(k) for k in ("fit_seconds", "score_seconds",
                                               "memory_budget_mb", "mrr")})
        row["scores"] = str(run_dir / "scores.pt")
    else:
        row["error"] = (work / f"{name}.log").read_text()[-600:]
    return row


def kronfluence_child(args) -> None:
    """Runs in a fresh process: kronfluence's EK-FAC fit and rank-32 scores on ``--model``."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from estimators.gradients import tracked_layers
    from estimators.problem import sample_categorical
    from tasks.hf_lm import HFLM
    from tasks.lm import make_collate, summed_nll

    torch.set_num_threads(args.threads)
    task = HFLM(model=args.model, corpus=str(Path(args.data) / "corpus.jsonl"),
                queries=str(Path(args.data) / "queries.jsonl"), max_length=args.tokens)
    model = task.build_model(0)
    tracked = [layer.name for layer in tracked_layers(model, "blocks")]
    generator = torch.Generator().manual_seed(0)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if sample:
                labels = labels.clone()
                labels[:, 1:] = sample_categorical(logits[:, :-1], labels[:, 1:], generator)
            return summed_nll(logits, {**batch, "labels": labels}).sum()

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            return -summed_nll(logits, batch).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):  # the positions that enter the loss, as
            mask = batch["attention_mask"]    # tda-bench's A: a next token follows
            return torch.cat([mask[:, :-1] * mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)

    lm_task = LMTask()
    model = prepare_model(model, lm_task)
    analyzer = Analyzer("lm_scale", model, lm_task, output_dir=args.out_dir,
                        disable_tqdm=True, cpu=True)
    kwargs = {"collate_fn": make_collate(task.pad_id)}
    from kronfluence.utils.dataset import DataLoaderKwargs

    loader = DataLoaderKwargs(**kwargs)
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", task.train_data, per_device_batch_size=args.fit_batch,
                             dataloader_kwargs=loader,
                             factor_args=FactorArguments(strategy="ekfac"),
                             overwrite_output_dir=True)
    fit = time.perf_counter() - start
    steps = -(-len(task.query_data) // args.query_batch)
    score_args = ScoreArguments(damping_factor=None, query_gradient_low_rank=32,
                                query_gradient_accumulation_steps=steps)
    start = time.perf_counter()
    analyzer.compute_pairwise_scores("scores", "ekfac", task.query_data, task.train_data,
                                     per_device_query_batch_size=args.query_batch,
                                     per_device_train_batch_size=args.train_batch,
                                     dataloader_kwargs=loader, score_args=score_args,
                                     overwrite_output_dir=True)
    score = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    torch.save(-scores.float(), Path(args.out_dir) / "scores_in_our_sign.pt")
    print(json.dumps({"fit_seconds": fit, "score_seconds": score}))


def kronfluence_run(args, work: Path, data: Path) -> dict:
    out_dir = work / "kronfluence"
    cmd = [args.kronfluence_python, "-m", "studies.perf.lm_scale", "--kronfluence-child",
           "--model", str(work / "llama"), "--data", str(data), "--out-dir", str(out_dir),
           "--threads", str(args.threads), "--tokens", str(args.tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    log = work / "kronfluence.log"
    code, peak, wall = run_child(cmd, env, log)
    row = {"model": "llama", "estimator": "kronfluence ekfac r=32", "data": data.name,
           "exit": code, "peak_rss_mb": peak, "wall_s": wall, "load": load,
           "commit": args.commit}
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if code == 0 and lines:
        row.update(json.loads(lines[-1]))
        row["scores"] = str(out_dir / "scores_in_our_sign.pt")
    else:
        row["error"] = log.read_text()[-600:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/tda-lm-scale")
    parser.add_argument("--out", default=None)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--target-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["llama", "gpt2"])
    parser.add_argument("--estimators", nargs="+",
                        default=[e for e in ESTIMATORS if not e.endswith("cached")])
    parser.add_argument("--kronfluence", action="store_true")
    parser.add_argument("--kronfluence-python", default=sys.executable)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-queries", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--report", action="store_true", help="only rewrite --out's section")
    parser.add_argument("--sweep-budget", type=int, default=10000,
                        help="memory_budget_mb of the query sweep (one budget for every Q; "
                        "0: the default budget); it must not bind at the largest Q")
    parser.add_argument("--sweep-chunk", type=int, default=8,
                        help="estimator.chunk_size of the query sweep (one chunk for every Q)")
    parser.add_argument("--sweep-docs", type=int, nargs="+", default=[75])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--commit", default="", help="the commit measured (for the table)")
    parser.add_argument("--kronfluence-child", action="store_true")
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out-dir")
    parser.add_argument("--fit-batch", type=int, default=8)
    parser.add_argument("--query-batch", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=8)
    args = parser.parse_args()
    if args.kronfluence_child:
        return kronfluence_child(args)
    if args.quick:
        args.docs, args.queries, args.tokens, args.query_tokens = 24, 6, 16, 8
        args.sweep_queries, args.sweep_docs = [3, 6], [6]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for arch in ("gpt2", "llama"):
        build_model(work / arch, arch, args.quick)
    sizes = (args.tokens, args.query_tokens, args.target_tokens)
    main_data = work / f"data-{args.docs}x{args.queries}"
    build_data(main_data, args.docs, args.queries, *sizes)
    log_path = work / "lm_scale.jsonl"

    def rows() -> list[dict]:  # re-read: another driver may share the workdir
        return [json.loads(x) for x in log_path.read_text().splitlines()] \
            if log_path.exists() else []

    done = rows()
    if args.report:
        return write_section(args, done, Path(args.out))

    def record(row: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[:] = rows()
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if args.out:
            write_section(args, done, Path(args.out))

    def have(model: str, label: str, data: Path) -> bool:
        return any(r["model"] == model and r["estimator"] == label and r["data"] == data.name
                   and r["exit"] == 0 for r in done)

    plan = [(m, e, main_data) for m in args.models for e in args.estimators
            if not (m == "llama" and e not in ("ekfac r=32",))]
    plan.sort(key=lambda p: p[1] == "ekfac")  # the slowest (exact ekfac) last
    if args.sweep:
        for q in args.sweep_queries:
            plan.append(("gpt2", "ekfac r=32 cached", work / f"data-{args.docs}x{q}"))
        for n in args.sweep_docs:
            plan.append(("gpt2", "ekfac r=32", work / f"data-{n}x{args.queries}"))
    def kronfluence() -> None:
        if args.kronfluence and not have("llama", "kronfluence ekfac r=32", main_data):
            record(kronfluence_run(args, work, main_data))

    for model, label, data in plan:
        if label == "ekfac" or data != main_data:  # after the runs the checks need
            kronfluence()
        if not have(model, label, data):
            docs, queries = (int(x) for x in data.name.split("-")[1].split("x"))
            build_data(data, docs, queries, *sizes)
            extra = []
            if label.endswith("cached"):  # the Q sweep: one chunk and budget for every Q
                extra = [f"estimator.chunk_size={args.sweep_chunk}"] + \
                    ([f"memory_budget_mb={args.sweep_budget}"] if args.sweep_budget else [])
            elif data != main_data:  # the n sweep: the main run's budget
                main_run = next((r for r in done if r["model"] == model and r["data"] ==
                                 main_data.name and r["estimator"] == label and r["exit"] == 0),
                                None)
                if main_run:
                    extra = [f"memory_budget_mb={main_run['memory_budget_mb']:.0f}"]
            record(bench_run(args, work, model, label, data, extra))
    kronfluence()


if __name__ == "__main__":
    main()

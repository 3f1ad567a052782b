"""Every bad input is one sentence and exit 2, before any work (the table of issue #16).

Each case runs the real entry point in this process (``bench.cli.main`` with its argv, or
the leaderboard's ``main``) and checks: exit status 2, one line on stderr that starts with
``tda-bench: error:`` and names the key or file, no traceback, and nothing expensive ran
first — the stages that train or compute ground truth are replaced by a tripwire, so a value
that slipped through validation fails the test instead of costing minutes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import cli, stages
from tests.helpers import TINY

SECONDS = 60  # generous: the host is shared; the tripwire is the real check
CASES = [  # (id, overrides, what the sentence must contain)
    ("seed negative", ["seed=-1"], "seed must be a non-negative integer, got -1"),
    ("seed string", ["seed=abc"], "seed must be a non-negative integer, got 'abc'"),
    ("seed float", ["seed=1.5"], "seed must be a non-negative integer, got 1.5"),
    ("memory budget zero", ["memory_budget_mb=0"], "memory_budget_mb must be positive or null"),
    ("memory budget string", ["memory_budget_mb=abc"], "memory_budget_mb must be a number"),
    ("threads zero", ["num_threads=0"], "num_threads must be a positive integer or null"),
    ("threads string", ["num_threads=abc"], "num_threads must be a positive integer"),
    ("stage unknown", ["stage=train"],
     "stage must be all, ground_truth, factors, score or merge, got 'train'"),
    ("device unknown", ["device=tpu"], "device must be cpu, cuda, cuda:<index> or auto"),
    ("save_scores not a flag", ["save_scores=maybe"], "save_scores must be true or false"),
    ("progress not a flag", ["progress=2"], "progress must be true or false, got 2"),
    ("plugin missing", ["plugins=[no_such_module]"], "cannot import module 'no_such_module'"),
    ("cache dir unwritable", ["cache_dir=/proc/tda-bench-cache"],
     "cache_dir=/proc/tda-bench-cache cannot be written"),
    ("cache dir under a file", ["cache_dir={file}/cache"], "cache_dir={file}/cache cannot be"),
    ("shards zero", ["ground_truth.num_shards=0"],
     "ground_truth.num_shards must be a positive integer, got 0"),
    ("shard out of range", ["ground_truth.shard=3", "ground_truth.num_shards=2"],
     "ground_truth.shard must be in [0, 2)"),
    ("on_missing unknown", ["ground_truth.on_missing=maybe"],
     "ground_truth.on_missing must be compute or error"),
    ("ground-truth threads zero", ["ground_truth.num_threads=0"],
     "ground_truth.num_threads must be a positive integer"),
    ("ground-truth key typo", ["+ground_truth.shards=2"], "ground_truth.shards is not a setting"),
    ("damping string", ["estimator.damping=abc"],
     "estimator.damping must be a number or null, got 'abc'"),
    ("damping negative", ["estimator.damping=-1"], "estimator.damping must be >= 0"),
    ("fisher unknown", ["estimator.fisher=bogus"], "estimator.fisher must be true or empirical"),
    ("chunk size zero", ["estimator.chunk_size=0"], "estimator.chunk_size must be a positive"),
    ("chunk size string", ["estimator.chunk_size=big"], "estimator.chunk_size must be a positive"),
    ("modules bad regex", ["estimator.modules='['"], "estimator.modules must be"),
    ("batch size zero", ["estimator.batch_size=0"], "estimator.batch_size must be a positive"),
    ("query rank negative", ["estimator.query_rank=-1"], "estimator.query_rank must be a"),
    ("projection on ekfac", ["+estimator.projection_dim=8"], "set estimator.projection_dim=null"),
    ("estimator key typo", ["estimator.dampin=1"],
     "estimator.dampin is not a config key (check the spelling); the keys of estimator are"),
    ("estimator key added", ["+estimator.dampin=1"],
     "estimator.dampin is not a setting of estimator=ekfac; its settings are batch_size"),
    ("estimator unknown", ["estimator=no_such"],
     "estimator=no_such is not a config of the estimator group; available: arnoldi"),
    ("curvature unknown", ["estimator=explicit", "estimator.curvature=fisher"],
     "estimator.curvature must be ggn or hessian"),
    ("trak ensemble zero", ["estimator=trak", "estimator.n_models=0"],
     "estimator.n_models must be a positive integer"),
    ("lissa depth zero", ["estimator=lissa", "estimator.depth=0"], "estimator.depth must be"),
    ("arnoldi rank above iterations", ["estimator=arnoldi", "estimator.rank=10",
                                       "estimator.iterations=5"],
     "estimator.rank (10) cannot exceed estimator.iterations (5)"),
    ("tracin checkpoints zero", ["estimator=tracin", "estimator.checkpoints=0"],
     "estimator.checkpoints must be 'last', 'all' or a positive integer"),
    ("override does not parse", ["estimator.damping={a:1"], "an override does not parse"),
    ("task unknown", ["task=no_such"], "task=no_such is not a config of the task group"),
    ("n_train zero", ["task.n_train=0"], "task.n_train must be a positive integer, got 0"),
    ("n_train string", ["task.n_train=abc"], "task.n_train must be a positive integer"),
    ("n_train too large", ["task.n_train=5000"], "task.n_train + task.n_queries must be at most"),
    ("epochs zero", ["task.epochs=0"], "task.epochs must be a positive integer, got 0"),
    ("learning rate string", ["task.optim.lr=abc"], "task.optim = {'lr': 'abc', 'momentum'"),
    ("l2 negative", ["task.l2=-1"], "task.l2 must be >= 0, got -1"),
    ("hidden not a list", ["task.hidden=abc"], "task.hidden must be a list of layer widths"),
    ("checkpoints zero", ["task.checkpoints={every_n_epochs:0}"],
     "task.checkpoints.every_n_epochs must be a positive integer"),
    ("task key typo", ["+task.n_trian=5"], "task.n_trian is not a setting of this task"),
    ("lds subsets zero", ["task.lds.subsets=0"], "task.lds.subsets must be a positive integer"),
    ("lds fraction", ["task.lds.fraction=1.5"], "task.lds.fraction must be in (0, 1), got 1.5"),
    ("lds setting typo", ["+task.lds.subset=3"], "unknown setting(s) task.lds.subset"),
    ("pbrf epsilon zero", ["task.pbrf.epsilon=0"], "task.pbrf.epsilon must be positive"),
    ("loo on a non-convex task", ["+task.loo={n:5}"], "DigitsMLP is not convex"),
    ("loo n negative", ["task=digits_logreg", "task.loo.n=-1"], "task.loo.n must be a positive"),
    ("removal fraction", ["removal.enabled=true", "removal.fraction=2"],
     "removal.fraction must be in (0, 1), got 2"),
    ("fact k zero", ["fact_metrics.k=0"], "fact_metrics.k must be a positive integer, got 0"),
    ("bm25 without text", ["estimator=bm25"], "bm25 needs the text of training examples"),
    ("candidates without text", ["estimator=grad_dot", "+estimator.candidates={k:5}"],
     "candidates.retriever=tfidf needs the text"),
    ("facts world zero", ["task=facts", "task.world.n_entities=0"],
     "task.world.n_entities must be a positive integer, got 0"),
    ("facts model heads", ["task=facts", "task.model.heads=3"],
     "task.model.width=32 must be a multiple of task.model.heads=3"),
    ("facts setting typo", ["task=facts", "+task.train.learning_rate=1"],
     "task.train.learning_rate is not a setting; train takes epochs"),
    ("logger mode unknown", ["logger=wandb", "logger.mode=loud"],
     "logger.mode must be offline, online or disabled, got 'loud'"),
    ("logger unknown", ["logger=no_such"], "logger=no_such is not a config of the logger group"),
    ("launcher unknown", ["-m", "hydra/launcher=no_such"],
     "hydra/launcher=no_such is not a config of the hydra/launcher group"),
]
LM_CASES = [  # (id, task overrides, what the sentence must contain)
    ("hf_lm without a model", {"model": None}, "task.model has no value"),
    ("model path missing", {"model": "{dir}/no_model_here"},
     "task.model={dir}/no_model_here: no such directory"),
    ("relative model path missing", {"model": "./models/mine"},
     "task.model=./models/mine: no such directory"),
    ("corpus missing", {"corpus": "{dir}/nope.jsonl"}, "task.corpus={dir}/nope.jsonl does not"),
    ("corpus bad JSON line", {"corpus": "{dir}/bad_json.jsonl"},
     "{dir}/bad_json.jsonl:2: not valid JSON"),
    ("corpus duplicate id", {"corpus": "{dir}/duplicate.jsonl"},
     "{dir}/duplicate.jsonl:3: the id 'd0' is already used"),
    ("corpus blank text", {"corpus": "{dir}/blank_text.jsonl"},
     "{dir}/blank_text.jsonl:2: 'text' must be a non-empty string"),
    ("proponents a string", {"queries": "{dir}/proponents_string.jsonl"},
     "{dir}/proponents_string.jsonl:1: 'proponents' must be a list of corpus ids"),
    ("empty target", {"queries": "{dir}/empty_target.jsonl"},
     "{dir}/empty_target.jsonl:1: 'target' must be a non-empty string, got ''"),
    ("blank prompt", {"queries": "{dir}/blank_prompt.jsonl"},
     "{dir}/blank_prompt.jsonl:1: 'prompt' must be a non-empty string"),
    ("unknown proponent", {"queries": "{dir}/unknown_proponent.jsonl"},
     "{dir}/unknown_proponent.jsonl:1: proponents ['d9'] are not ids of"),
    ("target a number", {"queries": "{dir}/number_target.jsonl"},
     "'target' must be a non-empty string, got 5"),
    ("prompt missing", {"queries": "{dir}/no_prompt.jsonl"}, "lacks the field 'prompt'"),
    ("dtype unknown", {"dtype": "float16"}, "task.dtype must be float32, float64 or bfloat16"),
    ("max_length zero", {"max_length": 0}, "task.max_length must be a positive integer"),
]


@pytest.fixture
def tripwire(monkeypatch):
    """Replaces every stage that trains or computes with one that fails the test."""
    def expensive(*args, **kwargs):
        raise AssertionError("expensive work started before the bad value was refused")

    for name in ("ground_truth", "model", "fit", "score", "ground_truth_shards"):
        monkeypatch.setattr(stages, name, expensive)
    for target in ("tasks.digits.DigitsTask.fit", "tasks.digits.DigitsTask.fit_many"):
        monkeypatch.setattr(target, expensive)
    monkeypatch.delenv("TDA_BENCH_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, list[str], float]:
    """``tda-bench ARGV`` in this process: exit status, stderr lines, seconds."""
    monkeypatch.setattr(sys, "argv", ["tda-bench", *argv])
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err
    return stop.value.code, [line for line in err.splitlines() if line.strip()], \
        time.perf_counter() - start


def assert_one_sentence(code: int, lines: list[str], seconds: float, expected: str,
                        prog: str = "tda-bench") -> None:
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert code == 2, lines
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert not any("Traceback" in line for line in lines), lines
    assert expected in errors[0], errors[0]
    assert seconds < SECONDS


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_value_is_one_sentence_before_any_work(overrides, expected, tmp_path, tripwire,
                                                     monkeypatch, capsys):
    if "device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    overrides = [o.replace("{file}", str(a_file)) for o in overrides]
    expected = expected.replace("{file}", str(a_file))
    base = ["task=digits_mlp", *TINY["digits_mlp"], "logger=none", "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if not any(o.startswith("cache_dir=") for o in overrides):
        base.append(f"cache_dir={tmp_path / 'cache'}")
    if any(o.startswith("task=") for o in overrides):
        base = [b for b in base if not b.startswith("task")]
        base += [t for t in TINY.get(next(o[5:] for o in overrides if o.startswith("task=")),
                                     []) if "loo.n" not in t]
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags come first
    overrides = [o for o in overrides if not o.startswith("-")]
    code, lines, seconds = run_cli([*flags, *base, *overrides], monkeypatch, capsys)
    assert_one_sentence(code, lines, seconds, expected)
    assert not (tmp_path / "cache" / "models").exists()


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """A tiny saved causal LM with its tokenizer, a good corpus and queries, and bad files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.facts import build_tokenizer

    root = tmp_path_factory.mktemp("hf_lm")
    corpus = [{"id": "d0", "text": "Ada Lovelace was born in London ."},
              {"id": "d1", "text": "Alan Turing was born in Maida Vale ."}]
    query = {"prompt": "Turing was born in", "target": "Maida Vale", "proponents": ["d1"]}
    files = {"corpus": corpus, "queries": [query],
             "duplicate": [*corpus, corpus[0]], "blank_text": [corpus[0], {"id": "d2",
                                                                          "text": "  "}],
             "proponents_string": [{**query, "proponents": "d1"}],
             "empty_target": [{**query, "target": ""}], "blank_prompt": [{**query, "prompt": " "}],
             "unknown_proponent": [{**query, "proponents": ["d9"]}],
             "number_target": [{**query, "target": 5}],
             "no_prompt": [{"target": "London"}]}
    for name, records in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "bad_json.jsonl").write_text(json.dumps(corpus[0]) + '\n{"id": "d1", "text": "x"\n')
    tokenizer = build_tokenizer([d["text"] for d in corpus] + ["Turing was born in Maida Vale"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


@pytest.mark.parametrize("changes,expected", [c[1:] for c in LM_CASES],
                         ids=[c[0] for c in LM_CASES])
def test_a_bad_hf_lm_input_is_one_sentence_naming_the_file(changes, expected, lm_files, tmp_path,
                                                           tripwire, monkeypatch, capsys):
    task = {"model": str(lm_files / "model"), "corpus": str(lm_files / "corpus.jsonl"),
            "queries": str(lm_files / "queries.jsonl")}
    task.update({k: str(v).replace("{dir}", str(lm_files)) for k, v in changes.items()
                 if v is not None})
    overrides = [f"task.{k}={v}" for k, v in task.items() if changes.get(k, "") is not None]
    code, lines, seconds = run_cli(
        ["task=hf_lm", "estimator=grad_dot", *overrides, "logger=none", "progress=false",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        monkeypatch, capsys)
    assert_one_sentence(code, lines, seconds, expected.replace("{dir}", str(lm_files)))


def test_the_hf_lm_fixture_itself_is_accepted(lm_files, tmp_path, make_cfg):
    """The good files pass resolve, so the cases above fail for their own reason."""
    cfg = make_cfg("hf_lm", f"task.model={lm_files / 'model'}",
                   f"task.corpus={lm_files / 'corpus.jsonl'}",
                   f"task.queries={lm_files / 'queries.jsonl'}", "estimator=grad_dot")
    assert stages.resolve(cfg).task.n_train == 2


def test_a_full_disk_is_refused_before_any_work(tmp_path, tripwire, monkeypatch, capsys):
    import shutil as real_shutil

    from bench import checks

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checks.shutil, "disk_usage",
                        lambda path: usage._replace(free=2**20))
    code, lines, seconds = run_cli(
        ["task=digits_mlp", *TINY["digits_mlp"], "logger=none", f"cache_dir={tmp_path / 'c'}",
         f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert_one_sentence(code, lines, seconds, f"cache_dir={tmp_path / 'c'} has 1.0 MiB free, "
                                              "but this run may write about 64 MiB")


def test_a_disk_that_fills_during_the_run_is_one_sentence(tmp_path, monkeypatch, capsys):
    """The free-space check is an estimate; a write that still finds the disk full ends in
    one sentence naming the file, and leaves nothing half-written."""
    import errno

    from estimators import atomic

    def full(path, fill):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_with", full)  # the writer of payloads and records
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, lines, seconds = run_cli(
        ["task=digits_mlp", *TINY["digits_mlp"], "logger=none", "progress=false",
         f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch,
        capsys)
    assert_one_sentence(code, lines, 0, "cannot write ")
    assert "shard-0000-of-0001.pt: no space is left on the device; free some space" in lines[-1]


LEADERBOARD = [  # (id, the files of one record folder, extra arguments, expected)
    ("record is a list", {"metrics.json": "[1, 2]"}, ["--strict"],
     "metrics.json holds a JSON list, not a run record"),
    ("record not JSON", {"metrics.json": '{"task": "t",\n'}, ["--strict"],
     "metrics.json is not valid JSON"),
    ("record without seed", {"metrics.json": '{"task": "t", "estimator": "e"}'}, ["--strict"],
     "metrics.json lacks seed"),
    ("record seed not an integer", {"metrics.json": '{"task": "t", "estimator": "e", '
                                                    '"seed": "x"}'}, ["--strict"],
     "seed must be a non-negative integer, got 'x'"),
    ("per-query table broken", {"metrics.json": '{"task": "t", "estimator": "e", "seed": 0, '
                                                '"lds": 0.5}', "per_query.csv": '"a\n'},
     ["--strict"], "per_query.csv cannot be read as a table"),
    ("seeds not integers", {}, ["--seeds", "a,b"], "--seeds takes comma-separated integers"),
    ("bootstrap zero", {}, ["--bootstrap", "0"], "--bootstrap must be at least 1"),
    ("no records", {"notes.txt": "x"}, [], "no metrics.json run records under"),
]


@pytest.mark.parametrize("files,args,expected", [c[1:] for c in LEADERBOARD],
                         ids=[c[0] for c in LEADERBOARD])
def test_a_bad_leaderboard_input_is_one_sentence(files, args, expected, tmp_path, capsys,
                                                 monkeypatch):
    from bench.report.leaderboard import main
    from tests.helpers import write_run

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    root = tmp_path / "runs"
    write_run(root, "t", "e", 1, [0.1, 0.2])
    for name, text in files.items():
        (root / "bad" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "bad" / name).write_text(text)
    target = root / "bad" if "notes.txt" in files else root
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        main([str(target), "--out", str(tmp_path / "out"), "--no-plots", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert_one_sentence(stop.value.code, lines, time.perf_counter() - start, expected,
                        prog="tda-bench-leaderboard")


def test_a_missing_leaderboard_folder_is_one_sentence(tmp_path, capsys):
    from bench.report.leaderboard import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"{tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err


def test_a_bad_record_is_skipped_with_its_path(tmp_path, capsys):
    """Without --strict the leaderboard reports a bad record and builds from the rest."""
    from bench.report.leaderboard import main
    from tests.helpers import write_run

    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "t", "grad_dot", seed, [0.1, 0.3])
    bad = root / "broken" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text("[1, 2]")
    (root / "broken" / "error.json").write_text("{not json")
    main([str(root), "--out", str(tmp_path / "out"), "--no-plots", "--bootstrap", "10"])
    err = capsys.readouterr().err
    assert f"skipping a bad record: {bad} holds a JSON list" in err
    assert "Traceback" not in err
    assert "grad_dot" in (tmp_path / "out" / "LEADERBOARD.md").read_text()


def test_a_programming_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Not a user error: the boundary lets it through with its traceback."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(stages, "resolve", bug)
    monkeypatch.setattr(sys, "argv", ["tda-bench", "logger=none",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(KeyError, match="a bug"):
        cli.main()


def test_a_user_error_in_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["tda-bench", "-m", "estimator.damping=abc,-1",
                                      "logger=none", f"hydra.sweep.dir={sweep}",
                                      f"cache_dir={tmp_path / 'cache'}"])
    monkeypatch.setattr(stages, "ground_truth", lambda *a: pytest.fail("work started"))
    cli.main()
    errors = sorted(json.loads(p.read_text())["error"] for p in Path(sweep).rglob("error.json"))
    assert errors == ["estimator.damping must be >= 0 or null, got -1",
                      "estimator.damping must be a number or null, got 'abc'"]

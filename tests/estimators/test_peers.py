"""The peer estimators without their libraries: the one-sentence refusal and exit 2, bergson's
refusal, the scratch folder under the run folder, and the flat batches the torch.func
libraries take. (Parity with the libraries: tests/estimators/test_peer_parity.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from bench.errors import user_message
from estimators.peers.bergson import Bergson
from estimators.peers.common import FlatBatches, Scratch, require
from estimators.problem import AttributionProblem
from tests.helpers import REPO, TINY

BLOCKED = "import sys; sys.modules[{lib!r}] = None; sys.argv = ['tda-bench', *sys.argv[1:]]; " \
          "from bench.cli import main; main()"


def refusal(estimator: str, library: str) -> str:
    return (f"estimator {estimator} needs the {library} library, which is not installed: run "
            'pip install -e ".[peers]" (torch pinned first, see docs/estimators.md#peers).')


def test_a_missing_library_exits_2_with_one_sentence_naming_the_extra(tmp_path):
    """kronfluence is blocked in the subprocess (``sys.modules[name] = None`` makes its
    import fail), so this holds whether or not the extra is installed."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED.format(lib="kronfluence"), "task=digits_logreg",
         "estimator=kronfluence_ekfac", "logger=none", f"cache_dir={tmp_path / 'cache'}",
         f"hydra.run.dir={tmp_path / 'run'}", *TINY["digits_logreg"]],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tda-bench: error:")]
    assert errors == ["tda-bench: error: " + refusal("kronfluence_ekfac", "kronfluence")]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # refused before training anything


@pytest.mark.parametrize("library,estimators", [
    ("kronfluence", ["kronfluence_kfac", "kronfluence_diagonal", "kronfluence_identity"]),
    ("dattri", ["dattri_explicit", "dattri_lissa", "dattri_arnoldi", "dattri_tracin",
                "dattri_trak", "dattri_grad_dot", "dattri_grad_cos"]),
    ("trak", ["traker"])])
def test_every_peer_refuses_on_construction_without_its_library(make_cfg, monkeypatch,
                                                                 library, estimators):
    monkeypatch.setitem(sys.modules, library, None)
    for estimator in estimators:
        with pytest.raises(Exception) as raised:
            instantiate(make_cfg("digits_logreg", f"estimator={estimator}").estimator)
        assert user_message(raised.value) == refusal(estimator, library)


def test_require_names_the_extra():
    with pytest.raises(ValueError, match=r'dattri_lissa needs the no_such_library library.*'
                                         r'pip install -e "\.\[peers\]"'):
        require("no_such_library", "dattri_lissa")


def test_bergson_refuses_in_one_sentence_with_its_reason():
    with pytest.raises(ValueError) as raised:
        Bergson()
    message = str(raised.value)
    assert message.startswith("bergson cannot run as a tda-bench estimator: it collects")
    assert "PreTrainedModel" in message and "torchvision" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_scratch_goes_under_the_run_folder(make_cfg):
    cfg = make_cfg("digits_logreg", "estimator=kronfluence_ekfac")
    run_dir = Path(cfg.hydra.runtime.output_dir)
    assert Path(cfg.estimator.scratch_dir) == run_dir / "peer_scratch"
    assert cfg.estimator.keep_scratch is False
    traker = make_cfg("digits_logreg", "estimator=traker").estimator
    assert Path(traker.scratch_dir).parent == run_dir


def test_scratch_is_created_on_use_and_removed_after(tmp_path):
    kept, removed = Scratch(tmp_path / "a", keep=True), Scratch(tmp_path / "b")
    for scratch in (kept, removed):
        (scratch.path / "factors.safetensors").write_text("x")
        scratch.done()
    assert (tmp_path / "a" / "factors.safetensors").exists() and not (tmp_path / "b").exists()
    temporary = Scratch(None)
    folder = temporary.path
    assert folder.exists() and not folder.is_relative_to(Path.cwd())
    temporary.done()
    assert not folder.exists()


def dict_problem() -> AttributionProblem:
    """A problem whose batches are dicts of an int64 and a float32 tensor."""
    data = [{"ids": torch.tensor([i, i + 1]), "w": torch.tensor(float(i))} for i in range(4)]

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    return AttributionProblem(model=torch.nn.Linear(2, 1), train=data, queries=data[:2],
                              collate_fn=collate, outputs=None, loss=None, measure=None)


def test_flat_batches_round_trip_per_example_and_cast_leaves():
    problem = dict_problem()
    batches = FlatBatches.of(problem)
    batch = problem.collate_fn([problem.train[i] for i in range(3)])
    leaves = batches.flatten(batch)
    assert [t.shape for t in leaves] == [(3, 2), (3,)]
    rebuilt = batches.rebuild(leaves)
    assert rebuilt.keys() == batch.keys() and torch.equal(rebuilt["ids"], batch["ids"])
    one = batches.rebuild([leaves[0][1], leaves[1][1]])  # one example, as under vmap
    assert one["ids"].shape == (1, 2) and one["w"].shape == (1,)
    cast = batches.rebuild([leaves[0].float(), leaves[1]])  # dattri's LiSSA casts to float
    assert cast["ids"].dtype == torch.int64
    flat = next(iter(batches.loader(problem, "train")))
    assert isinstance(flat, list) and flat[0].shape == (4, 2)


def test_flat_batches_of_a_list_batch_and_a_bare_layer(tiny_mlp):
    problem, _ = tiny_mlp
    batches = FlatBatches.of(problem)  # digits: default collate, [x, y]
    x, y = batches.flatten(problem.collate_fn or torch.utils.data.default_collate(
        [problem.train[0], problem.train[1]]))
    assert x.shape[0] == y.shape[0] == 2
    assert isinstance(batches.rebuild([x, y]), list)


def test_peer_configs_compose_without_their_libraries(make_cfg):
    for name, target in [("kronfluence_identity", "KronfluenceIdentity"),
                         ("dattri_explicit", "DattriExplicit"), ("bergson", "Bergson")]:
        cfg = make_cfg("digits_logreg", f"estimator={name}").estimator
        assert cfg._target_.endswith(target)
    with pytest.raises(Exception, match="bergson cannot run"):
        instantiate(make_cfg("digits_logreg", "estimator=bergson").estimator)

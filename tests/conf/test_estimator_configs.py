"""The estimator config group: one YAML per estimator, shared blocks under ``base/`` merged
with Hydra ``defaults:``, every key documented where it is set."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from bench.cli import CONF_DIR

GROUP = Path(CONF_DIR, "estimator")
ESTIMATORS = sorted(p.stem for p in GROUP.glob("*.yaml"))
BLOCKS = sorted(p.relative_to(GROUP).with_suffix("").as_posix()
                for p in (GROUP / "base").glob("*.yaml"))


def test_shared_blocks_are_not_estimators():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("estimator")
    GlobalHydra.instance().clear()
    assert options == ESTIMATORS and BLOCKS and not set(BLOCKS) & set(options)


def test_every_key_is_documented_where_it_is_set():
    undocumented = [f"{path.relative_to(GROUP)}: {line}"
                    for path in sorted(GROUP.rglob("*.yaml"))
                    for line in path.read_text().splitlines()
                    if re.match(r"\w+:", line) and not line.startswith(("_target_:", "defaults:"))
                    and "#" not in line]
    assert not undocumented, undocumented


def test_gradient_estimators_share_one_definition_of_each_key():
    """modules, chunk_size, per_layer and the projection keys are set only in base/ (an
    estimator may override the projection's dim and structure, e.g. trak's projection_dim
    or trackstar's sparse 2¹⁶), and compose flat."""
    shared = {"modules", "chunk_size", "per_layer", "projection_kind", "projection_seed",
              "index_dir"}
    for name in ESTIMATORS:
        own = {line.split(":")[0] for line in (GROUP / f"{name}.yaml").read_text().splitlines()
               if re.match(r"\w+:", line)}
        assert not own & shared, (name, own & shared)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["estimator=trak", "estimator.chunk_size=7"])
    GlobalHydra.instance().clear()
    assert OmegaConf.to_container(cfg.estimator)["chunk_size"] == 7
    assert cfg.estimator.projection_dim == 512 and "per_layer" not in cfg.estimator

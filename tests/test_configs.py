"""Every shipped config loads into the run configuration, and its objectives and constraints parse."""

from pathlib import Path

import pytest

from interop.config import load_config
from jaxnas.config import RunConfig
from jaxnas.search import objectives as obj

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_its_objectives_parse(path):
    cfg = load_config(RunConfig, path)
    allowed = obj.TABLE if cfg.mode == "table" else (*obj.TRAINED, *obj.CHEAP, *obj.MEASURED)
    assert obj.parse_objectives(cfg.objectives.objectives, allowed)
    for text in cfg.objectives.constraints:
        assert obj.parse_constraint(text, allowed)
    assert Path(cfg.output).parts[0] == "runs"


def test_the_configs_the_search_issue_names_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"quick", "mnist", "fashion_mnist", "cifar10", "nb201_table"} <= names

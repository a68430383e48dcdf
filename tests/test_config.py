"""interop.config: YAML + dotted overrides -> typed frozen dataclasses, with errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from interop.config import ConfigError, config_help, dump_config, from_dict, load_config, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = dataclasses.field(default=1e-3, metadata={"min": 0.0, "help": "learning rate"})
    name: Literal["adam", "sgd"] = "adam"
    steps: int = dataclasses.field(default=10, metadata={"min": 1, "max": 1000})


@dataclasses.dataclass(frozen=True)
class Run:
    seed: int = 0
    output: str = "runs/x"
    verbose: bool = False
    image_size: tuple[int, int] | None = None
    widths: tuple[int, ...] = (16, 32)
    act: str = dataclasses.field(default="relu", metadata={"choices": ("relu", "gelu")})
    optim: Optim = dataclasses.field(default_factory=Optim)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.output == "":
            raise ValueError("output must be a non-empty folder path")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    assert load_config(Run) == Run()


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "seed: 3\noptim:\n  lr: 0.01\nwidths: [8, 16, 24]\n")
    cfg = load_config(Run, p, ["optim.name=sgd", "verbose=true", "image_size=[32,32]", "optim.lr=1e-4", "extra.a=2"])
    assert cfg.seed == 3
    assert cfg.widths == (8, 16, 24)
    assert cfg.optim == Optim(lr=1e-4, name="sgd", steps=10)
    assert cfg.verbose is True
    assert cfg.image_size == (32, 32)
    assert cfg.extra == {"a": 2.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]


def test_str_override_keeps_text_exactly():
    assert load_config(Run, None, ["output=007"]).output == "007"
    assert load_config(Run, None, ["image_size=null"]).image_size is None
    assert load_config(Run, None, ["widths=4,8"]).widths == (4, 8)
    assert load_config(Run, None, ["optim.steps=1e2"]).optim.steps == 100


@pytest.mark.parametrize(
    "override, named, says",
    [
        ("sed=1", "'sed'", "Did you mean 'seed'"),
        ("optim.lrr=1", "'optim.lrr'", "Allowed keys at 'optim'"),
        ("seed=abc", "'seed'", "expected int"),
        ("verbose=3", "'verbose'", "true or false"),
        ("optim.name=rmsprop", "'optim.name'", "'adam' | 'sgd'"),
        ("optim.lr=-1", "'optim.lr'", "[0.0, inf]"),
        ("optim.steps=0", "'optim.steps'", "[1, 1000]"),
        ("act=tanh", "'act'", "allowed values are 'relu', 'gelu'"),
        ("image_size=[1,2,3]", "'image_size'", "expected a list of 2 items"),
        ("widths=[4,x]", "'widths[1]'", "expected int"),
        ("seed.x=1", "'seed'", "is a value (int), not a section"),
        ("output=", "top level", "output must be a non-empty folder path"),
        ("noequals", "noequals", "dotted.key=value"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(override, named, says):
    with pytest.raises(ConfigError) as e:
        load_config(Run, None, [override])
    assert named in str(e.value) and says in str(e.value)


def test_bad_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, write(tmp_path, "seed: [1\n"))
    with pytest.raises(ConfigError, match="mapping of keys"):
        load_config(Run, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="'optim'"):
        load_config(Run, write(tmp_path, "optim: 3\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=0.5", "image_size=28,28", "extra.b=1.5"])
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Run, tmp_path / "run" / "config.yaml") == cfg
    assert from_dict(Run, to_dict(cfg)) == cfg
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "config.yaml"]  # no temp files left


def test_required_field_missing():
    @dataclasses.dataclass(frozen=True)
    class NeedsPath:
        path: str

    with pytest.raises(ConfigError, match="'path' is required"):
        load_config(NeedsPath)


def test_help_lists_every_leaf_key():
    lines = config_help(Run)
    assert any(line.startswith("optim.lr (float, default 0.001): learning rate") for line in lines)
    assert sum(1 for line in lines if line.startswith("optim.")) == 3

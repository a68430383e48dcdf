"""``DataConfig``: every bad value is rejected with the field named; names list the accepted forms."""

import dataclasses

import pytest

from interop.config import load_config
from jaxnas.data import DataConfig


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"name": "imagenet"}, "DataConfig.name"),
        ({"name": "folder:"}, "DataConfig.name"),
        ({"name": "folder:/data"}, "DataConfig.image_size"),
        ({"image_size": (0, 8)}, "DataConfig.image_size"),
        ({"channels": 2}, "DataConfig.channels"),
        ({"validation_fraction": 0.0}, "DataConfig.validation_fraction"),
        ({"test_fraction": 1.2}, "DataConfig.test_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "DataConfig.validation_fraction + DataConfig.test_fr"),
        ({"split_seed": -1}, "DataConfig.split_seed"),
        ({"label_column": ""}, "DataConfig.label_column"),
    ],
)
def test_bad_config_values_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as error:
        DataConfig(**overrides)
    assert str(error.value).startswith(field)


def test_unknown_name_lists_the_accepted_forms():
    with pytest.raises(ValueError) as error:
        DataConfig(name="imagenet")
    for form in ("'mnist5k'", "'digits'", "'tfds:<name>", "'hf:", "'folder:<path>'", "'csv:<path>'"):
        assert form in str(error.value)


def test_image_size_from_yaml_lists_becomes_a_tuple():
    assert DataConfig(image_size=[32, 28]).image_size == (32, 28)


def test_every_field_has_help_for_the_config_loader():
    assert all(field.metadata.get("help") for field in dataclasses.fields(DataConfig))


def test_config_loader_builds_a_data_config_from_overrides():
    config = load_config(DataConfig, None, ["name=digits", "image_size=[16,16]", "channels=3"])
    assert config == DataConfig(name="digits", image_size=(16, 16), channels=3)


def test_cache_root_follows_cache_dir_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXNAS_CACHE", str(tmp_path / "env"))
    assert DataConfig().cache_root == tmp_path / "env"
    assert DataConfig(cache_dir=str(tmp_path / "mine")).cache_root == tmp_path / "mine"
    monkeypatch.delenv("JAXNAS_CACHE")
    assert DataConfig().cache_root.parts[-2:] == (".cache", "jaxnas")

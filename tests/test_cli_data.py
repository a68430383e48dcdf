"""The data smoke check, run exactly as `make run` runs it (README), in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxnas.data", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_make_run_command_prints_the_splits_and_writes_the_run_folder(tmp_path):
    out = run("--config", "configs/quick.yaml", f"output={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "mnist5k: image_shape (28, 28, 1) (H, W, C), 10 classes" in out.stdout
    assert "train      images (3000, 28, 28, 1) float32 in [0.000, 1.000]" in out.stdout
    assert "per class [100, 100, 100, 100, 100, 100, 100, 100, 100, 100]" in out.stdout  # validation and test
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["data"]["name"] == "mnist5k" and resolved["output"] == str(tmp_path)
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["test"]["per_class"] == [100] * 10


def test_overrides_select_another_dataset(tmp_path):
    out = run("--config", "configs/quick.yaml", "data.name=digits", f"output={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "digits: image_shape (8, 8, 1)" in out.stdout


def test_text_data_of_a_language_model_config_is_summarised(tmp_path):
    out = run("--config", "configs/lm.yaml", f"output={tmp_path}")  # as README shows it (and the output folder)
    assert out.returncode == 0, out.stderr
    assert "text:pydoc: bytes tokens (vocabulary 256), windows of 64 tokens (train stride 256)" in out.stdout
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    splits = [summary[s] for s in ("train", "validation", "test")]
    assert [s["span"][0] for s in splits] == ["train"] * 3  # pydoc is one stream, split by position
    assert splits[0]["span"][2] == splits[1]["span"][1] and splits[1]["span"][2] == splits[2]["span"][1]
    assert all(s["windows"] > 0 and s["tokens"] == s["span"][2] - s["span"][1] for s in splits)
    assert "validation starts: " in out.stdout


def test_bad_override_exits_nonzero_naming_the_key(tmp_path):
    out = run("--config", "configs/quick.yaml", "data.test_fraction=1.5", f"output={tmp_path}")
    assert out.returncode == 2
    assert "data.test_fraction" in out.stderr and "1.5" in out.stderr
    assert not (tmp_path / "config.yaml").exists()
    out = run("--config", "configs/quick.yaml", "data.nme=digits")
    assert out.returncode == 2 and "Did you mean 'name'" in out.stderr


def test_help_config_lists_keys():
    out = run("--help-config")
    assert out.returncode == 0 and "data.name (str, default 'mnist5k')" in out.stdout

"""``python -m torch_gating.seqgate`` on bad input: one line on stderr, exit status 2, never a traceback.

Each case is run as a user would run it (a subprocess, offline, on a tiny random model saved as a local
folder, small sizes), plus in-process checks of the loaders' messages and of Ctrl-C (exit 130, the line
"interrupted", no partly written output file).
"""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from torch_gating.models import ModelNotAvailableError, load_model, tiny_random_model
from torch_gating.seqgate import __main__ as seqgate_cli
from torch_gating.seqgate.experiment import plot_frontier
from torch_gating.text import TextNotAvailableError, load_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small sizes: the tiny model and a 64-token window, so a complete run takes seconds.
SMALL = ("--window", "64", "--probe-tokens", "16", "--calibration-windows", "2", "--max-tokens", "200",
         "--repeats", "0", "--decode-prompt", "24", "--threads", "1")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
HF_CACHE_TEXT = "Hugging Face cache"


def cli(*args, timeout=300):
    env = {**os.environ, **OFFLINE}
    return subprocess.run(
        [sys.executable, "-m", "torch_gating.seqgate", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_one_line_error(result, *fragments):
    """Exit status 2 and stderr exactly one line, no traceback, containing every fragment."""
    err = result.stderr
    assert result.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "\r" not in err, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama (4 layers) saved with its tokenizer as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer, _ = tiny_random_model("llama", seed=1, n_layers=4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- 1. a binary text file -------------------------------------------------------------------------------------


def test_cli_binary_text_file_is_one_line_error(tiny_folder, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 20)  # 0x80.. bytes are not UTF-8
    result = cli("--model", str(tiny_folder), "--text", str(binary), "--no-progress", *SMALL)
    line = assert_one_line_error(result, str(binary), "UTF-8")
    assert "--text pydoc" in line


def test_text_file_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n\nsecond paragraph\n".encode("latin-1"))
    with pytest.raises(TextNotAvailableError, match=r"not UTF-8 text.*byte 0xe9 at offset 3.*iconv"):
        load_text(latin1)
    nul = tmp_path / "zeros.txt"
    nul.write_bytes(b"\0" * 100)  # valid UTF-8, but binary
    with pytest.raises(TextNotAvailableError, match="NUL bytes"):
        load_text(nul)


def test_text_that_is_a_folder_or_a_missing_path_is_named_as_such(tmp_path):
    with pytest.raises(TextNotAvailableError, match="is a folder, not a text file"):
        load_text(tmp_path)
    with pytest.raises(TextNotAvailableError, match="does not exist"):
        load_text(tmp_path / "missing.txt")


# --- 2. an empty model folder / 4. a local path that is not a model folder --------------------------------------


def test_cli_empty_model_folder_is_one_line_error(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = cli("--model", str(empty), "--text", "pydoc", "--no-progress", *SMALL)
    line = assert_one_line_error(result, str(empty), "config.json", "is empty")
    assert HF_CACHE_TEXT not in line and "save_pretrained" in line


@pytest.mark.parametrize("kind", ["relative", "dot", "tilde", "nested"])
def test_cli_missing_local_model_path_names_the_folder_not_the_hf_cache(tmp_path, kind):
    name = f"no-such-model-{uuid.uuid4().hex[:8]}"
    model = {"relative": f"models/{name}/", "dot": f"./{name}", "tilde": f"~/{name}",
             "nested": f"runs/models/{name}"}[kind]
    result = cli("--model", model, "--text", "pydoc", "--no-progress", *SMALL)
    line = assert_one_line_error(result, model, "does not exist")
    assert HF_CACHE_TEXT not in line and "config.json" in line


def test_model_path_that_is_a_file_names_the_folder_to_use(tiny_folder):
    with pytest.raises(ModelNotAvailableError, match=r"is a file, not a model folder.*--model .*tiny-llama") as err:
        load_model(tiny_folder / "config.json")
    assert HF_CACHE_TEXT not in str(err.value)


def test_model_folder_without_config_lists_the_files_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    sub = tmp_path / "checkpoint"
    sub.mkdir()
    (sub / "config.json").write_text("{}")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "has no config.json" in message and "checkpoint/, notes.txt, weights.safetensors" in message
    assert f"--model {sub}" in message  # the subfolder that does hold a config.json
    assert HF_CACHE_TEXT not in message and "\n" not in message


def test_model_folder_without_tokenizer_or_with_a_bad_config_names_what_is_missing(tiny_folder, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_folder / name).read_bytes())
    with pytest.raises(ModelNotAvailableError, match="no tokenizer files.*config.json, model.safetensors") as err:
        load_model(no_tokenizer)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad-config"
    bad.mkdir()
    (bad / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ModelNotAvailableError, match="config.json.*model_type"):
        load_model(bad)


def test_cli_unsupported_architecture_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = cli("--model", str(tmp_path), "--text", "pydoc", "--no-progress", *SMALL)
    assert_one_line_error(result, "'bert' is not supported", "gpt2")


def test_hub_id_not_cached_still_gets_the_hub_message_and_says_there_is_no_such_folder():
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE is set") as err:
        load_model("some-org/does-not-exist")
    assert "no local folder 'some-org/does-not-exist'" in str(err.value)


# --- bad settings (flags, --config, key=value overrides) --------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--repeats", "3"], "at least 5"),
    (["bl=2"], "'bl'"),
    (["windw=64"], "Did you mean 'window'"),
    (["--config", "no-such-settings.yaml"], "no-such-settings.yaml"),
])
def test_bad_settings_are_one_line_errors(argv, fragment, capsys):
    assert seqgate_cli.main(["--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


# --- 3. a text too short for the probe / calibration / evaluation splits ---------------------------------------


def test_cli_text_too_short_says_how_much_is_needed_and_how_much_was_given(tiny_folder, tmp_path):
    short = tmp_path / "two.txt"
    short.write_text("First paragraph, a few words.\n\nSecond paragraph, also short.\n", encoding="utf-8")
    result = cli("--model", str(tiny_folder), "--text", str(short), "--no-progress", *SMALL)
    line = assert_one_line_error(result, str(short), "too short", "2 paragraphs", "64-token window", "--window")
    # The byte-level tokenizer has one token per byte: each split (one paragraph) has 29 tokens.
    assert "58 tokens" in line and "test 29" in line, line


def test_max_tokens_below_the_window_is_named_as_the_problem(tiny_folder, capsys):
    status = seqgate_cli.main(["--model", str(tiny_folder), "--text", "pydoc", "--no-progress", "--window", "64",
                               "--probe-tokens", "16", "--max-tokens", "10", "--repeats", "0", "--decode-prompt", "24"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-tokens 10" in err and "64" in err


# --- 5. Ctrl-C ------------------------------------------------------------------------------------------------


def test_cli_ctrl_c_prints_interrupted_exits_130_and_leaves_no_partial_output(tiny_folder, tmp_path):
    out = tmp_path / "out" / "report.json"
    env = {**os.environ, **OFFLINE}
    # As from a terminal: Ctrl-C raises KeyboardInterrupt even when this test process was started with SIGINT
    # ignored (as background jobs are), which a plain child would inherit.
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "torch_gating.seqgate", "--model", str(tiny_folder), "--text", "pydoc",
         "--window", "64", "--probe-tokens", "16", "--calibration-windows", "16", "--max-tokens", "50000",
         "--repeats", "5", "--decode-prompt", "24", "--threads", "1", "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    err_chunks = []
    reader = threading.Thread(target=lambda: err_chunks.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while "experiences" not in "".join(err_chunks):  # calibration has started: the run is under way
        assert proc.poll() is None, "".join(err_chunks)[-3000:]
        assert time.monotonic() < deadline, "".join(err_chunks)[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
    reader.join(timeout=10)
    err = "".join(err_chunks)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.replace("\r", "\n").strip().split("\n")[-1]
    assert last.startswith("interrupted") and "nothing was written" in last and "again" in last, last
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_ctrl_c_while_writing_the_report_leaves_no_file_and_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.json"
    fake = {"frontier": []}
    monkeypatch.setattr(seqgate_cli, "load_text", lambda name: object())
    monkeypatch.setattr(seqgate_cli, "load_model", lambda name, device: (None, None, None))
    monkeypatch.setattr(seqgate_cli, "check_text_length", lambda tokenizer, corpus, settings, label=None: None)
    monkeypatch.setattr(seqgate_cli, "asdict", lambda info: {})
    monkeypatch.setattr(seqgate_cli, "run_seqgate", lambda *args, **kwargs: fake)
    monkeypatch.setattr(seqgate_cli, "format_report", lambda report: "the report")

    def interrupted_fsync(fd):
        raise KeyboardInterrupt  # the data is in the temporary file, not yet renamed into place

    monkeypatch.setattr("interop._atomic.os.fsync", interrupted_fsync)
    assert seqgate_cli.main(["--no-progress", "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted") and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_the_report_says_what_was_kept(tmp_path, monkeypatch, capsys):
    out, plot = tmp_path / "report.json", tmp_path / "frontier.png"
    monkeypatch.setattr(seqgate_cli, "load_text", lambda name: object())
    monkeypatch.setattr(seqgate_cli, "load_model", lambda name, device: (None, None, None))
    monkeypatch.setattr(seqgate_cli, "check_text_length", lambda tokenizer, corpus, settings, label=None: None)
    monkeypatch.setattr(seqgate_cli, "asdict", lambda info: {})
    monkeypatch.setattr(seqgate_cli, "run_seqgate", lambda *args, **kwargs: {"frontier": []})
    monkeypatch.setattr(seqgate_cli, "format_report", lambda report: "the report")

    def interrupted_plot(points, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(seqgate_cli, "plot_frontier", interrupted_plot)
    assert seqgate_cli.main(["--no-progress", "--output", str(out), "--plot", str(plot)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted")
    assert f"{out} was written" in err and f"{plot} was not" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_plot_interrupted_mid_write_leaves_no_partial_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    original = Figure.savefig

    def half_then_interrupt(self, fname, **kwargs):
        buffer = io.BytesIO()
        original(self, buffer, format="png", **{k: v for k, v in kwargs.items() if k != "format"})
        data = buffer.getvalue()
        if isinstance(fname, (str, os.PathLike)):
            Path(fname).write_bytes(data[: len(data) // 2])
        else:
            fname.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half_then_interrupt)
    point = {"guardrail": 0.01, "delta_ppl_test": 0.005, "prefill_gain": 0.1, "prefill_gain_ci95": [0.0, 0.2]}
    with pytest.raises(KeyboardInterrupt):
        plot_frontier([point], tmp_path / "frontier.png")
    assert list(tmp_path.iterdir()) == []

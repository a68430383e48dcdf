"""A hostile user's corners of python -m jaxnas.search: run folders, resume, checkpoints and inputs. Every case
either runs or stops with one line on stderr naming the problem (exit 2; Ctrl-C: 130), and writes nothing for a
run that cannot start."""

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interop.config import load_config
from jaxnas.config import RunConfig
from jaxnas.search.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
TABLE = str(ROOT / "configs" / "nb201_table.yaml")
TINY_SPACE = ["space.name=macro", "space.families=[mlp]", "space.max_stages=1", "space.max_depth=1",
              "space.units=[8,16,32]", "space.activations=[relu,gelu]", "space.dropouts=[0.0]"]


def _cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxnas.search", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _refused(capsys, args, *words):
    """main(args) in this process: exit 2 and one line on stderr holding every one of ``words``."""
    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-2000:])
    for word in words:
        assert word in lines[0], (word, lines[0])


def _from_a_terminal(module: str, *args: str) -> list[str]:
    """``python -m module args`` as from a terminal: Ctrl-C raises KeyboardInterrupt even when this test process was
    started with SIGINT ignored (as background jobs are), which a plain child would inherit."""
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, module, *args]


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _tiny_table(tmp_path) -> tuple[Path, int]:
    """A CSV table holding every architecture of the tiny macro space, and the space's size."""
    from jaxnas.search.models import build_space
    import jax

    space = build_space(load_config(RunConfig, None, TINY_SPACE).space)
    archs = sorted({space.to_string(e) for e in np.asarray(space.sample(jax.random.key(0), 2000))})
    assert len(archs) == space.size()
    path = tmp_path / "tiny.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arch", "acc"])
        writer.writerows([a, 0.5 + 0.01 * i] for i, a in enumerate(archs))
    return path, len(archs)


# 1. a budget beyond the space ends when the space is exhausted, or when generations stall
def test_a_budget_beyond_the_space_stops_when_every_architecture_was_seen(tmp_path, capsys):
    table, size = _tiny_table(tmp_path)
    out = tmp_path / "run"
    assert main(["--config", TABLE, f"output={out}", *TINY_SPACE, f"table.path={table}", "table.signal=acc",
                 "table.report=acc", "search.budget=100000", "search.population=4", "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == size and "space exhausted" in summary["stopped"]
    assert "space exhausted" in capsys.readouterr().out


def test_generations_that_add_nothing_stop_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    # every candidate violates a cheap constraint: nothing is ever trained, so no generation adds an evaluation
    assert main([f"output={out}", "data.name=digits", "mode=train", *TINY_SPACE, "space.max_stages=3",
                 "objectives.constraints=[params<=1]", "search.stall_generations=3", "final.top_k=0",
                 "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generations"] == 3 and summary["evaluations"] == 0 and "stalled" in summary["stopped"]
    # 9. the counters and the message say what happened
    history = list(csv.DictReader(open(out / "history.csv")))
    assert summary["infeasible"] == len(history) > 0
    assert "relax objectives.constraints" in capsys.readouterr().out


# 2. resume refuses an edited config, naming the keys; keys safe to change are allowed
def test_resume_refuses_an_edited_config_naming_the_changed_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", TABLE, f"output={out}", "search.budget=20", "progress=false"]) == 0
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(saved.replace("population: 10", "population: 7"))
    _refused(capsys, ["--resume", str(out), "search.budget=30"], "search.population: 10 -> 7", "progress")
    (out / "config.yaml").write_text(saved)
    assert main(["--resume", str(out), "search.budget=30", "progress=false"]) == 0  # budget, progress may change
    assert json.loads((out / "summary.json").read_text())["evaluations"] == 30
    _refused(capsys, ["--resume", str(out), "search.sample_size=2"], "search.sample_size")


# 3. output folders: not a stranger's folder, one process at a time
def test_a_non_empty_folder_that_is_no_run_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "history.csv").write_text("my own data\n")
    _refused(capsys, ["--config", TABLE, f"output={folder}"], "not empty", "history.csv")
    assert sorted(p.name for p in folder.iterdir()) == ["history.csv"]
    assert (folder / "history.csv").read_text() == "my own data\n"


def test_a_run_folder_in_use_is_refused_and_a_dead_owners_lock_is_not(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", TABLE, f"output={out}", "search.budget=10", "progress=false"]) == 0
    lock = out / ".lock"
    with open(lock, "r+") as held:  # a live owner: flock locks belong to an open file, so this conflicts in-process too
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        _refused(capsys, ["--resume", str(out), "search.budget=20"], "in use by another process", "4242")
    lock.write_text("999999\n")  # a lock file left by a dead process holds no lock
    assert main(["--resume", str(out), "search.budget=20", "progress=false"]) == 0


# 4. + 8. a run that cannot start writes nothing, so the corrected command just works
def test_a_failed_start_writes_no_folder(tmp_path, capsys):
    partial = tmp_path / "partial.csv"
    partial.write_text((ROOT / "jaxnas" / "tables_data" / "nb201_analog.csv").read_text()[:3000])
    out = tmp_path / "run"
    for override, words in [("table.path=/nonexistent/table.csv", ["not found"]),
                            (f"table.path={partial}", ["fields", "header"]), ("table.signal=nope", ["nope"])]:
        _refused(capsys, ["--config", TABLE, f"output={out}", override], *words)
        assert not out.exists()
    # nothing was left behind, so the corrected command just runs (a subprocess: the user's view)
    proc = _cli("--config", TABLE, f"output={out}", "search.budget=10", "progress=false")
    assert proc.returncode == 0, proc.stderr


# 7. the checkpoint archive's JSON is checksummed; all steps corrupt -> refuse
def _edit_archive(step: Path) -> None:
    for f in (step / "archive").rglob("*"):
        if f.is_file() and f.read_text().count('"evaluations": ') :
            text = f.read_text()
            i = text.index('"evaluations": ') + len('"evaluations": ')
            f.write_text(text[:i] + str(int(text[i]) + 1 if text[i].isdigit() and text[i] != "9" else 1) + text[i + 1:])
            return
    raise AssertionError(f"no archive JSON in {step}")


def test_an_edited_archive_falls_back_and_all_steps_corrupt_is_refused(tmp_path):
    args = ["--config", TABLE, "search.budget=30", "search.population=5", "progress=false"]
    whole, edited = tmp_path / "whole", tmp_path / "edited"
    assert main([*args, f"output={whole}"]) == 0
    assert main([*args, f"output={edited}"]) == 0
    steps = sorted((p for p in (edited / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    _edit_archive(steps[-1])  # a one-digit edit of a JSON number
    with pytest.warns(UserWarning, match="checksum"):
        assert main(["--resume", str(edited)]) == 0
    for name in ("history.csv", "best.json", "pareto.json"):
        assert (edited / name).read_text() == (whole / name).read_text()
    for step in (p for p in (edited / "checkpoints").iterdir() if p.name.isdigit()):
        _edit_archive(step)
    for _ in range(2):  # refused again: nothing was set aside or started afresh
        _one_line_error(_cli("--resume", str(edited)), "every checkpoint step", "unreadable")


# 8. one-line errors instead of tracebacks
def test_inputs_that_used_to_end_in_tracebacks(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\x01\xff\xfe")
    _one_line_error(_cli("--config", str(binary)), "not UTF-8")  # the CLI as a user runs it
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(capsys, ["--config", TABLE, f"output={afile}"], "is a file")
    _refused(capsys, ["--config", TABLE, "output=/proc/jaxnas-run"], "cannot create")
    _refused(capsys, ["--config", TABLE, f"output={tmp_path / 'p'}", "search.population=1e9"],
             "search.population", "65536")
    _refused(capsys, ["--config", TABLE, f"output={tmp_path / 's'}", "seed=1e20"], "seed", "4294967295")
    # 10. seeds beyond 32 bits would alias lower ones; non-finite floats are refused
    _refused(capsys, ["--config", TABLE, f"output={tmp_path / 's'}", "seed=4294967296"], "seed")
    _refused(capsys, ["--config", TABLE, f"output={tmp_path / 'n'}", "train.learning_rate=.nan"],
             "train.learning_rate", "finite")
    _refused(capsys, ["--config", TABLE, f"output={tmp_path / 'n'}", "supernet.distill=.inf"], "supernet.distill")
    assert not any((tmp_path / d).exists() for d in "psn")


def test_a_population_too_large_for_memory_is_refused_with_the_estimate(tmp_path, capsys):
    _refused(capsys, [f"output={tmp_path / 'big'}", "data.name=digits", "mode=train", "search.population=65536"],
             "search.population=65536", "GiB", "search.population <=")
    assert not (tmp_path / "big").exists()


def test_ctrl_c_says_how_to_resume_and_the_resumed_run_finishes(tmp_path):
    out = tmp_path / "run"
    args = ["--config", TABLE, f"output={out}", "search.budget=1000", "search.population=50", "progress=false"]
    proc = subprocess.Popen(_from_a_terminal("jaxnas.search", *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    steps = lambda: [p for p in (out / "checkpoints").glob("[0-9]*")] if (out / "checkpoints").is_dir() else []  # noqa: E731
    while time.time() < deadline and not steps() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [f"interrupted; resume with: python -m jaxnas.search --resume {out}"]
    resumed = _cli("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["evaluations"] == 1000


def test_load_model_on_a_bad_encoding_names_the_file(tmp_path):
    import jaxnas

    folder = tmp_path / "model"
    folder.mkdir()
    meta = {"arch": "x", "encoding": [99, 99], "space": {"name": "macro", "families": ["mlp"]},
            "image_shape": [8, 8, 1], "num_classes": 10}
    (folder / "arch.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="arch.json is not a valid exported model"):
        jaxnas.load_model(folder)
    (folder / "arch.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not a valid exported model"):
        jaxnas.load_model(folder)


# 9. messages that said the wrong thing
def test_resume_messages_for_an_empty_config_and_a_moved_relative_output(tmp_path, capsys):
    run = tmp_path / "work" / "runs" / "r"
    run.parent.mkdir(parents=True)
    proc = _cli("--config", TABLE, "output=runs/r", "search.budget=10", "progress=false", cwd=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    # resumed from another folder: a run resumes in place, wherever it is called from
    proc = _cli("--resume", str(run), "search.budget=20", "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 20
    (run / "config.yaml").write_text("")
    _refused(capsys, ["--resume", str(run)], "empty or not a run's config")


def test_every_candidate_failing_is_reported_as_such(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([f"output={out}", "data.name=digits", "mode=train", *TINY_SPACE, "search.budget=4",
                 "search.population=4", "train.learning_rate=1e30", "train.epochs=1", "final.top_k=0",
                 "progress=false"]) == 0
    said = capsys.readouterr().out
    history = list(csv.DictReader(open(out / "history.csv")))
    assert {r["status"] for r in history} == {"failed"}  # a learning rate of 1e30 diverges for every candidate
    assert json.loads((out / "best.json").read_text())["arch"] is None
    assert "lower train.learning_rate" in said and "relax" not in said


# 11. a bad config fails before jax is imported
def test_a_bad_config_fails_before_the_heavy_imports():
    code = ("import sys; from jaxnas.search.__main__ import main; rc = main(['search.population=abc']); "
            "print(rc, 'jax' in sys.modules, 'orbax.checkpoint' in sys.modules, 'matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False", "False", "False"], proc.stdout + proc.stderr


# 12. temporary files of interrupted atomic writes are cleaned on resume
def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", TABLE, f"output={out}", "search.budget=10", "progress=false"]) == 0
    stale = [out / ".history.csv.abc123.tmp", out / ".summary.json.x9.tmp"]
    for path in stale:
        path.write_text("half")
    keep = out / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    assert main(["--resume", str(out), "search.budget=20"]) == 0
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


# a generated override either gives a config that starts, or exit 2 naming its key - never a traceback
KEYS = ["seed", "search.population", "search.budget", "search.generations", "search.prefilter_keep",
        "search.stall_generations", "train.epochs", "train.learning_rate", "train.batch_size", "train.patience",
        "supernet.distill", "supernet.warmup_epochs", "final.seeds", "final.top_k", "data.validation_fraction",
        "space.max_stages", "search.crossover_rate", "objectives.latency_repeats"]
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([".nan", ".inf", "-.inf", "1e20", "1e400", "-0", "true", "none", "[1,2]", "{a: 1}", "", "abc",
                     "0x10", "1_000"]),
    st.text(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_generated_overrides_start_or_exit_2_naming_the_key(monkeypatch, capsys, key, value):
    started = []
    import jaxnas.search.loop as loop

    monkeypatch.setattr(loop, "run_search", lambda cfg, resume=False: started.append(cfg) or {})
    rc = main(["--config", TABLE, "output=/tmp/jaxnas-never-written", f"{key}={value}"])
    err = capsys.readouterr().err
    if rc == 0:
        assert len(started) == 1
    else:
        assert rc == 2 and not started
        lines = err.strip().splitlines()
        assert len(lines) == 1 and key.split(".")[-1] in lines[0], (key, value, err)


def test_a_ctrl_c_inside_held_interrupt_takes_effect_when_the_block_ends():
    """What keeps a checkpoint whole: the block finishes its work, then KeyboardInterrupt; the handler is restored."""
    code = (
        "import os, signal, time\n"
        "from jaxnas.search.runfolder import held_interrupt\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "done = []\n"
        "try:\n"
        "    with held_interrupt():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.2)\n"
        "        done.append('written')\n"
        "except KeyboardInterrupt:\n"
        "    print(done, signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "['written'] True", proc.stderr[-2000:]

"""``python -m jaxnas.adaptive``: one-line errors with exit status 2, and a whole run on a tiny exported model."""

import json

import pytest

from jaxnas.adaptive.__main__ import main
from jaxnas.search.__main__ import main as search_main

TINY_SEARCH = [
    "data.name=digits", "mode=train", "search.strategy=random", "space.max_stages=2", "space.max_depth=2",
    "space.families=[cnn]", "space.channels=[8]", "space.kernels=[3]", "space.activations=[relu]",
    "space.dropouts=[0.0]", "space.batchnorm=[true]", "space.skip=[false]", "search.population=1", "search.budget=1",
    "train.epochs=1", "train.batch_size=64", "train.learning_rate=0.01", "final.top_k=1", "final.epochs=1",
    "final.seeds=1", "final.control=0", "final.baselines=[]", "progress=false",
]
FAST = ["--bl", "0.18", "--Bg", "0.08", "--batch-size", "32", "--calibration-batch", "32", "--probe-images", "4",
        "--repeats", "5", "--timing-passes", "1", "--exit-epochs", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive_cli") / "run"
    assert search_main([f"output={out}", *TINY_SEARCH]) == 0
    return out


@pytest.mark.parametrize("argv, says", [
    (["--model", "/nonexistent/run"], "no exported model"),
    (["--model", "{run}", "--repeats", "3"], "at least 5 interleaved repeats"),
    (["--model", "{run}", "--probe-images", "64", "--batch-size", "32"], "must be below batch_size"),
    (["--model", "{run}", "--bl", "1.5"], "fractions in [0, 1]"),
    (["--model", "{run}", "--align", "0"], "--align must be >= 1"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(run, capsys, argv, says):
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.startswith("error: ") and "\n" not in err


def test_a_run_writes_the_report_and_the_plot(run, capsys):
    out = run / "adaptive.json"
    assert main(["--model", str(run / "model"), *FAST, "--output", str(out), "--plot", str(run / "adaptive.png")]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["bl_grid"] == [0.18] and report["test_images"] > 0
    (row,) = report["grid"]
    assert set(row["arms"]) == {"static", "current", "experience"}
    for arm in row["arms"].values():
        assert arm["guardrail_validation"]["holds"] and len(arm["throughput_gain_ci95"]) == 2
    assert set(row["timing"]["arms"]) == {"base", "static", "current", "experience"}
    assert row["timing"]["repeats"] == 5
    printed = capsys.readouterr().out
    assert "images/s" in printed and f"report: {out}" in printed
    assert (run / "adaptive.png").stat().st_size > 0


def test_the_new_knobs_reach_the_settings_and_the_report(run):
    out = run / "knobs.json"
    knobs = ["--finetune-epochs", "1", "--finetune-lr", "0.002", "--exit-grid", "2", "--guardrail-z", "0",
             "--latency-rounds", "2", "--min-speedup", "0.05", "--align", "4", "--bl", "0.5", "--Bg", "0.5",
             "--decide-every", "2"]
    fast = [a for a in FAST if a not in ("--bl", "0.18", "--Bg", "0.08")]
    assert main(["--model", str(run / "model"), *fast, *knobs, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert (settings["finetune_epochs"], settings["finetune_lr"], settings["exit_grid"], settings["guardrail_z"],
            settings["latency_rounds"], settings["min_speedup"], settings["decide_every"]) == (1, 0.002, 2, 0.0, 2,
                                                                                               0.05, 2)
    assert report["latency_ms"][0]["widths"] == list(report["gates"].values()) and len(report["latency_ms"]) > 1
    assert report["finetune"] is None or report["finetune"]["epochs"] == 1
    early = report["early_exit"]
    assert early["validation"]["drop_bound"] == early["validation"]["accuracy_drop"]  # z = 0: the drop itself

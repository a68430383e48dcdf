"""jaxnas.search.report: plots and a self-contained report.html from the files of a run folder.

Each test writes a run folder in the formats `jaxnas.search.loop` writes (history.csv, generations.csv,
pareto.json, best.json, summary.json, config.yaml) and reads back what the report made of it.
"""

import base64
import csv
import json
import re

import numpy as np
import pytest

from jaxnas.search.report import PLOTS, write_plots, write_report, write_report_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BEST_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def _history_rows(generations=3, per_generation=6):
    """Rows of a bi-objective run: every status, failed rows with nan / -inf fitness and empty metric cells."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(generations):
        for i in range(per_generation):
            params = int(rng.integers(10_000, 2_000_000))
            accuracy = float(0.5 + 0.4 * np.log10(params) / 6.5 + 0.02 * g)
            status = ["ok", "ok", "early_stopped", "cached", "failed", "infeasible"][i]
            fitness = {"failed": "nan", "infeasible": "-inf"}.get(status, f"{accuracy:.4f}")
            measured = status not in ("failed", "infeasible")
            rows.append(
                {
                    "generation": g,
                    "index": i,
                    "arch": f"arch-g{g}-i{i}",
                    "status": status,
                    "fitness": fitness,
                    "val_accuracy": f"{accuracy:.4f}" if measured else "",
                    "val_loss": f"{1 - accuracy:.4f}" if measured else "",
                    "params": params if status != "failed" else "",
                    "macs": params * 30 if status != "failed" else "",
                }
            )
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_run(run, history=None, optional=True):
    """A run folder; ``optional=False`` writes history.csv alone."""
    run.mkdir(parents=True, exist_ok=True)
    history = history or _history_rows()
    _write_csv(run / "history.csv", history)
    if not optional:
        return run
    generations = sorted({r["generation"] for r in history})
    _write_csv(
        run / "generations.csv",
        [
            {
                "generation": g,
                "evaluations": 6,
                "cache_hits": 1,
                "best_fitness": 0.80 + 0.03 * g,
                "mean_fitness": 0.70 + 0.02 * g,
                "diversity": "" if g == 0 else 1.5 - 0.2 * g,
                "hypervolume": 1.0e5 * (g + 1),
                "front_size": 2 + g,
            }
            for g in generations
        ],
    )
    (run / "pareto.json").write_text(
        json.dumps(
            {
                "objectives": [{"name": "val_accuracy", "direction": "max"}, {"name": "params", "direction": "min"}],
                "reference": [0.0, 2.2e6],
                "hypervolume": 1.81e6,
                "front": [
                    {"arch": "front-small", "generation": 0, "values": {"val_accuracy": 0.71, "params": 15_000}},
                    {"arch": BEST_ARCH, "generation": 2, "values": {"val_accuracy": 0.93, "params": 120_000}},
                    {"arch": "front-large", "generation": 1, "values": {"val_accuracy": 0.94, "params": 1_900_000}},
                ],
                "knee": BEST_ARCH,
            }
        )
    )
    (run / "best.json").write_text(
        json.dumps(
            {
                "arch": BEST_ARCH,
                "fitness": 0.93,
                "generation": 2,
                "metrics": {"val_accuracy": 0.93, "params": 120_000},
                "final": {"test_accuracy": 0.9271, "test_loss": 0.2468, "confusion": [[47, 3], [4, 46]]},
            }
        )
    )
    (run / "summary.json").write_text(
        json.dumps({"evaluations": 18, "wall_time_s": 12.5, "strategy": "nsga2", "cache": {"hits": 3, "misses": 15}})
    )
    (run / "config.yaml").write_text("seed: 0\nsearch:\n  strategy: nsga2\n  generations: 3\n")
    return run


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"


def _embedded_pngs(page):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_write_report_writes_valid_plots_and_a_self_contained_html_page(tmp_path):
    run = _write_run(tmp_path / "run")
    report = write_report(run)
    assert report == run / "report.html"
    for name in PLOTS:
        _assert_png(run / f"{name}.png")
    page = report.read_text()
    assert BEST_ARCH in page
    embedded = _embedded_pngs(page)
    assert len(embedded) == len(PLOTS)
    assert all(png.startswith(PNG_SIGNATURE) for png in embedded)
    assert 'src="http' not in page and 'href="http' not in page and "<script" not in page
    # Best architecture's final test numbers, the front with its knee, the config and the summary.
    assert "0.9271" in page and "Final (test split)" in page
    assert '<table class="matrix"><tr><td class="num">47</td><td class="num">3</td></tr>' in page
    assert "front-large" in page and "1,900,000" in page and page.count(">knee<") == 1
    knee_row = page[page.rindex("<tr>", 0, page.index(">knee<")) : page.index(">knee<")]
    assert BEST_ARCH in knee_row  # the run's knee (pareto.json), not one the report recomputes
    assert "strategy: nsga2" in page and "wall_time_s" in page
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp")), "a temporary file was left behind"


def test_write_plots_returns_the_written_paths_and_skips_diversity_without_values(tmp_path):
    run = _write_run(tmp_path / "run")
    generations = list(csv.DictReader(open(run / "generations.csv")))
    for row in generations:
        row["diversity"] = "nan" if row["generation"] == "0" else ""
    _write_csv(run / "generations.csv", generations)
    (run / "diversity.png").write_bytes(b"stale")  # from an earlier call, when there were values
    written = write_plots(run)
    assert set(written) == {"fitness", "pareto", "hypervolume"}
    assert written["pareto"] == run / "pareto.png"
    assert not (run / "diversity.png").exists()


def test_report_of_a_folder_with_only_history_omits_the_optional_sections(tmp_path):
    run = _write_run(tmp_path / "run", optional=False)
    written = write_plots(run)
    # Fitness comes from history.csv alone; with no pareto.json, fitness is plotted against params.
    assert set(written) == {"fitness", "pareto"}
    _assert_png(written["fitness"])
    _assert_png(written["pareto"])
    page = write_report_html(run).read_text()
    assert "Best architecture" not in page and "Pareto front</h2>" not in page and "Configuration" not in page
    assert "Plots" in page and "History" in page
    assert "<th>total</th><td>18</td>" in page and "<th>failed</th><td>3</td>" in page


def test_signal_mode_history_without_cost_columns_has_no_trade_off_plot(tmp_path):
    rows = [
        {"generation": g, "index": i, "arch": f"a{g}{i}", "status": "ok", "fitness": 0.1 * (g + i)}
        | {"signal": 0.1 * i, "report": "fine"}
        for g in range(2)
        for i in range(3)
    ]
    run = _write_run(tmp_path / "run", history=rows, optional=False)
    assert set(write_plots(run)) == {"fitness"}
    page = write_report_html(run).read_text()
    assert "<th>signal</th>" in page and "fine" in page


def test_report_html_escapes_text_from_the_run(tmp_path):
    run = _write_run(tmp_path / "run")
    (run / "config.yaml").write_text("note: <script>alert('x')</script> & more\n")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "<b>key</b>": "a < b"}))
    page = write_report(run).read_text()
    assert "<script>" not in page and "<b>key</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "&lt;b&gt;key&lt;/b&gt;" in page and "a &lt; b" in page


def test_report_shows_only_the_last_n_history_rows(tmp_path):
    run = _write_run(tmp_path / "run")
    page = write_report(run, history_rows=4).read_text()
    assert "Last 4 of 18 evaluations" in page
    history = page[page.index("<h2>History</h2>") :]
    assert "arch-g2-i5" in history and "arch-g2-i2" in history
    assert "arch-g2-i1" not in history and "arch-g0-i0" not in history


def test_report_of_a_run_without_a_feasible_candidate_says_so(tmp_path):
    rows = [r | {"status": "infeasible", "fitness": "-inf"} for r in _history_rows()]
    run = _write_run(tmp_path / "run", history=rows)
    (run / "best.json").write_text(json.dumps({"arch": None}))
    (run / "pareto.json").write_text(
        json.dumps({"objectives": [{"name": "val_accuracy", "direction": "max"}], "reference": None, "front": []})
    )
    _write_csv(run / "generations.csv", [{"generation": 0, "best_fitness": "nan", "mean_fitness": "nan"}])
    assert set(write_plots(run)) == set()
    page = write_report_html(run).read_text()
    assert "No feasible candidate was evaluated." in page and "The front is empty." in page
    assert "<th>infeasible</th><td>18</td>" in page


def test_missing_history_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="has no history.csv.*search run"):
        write_report(run)
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        write_plots(tmp_path / "nowhere")


def test_history_without_the_required_columns_names_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text("generation,arch,fitness\n0,a,0.5\n")
    with pytest.raises(ValueError, match=r"\['index', 'status'\].*generation,index,arch,status,fitness"):
        write_report(run)


def test_a_corrupt_optional_file_names_itself(tmp_path):
    run = _write_run(tmp_path / "run")
    (run / "best.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"best\.json is not valid JSON"):
        write_report_html(run)

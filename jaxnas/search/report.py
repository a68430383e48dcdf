"""Plots and a self-contained ``report.html`` from the files a search run wrote into its run folder.

The run folder (written by `jaxnas.search.loop`) holds:

- ``history.csv`` (required): ``generation,index,arch,status,fitness,<metric columns...>``, one row per
  evaluated candidate; status is one of `STATUSES`; fitness is maximised and NaN / -inf for failed or
  infeasible candidates; metric columns depend on the mode and space (``val_accuracy,val_loss,params,macs``,
  ``signal,report``, or for language models ``val_ppl,val_loss,params,macs_per_token,...``), an empty cell meaning
  "not measured".
- ``generations.csv``: ``generation,evaluations,cache_hits,best_fitness,mean_fitness,diversity,
  hypervolume,front_size``, one row per generation (diversity in nats; either may be empty).
- ``pareto.json``: ``{"objectives": [{"name", "direction"}...], "reference": [...], "hypervolume": float,
  "front": [{"arch", "generation", "values": {name: value}}...]}``.
- ``best.json``: ``{"arch", "fitness", "generation", "metrics": {...}, "final": {...}}`` (final optional).
- ``summary.json``: a dict of scalars and small dicts.
- ``config.yaml``: the resolved configuration of the run.

Only ``history.csv`` is required; a missing optional file omits what depends on it. Every file is written
atomically (`interop._atomic`), so a browser or a concurrent reader never sees half a plot or page:

    write_report("runs/mnist-re")   # fitness.png, pareto.png, diversity.png, hypervolume.png, report.html

Plots are drawn with matplotlib's object-oriented API (`matplotlib.figure.Figure`, Agg canvas) rather
than pyplot, so reporting never touches pyplot's global figure state or the user's chosen backend.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from interop._atomic import atomic_write_bytes, atomic_write_text
from jaxnas.search.pareto import Objective, pareto_mask
from jaxnas.status import EVALUATED, Status

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: a slow import every search would pay at start
    from matplotlib.figure import Figure

HISTORY = "history.csv"
GENERATIONS = "generations.csv"
PARETO = "pareto.json"
BEST = "best.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
REPORT = "report.html"

HISTORY_COLUMNS = ("generation", "index", "arch", "status", "fitness")
"""The columns every ``history.csv`` starts with; metric columns follow."""

STATUSES = tuple(Status)
"""Evaluation outcomes in ``history.csv``, in the order the report counts them (others follow, sorted). Plotted are
the `EVALUATED` rows: a ``cached`` row repeats an earlier row of the same arch, so it adds no point of its own."""

COST_COLUMNS = ("params", "macs", "macs_per_token")
"""Metric columns a single-objective run's trade-off plot puts fitness against, in order of preference."""

PLOTS = ("fitness", "pareto", "diversity", "hypervolume")
"""The plots `write_plots` may write, as ``<name>.png`` in the run folder, in report order."""

_TEXT_COLUMNS = ("arch", "status")
"""CSV columns kept as text even when they look numeric (an arch string such as ``"0121"``)."""


@dataclasses.dataclass(frozen=True)
class _Csv:
    """A parsed CSV file: its header and its rows (cells: int, float, str, or None when empty)."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[dict[str, object], ...]

    def numbers(self, column: str) -> np.ndarray:
        """float64 [len(rows)]: the column's values, NaN where empty, not numeric, or the column is absent."""
        return np.array([_number(row.get(column)) for row in self.rows], dtype=np.float64)


def write_plots(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw the run's plots into ``run_dir``; returns ``{name: path}`` of those written (names from `PLOTS`).

    - ``fitness.png``: best-so-far and mean fitness per generation (from ``generations.csv``, else from
      ``history.csv``).
    - ``pareto.png``: every feasible candidate on the first two objectives of ``pareto.json``, coloured
      by generation, the front highlighted and connected; a single-objective run plots fitness against
      params (or MACs) with its fitness-vs-cost front instead; skipped if neither column exists.
    - ``diversity.png`` / ``hypervolume.png``: those ``generations.csv`` columns per generation.

    A plot with nothing to show is skipped, and deleted if an earlier call wrote it, so that the folder
    and the report never show a stale picture.
    """
    run_dir = _run_dir(run_dir)
    history = _read_history(run_dir)
    generations = _read_csv(run_dir / GENERATIONS) if (run_dir / GENERATIONS).is_file() else None
    pareto = _read_pareto(run_dir)
    rendered = {
        "fitness": _fitness_png(history, generations),
        "pareto": _pareto_png(history, pareto),
        "diversity": _per_generation_png(generations, "diversity", "diversity (nats)", "Population diversity"),
        "hypervolume": _per_generation_png(
            generations, "hypervolume", "hypervolume", "Hypervolume (fixed reference point)"
        ),
    }
    written = {}
    for name, png in rendered.items():
        path = run_dir / f"{name}.png"
        if png is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, png)
            written[name] = path
    return written


def write_report_html(run_dir: str | os.PathLike, history_rows: int = 50) -> Path:
    """Write ``run_dir/report.html`` and return its path: one page with no external resources.

    Sections: summary (``summary.json`` and evaluation counts by status), best architecture with its
    metrics and final test numbers (``best.json``), the plots already in the folder (``<name>.png`` for
    `PLOTS`, embedded as base64 data URIs; `write_plots` draws them), the Pareto front (``pareto.json``,
    its knee marked), the resolved config (``config.yaml``) and the last ``history_rows`` rows of
    ``history.csv``. All text from the run is HTML-escaped.
    """
    if not isinstance(history_rows, int) or history_rows < 0:
        raise ValueError(f"history_rows (how many last history rows to show): an int >= 0; got {history_rows!r}")
    run_dir = _run_dir(run_dir)
    history = _read_history(run_dir)
    summary = _read_json(run_dir / SUMMARY)
    best = _read_json(run_dir / BEST)
    pareto = _read_pareto(run_dir)
    config = (run_dir / CONFIG).read_text(encoding="utf-8") if (run_dir / CONFIG).is_file() else None
    sections = [
        _summary_section(summary, history),
        _best_section(best) if best is not None else "",
        _baselines_section(best) if best is not None else "",
        _ranking_section(best) if best is not None else "",
        _plots_section(run_dir),
        _pareto_section(pareto) if pareto is not None else "",
        _section("Configuration", f"<pre>{html.escape(config)}</pre>") if config is not None else "",
        _history_section(history, history_rows),
    ]
    title = f"jaxnas search report: {run_dir.name}"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"path\">{html.escape(str(run_dir))}</p>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body>\n</html>\n"
    )
    path = run_dir / REPORT
    atomic_write_text(path, page)
    return path


def write_report(run_dir: str | os.PathLike, history_rows: int = 50) -> Path:
    """`write_plots` then `write_report_html`; returns the path of ``report.html``."""
    write_plots(run_dir)
    return write_report_html(run_dir, history_rows)


def _run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"run folder {str(path)!r} does not exist or is not a folder; pass the folder a search run "
            f"wrote its results to (the run's output setting, e.g. runs/<name>)"
        )
    if not (path / HISTORY).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {HISTORY}, so there is nothing to report: pass the folder of a search run "
            f"(`python -m jaxnas.search` writes {HISTORY} there after its first generation)"
        )
    return path


def _read_history(run_dir: Path) -> _Csv:
    history = _read_csv(run_dir / HISTORY)
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise ValueError(
            f"{history.path} lacks the column(s) {missing}: its header must start with "
            f"{','.join(HISTORY_COLUMNS)} followed by the metric columns; got {','.join(history.columns)}"
        )
    return history


def _read_csv(path: Path) -> _Csv:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path} is empty: expected a header line and one row per record")
        columns = tuple(reader.fieldnames)
        rows = tuple(
            {c: (row.get(c) if c in _TEXT_COLUMNS else _cell(row.get(c))) for c in columns} for row in reader
        )
    return _Csv(path, columns, rows)


def _cell(text: str | None) -> object:
    """A CSV cell as int, float (incl. nan / inf), str, or None when empty or missing."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _number(value: object) -> float:
    """``value`` as a float, NaN if it is not a number (None, text, bool)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it to leave its section out of the report"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (a dict), got {type(data).__name__}")
    return data


def _read_pareto(run_dir: Path) -> dict | None:
    """``pareto.json`` with ``objectives`` turned into `Objective`s and ``front`` defaulting to []."""
    pareto = _read_json(run_dir / PARETO)
    if pareto is None:
        return None
    path = run_dir / PARETO
    specs = pareto.get("objectives")
    if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s for s in specs):
        raise ValueError(
            f"{path}: 'objectives' must be a list of {{\"name\": ..., \"direction\": \"max\" | \"min\"}}, "
            f"got {specs!r}"
        )
    front = pareto.get("front", [])
    if not isinstance(front, list) or not all(isinstance(p, dict) for p in front):
        raise ValueError(f"{path}: 'front' must be a list of {{\"arch\", \"generation\", \"values\"}} objects")
    objectives = [Objective(s["name"], s.get("direction", "max")) for s in specs]
    return {**pareto, "objectives": objectives, "front": front}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _new_axes(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _fitness_png(history: _Csv, generations: _Csv | None) -> bytes | None:
    if generations is not None and "best_fitness" in generations.columns:
        order = np.argsort(generations.numbers("generation"), kind="stable")
        gens = generations.numbers("generation")[order]
        best = _finite_or_nan(generations.numbers("best_fitness")[order])
        mean = _finite_or_nan(generations.numbers("mean_fitness")[order])
    else:
        feasible = np.array([row["status"] in EVALUATED for row in history.rows], dtype=bool)
        all_gens = history.numbers("generation")
        fitness = np.where(feasible, _finite_or_nan(history.numbers("fitness")), np.nan)
        gens = np.unique(all_gens[np.isfinite(all_gens)])
        per_generation = [fitness[all_gens == g] for g in gens]
        best = np.array([np.nanmax(f) if np.isfinite(f).any() else np.nan for f in per_generation])
        mean = np.array([np.nanmean(f) if np.isfinite(f).any() else np.nan for f in per_generation])
    if not np.isfinite(best).any() and not np.isfinite(mean).any():
        return None
    figure, axes = _new_axes("Fitness per generation", "generation", "fitness (higher is better)")
    # fmax skips NaN, so a generation where everything failed keeps the best found so far.
    axes.plot(gens, np.fmax.accumulate(best), marker="s", ms=4, color="tab:red", lw=2, label="best so far")
    axes.plot(gens, mean, marker="o", ms=3, color="tab:blue", label="generation mean")
    axes.xaxis.set_major_locator(_integer_locator())
    axes.legend()
    return _png(figure)


def _pareto_png(history: _Csv, pareto: dict | None) -> bytes | None:
    objectives = pareto["objectives"] if pareto is not None else []
    feasible = np.array([row["status"] in EVALUATED for row in history.rows], dtype=bool)
    if len(objectives) >= 2:
        x_objective, y_objective = objectives[:2]
        candidates = np.stack([history.numbers(x_objective.name), history.numbers(y_objective.name)], 1)
        front = np.array(
            [[_number(p.get("values", {}).get(o.name)) for o in (x_objective, y_objective)] for p in pareto["front"]],
            dtype=np.float64,
        ).reshape(-1, 2)
        title = "Pareto front" + (f" (first two of {len(objectives)} objectives)" if len(objectives) > 2 else "")
        front_label = "Pareto front"
    else:
        cost = next((c for c in COST_COLUMNS if c in history.columns), None)
        if cost is None:
            return None
        x_objective, y_objective = Objective(cost, "min"), Objective("fitness", "max")
        candidates = np.stack([history.numbers(cost), history.numbers("fitness")], 1)
        on_front = pareto_mask(np.where(feasible[:, None], candidates, np.nan), [x_objective, y_objective])
        front = candidates[on_front]
        title, front_label = f"Fitness against {cost}", f"non-dominated (fitness vs {cost})"
    shown = feasible & np.all(np.isfinite(candidates), axis=1)
    front = front[np.all(np.isfinite(front), axis=1)]
    if not shown.any() and len(front) == 0:
        return None
    figure, axes = _new_axes(title, _axis_label(x_objective), _axis_label(y_objective))
    if shown.any():
        points = axes.scatter(
            candidates[shown, 0], candidates[shown, 1], c=history.numbers("generation")[shown],
            cmap="viridis", s=14, alpha=0.6, label="evaluated candidates",
        )
        colorbar = figure.colorbar(points, ax=axes, label="generation")
        colorbar.locator = _integer_locator()
        colorbar.update_ticks()
    if len(front):
        front = front[np.argsort(front[:, 0], kind="stable")]
        axes.plot(front[:, 0], front[:, 1], "-o", color="tab:red", ms=6, lw=1.5, label=front_label)
    for axis, column in ((axes.xaxis, 0), (axes.yaxis, 1)):
        values = np.concatenate([candidates[shown, column], front[:, column]])
        # Params and MACs of a space often span decades; a linear axis would crush the small models.
        if values.min() > 0 and values.max() / values.min() > 100:
            (axes.set_xscale if axis is axes.xaxis else axes.set_yscale)("log")
    axes.legend(loc="best")
    return _png(figure)


def _axis_label(objective: Objective) -> str:
    return f"{objective.name} ({'higher' if objective.direction == 'max' else 'lower'} is better)"


def _per_generation_png(generations: _Csv | None, column: str, ylabel: str, title: str) -> bytes | None:
    if generations is None or column not in generations.columns:
        return None
    gens, values = generations.numbers("generation"), _finite_or_nan(generations.numbers(column))
    if not np.isfinite(values).any():
        return None
    order = np.argsort(gens, kind="stable")
    figure, axes = _new_axes(title, "generation", ylabel)
    axes.plot(gens[order], values[order], marker="o", ms=3, color="tab:green")
    axes.xaxis.set_major_locator(_integer_locator())
    return _png(figure)


def _section(title: str, body: str) -> str:
    return f"<section>\n<h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _text(value: object) -> str:
    """A value as display text (not yet escaped): ints with thousands separators, floats to 6 digits."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _value_html(value: object) -> str:
    if isinstance(value, dict):
        return _key_value_table(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        # A matrix such as a confusion matrix (rows: true class, columns: predicted) reads as a grid.
        cells = ("".join(f'<td class="num">{_value_html(v)}</td>' for v in row) for row in value)
        rows = "".join(f"<tr>{c}</tr>" for c in cells)
        return f"<table class=\"matrix\">{rows}</table>"
    return html.escape(_text(value))


def _key_value_table(mapping: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value_html(v)}</td></tr>" for k, v in mapping.items())
    return f"<table class=\"kv\">{rows}</table>"


def _table(header: list[str], rows: list[list[object]], numeric: list[bool] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    numeric = numeric or [False] * len(header)
    cell = ("<td>", '<td class="num">')
    body = "".join(
        "<tr>" + "".join(f"{cell[n]}{_value_html(v)}</td>" for v, n in zip(row, numeric)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_section(summary: dict | None, history: _Csv) -> str:
    counts = Counter(row["status"] for row in history.rows)
    ordered = [s for s in STATUSES if s in counts] + sorted(s for s in counts if s not in STATUSES)
    evaluations = {"total": len(history.rows), **{str(s): counts[s] for s in ordered}}
    return _section("Summary", _key_value_table({**(summary or {}), "evaluations (history.csv)": evaluations}))


def _best_section(best: dict) -> str:
    if best.get("arch") is None:
        return _section("Best architecture", "<p>No feasible candidate was evaluated.</p>")
    parts = [
        f"<p class=\"arch\"><code>{html.escape(_text(best.get('arch')))}</code></p>",
        _key_value_table({"fitness": best.get("fitness"), "generation": best.get("generation")}),
    ]
    if isinstance(best.get("metrics"), dict) and best["metrics"]:
        parts.append(f"<h3>Metrics during search</h3>{_key_value_table(best['metrics'])}")
    if isinstance(best.get("final"), dict) and best["final"]:
        parts.append(f"<h3>Final (test split)</h3>{_key_value_table(best['final'])}")
    return _section("Best architecture", "\n".join(parts))


def _final(best: dict) -> dict:
    final = best.get("final")
    return final if isinstance(final, dict) else {}


def _seeds_cell(summary: object) -> str:
    """A per-seed summary {"mean", "std", "seeds"} as 'mean +- std (n seeds)'."""
    if not isinstance(summary, dict) or "mean" not in summary:
        return _text(summary)
    return f"{_text(summary['mean'])} \u00b1 {_text(summary.get('std'))} ({summary.get('seeds')} seeds)"


def _baselines_section(best: dict) -> str:
    """The winner next to the baselines, all retrained with the final recipe: what the search bought."""
    final = _final(best)
    baselines = final.get("baselines")
    if not isinstance(baselines, dict) or not baselines:
        return ""
    winner = next((r for r in final.get("retrained", []) if r.get("arch") == final.get("arch")), None)
    test, val = ("test_ppl", "val_ppl") if "test_ppl" in final else ("test_accuracy", "val_accuracy")
    rows = []
    if winner is not None:
        rows.append(["search winner", final.get("arch"), final.get("params"), _seeds_cell(winner.get(test)),
                     _seeds_cell(winner.get(val))])
    for name, b in baselines.items():
        rows.append([name, b.get("arch"), b.get("params"), _seeds_cell(b.get(test)), _seeds_cell(b.get(val))])
    named = ("test perplexity", "validation perplexity") if test == "test_ppl" else ("test accuracy",
                                                                                      "validation accuracy")
    table = _table(["", "arch", "params", *named], rows, [False, False, True, True, True])
    note = ("<p>Every row retrained from scratch with the final recipe over the same seeds; largest: the largest "
            "network of the space; random: the best of search.budget random architectures by the same scores.</p>")
    return _section("Winner vs baselines", note + table)


def _ranking_section(best: dict) -> str:
    """Ranking fidelity: the search's cheap scores against stand-alone training of a control sample."""
    ranking = _final(best).get("ranking")
    if not isinstance(ranking, dict) or not ranking:
        return ""
    described = {k: ranking.get(k) for k in ("score", "reference", "kendall_tau", "spearman", "params_kendall_tau",
                                            "synflow_kendall_tau", "n")}
    warning = (f"<p class=\"warning\"><strong>Warning:</strong> {html.escape(str(ranking['warning']))}</p>"
               if ranking.get("warning") else "")
    rows = [[c.get("arch"), c.get("score"), c.get("standalone")] for c in ranking.get("control", [])]
    reference = "stand-alone " + ("-test perplexity" if "perplexity" in str(ranking.get("reference")) else
                                  "test accuracy")
    table = _table(["arch", "search score", reference], rows, [False, True, True]) if rows else ""
    return _section("Ranking fidelity", warning + _key_value_table(described) + "\n" + table)


def _plots_section(run_dir: Path) -> str:
    figures = []
    for name in PLOTS:
        path = run_dir / f"{name}.png"
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            figures.append(
                f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(name)} plot\">"
                f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
            )
    return _section("Plots", "\n".join(figures)) if figures else ""


def _pareto_section(pareto: dict) -> str:
    objectives: list[Objective] = pareto["objectives"]
    front = pareto["front"]
    described = {
        "objectives": ", ".join(str(o) for o in objectives),
        "reference": pareto.get("reference"),
        "hypervolume": pareto.get("hypervolume"),
        "front size": len(front),
    }
    knee = pareto.get("knee")  # chosen by the run (pareto.json); the report only renders it
    header = ["arch", "generation", *(f"{o.name} ({o.direction})" for o in objectives), "note"]
    rows = [
        [p.get("arch"), p.get("generation"), *(p.get("values", {}).get(o.name) for o in objectives)]
        + ["knee" if knee is not None and p.get("arch") == knee else ""]
        for p in front
    ]
    numeric = [False, True, *([True] * len(objectives)), False]
    table = _table(header, rows, numeric) if rows else "<p>The front is empty.</p>"
    return _section("Pareto front", _key_value_table(described) + "\n" + table)


def _history_section(history: _Csv, last: int) -> str:
    rows = history.rows[len(history.rows) - min(last, len(history.rows)) :]
    header = list(history.columns)
    numeric = [c not in _TEXT_COLUMNS for c in header]
    caption = f"<p>Last {len(rows)} of {len(history.rows)} evaluations.</p>"
    table = _table(header, [[r.get(c) for c in header] for r in rows], numeric) if rows else ""
    return _section("History", caption + table)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.path { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f3f3f3; }
table.kv th { background: #fafafa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; }
.arch code { background: #f6f6f6; padding: 0.3em 0.5em; word-break: break-all; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
figure { display: inline-block; margin: 0.5em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.85em; text-align: center; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5em 0.8em; }
"""

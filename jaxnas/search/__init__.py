"""The search run: strategies driven over a space, evaluated, checkpointed and reported.

    from jaxnas.search import run_search
    summary = run_search(load_config(RunConfig, "configs/quick.yaml"))   # what python -m jaxnas.search does

Modules: `loop` (the run), `evaluate` (modes table / train / oneshot and the final retraining), `models` (one
surface over a space's supernets), `strategies` (the configured strategy), `objectives` (metrics and
constraints), `pareto` (fronts, hypervolume, knee, preference), `checkpoint` (Orbax), `export` (the best
model), `report` (plots and report.html).
"""

from jaxnas.search.export import LoadedModel, load_model
from jaxnas.search.loop import RunError, run_search

__all__ = ["LoadedModel", "RunError", "load_model", "run_search"]

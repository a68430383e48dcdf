"""The search run: strategies driven over a space, evaluated, checkpointed and reported.

    from jaxnas.search import run_search
    summary = run_search(load_config(RunConfig, "configs/quick.yaml"))   # what python -m jaxnas.search does

Modules: `loop` (the run), `evaluate` (modes table / train / oneshot and the final retraining), `models` (one
surface over a space's supernets), `strategies` (the configured strategy), `objectives` (metrics and
constraints), `pareto` (fronts, hypervolume, knee, preference), `checkpoint` (Orbax), `export` (the best
model), `report` (plots and report.html).

The names below are imported on first use, so ``python -m jaxnas.search`` checks its config before it pays for
jax, orbax and matplotlib (a bad config fails at once).
"""

__all__ = ["LoadedModel", "RunError", "load_model", "run_search"]


def __getattr__(name):
    if name in ("LoadedModel", "load_model"):
        from jaxnas.search import export

        return getattr(export, name)
    if name in ("RunError", "run_search"):
        from jaxnas.search import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'jaxnas.search' has no attribute {name!r}")

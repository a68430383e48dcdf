"""Tabular benchmarks shipped with jaxnas: ``<name>.csv`` (read by `jaxnas.tables`) and ``<name>.json`` (its source and column meanings)."""

"""jaxnas.compiled: a long-lived process drops JAX's compiled programs before it reaches the kernel's cap on memory
mappings (vm.max_map_count), where a failed compilation crashed the interpreter."""

import jax
import jax.numpy as jnp
import pytest

from jaxnas import compiled


@jax.jit
def _gram(a):
    return jnp.tanh(a @ a.T)


def _compile_some(n):
    """n programs JAX keeps cached: one per input shape of a jitted function that stays alive."""
    for rows in range(1, n + 1):
        _gram(jnp.ones((rows, 3))).block_until_ready()


def test_counts_this_process_mappings_and_reads_the_cap():
    before = compiled.mapping_count()
    assert before is not None and before > 10 and compiled.mapping_limit() > 0
    _compile_some(40)
    assert compiled.mapping_count() > before + 40  # each compiled program keeps mappings while JAX caches it


def test_releases_compiled_programs_past_the_share_of_the_cap(tmp_path, monkeypatch):
    _compile_some(40)
    crowded = compiled.mapping_count()
    monkeypatch.setattr(compiled, "_LIMIT", tmp_path / "max_map_count")
    (tmp_path / "max_map_count").write_text(f"{crowded * 4}\n")
    assert not compiled.release_if_crowded(share=0.5)  # a quarter of the cap: nothing to do
    (tmp_path / "max_map_count").write_text(f"{crowded}\n")
    said = []
    assert compiled.release_if_crowded(share=0.5, log=said.append)
    assert compiled.mapping_count() < crowded - 40  # the 40 programs' mappings are gone
    assert len(said) == 1 and "vm.max_map_count" in said[0] and str(crowded) in said[0]
    assert float(jax.jit(lambda a: a.sum())(jnp.ones(3))) == 3.0  # jitted code still runs: it compiles again


def test_does_nothing_where_the_counts_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "_MAPS", tmp_path / "no-such-file")
    assert compiled.mapping_count() is None and not compiled.release_if_crowded(share=0.01)
    monkeypatch.setattr(compiled, "_LIMIT", tmp_path / "no-such-file")
    assert compiled.mapping_limit() is None
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\], got 0"):
        compiled.release_if_crowded(share=0)


def test_a_search_that_releases_its_programs_every_generation_ends_exactly_as_one_that_never_does(
        tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from jaxnas.search.__main__ import main

    table = str(Path(__file__).resolve().parents[1] / "configs" / "nb201_table.yaml")
    args = ["--config", table, "search.strategy=evolution", "search.budget=24", "search.population=6",
            "progress=false"]
    assert main([*args, f"output={tmp_path / 'kept'}"]) == 0
    assert "released JAX's compiled programs" not in capsys.readouterr().out
    (tmp_path / "max_map_count").write_text("1\n")  # every generation is past the share: release each time
    monkeypatch.setattr(compiled, "_LIMIT", tmp_path / "max_map_count")
    assert main([*args, f"output={tmp_path / 'released'}"]) == 0
    assert capsys.readouterr().out.count("released JAX's compiled programs") == 4  # 24 queries, 6 per generation
    for name in ("history.csv", "generations.csv", "best.json", "pareto.json"):
        assert (tmp_path / "released" / name).read_text() == (tmp_path / "kept" / name).read_text()

"""Language-model search (space.name=lm on text): config rules, a mode-train run end to end (history, best.json's
test and quantised perplexities, export + load_model + generate), its exact resume, and the population's scores
against each candidate's own twin."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from interop.config import load_config
from jaxnas import load_model
from jaxnas import population as pop
from jaxnas.config import RunConfig
from jaxnas.data import load_text
from jaxnas.search.__main__ import main
from jaxnas.search.evaluate import twin_lm_loss
from jaxnas.search.models import build_space, model_for

ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = ["space.max_layers=1", "space.hidden=[8,16]", "space.heads=[1,2]", "space.kv_heads=[1]",
              "space.ffn_mults=[1,2]", "space.mixers=[attention,recurrent]", "space.positions=[rope]",
              "space.lm_activations=[gelu]"]
TINY_DATA = ["data.seq_len=16", "data.train_stride=4096"]
RUN = ["--config", str(ROOT / "configs" / "lm.yaml"), *TINY_DATA, *TINY_SPACE, "search.population=2",
       "search.budget=4", "train.epochs=1", "final.top_k=2", "final.epochs=1", "final.baselines=[]", "progress=false"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["space.name=lm", "data.name=mnist5k"], "space.name=lm searches language models on text"),
        (["space.name=macro", "data.name=text:pydoc"], "only space.name=lm searches"),
        (["objectives.objectives=[val_accuracy]"], "objectives.objectives names val_accuracy, an image metric"),
        (["objectives.constraints=[macs<=100]"], "objectives.constraints names macs"),
        (["search.prefilter=synflow"], "search.prefilter=synflow is not available for space.name=lm"),
        (["objectives.quant=int2"], "objectives.quant"),
    ],
)
def test_text_and_lm_combinations_it_cannot_run_are_refused_in_one_line(tmp_path, capsys, overrides, says):
    assert main([*RUN, f"output={tmp_path / 'bad'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_lm_config_defaults_to_perplexity_objectives_and_image_configs_are_unchanged():
    lm = load_config(RunConfig, None, ["space.name=lm", "data.name=text:pydoc"])
    assert lm.objectives.objectives == ("val_ppl:min", "params:min")
    assert load_config(RunConfig, None, []).objectives.objectives == ("val_accuracy", "params:min")
    text = lm.data.text_config()
    assert (text.name, text.seq_len, text.tokenizer) == ("text:pydoc", 128, "bytes")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    assert main([*RUN, f"output={out}"]) == 0
    return out


def test_lm_run_writes_perplexities_and_its_model_generates_text(lm_run):
    with (lm_run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["generation", "index", "arch", "status", "fitness", "val_ppl", "val_loss", "params",
                             "macs_per_token", "kv_bytes_per_token", "size_bytes", "epochs", "cached_from"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert math.isclose(float(r["val_ppl"]), math.exp(float(r["val_loss"])), rel_tol=1e-9)
        assert float(r["fitness"]) == -float(r["val_ppl"])
        assert int(float(r["size_bytes"])) < 4 * int(float(r["params"]))  # int8 matrices, float32 vectors
    best = json.loads((lm_run / "best.json").read_text())
    final = best["final"]
    assert final["test_ppl"] > 1 and final["quant"]["precision"] == "int8"
    # measured, not assumed: the dequantised twin is close to, but not exactly, the float32 one
    assert final["quant"]["test_ppl"] != final["quant"]["fp32_test_ppl"]
    assert math.isclose(final["quant"]["test_ppl"], final["test_ppl"], rel_tol=0.05)
    assert math.isclose(final["quant"]["fp32_test_ppl"], final["test_ppl"], rel_tol=1e-4)
    assert final["quant"]["size_bytes"] == final["size_bytes"]
    summary = json.loads((lm_run / "summary.json").read_text())
    assert summary["test_ppl"] == final["test_ppl"] and summary["space"] == "lm"
    assert (lm_run / "report.html").is_file() and (lm_run / "model" / "weights.int8.safetensors").is_file()

    model = load_model(lm_run)
    assert model.arch == final["arch"]
    text = model.generate("The ", 12)
    assert isinstance(text, str) and 1 <= len(text) <= 12
    ids = model.generate(model.tokenizer.encode("The "), 12)
    assert ids.shape == (4 + 12,)
    assert text == model.tokenizer.decode(ids[4:])
    # greedy decoding with the cache = the argmax of the full (causal) forward at every generated position
    np.testing.assert_array_equal(np.argmax(model(ids[None, :-1])[0, 3:], -1), ids[4:])
    # the run wrote its portable StableHLO file: token ids in, the twin's logits out
    from jaxnas.export import load_stablehlo

    np.testing.assert_allclose(np.asarray(load_stablehlo(lm_run)(ids[None, :16])), np.asarray(model(ids[None, :16])),
                               rtol=1e-5, atol=1e-5)


def test_lm_run_resumes_from_a_checkpoint_exactly(lm_run, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(lm_run, cut)
    last = max(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(cut / "checkpoints" / str(last))
    for name in ("summary.json", "best.json"):
        (cut / name).unlink()
    assert main(["--resume", str(cut)]) == 0
    for name in ("history.csv", "generations.csv"):
        assert (cut / name).read_text() == (lm_run / name).read_text()
    with ocp.StandardCheckpointer() as checkpointer:
        a, b = (checkpointer.restore((out / "checkpoints" / str(last) / "state").resolve()) for out in (cut, lm_run))
    chex.assert_trees_all_equal(a, b)
    assert json.loads((cut / "best.json").read_text())["final"]["arch"] == \
        json.loads((lm_run / "best.json").read_text())["final"]["arch"]


def test_population_scores_of_an_lm_equal_each_candidates_own_twin():
    """The masked population's mean token NLL (vmapped, params_P) equals each candidate's twin on the same
    windows, and a candidate's score does not depend on the population it is scored in."""
    cfg = load_config(RunConfig, None, ["space.name=lm", "data.name=text:pydoc", *TINY_SPACE, "space.max_layers=2",
                                        "space.mixers=[attention,linear,recurrent]", "space.positions=[rope,alibi]"])
    space = build_space(cfg.space)
    data = load_text("text:pydoc", seq_len=16, train_stride=2048)
    model = model_for(space, cfg.space, (16,), data.info.vocab_size)
    encs = np.asarray(space.sample(jax.random.key(3), 4))
    params_P = pop.init_population(model.init, jax.random.key(0), 4)
    vx, vy = data.validation.inputs[:50], data.validation.targets[:50]
    scores = pop.evaluate_population(model.apply, params_P, encs, vx, vy, batch_size=16)
    for p, enc in enumerate(encs):
        one = jax.tree.map(lambda a, p=p: a[p], params_P)
        _, twin = model.extract(one, enc)
        np.testing.assert_allclose(float(scores["loss"][p]), twin_lm_loss(twin, vx, vy), rtol=2e-5,
                                   err_msg=space.to_string(enc))
        alone = pop.evaluate_population(model.apply, jax.tree.map(lambda a: a[None], one), enc[None], vx, vy,
                                        batch_size=16)
        np.testing.assert_allclose(alone["loss"][0], scores["loss"][p], rtol=1e-6)
        np.testing.assert_allclose(alone["accuracy"][0], scores["accuracy"][p], rtol=1e-6)


def test_lm_run_with_successive_halving_promotes_by_validation_loss(tmp_path):
    """train.fidelity=successive_halving on LMs: every candidate trains the first rung, the best half by validation
    loss (lower perplexity) goes on to the full epochs."""
    out = tmp_path / "run"
    args = [*RUN, "search.budget=4", "search.population=4", "train.epochs=2", "train.fidelity=successive_halving",
            "final.top_k=0", f"output={out}"]
    assert main(args) == 0
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["epochs"]) for r in rows) == [1, 1, 2, 2]
    promoted = [float(r["val_ppl"]) for r in rows if r["epochs"] == "2"]
    stopped = [float(r["val_ppl"]) for r in rows if r["epochs"] == "1"]
    assert max(promoted) < min(stopped)


def test_lm_oneshot_run_scores_inherited_weights_and_measures_decode_latency(tmp_path):
    """Mode oneshot: the LM supernet trained with the sandwich rule, candidates scored by validation perplexity
    on inherited weights; latency_ms_per_token measured on each candidate's twin (cached decode steps)."""
    out = tmp_path / "oneshot"
    assert main([*RUN, f"output={out}", "mode=oneshot", "supernet.epochs=1", "supernet.batch_size=16",
                 "supernet.sampler=sandwich", "final.top_k=0", "objectives.latency_repeats=3",
                 "objectives.objectives=[val_ppl:min,latency_ms_per_token:min]"]) == 0
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert "latency_ms_per_token" in rows[0] and len(rows) == 4
    for r in rows:
        assert r["status"] == "ok" and 1 < float(r["val_ppl"]) < 1e4 and float(r["latency_ms_per_token"]) > 0
    losses = json.loads((out / "supernet" / "losses.json").read_text())["mean_loss_per_epoch"]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert json.loads((out / "summary.json").read_text())["best_val_ppl"] == min(float(r["val_ppl"]) for r in rows)

"""benchmarks/lm_reference.py: the PyTorch `TorchLM` computes `TwinLM`'s logits for every norm, activation, mixer,
position and head grouping; `train_sequential` trains on the given batch order, its first loss is the twin's and
one Adam step moves both frameworks to the same logits."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxnas.data import epoch_indices
from jaxnas.spaces import LMArch, lm_space
from jaxnas.supernet import LMSupernet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lm_reference import TorchLM, torch_lm_from_twin, train_sequential, twin_arch

VOCAB, SEQ = 50, 12


def _arch(hidden, norm, activation, mixer, position=None, heads=(), kv_heads=(), ffn_mult=(1,)):
    arch = {"layers": len(ffn_mult), "hidden": hidden, "norm": norm, "activation": activation, "mixer": mixer}
    if position is not None:
        arch["position"] = position
    for i, mult in enumerate(ffn_mult, 1):
        if heads:
            arch[f"layer{i}.heads"], arch[f"layer{i}.kv_heads"] = heads[i - 1], kv_heads[i - 1]
        arch[f"layer{i}.ffn_mult"] = mult
    return arch


# Every mixer x allowed position, both norms, every activation, MHA / GQA / MQA, layers of different head counts.
ARCHS = {
    "attention-learned": _arch(16, "layernorm", "gelu", "attention", "learned", (2,), (2,)),
    "attention-rope-gqa-mqa": _arch(32, "rmsnorm", "swiglu", "attention", "rope", (4, 2), (2, 1), (2, 1)),
    "attention-alibi": _arch(32, "layernorm", "geglu", "attention", "alibi", (4, 2), (1, 2), (1, 2)),
    "attention-rope-mha": _arch(16, "layernorm", "silu", "attention", "rope", (4,), (4,)),
    "linear-learned": _arch(32, "rmsnorm", "silu", "linear", "learned", (4,), (2,)),
    "linear-rope": _arch(32, "layernorm", "swiglu", "linear", "rope", (2, 4), (1, 2), (1, 2)),
    "recurrent-rmsnorm": _arch(32, "rmsnorm", "geglu", "recurrent", ffn_mult=(2, 1)),
    "recurrent-layernorm": _arch(16, "layernorm", "gelu", "recurrent"),
}


@pytest.fixture(scope="module")
def supernet():
    space = lm_space(max_layers=2, hidden=(16, 32), heads=(2, 4), kv_heads=(1, 2, 4), ffn_mults=(1, 2))
    sup = LMSupernet(space, vocab_size=VOCAB, seq_len=SEQ)
    return sup, sup.init(jax.random.key(0))


def _twin(supernet, name, noise=0.05):
    """The twin of ARCHS[name] with every parameter perturbed (zero positions, unit scales, zero biases would hide
    layout mistakes)."""
    sup, params = supernet
    enc = sup.space.encode(ARCHS[name])
    _, twin = sup.extract(params, enc)
    rng = np.random.default_rng(list(ARCHS).index(name))
    state = nnx.state(twin, nnx.Param)
    nnx.update(twin, jax.tree.map(lambda a: a + noise * rng.standard_normal(a.shape).astype(np.float32), state))
    return sup.arch(enc), twin


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def _close(a, b, rel):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= rel * max(1.0, np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_twin(supernet, name):
    arch, twin = _twin(supernet, name)
    sup = supernet[0]
    model = torch_lm_from_twin(twin, arch, vocab_size=sup.vocab_size, positions=sup.seq_len)
    assert twin_arch(twin)[0] == arch == model.arch == torch_lm_from_twin(twin).arch
    tokens = _tokens((3, SEQ))
    with torch.no_grad():
        mine = model(torch.from_numpy(tokens).long()).numpy()
    forward = _jit(twin, lambda twin, tokens: twin(tokens))
    theirs = np.asarray(forward(tokens))
    assert mine.shape == theirs.shape == (3, SEQ, VOCAB)
    _close(mine, theirs, 1e-5)  # agreement is ~1e-6; exact-erf gelu would be off by ~1e-4
    with torch.no_grad():  # shorter sequences (a prefix of the learned table, RoPE / ALiBi of fewer tokens)
        _close(model(torch.from_numpy(tokens[:, :5]).long()).numpy(), forward(tokens[:, :5]), 1e-5)


def test_from_twin_checks_the_given_sizes(supernet):
    arch, twin = _twin(supernet, "attention-learned")
    with pytest.raises(ValueError, match="not the twin's"):
        torch_lm_from_twin(twin, dataclasses.replace(arch, hidden=32))
    with pytest.raises(ValueError, match="learned rows"):
        torch_lm_from_twin(twin, arch, positions=SEQ + 1)
    with pytest.raises(ValueError, match="vocab_size"):
        torch_lm_from_twin(twin, vocab_size=VOCAB + 1)


def test_standalone_model_runs():
    arch = LMArch(1, 16, "layernorm", "gelu", "attention", "alibi", (2,), (1,), (1,))
    logits = TorchLM(arch, vocab_size=VOCAB, positions=SEQ)(torch.zeros(2, SEQ, dtype=torch.long))
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()


def _jit(twin, fn):
    """fn(twin, *args) jitted over the twin's state (one compile instead of op-by-op eager dispatch)."""
    graphdef, state = nnx.split(twin)
    compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: compiled(state, *args)


def _jax_loss(twin, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(twin(jnp.asarray(x)), jnp.asarray(y)).mean()


def _data(n, seed):
    seqs = _tokens((n, SEQ + 1), seed)
    return seqs[:, :-1], seqs[:, 1:]


def test_train_sequential(supernet):
    names = ("attention-rope-gqa-mqa", "recurrent-rmsnorm")
    twins = [_twin(supernet, name)[1] for name in names]
    models = [torch_lm_from_twin(twin) for twin in twins]
    (x, y), (vx, vy) = _data(24, 1), _data(10, 2)
    order = epoch_indices(24, 8, seed=0, epoch=0)
    assert order.shape == (3, 8)
    results = train_sequential(models, x, y, vx, vy, epochs=1, batch_size=8, lr=1e-2, batches=[order])
    assert len(results) == 2
    for result, twin in zip(results, twins, strict=True):
        assert len(result["step_losses"]) == 3
        assert np.isfinite([result["train_loss"], result["val_loss"], *result["step_losses"]]).all()
        assert result["train_loss"] == pytest.approx(np.mean(result["step_losses"]), rel=1e-6)
        first = float(_jit(twin, _jax_loss)(x[order[0]], y[order[0]]))
        assert result["step_losses"][0] == pytest.approx(first, rel=1e-5)


@pytest.mark.parametrize("name", ["attention-alibi", "linear-rope", "recurrent-layernorm"])
def test_one_adam_step_matches_optax(supernet, name):
    _, twin = _twin(supernet, name)
    model = torch_lm_from_twin(twin)
    (x, y), lr = _data(8, 3), 1e-3
    order = np.arange(8, dtype=np.int32)[None]
    train_sequential([model], x, y, x, y, epochs=1, batch_size=8, lr=lr, batches=[order])

    graphdef, params, rest = nnx.split(twin, nnx.Param, ...)

    @jax.jit
    def stepped_logits(params, tokens):
        def loss(p):
            return _jax_loss(nnx.merge(graphdef, p, rest), x, y)

        optimizer = optax.adam(lr)
        updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params), params)
        stepped = nnx.merge(graphdef, optax.apply_updates(params, updates), rest)
        return stepped(tokens), nnx.merge(graphdef, params, rest)(tokens)

    tokens = _tokens((3, SEQ), 4)
    with torch.no_grad():
        mine = model(torch.from_numpy(tokens).long()).numpy()
    after, before = stepped_logits(params, tokens)
    _close(mine, after, 1e-3)
    assert np.abs(mine - np.asarray(before)).max() > 1e-3  # the step did move the logits

"""The exported best model: the compact standalone twin's state (Orbax) plus its architecture (JSON).

    <run>/model/arch.json   canonical string, encoding, the space and data settings, recorded metrics
    <run>/model/state/      the twin's parameters and BatchNorm statistics (Orbax)
    <run>/model/model.stablehlo(.json)  the twin as one portable StableHLO file (runs with only jax; `jaxnas.export`)

``jaxnas.load_model(path)`` rebuilds the twin from ``arch.json`` and restores its state; the result is an
ordinary Flax NNX module: ``model(x [B, H, W, C] float32) -> logits [B, classes]``.

Language models (space lm) export the `TwinLM` the same way (its StableHLO file maps token ids [b, seq_len] to
next-token logits), with ``arch.json["text"]`` = {name, tokenizer, vocab_size, seq_len} and the weights also stored at
objectives.quant as ``weights.<precision>.safetensors`` (`jaxnas.quant.save`: layer indices as string keys).
They load as `LoadedLM`: ``model(tokens [B, T]) -> logits [B, T, vocab]`` and ``model.generate(text, n_new)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interop._atomic import atomic_write_text
from interop.config import ConfigError, from_dict, to_dict
from interop.jsonsafe import json_safe
from jaxnas.config import SpaceConfig
from jaxnas.distributed import is_primary
from jaxnas.search.checkpoint import load_arrays, save_arrays
from jaxnas.search.models import SearchModel, build_space, model_for

_STATE_FILTER = nnx.Any(nnx.Param, nnx.BatchStat)


def export_model(folder: str | Path, model: SearchModel, space_cfg: SpaceConfig, enc, params, bn_stats, record: dict,
                 *, quantised=None):
    """Write the twin of ``enc`` (sliced from candidate ``params`` with its statistics) into ``folder``; a language
    model's ``quantised`` weights (`jaxnas.quant.QuantizedParams` of the twin's parameters) go next to it."""
    folder = Path(folder)
    _, twin = model.extract(params, enc, bn_stats)
    twin.eval()
    save_arrays(folder / "state", nnx.state(twin, _STATE_FILTER).to_pure_dict())
    meta = {
        "arch": model.space.to_string(np.asarray(enc)),
        "encoding": np.asarray(enc).astype(int).tolist(),
        "space": to_dict(space_cfg),
        "image_shape": list(model.image_shape),
        "num_classes": model.num_classes,
        **record,
    }
    if is_primary():  # the state above is written by every process together (Orbax)
        atomic_write_text(folder / "arch.json", json.dumps(json_safe(meta), indent=2) + "\n")
        if "text" in meta and quantised is not None:  # a language model's weights at objectives.quant
            from jaxnas import quant

            leaves, treedef = jax.tree.flatten(_string_keys(jax.tree.unflatten(quantised.treedef, quantised.leaves)))
            quant.save(quant.QuantizedParams(quantised.precision, treedef, tuple(leaves)),
                       folder / f"weights.{quantised.precision}.safetensors")
        from jaxnas.export import export_stablehlo  # lazy: jaxnas.export imports this module

        export_stablehlo(LoadedModel(twin, meta["arch"], meta, folder))  # one trace + serialise of the twin


@dataclasses.dataclass
class LoadedModel:
    """A loaded best model: ``twin`` (nnx.Module), its canonical ``arch`` string, the recorded ``meta`` and the
    ``folder`` (``<run>/model``) it was loaded from."""

    twin: nnx.Module
    arch: str
    meta: dict
    folder: Path | None = None

    def __call__(self, x) -> jax.Array:
        """logits [B, classes] of images ``x`` [B, H, W, C] float32."""
        return self.twin(jnp.asarray(x, jnp.float32))

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """int32 [B] predicted classes, in batches (compiled once per batch shape, reused across calls)."""
        forward, state = self._forward
        x = np.asarray(x, np.float32)
        return np.concatenate([np.asarray(forward(state, x[i : i + batch_size])) for i in range(0, len(x), batch_size)])

    @functools.cached_property
    def _forward(self):
        graph, state = nnx.split(self.twin)
        return jax.jit(lambda s, xb: jnp.argmax(nnx.merge(graph, s)(xb), -1)), state


def _string_keys(tree):
    """Nested dicts with every key a string (nnx lists' layer indices become "0", "1", ...)."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


@dataclasses.dataclass
class LoadedLM(LoadedModel):
    """A loaded language model: ``twin`` is a `jaxnas.supernet.TwinLM`; ``meta["text"]`` names its tokenizer."""

    def __call__(self, tokens) -> jax.Array:
        """logits [B, T, vocab] of token ids ``tokens`` [B, T] int32."""
        return self.twin(jnp.asarray(tokens, jnp.int32))

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer the model was trained with (`jaxnas.data.text.load_tokenizer`)."""
        from jaxnas.data.text import load_tokenizer

        return load_tokenizer(self.meta["text"]["tokenizer"])

    def generate(self, prompt, n_new: int, *, temperature: float = 0.0, seed: int = 0):
        """Continue ``prompt`` by ``n_new`` tokens, decoded with the twin's cache: greedily (temperature 0) or
        sampled from softmax(logits / temperature) with PRNG ``seed``.

        A string prompt is encoded with the model's tokenizer and the continuation comes back as text (only the
        new tokens; with the byte tokenizer a character cut by the end decodes as U+FFFD). Token ids [P] or
        [B, P] come back as int32 ids [P + n_new] or [B, P + n_new], prompt included.
        """
        text = isinstance(prompt, str)
        ids = self.tokenizer.encode(prompt) if text else np.asarray(prompt, np.int32)
        rows = ids[None] if ids.ndim == 1 else ids
        if rows.ndim != 2 or rows.shape[1] < 1 or n_new < 0:
            raise ValueError(f"generate: need a non-empty prompt (text, ids [P] or [B, P]) and n_new >= 0, got ids of "
                             f"shape {list(ids.shape)} and n_new={n_new}")
        out = np.asarray(self._generate(rows.shape[1], int(n_new), float(temperature))(
            self._state, jnp.asarray(rows, jnp.int32), jax.random.key(seed)))
        if text:
            return self.tokenizer.decode(out[0, rows.shape[1]:])
        return out[0] if ids.ndim == 1 else out

    @functools.cached_property
    def _state(self):
        return nnx.state(self.twin)

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one compiled program per (prompt length, n_new, temperature)
    def _generate(self, length: int, n_new: int, temperature: float):
        graph = nnx.graphdef(self.twin)

        def run(state, prompt, key):
            return nnx.merge(graph, state).generate(prompt, n_new, key=key, temperature=temperature)

        return jax.jit(run)

    __hash__ = object.__hash__


def load_model(path: str | Path) -> LoadedModel:
    """The model exported into ``path`` (a run folder or its ``model/`` folder)."""
    folder = Path(path)
    if (folder / "model" / "arch.json").is_file():
        folder = folder / "model"
    meta_file = folder / "arch.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"no exported model in {path}: expected {meta_file} (python -m jaxnas.search writes it into the run "
            "folder's model/ when a search of mode oneshot or train finishes)"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        space_cfg = from_dict(SpaceConfig, meta["space"])
        space = build_space(space_cfg)
        enc = np.asarray(meta["encoding"], np.int32)
        if enc.shape != (space.n_choices,):
            raise ValueError(f"the encoding has shape {list(enc.shape)}, the space needs [{space.n_choices}]")
        space.validate(enc)
        if space.to_string(enc) != meta["arch"]:
            raise ValueError(f"the encoding is {space.to_string(enc)!r} but arch says {meta['arch']!r}")
        image_shape, num_classes = tuple(int(v) for v in meta["image_shape"]), int(meta["num_classes"])
    except (ValueError, KeyError, TypeError, OverflowError, ConfigError, UnicodeDecodeError) as error:
        what = f"missing key {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
        raise ValueError(f"{meta_file} is not a valid exported model ({what}); it is written by python -m "
                         "jaxnas.search: restore it or run the search again") from None
    model = model_for(space, space_cfg, image_shape, num_classes)
    # Any weights of the right structure will do: the twin's state is replaced by the saved one below.
    params = model.init(jax.random.key(0))
    batches = jnp.zeros((1, 2, *model.image_shape), jnp.float32)
    stats = model.statistics(params, enc[None], batches, shared=True)
    stats = None if stats is None else jax.tree.map(lambda a: a[0], stats)
    _, twin = model.extract(params, enc, stats)
    twin.eval()
    like = nnx.state(twin, _STATE_FILTER)
    restored = load_arrays(folder / "state", like.to_pure_dict())
    like.replace_by_pure_dict(restored)
    nnx.update(twin, like)
    return (LoadedLM if "text" in meta else LoadedModel)(twin, meta["arch"], meta, folder)

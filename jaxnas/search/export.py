"""The exported best model: the compact standalone twin's state (Orbax) plus its architecture (JSON).

    <run>/model/arch.json   canonical string, encoding, the space and data settings, recorded metrics
    <run>/model/state/      the twin's parameters and BatchNorm statistics (Orbax)
    <run>/model/model.stablehlo(.json)  the twin as one portable StableHLO file (runs with only jax; `jaxnas.export`)

``jaxnas.load_model(path)`` rebuilds the twin from ``arch.json`` and restores its state; the result is an
ordinary Flax NNX module: ``model(x [B, H, W, C] float32) -> logits [B, classes]``.
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


def export_model(folder: str | Path, model: SearchModel, space_cfg: SpaceConfig, enc, params, bn_stats, record: dict):
    """Write the twin of ``enc`` (sliced from candidate ``params`` with its statistics) into ``folder``."""
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
    return LoadedModel(twin, meta["arch"], meta, folder)

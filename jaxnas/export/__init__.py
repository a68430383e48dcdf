"""Portable export of a search's best model: one StableHLO file that runs with only ``jax`` installed.

    from jaxnas.export import export_stablehlo, load_stablehlo
    path = export_stablehlo("runs/quick")           # -> runs/quick/model/model.stablehlo (+ model.stablehlo.json)
    logits = load_stablehlo(path)(images)            # images [B, H, W, C] float32 -> logits [B, classes]

or ``python -m jaxnas.export runs/quick --format stablehlo [--output PATH]``. A search (modes oneshot and train)
writes the file itself, next to ``arch.json`` and ``state/`` in ``<run>/model/``.

The file is the compact twin (`jaxnas.load_model`) in inference mode (BatchNorm on its running statistics,
dropout off), traced once with ``jax.export.export(jax.jit(forward))`` over a symbolic batch dimension ``b``
(any batch size works) and serialised with ``Exported.serialize()``; the parameters are constants inside it.
It is lowered for CPU, CUDA and TPU, so one file runs on any of them. Running it needs neither jaxnas nor flax:
only jax and the small flatbuffers package ``jax.export.deserialize`` imports (``pip install jax flatbuffers``;
newer jax versions read files written by older ones within jax.export's compatibility window; the writer's
version is in the sidecar)::

    import jax, numpy as np
    exported = jax.export.deserialize(open("runs/quick/model/model.stablehlo", "rb").read())
    images = np.zeros((5, 8, 8, 1), np.float32)   # [batch, H, W, C] float32: "input" in model.stablehlo.json
    logits = exported.call(images)                 # [batch, classes]

The images are what `jaxnas.data.load_dataset` gives for the run's data settings (the ``data:`` section of its
``config.yaml``), already scaled. The sidecar ``model.stablehlo.json`` records the input shape (the batch as
"b"), its dtype, the number of classes, the architecture string, the jax version and how to call the file.

This package imports jax only when it exports or loads, so ``python -m jaxnas.export`` refuses bad input at once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from interop._atomic import atomic_write_bytes, atomic_write_text

__all__ = ["ExportError", "FORMATS", "PLATFORMS", "export_stablehlo", "load_stablehlo", "model_folder"]

STABLEHLO_NAME = "model.stablehlo"
SIDECAR_SUFFIX = ".json"
# The file is lowered for each of these, so one file serves CPU, GPU (CUDA) and TPU; lowering needs no device.
PLATFORMS = ("cpu", "cuda", "tpu")
FORMATS = ("stablehlo", "onnx")
ONNX_UNAVAILABLE = (
    "ONNX export is not available: it needs the jax2onnx package, which jaxnas does not install (jax2onnx 0.17 pins "
    "orbax-checkpoint<0.11.37, older than the one jaxnas uses, and pulls in onnxruntime, equinox and orbax-export); "
    "use --format stablehlo, which runs with only jax"
)


class ExportError(ValueError):
    """Bad input to an export (no exported model there, an unknown format): the message says what to do."""


def _need_flatbuffers() -> None:
    # jax.export's (de)serialisation imports it lazily; jax itself does not install it.
    if importlib.util.find_spec("flatbuffers") is None:
        raise ExportError("StableHLO (de)serialisation needs the flatbuffers package (jax.export uses it; jax does "
                          "not install it): pip install flatbuffers")


def model_folder(path: str | Path) -> Path:
    """The ``model/`` folder of the exported model in ``path`` (a run folder or that folder itself).

    Raises `ExportError` when there is no exported model (no ``arch.json``) there.
    """
    folder = Path(path)
    if (folder / "model" / "arch.json").is_file():
        return folder / "model"
    if (folder / "arch.json").is_file():
        return folder
    if not folder.exists():
        raise ExportError(f"{path} does not exist; pass the folder of a finished search run (its output=)")
    raise ExportError(
        f"no exported model in {path}: expected {folder / 'model' / 'arch.json'} (python -m jaxnas.search writes it "
        "into the run folder's model/ when a search of mode oneshot or train finishes); pass such a run folder"
    )


def export_stablehlo(model_or_run_folder, path: str | Path | None = None, *, platforms=PLATFORMS) -> Path:
    """Write the model as a serialised `jax.export.Exported` (StableHLO) and its JSON sidecar; return its path.

    ``model_or_run_folder``: a run folder (or its ``model/``), or a `jaxnas.search.export.LoadedModel`.
    ``path``: where to write (a folder: ``model.stablehlo`` inside it); default ``<run>/model/model.stablehlo``.
    The sidecar is ``path`` + ``.json``. Both are written atomically.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxnas.search.export import LoadedModel, load_model

    _need_flatbuffers()
    if isinstance(model_or_run_folder, LoadedModel):
        loaded = model_or_run_folder
        home = loaded.folder
    else:
        home = model_folder(model_or_run_folder)
        loaded = load_model(home)
    if path is None:
        if home is None:
            raise ExportError("this model was not loaded from a folder, so there is no default path: pass path=")
        path = Path(home) / STABLEHLO_NAME
    path = Path(path)
    if path.is_dir():
        path = path / STABLEHLO_NAME

    image_shape = tuple(int(v) for v in loaded.meta["image_shape"])
    num_classes = int(loaded.meta["num_classes"])
    twin = loaded.twin
    twin.eval()  # BatchNorm on its running statistics, dropout off (a loaded twin already is)
    graph, state = nnx.split(twin)

    def forward(x):
        return nnx.merge(graph, state)(x)  # the state is closed over: its arrays become the file's constants

    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(spec)
    (out,) = exported.out_avals
    if len(out.shape) != 2 or str(out.shape[0]) != "b" or out.shape[1] != num_classes:
        raise RuntimeError(f"the traced model returns {out.shape}, expected (b, {num_classes})")  # a bug

    shape_text = ", ".join(["b", *map(str, image_shape)])
    sidecar = {
        "format": "jax.export serialized Exported (StableHLO); read with jax.export.deserialize",
        "input": {"shape": ["b", *image_shape], "dtype": "float32", "layout": "NHWC images, batch b >= 1"},
        "output": {"shape": ["b", num_classes], "dtype": str(out.dtype), "meaning": "logits"},
        "num_classes": num_classes,
        "arch": loaded.arch,
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "usage": (
            f"import jax, numpy as np; exported = jax.export.deserialize(open('{path.name}', 'rb').read()); "
            f"logits = exported.call(images)  # images: np.float32 array of shape ({shape_text})"
        ),
    }
    atomic_write_bytes(path, bytes(exported.serialize()))
    atomic_write_text(path.with_name(path.name + SIDECAR_SUFFIX), json.dumps(sidecar, indent=2) + "\n")
    return path


def load_stablehlo(path: str | Path):
    """A function images [B, H, W, C] -> logits [B, classes] from a file `export_stablehlo` wrote.

    ``path``: the ``.stablehlo`` file, or a run folder / its ``model/`` holding one. Uses only jax (as the snippet
    in this module's docstring does); the `jax.export.Exported` is the function's ``exported`` attribute.
    """
    import jax
    import jax.numpy as jnp

    _need_flatbuffers()
    file = Path(path)
    if file.is_dir():
        file = model_folder(file) / STABLEHLO_NAME
    if not file.is_file():
        raise ExportError(f"no StableHLO model at {file}; write one with python -m jaxnas.export <run folder>")
    exported = jax.export.deserialize(file.read_bytes())

    def logits(x):
        return exported.call(jnp.asarray(x, jnp.float32))

    logits.exported = exported
    return logits

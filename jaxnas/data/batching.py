"""Seeded batch orders: the same (seed, epoch) always gives the same order, on any machine.

``epoch_indices`` is the device-friendly form (an index matrix a jitted ``lax.scan`` can walk over a
device-resident split); ``batches`` is the host-side iterator built on the same orders.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxnas.data.core import Split


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """``[n] int64``: the shuffled example order of ``epoch``; a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_indices(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """``[n // batch_size, batch_size] int32`` example indices of one shuffled epoch, remainder dropped.

    Row ``b`` holds the indices of batch ``b``; the same as the order ``batches`` yields for that epoch.
    """
    if batch_size < 1 or n < batch_size:
        raise ValueError(f"batch_size: got {batch_size}; expected 1 <= batch_size <= n = {n} examples")
    n_batches = n // batch_size
    return epoch_order(n, seed, epoch)[: n_batches * batch_size].reshape(n_batches, batch_size).astype(np.int32)


def batch_rows(
    n: int, batch_size: int, seed: int, *, shuffle: bool = True, drop_remainder: bool = True, epochs: int = 1
) -> Iterator[np.ndarray]:
    """Yield the example indices of every batch over ``epochs`` passes of ``n`` examples: each epoch reshuffled
    with ``epoch_order(n, seed, epoch)`` (``shuffle=False``: in order); ``drop_remainder=False`` also yields the
    last, smaller batch of each epoch. ValueError for a batch size or epoch count it cannot serve."""
    if batch_size < 1 or (drop_remainder and n < batch_size):
        raise ValueError(f"batch_size: got {batch_size}; expected 1 <= batch_size <= {n} (the split's size)")
    if epochs < 1:
        raise ValueError(f"epochs: got {epochs}; expected an integer >= 1")
    stop = n - n % batch_size if drop_remainder else n
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]


def batches(
    split: Split,
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    drop_remainder: bool = True,
    epochs: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images [B, H, W, C] float32, labels [B] int32)`` over ``epochs`` passes of ``split``, in the
    batches of `batch_rows`."""
    for index in batch_rows(len(split), batch_size, seed, shuffle=shuffle, drop_remainder=drop_remainder,
                            epochs=epochs):
        yield split.images[index], split.labels[index]

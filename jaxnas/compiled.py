"""Keeping a long-lived process's compiled programs within the operating system's memory-map limit.

Every program XLA:CPU compiles keeps a few memory mappings (its code and data: about 3 per small program, more for
large ones) until JAX drops it from its caches, which hold thousands of programs. Linux caps the mappings of a
process (``vm.max_map_count``, 65530 by default); a process that reaches the cap cannot map the next program, its
compilation fails, and on jax 0.10.2 the error then crashes the interpreter (a segmentation fault while the C++
exception unwinds) instead of raising. A search whose candidates compile programs of their own shapes (the sized
backend, one program per distinct layer plan) can get there in a long run; so can a test session.

`release_if_crowded` checks the count (one read of /proc/self/maps) and, past a share
of the cap, drops every compiled program with `jax.clear_caches`: the next calls compile again, nothing else
changes. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import gc
from pathlib import Path

_MAPS = Path("/proc/self/maps")
_LIMIT = Path("/proc/sys/vm/max_map_count")


def mapping_count() -> int | None:
    """Memory mappings of this process (Linux), or None where /proc/self/maps does not exist."""
    try:
        with _MAPS.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def mapping_limit() -> int | None:
    """The kernel's cap on a process's memory mappings (vm.max_map_count), or None where it cannot be read."""
    try:
        return int(_LIMIT.read_text().strip())
    except (OSError, ValueError):
        return None


def release_if_crowded(share: float = 0.5, log=None) -> bool:
    """Drop JAX's compiled programs if this process holds more than ``share`` of its memory-map cap.

    Returns whether it did; ``log`` (a print-like callable) is told the counts when it does.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    count, limit = mapping_count(), mapping_limit()
    if count is None or limit is None or count <= share * limit:
        return False
    import jax

    jax.clear_caches()
    gc.collect()
    if log is not None:
        log(f"released JAX's compiled programs: this process held {count} memory mappings of the kernel's "
            f"{limit} (vm.max_map_count), now {mapping_count()}; the next steps compile again")
    return True

"""A run folder's safety: what may be written where, one process at a time, and what a resume may change.

    check_output(out, resume)          refuse a file, an unwritable place, a non-empty folder that is no run, or a
                                       run folder without --resume (RunError saying what to do instead)
    RunLock(out)                       creates the folder and takes an exclusive lock (fcntl.flock on <run>/.lock,
                                       holding the owner's pid);
                                       released on exit, and by the OS when the process dies (no stale locks)
    config_changes(saved, current)     the dotted keys whose values differ, but those a resume may change
    clean_stale_temporaries(out)       the temporary files of atomic writes cut short by a kill
    held_interrupt()                   Ctrl-C inside the block takes effect when it ends (a checkpoint is whole)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
from pathlib import Path

RESUMABLE_KEYS = ("progress", "distributed", "search.budget", "search.generations", "search.stall_generations")
"""Keys a resumed run may change: how it is shown and spread over processes, and when it stops."""

_TEMPORARY = ".*.tmp"  # interop._atomic's temporary siblings: ".<name>.<random>.tmp"


class RunError(Exception):
    """A run cannot start or resume as asked (the message says why and what to do)."""


def is_run(out: Path) -> bool:
    return (out / "config.yaml").is_file()


def check_output(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"output={out} is a file, not a folder; choose a folder for the run (output=<folder>)")
    if resume:
        if not is_run(out):
            raise RunError(f"--resume {out}: no config.yaml there, so there is no run to resume")
    elif is_run(out) or (out / "checkpoints").exists():
        raise RunError(f"{out} already holds a run; continue it with --resume {out}, or choose another output=")
    elif out.is_dir():
        found = sorted(p.name for p in out.iterdir())
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise RunError(f"output={out} is not empty and holds no run ({shown}); a run writes history.csv, "
                           "summary.json, ... there, so choose an empty or new folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"output={out}: cannot write in {existing} (permission denied); choose a folder you can write to")


class RunLock:
    """``with RunLock(out):`` the run folder is this process's; a second process gets a RunError at once."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunError(f"output={self.path.parent}: cannot create the run folder or write in it "
                           f"({error.strerror}); choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunError(f"{self.path.parent} is in use by another process (pid {owner}); wait for it to "
                               "finish or stop it, then --resume; or choose another output=") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """``"key: old -> new"`` for every dotted key that differs, except `RESUMABLE_KEYS` (and ``output``: a run
    folder may be moved)."""
    a, b = _flatten(saved), _flatten(current)
    safe = lambda k: k == "output" or any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)  # noqa: E731
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if not safe(k) and a.get(k) != b.get(k)]


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove (and return) the temporary files of interrupted atomic writes in the run folder and its subfolders
    (Orbax cleans its own temporary checkpoint folders)."""
    removed = []
    for path in Path(out).rglob(_TEMPORARY):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def held_interrupt():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and deliver it when the block ends.

    Orbax writes a checkpoint with helper threads; a KeyboardInterrupt in the middle left them running while the
    interpreter shut down (tracebacks on stderr, a step cut short). Outside the main thread, or when SIGINT is
    ignored or handled by someone else, the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not (
        signal.default_int_handler
    ):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt

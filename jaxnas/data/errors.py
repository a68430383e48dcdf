"""Errors of the data layer: each says what was wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Mapping


class DataError(Exception):
    """A dataset could not be loaded as asked; the message says why and what to do."""


class DatasetNotAvailableError(DataError):
    """The dataset is not on this machine (not prepared, not downloaded, hub unreachable)."""


class UnreadableImagesError(DataError):
    """Some image files are missing or cannot be decoded; ``paths`` lists every one of them."""

    def __init__(self, problems: Mapping[str, str]):
        self.paths = tuple(problems)
        lines = [f"{path}: {reason}" for path, reason in list(problems.items())[:20]]
        if len(problems) > 20:
            lines.append(f"... and {len(problems) - 20} more")
        super().__init__(
            f"{len(problems)} image file(s) are missing or cannot be decoded:\n  " + "\n  ".join(lines) + "\n"
            "Fix or remove these files; none is skipped silently, so that splits stay what you expect."
        )

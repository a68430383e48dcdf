"""The run configuration of ``jaxnas`` entry points: one frozen dataclass tree loaded from YAML.

``configs/quick.yaml`` is the embedded default. Sections are added here as the product grows; every
key is documented by its field's ``help`` metadata (``python -m jaxnas.data --help`` lists them).
"""

from __future__ import annotations

import dataclasses

from jaxnas.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Top level of a jaxnas run configuration."""

    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of every random choice in the run.", "min": 0})
    output: str = dataclasses.field(
        default="runs/quick", metadata={"help": "Run folder: everything the run writes goes here."}
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={"help": "The dataset."})

    def __post_init__(self):
        if not self.output.strip():
            raise ValueError("RunConfig.output: got an empty path; expected a folder for the run's files, e.g. runs/quick")

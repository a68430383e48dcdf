"""Search spaces: declarative choices (`core`) and the three concrete spaces (macro, NAS-Bench-201, transformer)."""

from jaxnas.spaces.core import Choice, Compatible, Condition, Space, at_least, is_in
from jaxnas.spaces.macro import MacroArch, StageArch, macro_space
from jaxnas.spaces.nb201 import from_analog_tuple, nb201_space, to_analog_tuple
from jaxnas.spaces.transformer import TransformerArch, transformer_space

__all__ = [
    "Choice",
    "Compatible",
    "Condition",
    "MacroArch",
    "Space",
    "StageArch",
    "TransformerArch",
    "at_least",
    "from_analog_tuple",
    "is_in",
    "macro_space",
    "nb201_space",
    "to_analog_tuple",
    "transformer_space",
]

"""Search spaces: declarative choices (`core`) and the concrete spaces (macro, NAS-Bench-201, transformer, lm)."""

from jaxnas.spaces.core import Choice, Compatible, Condition, Space, at_least, is_in
from jaxnas.spaces.lm import LMArch, lm_space
from jaxnas.spaces.macro import MacroArch, StageArch, macro_space
from jaxnas.spaces.nb201 import from_analog_tuple, nb201_space, to_analog_tuple
from jaxnas.spaces.transformer import TransformerArch, transformer_space

__all__ = [
    "Choice",
    "Compatible",
    "Condition",
    "LMArch",
    "MacroArch",
    "Space",
    "StageArch",
    "TransformerArch",
    "at_least",
    "from_analog_tuple",
    "is_in",
    "lm_space",
    "macro_space",
    "nb201_space",
    "to_analog_tuple",
    "transformer_space",
]

"""The S-NAS families in one space: MLP, plain CNN, ResNet-style and MobileNet-style (inverted residual) stages.

A network is a family, then up to ``max_stages`` stages in order, then a dropout rate before the classifier::

    family                              mlp | cnn | resnet | mobilenet   (mutated at a lower rate, as in S-NAS;
                                        the conv families are declared in jaxnas.blocks)
    stage k:  depth                     blocks; stage 1 has at least one, and stage k+1 exists only if stage k does
              channels  (conv families) / units (mlp)
              kernel    (conv families)
              expansion (families that expand: mobilenet)
              activation, norm (on/off)
              skip      (mlp, cnn: optional; resnet and mobilenet blocks are residual by design, so not a choice;
                         a conv family's ``optional_skip`` in jaxnas.blocks)
    dropout

Canonical string: ``cnn|s1:d2,w32,k5,relu,bn,skip|s2:d1,w64,k3,gelu|drop0.1`` - stages of depth 0 are left
out, ``bn`` / ``skip`` appear when on, ``e<ratio>`` for mobilenet, and ``w`` is channels or units.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxnas.blocks import FAMILIES as BLOCK_FAMILIES
from jaxnas.spaces.core import Choice, Condition, Space, at_least, is_in

# The conv families and what they use of a stage are declared in jaxnas.blocks; the mlp family is the supernet's.
CONV_FAMILIES = tuple(BLOCK_FAMILIES)
FAMILIES = ("mlp", *CONV_FAMILIES)
SKIP_FAMILIES = ("mlp", *(f for f in CONV_FAMILIES if BLOCK_FAMILIES[f].optional_skip))  # an optional skip
EXPANSION_FAMILIES = tuple(f for f in CONV_FAMILIES if BLOCK_FAMILIES[f].expansion)
ACTIVATIONS = ("relu", "gelu", "silu", "elu", "leaky_relu")


@dataclasses.dataclass(frozen=True)
class StageArch:
    """One stage of a macro architecture: ``depth`` blocks of ``width`` channels (conv) or units (mlp)."""

    depth: int
    width: int
    kernel: int | None  # None for mlp
    expansion: int | None  # None unless the family expands (mobilenet)
    activation: str
    norm: bool
    skip: bool  # always True for families whose residuals are their own (resnet, mobilenet)


@dataclasses.dataclass(frozen=True)
class MacroArch:
    """Typed view of a macro architecture; ``stages`` holds only the stages that exist (depth >= 1)."""

    family: str
    stages: tuple[StageArch, ...]
    dropout: float

    @classmethod
    def from_encoding(cls, space: Space, enc: Any) -> MacroArch:
        """The view of a valid encoding int [n_choices] of a `macro_space`."""
        arch = space.decode(enc)
        family = arch["family"]
        stages = []
        k = 1
        while arch.get(f"stage{k}.depth", 0) >= 1:
            s = f"stage{k}."
            stages.append(
                StageArch(
                    depth=arch[s + "depth"],
                    width=arch[s + ("units" if family == "mlp" else "channels")],
                    kernel=arch.get(s + "kernel"),
                    expansion=arch.get(s + "expansion"),
                    activation=arch[s + "activation"],
                    norm=arch[s + "norm"],
                    skip=arch.get(s + "skip", True),
                )
            )
            k += 1
        return cls(family, tuple(stages), arch["dropout"])


def macro_space(
    *,
    families: Sequence[str] = FAMILIES,
    max_stages: int = 3,
    max_depth: int = 3,
    channels: Sequence[int] = (16, 24, 32, 48, 64),
    units: Sequence[int] = (64, 128, 256, 512),
    kernels: Sequence[int] = (3, 5, 7),
    expansions: Sequence[int] = (1, 3, 6),
    activations: Sequence[str] = ACTIVATIONS,
    dropouts: Sequence[float] = (0.0, 0.1, 0.2),
    norms: Sequence[bool] = (False, True),
    skips: Sequence[bool] = (False, True),
    mutation_rate: float = 0.1,
    family_mutation_rate: float = 0.05,
) -> Space:
    """The macro space; shrink any option list for tiny test spaces.

    ``norms`` / ``skips``: the options of every stage's BatchNorm and (mlp, cnn) skip choice; ``(True,)`` fixes
    BatchNorm on, as weight-sharing searches usually do (a supernet cannot share weights well between normalised
    and raw paths: measured in benchmarks/ranking.py).

    Choices a family subset never uses (e.g. ``expansion`` without mobilenet) are not declared at all.
    Parents of different families are not crossed (``space.compatible``).
    """
    for name, values in (("norms", norms), ("skips", skips)):
        if not values or len(set(values)) != len(values) or not set(values) <= {False, True}:
            raise ValueError(f"{name} must be a non-empty subset of [false, true] without repeats, got {list(values)}")
    norms, skips = tuple(sorted(bool(v) for v in norms)), tuple(sorted(bool(v) for v in skips))
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {tuple(families)}")
    if max_stages < 1 or max_depth < 1:
        raise ValueError(f"max_stages and max_depth must be >= 1, got {max_stages} and {max_depth}")
    present = [f for f in FAMILIES if f in families]
    conv = [f for f in CONV_FAMILIES if f in present]
    skip = [f for f in SKIP_FAMILIES if f in present]
    expanding = [f for f in EXPANSION_FAMILIES if f in present]

    def stage(k: int) -> list[Choice]:
        exists = at_least(f"stage{k}.depth", 1)

        def when(fams: Sequence[str]) -> Condition:
            return exists & is_in("family", *fams)

        s = f"stage{k}."
        declared = [
            Choice(
                s + "depth",
                range(1 if k == 1 else 0, max_depth + 1),
                active_if=None if k == 1 else at_least(f"stage{k - 1}.depth", 1),
            ),
            Choice(s + "channels", channels, active_if=when(conv)) if conv else None,
            Choice(s + "units", units, active_if=when(["mlp"])) if "mlp" in present else None,
            Choice(s + "kernel", kernels, active_if=when(conv)) if conv else None,
            Choice(s + "expansion", expansions, active_if=when(expanding)) if expanding else None,
            Choice(s + "activation", activations, active_if=exists),
            Choice(s + "norm", norms, active_if=exists),
            Choice(s + "skip", skips, active_if=when(skip)) if skip else None,
        ]
        return [c for c in declared if c is not None]

    choices = [Choice("family", present, mutation_rate=family_mutation_rate)]
    for k in range(1, max_stages + 1):
        choices += stage(k)
    choices.append(Choice("dropout", dropouts))
    return Space(
        "macro",
        choices,
        mutation_rate=mutation_rate,
        crossover_requires=("family",),
        formatter=_format,
        parser=lambda text: _parse(text, max_stages, activations),
    )


def _format(arch: Mapping[str, Any]) -> str:
    parts = [arch["family"]]
    k = 1
    while arch.get(f"stage{k}.depth", 0) >= 1:
        s = f"stage{k}."
        tokens = [f"d{arch[s + 'depth']}", f"w{arch.get(s + 'channels', arch.get(s + 'units'))}"]
        if s + "kernel" in arch:
            tokens.append(f"k{arch[s + 'kernel']}")
        if s + "expansion" in arch:
            tokens.append(f"e{arch[s + 'expansion']}")
        tokens.append(arch[s + "activation"])
        if arch[s + "norm"]:
            tokens.append("bn")
        if arch.get(s + "skip"):
            tokens.append("skip")
        parts.append(f"s{k}:" + ",".join(tokens))
        k += 1
    parts.append(f"drop{arch['dropout']}")
    return "|".join(parts)


_EXAMPLE = "cnn|s1:d2,w32,k5,relu,bn,skip|s2:d1,w64,k3,gelu|drop0.1"
_NUMBERED = {"d": "depth", "k": "kernel", "e": "expansion"}


def _parse(text: str, max_stages: int, activations: Sequence[str]) -> dict[str, str]:
    """choice name -> option text; the space's encode then checks values and which choices apply."""
    parts = text.split("|")
    if len(parts) < 3 or not parts[-1].startswith("drop"):
        raise ValueError(
            f"malformed macro architecture {text!r}: expected 'family|s1:...|...|drop<rate>', e.g. {_EXAMPLE!r}"
        )
    family = parts[0]
    arch = {"family": family, "dropout": parts[-1][len("drop") :]}
    stages = parts[1:-1]
    for k, part in enumerate(stages, start=1):
        label, sep, body = part.partition(":")
        if label != f"s{k}" or not sep:
            raise ValueError(f"malformed macro architecture {text!r}: stage {k} must start with 's{k}:', got {part!r}")
        s = f"stage{k}."
        arch[s + "norm"] = "False"
        if family in SKIP_FAMILIES:
            arch[s + "skip"] = "False"
        for token in body.split(","):
            numbered = re.fullmatch(r"([dwke])(\d+)", token)
            if numbered:
                letter, number = numbered.groups()
                name = ("units" if family == "mlp" else "channels") if letter == "w" else _NUMBERED[letter]
                arch[s + name] = number
            elif token == "bn":
                arch[s + "norm"] = "True"
            elif token == "skip":
                arch[s + "skip"] = "True"
            elif token in activations:
                arch[s + "activation"] = token
            else:
                raise ValueError(
                    f"malformed macro architecture {text!r}: unknown token {token!r} in stage {k}; expected "
                    f"d<depth>, w<width>, k<kernel>, e<expansion>, an activation ({', '.join(activations)}), bn, skip"
                )
    if len(stages) < max_stages:
        arch[f"stage{len(stages) + 1}.depth"] = "0"  # stages left out have depth 0
    return arch

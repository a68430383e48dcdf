"""Declarative discrete search spaces: architectures as int32 encodings, operators as pure JAX functions.

A space is an ordered list of named choices, declared the way the architecture family reads::

    Space("tiny", [
        Choice("family", ["mlp", "cnn"], mutation_rate=0.05),
        Choice("depth", [1, 2, 3]),
        Choice("kernel", [3, 5], active_if=is_in("family", "cnn")),
        Choice("layer3.width", [16, 32], active_if=at_least("depth", 3)),
        Choice("heads", [1, 2, 4], valid_if=Compatible("width", lambda w, h: w % h == 0, "heads divide width")),
    ])

An architecture is one int per choice (the option's index), int32 ``[n_choices]``; a population is
``[P, n_choices]``. Two declarative rules shape what an encoding may hold:

- ``active_if``: a choice applies only when earlier choices have certain values (a kernel size only for
  convolutional families, a layer's width only if the layer exists). Inactive choices hold 0, so an
  architecture has exactly one (canonical) encoding. A test on a choice that is itself inactive is false,
  which makes chains (stage 3 exists only if stage 2 exists ...) need no repetition.
- ``valid_if``: some options of a choice are allowed only with some values of an earlier choice (the number
  of heads must divide the hidden size). ``sample``, ``mutate`` and ``crossover`` only produce allowed
  combinations, because they decide choices in declaration order and draw each one from the options the
  earlier decisions allow (a repair to the nearest allowed option where a value is inherited).

Rules may refer only to earlier choices: a space is decided front to back, like the program it describes.
That order also bounds the work: operators decide all choices at once, in one vectorised pass per level of
dependency (a choice's level is one more than its deepest reference; the macro space has four levels).

Operators that a search runs per generation (``sample``, ``mutate``, ``crossover``, ``canonicalize``,
``active_mask``, ``is_valid``, ``compatible``, ``first_occurrence``, ``value``) are pure JAX functions that
work under ``jit`` and ``vmap`` and broadcast over leading axes. Host-side helpers (``validate``,
``decode``, ``encode``, strings, ``fingerprint``, ``unique``, ``neighbours``, ``size``) run in Python/numpy.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Formatter = Callable[[Mapping[str, Any]], str]
"""Turns a decoded architecture (active choice name -> option value) into its canonical string."""
Parser = Callable[[str], Mapping[str, str]]
"""Turns a canonical string into active choice name -> option text (``str(option)``)."""


@dataclasses.dataclass(frozen=True)
class _Test:
    name: str
    holds: Callable[[Any], bool]
    text: str
    mentions: tuple = ()  # option values the test names: each must exist, which catches typos early


@dataclasses.dataclass(frozen=True)
class Condition:
    """When a choice is active: a conjunction of tests on earlier choices.

    Build with `is_in` / `at_least`, join with ``&``.
    """

    tests: tuple[_Test, ...]

    def __and__(self, other: Condition) -> Condition:
        return Condition(self.tests + other.tests)

    def __str__(self) -> str:
        return " and ".join(t.text for t in self.tests)


def is_in(name: str, *values: Any) -> Condition:
    """Active only while choice ``name`` (itself active) holds one of ``values``."""
    allowed = tuple(values)
    shown = ", ".join(map(str, allowed))
    return Condition((_Test(name, lambda v: v in allowed, f"{name} in {{{shown}}}", allowed),))


def at_least(name: str, minimum: Any) -> Condition:
    """Active only while choice ``name`` (itself active) holds a value >= ``minimum``."""
    return Condition((_Test(name, lambda v: v >= minimum, f"{name} >= {minimum}"),))


@dataclasses.dataclass(frozen=True)
class Compatible:
    """Options of a choice allowed with an earlier choice's value: ``test(other_value, own_value) -> bool``.

    Applies only while the other choice is active. ``text`` explains the rule in error messages.
    """

    name: str
    test: Callable[[Any, Any], bool]
    text: str


@dataclasses.dataclass(frozen=True)
class Choice:
    """One named discrete decision.

    Attributes:
      name: unique within the space; dots group choices (``stage2.kernel``).
      options: the values it can take, in encoding order (index 0 is also the inactive placeholder).
      active_if: when the choice applies (None: always).
      valid_if: a `Compatible` rule, or a tuple of them, restricting its options by earlier choices' values.
      mutation_rate: probability per `Space.mutate` that it is redrawn (None: the space's default).
    """

    name: str
    options: tuple
    active_if: Condition | None = None
    valid_if: tuple[Compatible, ...] | Compatible = ()
    mutation_rate: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if isinstance(self.valid_if, Compatible):
            object.__setattr__(self, "valid_if", (self.valid_if,))
        if not self.name:
            raise ValueError("a Choice needs a non-empty name")
        if not self.options:
            raise ValueError(f"choice {self.name!r} has no options; give at least one")
        texts = self.texts
        if len(set(texts)) != len(texts):
            raise ValueError(f"choice {self.name!r} has options that print alike {texts}; each needs its own text")
        if self.mutation_rate is not None and not 0.0 <= self.mutation_rate <= 1.0:
            raise ValueError(f"choice {self.name!r}: mutation_rate must lie in [0, 1], got {self.mutation_rate}")

    @property
    def texts(self) -> tuple[str, ...]:
        """``str`` of each option: how options appear in strings and messages."""
        return tuple(str(o) for o in self.options)

    def allowed_text(self) -> str:
        return ", ".join(self.texts)

    def index_of(self, value: Any) -> int:
        """Index of option ``value``; raises ValueError naming the allowed values."""
        for i, option in enumerate(self.options):
            # 1 == True in Python: keep bool and number options apart so a typo cannot slip through.
            if isinstance(option, bool) == isinstance(value, bool) and option == value:
                return i
        raise ValueError(f"choice {self.name!r} has no option {value!r}; allowed: {self.allowed_text()}")

    def index_of_text(self, text: str) -> int:
        """Index of the option printed as ``text``; raises ValueError naming the allowed texts."""
        try:
            return self.texts.index(text)
        except ValueError:
            raise ValueError(f"choice {self.name!r} has no option {text!r}; allowed: {self.allowed_text()}") from None


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 ``shape`` i.i.d. uniform in [0, 1).

    Drawn flat and reshaped: XLA:CPU compiles a multi-dimensional threefry draw 4-7x slower than a flat one.
    """
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def _pick(xp, mask, scores):
    """Uniform draw among allowed options: the allowed option with the highest i.i.d. uniform score.

    mask bool [..., M], scores float [..., M] -> int32 [...] (0 if nothing is allowed).
    """
    return xp.argmax(xp.where(mask, scores, -1.0), -1).astype(xp.int32)


def _holds(xp, mask, value):
    """bool [...]: whether option ``value`` [...] is allowed by mask [..., M] (False when out of range)."""
    return (mask & (xp.expand_dims(value, -1) == xp.arange(mask.shape[-1]))).any(-1)


def _nearest(xp, mask, value):
    """int32 [...]: allowed option closest to ``value`` (ties go to the lower index), so a repair changes little."""
    idx = xp.arange(mask.shape[-1])
    v = xp.expand_dims(value, -1)
    distance = 2 * xp.abs(idx - v) + (idx > v)
    return xp.argmin(xp.where(mask, distance, 4 * mask.shape[-1] + 4), -1).astype(xp.int32)


class Space:
    """An ordered list of named discrete choices; see the module docstring.

    Args:
      name: the space's name (part of every fingerprint).
      choices: the choices in decision order; rules may refer only to earlier choices.
      mutation_rate: default per-choice mutation probability for choices that declare none.
      crossover_requires: names of choices two parents must share for `crossover` to mix them
        (S-NAS crosses only parents of the same family); empty: any two parents are compatible.
      formatter, parser: the canonical string format (default ``name=value;...`` over active choices).
        ``parser(formatter(decoded))`` must give back ``{name: str(value)}``.
    """

    def __init__(
        self,
        name: str,
        choices: Sequence[Choice],
        *,
        mutation_rate: float = 0.1,
        crossover_requires: Sequence[str] = (),
        formatter: Formatter | None = None,
        parser: Parser | None = None,
    ) -> None:
        self.name = name
        self.choices: tuple[Choice, ...] = tuple(choices)
        if not self.choices:
            raise ValueError(f"space {name!r} has no choices")
        self.names: tuple[str, ...] = tuple(c.name for c in self.choices)
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            twice = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"space {name!r} declares choices {twice} more than once; names must be unique")
        if not 0.0 <= mutation_rate <= 1.0:
            raise ValueError(f"space {name!r}: mutation_rate must lie in [0, 1], got {mutation_rate}")
        self.n_choices = len(self.choices)
        self.cardinalities = np.array([len(c.options) for c in self.choices], np.int32)
        self.mutation_rates = np.array(
            [mutation_rate if c.mutation_rate is None else c.mutation_rate for c in self.choices], np.float32
        )
        # Compiled operators bake these in, so they must not change behind the jit cache's back.
        self.cardinalities.setflags(write=False)
        self.mutation_rates.setflags(write=False)
        self._m = int(self.cardinalities.max())
        self._option_mask = np.arange(self._m)[None, :] < self.cardinalities[:, None]  # [n_choices, M]
        conditions = [self._compile_condition(i, c) for i, c in enumerate(self.choices)]
        constraints = [self._compile_constraints(i, c) for i, c in enumerate(self.choices)]
        # Rules padded into arrays so that every operator evaluates all choices at once ...
        self._term_ref, self._term_table, self._term_real = _pad(conditions, (self._m,))
        self._rule_ref, self._rule_table, self._rule_real = _pad(constraints, (self._m, self._m))
        self._refs = [sorted({r for r, _ in a + b}) for a, b in zip(conditions, constraints, strict=True)]
        # ... and repeats that once per dependency level: after pass t, choices of level < t are final.
        level = []
        for refs in self._refs:
            level.append(1 + max((level[r] for r in refs), default=-1))
        self._passes = max(level) + 1
        self._crossover_idx = np.array([self._ref(n, "crossover_requires") for n in crossover_requires], np.int32)
        if formatter is None and parser is None:
            self._check_default_format()
            formatter, parser = _default_format, _default_parse
        elif formatter is None or parser is None:
            raise ValueError(f"space {name!r}: give both formatter and parser, or neither")
        self._formatter, self._parser = formatter, parser
        # Everything the jitted operators depend on; spaces built twice from one declaration compare equal,
        # so they share compiled operators (jit caches on the space as a static argument).
        tables = (self._term_ref, self._term_table, self._term_real, self._rule_ref, self._rule_table, self._rule_real)
        arrays = (self.mutation_rates, self._crossover_idx, *tables)
        self._key = (name, self.names, tuple(c.texts for c in self.choices), *(a.tobytes() for a in arrays))

    def __eq__(self, other: object) -> bool:
        """Same name, choices, options, rules and rates (the string format is not compared)."""
        return isinstance(other, Space) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    # ------------------------------------------------------------------ declaration
    def _ref(self, name: str, where: str, before: int | None = None) -> int:
        if name not in self._index:
            raise ValueError(f"{where} refers to unknown choice {name!r}{_did_you_mean(name, self.names)}")
        i = self._index[name]
        if before is not None and i >= before:
            raise ValueError(
                f"{where} refers to {name!r}, which is declared later; rules may only use earlier choices, "
                f"so declare {name!r} first"
            )
        return i

    def _compile_condition(self, i: int, choice: Choice) -> list[tuple[int, np.ndarray]]:
        """[(earlier choice index, bool [M] table: which of its options make choice i active)]."""
        compiled = []
        for test in choice.active_if.tests if choice.active_if else ():
            ref = self._ref(test.name, f"active_if of {choice.name!r}", before=i)
            options = self.choices[ref].options
            for value in test.mentions:
                self.choices[ref].index_of(value)
            table = np.zeros(self._m, bool)
            table[: len(options)] = [bool(test.holds(o)) for o in options]
            compiled.append((ref, table))
        return compiled

    def _compile_constraints(self, i: int, choice: Choice) -> list[tuple[int, np.ndarray]]:
        """[(earlier choice index, bool [M, M] table: row = its option, column = allowed option of choice i)]."""
        compiled = []
        for rule in choice.valid_if:
            ref = self._ref(rule.name, f"valid_if of {choice.name!r}", before=i)
            table = np.zeros((self._m, self._m), bool)
            for r, other in enumerate(self.choices[ref].options):
                table[r, : len(choice.options)] = [bool(rule.test(other, own)) for own in choice.options]
            compiled.append((ref, table))
        if compiled:
            # Every combination of the referenced values must leave an option, or sampling would have none to draw.
            joint = functools.reduce(
                lambda acc, ct: acc[..., None, :] & ct[1][: len(self.choices[ct[0]].options)],
                compiled,
                self._option_mask[i],
            )
            if not joint.any(-1).all():
                raise ValueError(
                    f"choice {choice.name!r}: some values of {[r.name for r in choice.valid_if]} allow none of its "
                    f"options {choice.options} under {[r.text for r in choice.valid_if]}; widen the options"
                )
        return compiled

    def _check_default_format(self) -> None:
        for c in self.choices:
            for text in (c.name, *c.texts):
                if ";" in text or "=" in text:
                    raise ValueError(
                        f"choice {c.name!r}: {text!r} contains ';' or '=', which the default string format uses "
                        "as separators; rename it or give the space a formatter and parser"
                    )

    # ------------------------------------------------------------------ lookup
    def index(self, name: str) -> int:
        """Position of choice ``name`` in the encoding."""
        return self._ref(name, f"space {self.name!r}")

    def __getitem__(self, name: str) -> Choice:
        return self.choices[self.index(name)]

    def __repr__(self) -> str:
        return f"Space({self.name!r}, {self.n_choices} choices: {', '.join(self.names)})"

    # ------------------------------------------------------------------ rule evaluation, all choices at once
    def _applies(self, xp, enc, active):
        """bool [..., n_choices]: whether each choice's active_if holds for enc [..., n] whose refs have ``active``."""
        hit = (xp.expand_dims(enc[..., self._term_ref], -1) == xp.arange(self._m)) & self._term_table
        return ((hit.any(-1) & active[..., self._term_ref]) | ~self._term_real).all(-1)

    def _allowed(self, xp, enc, active):
        """bool [..., n_choices, M]: options of each choice that its valid_if rules allow, given enc and ``active``."""
        onehot = xp.expand_dims(enc[..., self._rule_ref], -1) == xp.arange(self._m)  # [..., n, C, M]
        rows = (xp.expand_dims(onehot, -1) & self._rule_table).any(-2)  # [..., n, C, M]
        binding = active[..., self._rule_ref] & self._rule_real  # rules about inactive choices do not bind
        return self._option_mask & (rows | ~xp.expand_dims(binding, -1)).all(-2)

    def _activity(self, xp, enc):
        """bool [..., n_choices]: which choices of enc [..., n_choices] apply."""
        active = xp.ones(enc.shape, bool)
        for _ in range(self._passes):
            active = self._applies(xp, enc, active)
        return active

    def _resolve(self, xp, proposal, fallback, fresh, change, scores):
        """Decide every choice; returns valid canonical int32 [..., n_choices].

        Per choice: ``fresh`` -> a uniform draw among allowed options; ``change`` -> a uniform draw among
        allowed options other than the proposal's (kept if there is none); otherwise the proposal's value.
        A value the earlier decisions do not allow becomes ``fallback``'s if allowed, else the nearest allowed
        option. Inactive choices become 0. proposal, fallback int [..., n]; fresh, change bool [..., n];
        scores float [..., n, M] i.i.d. uniform (the random draws).
        """
        others = xp.arange(self._m) != xp.expand_dims(proposal, -1)
        enc, active = proposal, xp.ones(proposal.shape, bool)
        for _ in range(self._passes):
            allowed = self._allowed(xp, enc, active)
            active = self._applies(xp, enc, active)
            redraw = allowed & others
            changed = xp.where(redraw.any(-1), _pick(xp, redraw, scores), proposal)
            value = xp.where(fresh, _pick(xp, allowed, scores), xp.where(change, changed, proposal))
            repaired = xp.where(_holds(xp, allowed, fallback), fallback, _nearest(xp, allowed, value))
            enc = xp.where(active, xp.where(_holds(xp, allowed, value), value, repaired), 0).astype(xp.int32)
        return enc

    def _choice_ok(self, xp, enc):
        """bool [..., n_choices]: active choices hold an allowed option, inactive ones hold 0."""
        active = self._activity(xp, enc)
        return xp.where(active, _holds(xp, self._allowed(xp, enc, active), enc), enc == 0)

    # ------------------------------------------------------------------ JAX operators
    @functools.partial(jax.jit, static_argnums=0)
    def active_mask(self, enc: jax.Array) -> jax.Array:
        """bool [..., n_choices]: which choices apply to each encoding int [..., n_choices]."""
        return self._activity(jnp, jnp.asarray(enc, jnp.int32))

    @functools.partial(jax.jit, static_argnums=0)
    def canonicalize(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: inactive choices set to 0, so encodings differing only there become equal."""
        enc = jnp.asarray(enc, jnp.int32)
        return jnp.where(self.active_mask(enc), enc, 0)

    @functools.partial(jax.jit, static_argnums=0)
    def is_valid(self, enc: jax.Array) -> jax.Array:
        """bool [...]: every choice in range, allowed by its rules, and inactive ones 0 (canonical)."""
        return self._choice_ok(jnp, jnp.asarray(enc, jnp.int32)).all(-1)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """int32 [n, n_choices]: each choice uniform over the options its earlier choices allow; canonical."""
        scores = _uniform(key, (n, self.n_choices, self._m))
        zeros = jnp.zeros((n, self.n_choices), jnp.int32)
        return self._resolve(jnp, zeros, zeros, jnp.ones(zeros.shape, bool), jnp.zeros(zeros.shape, bool), scores)

    @functools.partial(jax.jit, static_argnums=0)
    def mutate(self, key: jax.Array, enc: jax.Array, rate: jax.Array | float | None = None) -> jax.Array:
        """int32 [..., n_choices]: each active choice of a valid ``enc`` [..., n_choices] redrawn with its rate.

        A redrawn choice always takes a different allowed option. ``rate``: None (each choice's declared
        rate), a scalar, or float [n_choices]. Choices a mutation brings into play (e.g. the widths of a
        stage that now exists) are drawn uniformly, having had no value before; values a mutation makes
        disallowed move to the nearest allowed option.
        """
        enc = jnp.asarray(enc, jnp.int32)
        if rate is None:
            rates = self.mutation_rates
        else:
            rates = jnp.broadcast_to(jnp.asarray(rate, jnp.float32), (self.n_choices,))
        # One draw per choice for selection plus M option scores: a single RNG call keeps compiles short.
        u = _uniform(key, (*enc.shape, self._m + 1))
        was_active = self.active_mask(enc)
        select = was_active & (u[..., -1] < rates)
        return self._resolve(jnp, enc, enc, ~was_active, select, u[..., :-1])

    @functools.partial(jax.jit, static_argnums=0)
    def compatible(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """bool [...]: whether parents a, b [..., n_choices] agree on every choice in ``crossover_requires``."""
        a, b = jnp.asarray(a), jnp.asarray(b)
        return jnp.all(a[..., self._crossover_idx] == b[..., self._crossover_idx], -1)

    @functools.partial(jax.jit, static_argnums=0)
    def crossover(self, key: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: uniform crossover of valid parents a, b [..., n_choices].

        Parents that are not `compatible` give a copy of ``a``. Each choice comes from either parent with
        probability 1/2, except that a choice active in only one parent comes from that one (the other holds
        only a placeholder). A value the child's earlier choices do not allow is taken from the other parent,
        else repaired to the nearest allowed option.
        """
        a, b = jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)
        active_a, active_b = self.active_mask(a), self.active_mask(b)
        take_b = jnp.where(active_a == active_b, _uniform(key, a.shape) < 0.5, active_b)
        primary, other = jnp.where(take_b, b, a), jnp.where(take_b, a, b)
        no = jnp.zeros(a.shape, bool)
        child = self._resolve(jnp, primary, other, no, no, jnp.zeros((*a.shape, self._m)))
        return jnp.where(self.compatible(a, b)[..., None], child, a)

    @functools.partial(jax.jit, static_argnums=0)
    def first_occurrence(self, pop: jax.Array) -> jax.Array:
        """bool [P]: whether each row of ``pop`` [P, n_choices] is the first with its canonical encoding."""
        canon = self.canonicalize(pop)
        p = canon.shape[0]
        # lexsort's last key is primary; the row index as least significant key makes ties keep their order.
        order = jnp.lexsort((jnp.arange(p), *(canon[:, i] for i in reversed(range(self.n_choices)))))
        rows = canon[order]
        starts = jnp.concatenate([jnp.ones(1, bool), jnp.any(rows[1:] != rows[:-1], -1)])
        return jnp.zeros(p, bool).at[order].set(starts)

    def value(self, enc: jax.Array, name: str) -> jax.Array:
        """[...]: option value of numeric choice ``name`` for encodings [..., n_choices].

        Jit-able, e.g. for a supernet turning widths into masks.
        """
        choice = self[name]
        if not all(isinstance(o, (int, float)) for o in choice.options):
            raise TypeError(f"choice {name!r} has non-numeric options {choice.options}; compare its index instead")
        return jnp.asarray(np.array(choice.options))[jnp.asarray(enc)[..., self.index(name)]]

    # ------------------------------------------------------------------ host-side helpers
    def _as_host(self, enc: Any) -> np.ndarray:
        enc = np.asarray(enc)
        if enc.shape[-1:] != (self.n_choices,):
            raise ValueError(
                f"space {self.name!r} expects encodings of shape [..., {self.n_choices}] (one int per choice: "
                f"{', '.join(self.names)}), got shape {enc.shape}"
            )
        if not np.issubdtype(enc.dtype, np.integer):
            raise ValueError(f"encodings hold option indices and must be integers, got dtype {enc.dtype}")
        return enc.astype(np.int32)

    def validate(self, enc: Any) -> None:
        """Raise ValueError naming the first bad choice of ``enc`` [..., n_choices] and its allowed values."""
        rows = self._as_host(enc).reshape(-1, self.n_choices)
        bad = np.argwhere(~self._choice_ok(np, rows))
        if len(bad):
            r, i = (int(x) for x in bad[0])
            where = f"row {r}: " if np.ndim(enc) > 1 else ""
            raise ValueError(where + self._explain(rows[r], i))

    def _explain(self, row: np.ndarray, i: int) -> str:
        choice, v = self.choices[i], int(row[i])
        active = self._activity(np, row)
        if not active[i]:
            return (
                f"choice {choice.name!r} does not apply here (only when {choice.active_if}) but holds index {v}; "
                "inactive choices must be 0 - pass the encoding through space.canonicalize()"
            )
        if not 0 <= v < len(choice.options):
            return (
                f"choice {choice.name!r} holds index {v}, but its options are 0..{len(choice.options) - 1} "
                f"({choice.allowed_text()})"
            )
        allowed = self._allowed(np, row, active)[i]
        given = ", ".join(f"{r.name} = {self[r.name].options[int(row[self.index(r.name)])]}" for r in choice.valid_if)
        rules = "; ".join(r.text for r in choice.valid_if)
        options = ", ".join(t for t, ok in zip(choice.texts, allowed, strict=False) if ok)
        return (
            f"choice {choice.name!r} = {choice.options[v]} is not allowed with {given} ({rules}); "
            f"allowed here: {options}"
        )

    def decode(self, enc: Any) -> dict[str, Any]:
        """Readable architecture from a valid ``enc`` [n_choices]: active choice name -> option value."""
        row = self._as_host(enc)
        if row.ndim != 1:
            raise ValueError(f"decode takes one encoding of shape [{self.n_choices}], got shape {row.shape}")
        self.validate(row)
        active = self._activity(np, row)
        return {c.name: c.options[int(row[i])] for i, c in enumerate(self.choices) if active[i]}

    def encode(self, arch: Mapping[str, Any]) -> np.ndarray:
        """int32 [n_choices] from choice name -> option value; inactive choices may (and must) be left out."""
        self._check_names(arch)
        row = np.zeros(self.n_choices, np.int32)
        for i, c in enumerate(self.choices):
            # Choice i's activity depends only on the earlier entries, which are already filled in.
            is_active = self._activity(np, row)[i]
            if c.name in arch and not is_active:
                raise ValueError(
                    f"choice {c.name!r} does not apply to this architecture (only when {c.active_if}); remove it"
                )
            if is_active:
                if c.name not in arch:
                    raise ValueError(
                        f"choice {c.name!r} is missing; it applies to this architecture, allowed: {c.allowed_text()}"
                    )
                row[i] = c.index_of(arch[c.name])
        self.validate(row)
        return row

    def _check_names(self, arch: Mapping[str, Any]) -> None:
        for name in arch:
            if name not in self._index:
                raise ValueError(
                    f"space {self.name!r} has no choice {name!r}{_did_you_mean(name, self.names)}; "
                    f"its choices are {', '.join(self.names)}"
                )

    def to_string(self, enc: Any) -> str:
        """Canonical string of a valid ``enc`` [n_choices]."""
        return self._formatter(self.decode(enc))

    def from_string(self, text: str) -> np.ndarray:
        """int32 [n_choices] from a canonical string; ValueError says what was malformed."""
        texts = self._parser(text)
        self._check_names(texts)
        return self.encode({name: self[name].options[self[name].index_of_text(t)] for name, t in texts.items()})

    def fingerprint(self, enc: Any) -> str:
        """Stable hex id of the architecture: sha1 of ``"<space name>:<canonical string>"`` (same in every process)."""
        return hashlib.sha1(f"{self.name}:{self.to_string(enc)}".encode()).hexdigest()

    def unique(self, pop: Any) -> np.ndarray:
        """int32 [k]: ascending indices of the first row of each distinct canonical encoding in pop [P, n_choices]."""
        return np.flatnonzero(np.asarray(self.first_occurrence(self._as_host(pop)))).astype(np.int32)

    def neighbours(self, enc: Any) -> np.ndarray:
        """int32 [k, n_choices]: every valid architecture that differs from valid ``enc`` in one active choice.

        Choices such a change brings into play take their first allowed option, and values it makes
        disallowed move to the nearest allowed one; neighbours are distinct.
        """
        row = self._as_host(enc)
        self.validate(row)
        active = self._activity(np, row)
        allowed = self._allowed(np, row, active)
        candidates = []
        for i in range(self.n_choices):
            if active[i]:
                for option in np.flatnonzero(allowed[i]):
                    if option != row[i]:
                        candidates.append(row.copy())
                        candidates[-1][i] = option
        if not candidates:
            return np.zeros((0, self.n_choices), np.int32)
        batch = np.stack(candidates)
        no = np.zeros(batch.shape, bool)
        return self._resolve(np, batch, batch, no, no, np.zeros((*batch.shape, self._m)))

    def size(self) -> int:
        """Exact number of valid canonical architectures.

        Enumerates only the choices that rules refer to (in order: each one's activity and allowed options
        depend on earlier ones alone); for each such assignment, every other active choice multiplies the
        count by its number of allowed options and every inactive one by 1.
        """
        branching = sorted({r for refs in self._refs for r in refs})

        def count(row: np.ndarray, k: int) -> int:
            active = self._activity(np, row)
            allowed = self._allowed(np, row, active)
            if k == len(branching):
                free = [i for i in range(self.n_choices) if active[i] and i not in branching]
                return math.prod(int(allowed[i].sum()) for i in free)
            i = branching[k]
            if not active[i]:
                return count(row, k + 1)
            total = 0
            for option in np.flatnonzero(allowed[i]):
                row[i] = option
                total += count(row.copy(), k + 1)
            return total

        return count(np.zeros(self.n_choices, np.int32), 0)


def _pad(rules: list[list[tuple[int, np.ndarray]]], table_shape: tuple[int, ...]):
    """Per-choice rule lists as arrays: refs int32 [n, R], tables bool [n, R, *table_shape], real bool [n, R].

    Padding entries (real False) refer to choice 0 and never bind.
    """
    width = max(1, *(len(r) for r in rules))
    refs = np.zeros((len(rules), width), np.int32)
    tables = np.ones((len(rules), width, *table_shape), bool)
    real = np.zeros((len(rules), width), bool)
    for i, choice_rules in enumerate(rules):
        for j, (ref, table) in enumerate(choice_rules):
            refs[i, j], tables[i, j], real[i, j] = ref, table, True
    return refs, tables, real


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _default_format(arch: Mapping[str, Any]) -> str:
    return ";".join(f"{name}={value}" for name, value in arch.items())


def _default_parse(text: str) -> dict[str, str]:
    parsed = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(
                f"malformed architecture string {text!r}: expected 'name=value' parts joined by ';', got {part!r}"
            )
        parsed[name] = value
    return parsed

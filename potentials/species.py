"""Per-species-pair parameter tables for pair potentials (Lennard-Jones, Morse).

A :class:`PairTable` holds, for every parameter name, a symmetric ``(n, n)``
table over the ``n`` species it covers, and an atomic-number -> species lookup.
Under ``jit`` :meth:`PairTable.lookup` gathers every pair's parameters.

Tables are built on the host by :func:`pair_table` from

* per-parameter values: a scalar (the same for every pair), a mapping
  ``element -> value`` (combined for unlike pairs by a mixing rule), or ``None``
  (left for the potential to default);
* explicit pair values ``{("Ar", "Kr"): {"sigma": 3.5}}`` (or ``{"Ar-Kr": ...}``)
  that override the above for that pair (both orders).

Mixing rules: ``"arithmetic"`` ``(a + b) / 2`` and ``"geometric"`` ``sqrt(a b)``;
Lorentz-Berthelot is arithmetic for lengths and geometric for energies.
Elements may be given as chemical symbols or atomic numbers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kups_relax.precision import x64

Species = Union[str, int]
ParameterValue = Union[float, Mapping[Species, float], None]

MIXING_RULES = {
    "arithmetic": lambda a, b: 0.5 * (a + b),
    "geometric": lambda a, b: math.sqrt(a * b),
}

#: Length of the atomic-number -> species lookup table.
_N_NUMBERS = 119


def atomic_number(species: Species) -> int:
    """Atomic number of a chemical symbol or number; ``ValueError`` for anything else."""
    if isinstance(species, (int, np.integer)) and not isinstance(species, bool):
        if 0 < int(species) < _N_NUMBERS:
            return int(species)
    elif isinstance(species, str) and species in atomic_numbers and species != "X":
        return atomic_numbers[species]
    raise ValueError(f"{species!r} is not a chemical symbol or atomic number")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairTable:
    """Symmetric per-species-pair parameters (a pytree; build with :func:`pair_table`).

    Attributes:
        values: parameter name -> ``(n, n)`` table, in the potential's units.
        index: ``(119,)`` int32 species index of every atomic number, ``-1`` if not covered.
        numbers: the covered atomic numbers, in species order (static).
    """

    values: dict[str, jax.Array]
    index: jax.Array
    numbers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    def lookup(self, numbers_i: jax.Array, numbers_j: jax.Array) -> dict[str, jax.Array]:
        """Every parameter of the pairs ``(numbers_i[e], numbers_j[e])`` -> name -> ``(E,)``.

        Atomic numbers the table does not cover read species 0 (callers mask such pairs;
        the engine rejects structures with uncovered elements before they get here).
        """
        a = jnp.clip(jnp.take(self.index, numbers_i, mode="clip"), 0, None)
        b = jnp.clip(jnp.take(self.index, numbers_j, mode="clip"), 0, None)
        return {name: table[a, b] for name, table in self.values.items()}

    def host(self, name: str) -> np.ndarray:
        """The ``(n, n)`` table of ``name`` as a numpy array (host)."""
        return np.asarray(self.values[name])

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(chemical_symbols[z] for z in self.numbers)

    def __repr__(self) -> str:
        """Every pair's parameters (what trajectory metadata records), e.g. ``PairTable(Ar-Ar: sigma=3.4 ...)``."""
        try:
            tables = {name: self.host(name) for name in self.values}
        except Exception:  # traced values (inside jit) have no numbers to show
            return f"PairTable({', '.join(self.symbols)}; {', '.join(self.values)})"
        symbols = self.symbols
        pairs = []
        for a in range(len(symbols)):
            for b in range(a, len(symbols)):
                values = " ".join(f"{name}={table[a, b]:.10g}" for name, table in tables.items())
                pairs.append(f"{symbols[a]}-{symbols[b]}: {values}")
        return f"PairTable({'; '.join(pairs)})"


def _pair_key(key) -> tuple[Species, Species]:
    """``("Ar", "Kr")``, ``(18, 36)`` or, as configuration files write it, ``"Ar-Kr"``."""
    if isinstance(key, str) and key.count("-") == 1:
        key = tuple(part.strip() for part in key.split("-"))
    if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"pair keys must be (element, element) tuples or 'A-B' strings, got {key!r}")
    return key


def pair_table(
    parameters: Mapping[str, ParameterValue],
    pairs: Mapping[tuple[Species, Species], Mapping[str, float]] | None = None,
    mixing: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray | tuple[int, ...]]:
    """Per-pair tables from per-element values, mixing rules and explicit pairs (host).

    Args:
        parameters: every parameter name -> scalar, ``{element: value}`` or ``None``.
        pairs: explicit ``{(a, b): {name: value}}``; ``(a, b)`` and ``(b, a)`` are the same pair.
        mixing: parameter name -> ``"arithmetic"`` or ``"geometric"``, used for unlike pairs of
            per-element values (required for every parameter given per element).

    Returns:
        ``{"numbers": covered atomic numbers (sorted), name: (n, n) float64 table}``; entries
        no rule or pair determined are NaN (the caller applies its defaults, then
        :func:`finish`).

    Raises:
        ValueError: unknown elements, parameter names or mixing rules; a pair given twice
            with different values; no species at all.
    """
    pairs = dict(pairs or {})
    mixing = dict(mixing or {})
    species: set[int] = set()
    per_element: dict[str, dict[int, float]] = {}
    for name, value in parameters.items():
        if isinstance(value, Mapping):
            per_element[name] = {atomic_number(k): float(v) for k, v in value.items()}
            species |= set(per_element[name])
    pairs = {_pair_key(key): values for key, values in pairs.items()}
    for key, values in pairs.items():
        species |= {atomic_number(key[0]), atomic_number(key[1])}
        unknown = set(values) - set(parameters)
        if unknown:
            raise ValueError(f"pair {key}: unknown parameter(s) {sorted(unknown)} (known: {sorted(parameters)})")
    if not species:
        raise ValueError("per-species parameters need at least one element (a mapping or explicit pairs)")
    numbers = tuple(sorted(species))
    where = {z: k for k, z in enumerate(numbers)}
    n = len(numbers)

    out: dict[str, np.ndarray | tuple[int, ...]] = {"numbers": numbers}
    for name, value in parameters.items():
        table = np.full((n, n), np.nan)
        if name in per_element:
            rule = mixing.get(name)
            if rule not in MIXING_RULES:
                raise ValueError(f"mixing rule for {name!r} must be one of {sorted(MIXING_RULES)}, got {rule!r}")
            values = per_element[name]
            for a, va in values.items():
                for b, vb in values.items():
                    table[where[a], where[b]] = va if a == b else MIXING_RULES[rule](va, vb)
        elif value is not None:
            table[:] = float(value)
        out[name] = table

    given: dict[tuple[int, int], dict[str, float]] = {}
    for (a, b), values in pairs.items():
        za, zb = sorted((atomic_number(a), atomic_number(b)))
        for name, v in values.items():
            previous = given.setdefault((za, zb), {}).get(name)
            if previous is not None and previous != float(v):
                raise ValueError(f"pair ({chemical_symbols[za]}, {chemical_symbols[zb]}): {name} given twice "
                                 f"({previous} and {float(v)})")
            given[(za, zb)][name] = float(v)
            out[name][where[za], where[zb]] = out[name][where[zb], where[za]] = float(v)
    return out


@x64
def finish(tables: Mapping[str, np.ndarray | tuple[int, ...]]) -> PairTable:
    """A :class:`PairTable` from complete host tables (from :func:`pair_table` plus defaults).

    Raises:
        ValueError: naming the first parameter and pair left undetermined.
    """
    numbers = tuple(tables["numbers"])
    values = {}
    for name, table in tables.items():
        if name == "numbers":
            continue
        table = np.asarray(table, dtype=np.float64)
        missing = np.argwhere(np.isnan(table))
        if len(missing):
            a, b = missing[0]
            raise ValueError(f"no {name} for the pair ({chemical_symbols[numbers[a]]}, {chemical_symbols[numbers[b]]}): "
                             f"give it per element (mixed) or in pairs")
        values[name] = jnp.asarray(table)
    index = np.full(_N_NUMBERS, -1, dtype=np.int32)
    index[list(numbers)] = np.arange(len(numbers), dtype=np.int32)
    return PairTable(values=values, index=jnp.asarray(index), numbers=numbers)

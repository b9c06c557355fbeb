"""Morse potential with the semantics of ``ase.calculators.morse.MorsePotential``.

Pair energy, for every ordered pair counted with weight 1/2 (ASE's ``bothways``)::

    V(r) = epsilon * exp(rho0 (1 - r/r0)) * (exp(rho0 (1 - r/r0)) - 2) * fcut(r)

with ASE's (JuLIP's) quintic smooth-step cutoff ``fcut``: 1 below ``rcut1 * r0``,
0 beyond ``rcut2 * r0``, and ``6 s^5 - 15 s^4 + 10 s^3`` with
``s = 1 - (r - rcut1 r0) / ((rcut2 - rcut1) r0)`` between (C², so energies and forces
are continuous). ``rcut1`` and ``rcut2`` are in units of ``r0``, as in ASE.

Per-species-pair parameters: :meth:`MorsePotential.per_species` takes every
parameter per element (mixed for unlike pairs) and/or explicitly per pair.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kups_relax.batch import Geometry
from kups_relax.neighbors import NeighborList
from kups_relax.pairs import gather_neighbors, pair_geometry

from .pair import PairPotential
from .species import ParameterValue, PairTable, Species, finish, pair_table

#: Mixing rules of :meth:`MorsePotential.per_species`, per parameter.
MORSE_MIXING = {
    # energies geometric, everything else (lengths and the dimensionless rho0, rcut1, rcut2) arithmetic
    "lorentz-berthelot": dict(epsilon="geometric", r0="arithmetic", rho0="arithmetic",
                              rcut1="arithmetic", rcut2="arithmetic"),
    "geometric": dict(epsilon="geometric", r0="geometric", rho0="geometric", rcut1="geometric", rcut2="geometric"),
}

#: ASE's defaults (``MorsePotential.default_parameters``).
DEFAULTS = dict(epsilon=1.0, rho0=6.0, r0=1.0, rcut1=1.9, rcut2=2.7)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MorsePotential(PairPotential):
    """Morse potential (ASE's ``MorsePotential`` parameters and defaults).

    Attributes:
        epsilon: well depth, eV.
        rho0: exponential prefactor (dimensionless); the force constant at the minimum
            is ``2 epsilon (rho0 / r0)**2``.
        r0: position of the minimum, Å.
        rcut1: onset of the smooth cutoff, in units of ``r0``.
        rcut2: end of the cutoff, in units of ``r0`` (the cutoff is ``rcut2 * r0`` Å).
        pairs: per-species-pair tables of the five parameters (build with
            :meth:`per_species`); when set they replace the scalars.
    """

    epsilon: float = DEFAULTS["epsilon"]
    rho0: float = DEFAULTS["rho0"]
    r0: float = DEFAULTS["r0"]
    rcut1: float = DEFAULTS["rcut1"]
    rcut2: float = DEFAULTS["rcut2"]
    pairs: PairTable | None = None

    @classmethod
    def per_species(
        cls,
        epsilon: ParameterValue = DEFAULTS["epsilon"],
        rho0: ParameterValue = DEFAULTS["rho0"],
        r0: ParameterValue = DEFAULTS["r0"],
        rcut1: ParameterValue = DEFAULTS["rcut1"],
        rcut2: ParameterValue = DEFAULTS["rcut2"],
        pairs: dict[tuple[Species, Species], dict[str, float]] | None = None,
        mixing: str = "lorentz-berthelot",
    ) -> "MorsePotential":
        """Morse with parameters per species pair.

        Args:
            epsilon, rho0, r0, rcut1, rcut2: each a scalar for every pair (default ASE's) or
                ``{element: value}`` mixed for unlike pairs by ``mixing``.
            pairs: explicit values for some pairs, e.g. ``{("Cu", "Ag"): {"r0": 2.7}}``;
                they override the mixed values.
            mixing: ``"lorentz-berthelot"`` (``epsilon`` geometric, the others arithmetic)
                or ``"geometric"`` (all geometric).

        The potential covers exactly the elements named (in a mapping or a pair).
        """
        if mixing not in MORSE_MIXING:
            raise ValueError(f"unknown mixing rule {mixing!r} (available: {', '.join(MORSE_MIXING)})")
        parameters = dict(epsilon=epsilon, rho0=rho0, r0=r0, rcut1=rcut1, rcut2=rcut2)
        table = finish(pair_table(parameters, pairs, MORSE_MIXING[mixing]))
        cutoff = float(np.max(table.host("rcut2") * table.host("r0")))
        nan = float("nan")  # the scalars do not apply; rcut2 * r0 is the largest cutoff
        return cls(epsilon=nan, rho0=nan, r0=1.0, rcut1=nan, rcut2=cutoff, pairs=table)

    @property
    def cutoff(self) -> float:
        return float(self.rcut2 * self.r0)

    @property
    def supported_numbers(self) -> frozenset[int] | None:
        return None if self.pairs is None else frozenset(self.pairs.numbers)

    def _pair_terms(self, geometry: Geometry, neighbors: NeighborList):
        """One pass over the neighbor matrix: pair geometry, pair energies and ``g / r``.

        Returns ``(pg, pair, g_over_r)``: the :class:`~kups_relax.pairs.PairGeometry`, every
        directed pair's ``V(r)`` ``(K, A)`` (eV, before the weight 1/2) and ``g / r`` ``(K, A)``
        (eV/Å², ``g = dV/dr`` counts both directed copies of the pair, :mod:`kups_relax.pairs`;
        zero beyond the cutoff). :meth:`energy` uses only the energies.
        """
        if self.pairs is None:
            epsilon, rho0, r0, rcut1, rcut2 = self.epsilon, self.rho0, self.r0, self.rcut1, self.rcut2
        else:  # every pair's own parameters, (K, A) each
            (numbers_j,) = gather_neighbors(neighbors, geometry.numbers)
            p = self.pairs.lookup(geometry.numbers[None, :], numbers_j)
            epsilon, rho0, r0, rcut1, rcut2 = p["epsilon"], p["rho0"], p["r0"], p["rcut1"], p["rcut2"]
        r_on, r_off = rcut1 * r0, rcut2 * r0
        pg = pair_geometry(neighbors, geometry.positions, geometry.cell, geometry.system)
        r2 = pg.r2
        inside = pg.valid & (r2 < r_off ** 2)
        d = jnp.sqrt(jnp.where(inside, r2, r_off ** 2))  # padding pairs kept off r = 0
        expf = jnp.exp(rho0 * (1.0 - d / r0))
        morse = epsilon * expf * (expf - 2.0)
        cut, dcut = _smooth_step(d, r_on, r_off)
        pair = jnp.where(inside, morse * cut, 0.0)
        dmorse = -2.0 * epsilon * rho0 / r0 * expf * (expf - 1.0)
        g_over_r = jnp.where(inside, (dmorse * cut + morse * dcut) / d, 0.0)
        return pg, pair, g_over_r


def _smooth_step(r: jax.Array, r_on, r_off) -> tuple[jax.Array, jax.Array]:
    """ASE's quintic smooth step (:func:`fcut`) and its derivative by ``r`` (1/Å)."""
    s = 1.0 - (r - r_on) / (r_off - r_on)
    between = s * s * s * (10.0 + s * (-15.0 + 6.0 * s))
    dbetween = -30.0 * (s * (1.0 - s)) ** 2 / (r_off - r_on)  # d(between)/ds = 30 s^2 (1 - s)^2, ds/dr < 0
    value = jnp.where(s >= 1.0, 1.0, jnp.where(s > 0.0, between, 0.0))
    derivative = jnp.where((s < 1.0) & (s > 0.0), dbetween, 0.0)
    return value, derivative


def fcut(r: jax.Array, r_on, r_off) -> jax.Array:
    """ASE's quintic smooth step: 1 for ``r <= r_on``, 0 for ``r >= r_off``, C² in between (Å)."""
    return _smooth_step(r, r_on, r_off)[0]

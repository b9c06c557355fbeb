"""Lennard-Jones with the semantics of ``ase.calculators.lj.LennardJones``.

Pair energy ``u(r) = 4 epsilon ((sigma/r)**12 - (sigma/r)**6)`` for ``r < rc``.
With ``smooth=False`` (ASE's default) every pair inside the cutoff is shifted
by ``u(rc)`` so the energy is continuous at ``rc`` (the forces are not); with
``smooth=True`` the pair energy is multiplied by ASE's (jax-md's) cutoff
function going from 1 at ``ro`` to 0 at ``rc``. Every pair is counted from both
ends with weight 1/2, as ASE does with its ``bothways`` neighbor list.

Per-species-pair parameters: :meth:`LennardJones.per_species` builds a potential
whose ``sigma``, ``epsilon``, ``rc`` and ``ro`` come per pair from a
:class:`potentials.species.PairTable` (per-element values mixed by
Lorentz-Berthelot or geometric rules, and/or explicit pairs); every pair then
follows the formulas above with its own parameters, and the neighbor list
reaches the largest pair cutoff.
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

#: Mixing rules of :meth:`LennardJones.per_species`, per parameter.
LJ_MIXING = {
    "lorentz-berthelot": dict(sigma="arithmetic", epsilon="geometric", rc="arithmetic", ro="arithmetic"),
    "geometric": dict(sigma="geometric", epsilon="geometric", rc="geometric", ro="geometric"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LennardJones(PairPotential):
    """Lennard-Jones potential (ASE's ``LennardJones`` parameters and defaults).

    Attributes:
        sigma: length scale, Å (ASE default 1.0).
        epsilon: well depth, eV (ASE default 1.0).
        rc: cutoff, Å; ``None`` -> ``3 * sigma`` as in ASE.
        ro: onset of the smooth cutoff, Å; ``None`` -> ``0.66 * rc`` as in ASE.
        smooth: multiply by a smooth cutoff function instead of shifting the energy.
        pairs: per-species-pair ``sigma``, ``epsilon``, ``rc``, ``ro`` tables (build with
            :meth:`per_species`); when set they replace the scalars, and ``rc`` is the
            largest pair cutoff.
    """

    sigma: float = 1.0
    epsilon: float = 1.0
    rc: float | None = None
    ro: float | None = None
    smooth: bool = dataclasses.field(default=False, metadata=dict(static=True))
    pairs: PairTable | None = None

    def __post_init__(self):
        # resolve ASE's defaults once, on the host (leaves may be tracers under jit: leave them)
        if self.rc is None:
            object.__setattr__(self, "rc", 3.0 * self.sigma)
        if self.ro is None:
            object.__setattr__(self, "ro", 0.66 * self.rc)

    @classmethod
    def per_species(
        cls,
        sigma: ParameterValue = None,
        epsilon: ParameterValue = None,
        pairs: dict[tuple[Species, Species], dict[str, float]] | None = None,
        rc: ParameterValue = None,
        ro: ParameterValue = None,
        smooth: bool = False,
        mixing: str = "lorentz-berthelot",
    ) -> "LennardJones":
        """Lennard-Jones with parameters per species pair.

        Args:
            sigma, epsilon: Å, eV: a scalar for every pair, or ``{element: value}`` mixed
                for unlike pairs by ``mixing``.
            pairs: explicit values for some pairs, e.g. ``{("Ar", "Kr"): {"sigma": 3.5,
                "epsilon": 0.012}}`` (keys ``sigma``, ``epsilon``, ``rc``, ``ro``); they override
                the mixed values.
            rc, ro: Å, scalar or per element (mixed); default per pair as in ASE:
                ``rc = 3 sigma``, ``ro = 0.66 rc``.
            smooth: as for the scalar potential.
            mixing: ``"lorentz-berthelot"`` (``sigma``, ``rc``, ``ro`` arithmetic, ``epsilon``
                geometric) or ``"geometric"`` (all geometric).

        The potential covers exactly the elements named; a structure with another
        element is rejected by the engine (``supported_numbers``).
        """
        if mixing not in LJ_MIXING:
            raise ValueError(f"unknown mixing rule {mixing!r} (available: {', '.join(LJ_MIXING)})")
        tables = pair_table(dict(sigma=sigma, epsilon=epsilon, rc=rc, ro=ro), pairs, LJ_MIXING[mixing])
        tables["rc"] = np.where(np.isnan(tables["rc"]), 3.0 * tables["sigma"], tables["rc"])
        tables["ro"] = np.where(np.isnan(tables["ro"]), 0.66 * tables["rc"], tables["ro"])
        table = finish(tables)
        nan = float("nan")  # the scalars do not apply; nan makes any accidental use visible
        return cls(sigma=nan, epsilon=nan, rc=float(np.max(table.host("rc"))), ro=nan, smooth=smooth, pairs=table)

    @property
    def cutoff(self) -> float:
        return float(self.rc)

    @property
    def supported_numbers(self) -> frozenset[int] | None:
        return None if self.pairs is None else frozenset(self.pairs.numbers)

    def _pair_terms(self, geometry: Geometry, neighbors: NeighborList):
        """One pass over the neighbor matrix: pair geometry, pair energies and ``g / r``.

        Returns ``(pg, pair, g_over_r)``: the :class:`~kups_relax.pairs.PairGeometry`, every
        directed pair's energy ``(K, A)`` (eV, before the weight 1/2) and ``g / r`` ``(K, A)``
        (eV/Å², ``g = du/dr`` counts both directed copies of the pair, :mod:`kups_relax.pairs`;
        zero outside the cutoff). :meth:`energy` uses only the energies.
        """
        if self.pairs is None:
            sigma, epsilon, rc, ro = self.sigma, self.epsilon, self.rc, self.ro
        else:  # every pair's own parameters, (K, A) each
            (numbers_j,) = gather_neighbors(neighbors, geometry.numbers)
            p = self.pairs.lookup(geometry.numbers[None, :], numbers_j)
            sigma, epsilon, rc, ro = p["sigma"], p["epsilon"], p["rc"], p["ro"]
        pg = pair_geometry(neighbors, geometry.positions, geometry.cell, geometry.system)
        r2 = pg.r2
        rc2 = rc ** 2
        inside = pg.valid & (r2 <= rc2)
        r2_safe = jnp.where(inside, r2, rc2)  # keeps padding pairs away from 1/0
        c6 = jnp.where(inside, (sigma ** 2 / r2_safe) ** 3, 0.0)
        c12 = c6 ** 2
        pair = 4.0 * epsilon * (c12 - c6)
        # g / r = (du/dr) / r = 2 du/d(r^2): the pair's two directed copies weigh 1/2 each
        g_over_r = 24.0 * epsilon * (c6 - 2.0 * c12) / r2_safe
        if self.smooth:
            cut, dcut_dr2 = _cutoff_function(r2_safe, rc2, ro ** 2)
            g_over_r = g_over_r * cut + 2.0 * pair * dcut_dr2
            pair = pair * cut
        else:  # the shift is a constant: the force jumps at rc, as in ASE
            e0 = 4.0 * epsilon * ((sigma / rc) ** 12 - (sigma / rc) ** 6)
            pair = pair - jnp.where(c6 != 0.0, e0, 0.0)
        pair = jnp.where(inside, pair, 0.0)
        g_over_r = jnp.where(inside, g_over_r, 0.0)
        return pg, pair, g_over_r


def _cutoff_function(r2, rc2, ro2):
    """ASE's smooth cutoff in squared distances (1 below ``ro``, 0 above ``rc``, C^1 between)
    and its derivative by ``r2`` (1/Å²)."""
    between = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
    dbetween = 6.0 * (rc2 - r2) * (ro2 - r2) / (rc2 - ro2) ** 3
    value = jnp.where(r2 < ro2, 1.0, jnp.where(r2 < rc2, between, 0.0))
    derivative = jnp.where(r2 < ro2, 0.0, jnp.where(r2 < rc2, dbetween, 0.0))
    return value, derivative

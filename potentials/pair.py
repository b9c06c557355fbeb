"""What every pair potential shares: per-system energies, analytic forces and virials from pair terms.

A pair potential (:class:`~potentials.lennard_jones.LennardJones`,
:class:`~potentials.morse.MorsePotential`) subclasses :class:`PairPotential` and implements
``_pair_terms(geometry, neighbors) -> (pair geometry, pair energies (K, A), g/r (K, A))``, the
energy of every neighbor-matrix entry (eV, counted once from each end) and its derivative by
the distance over the distance (eV/Å²); energies, forces and virials follow here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kups_relax.batch import Geometry
from kups_relax.evaluate import EnergyForces
from kups_relax.neighbors import NeighborList
from kups_relax.pairs import pair_forces, pair_virial
from kups_relax.segments import segment_sum


class PairPotential:
    """Mixin: :meth:`energy` and :meth:`energy_forces` from the subclass's ``_pair_terms``."""

    def _pair_terms(self, geometry: Geometry, neighbors: NeighborList):
        raise NotImplementedError

    def _system_energies(self, geometry: Geometry, pair: jax.Array) -> jax.Array:
        # every pair appears in both atoms' columns: half of each entry is that atom's share
        per_atom = jnp.where(geometry.atom_mask, 0.5 * jnp.sum(pair, axis=0), 0.0)
        return segment_sum(per_atom, geometry.system, geometry.n_systems)

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        """Per-system energies ``(S,)``, eV."""
        _, pair, _ = self._pair_terms(geometry, neighbors)
        return self._system_energies(geometry, pair)

    def energy_forces(self, geometry: Geometry, neighbors: NeighborList, compute_virial: bool = False) -> EnergyForces:
        """Energies ``(S,)``, forces ``(A, 3)`` and (optionally) virials ``(S, 3, 3)`` analytically,
        from one pass over the neighbor matrix (the energies are :meth:`energy`'s)."""
        pg, pair, g_over_r = self._pair_terms(geometry, neighbors)
        forces = pair_forces(g_over_r, pg)
        virial = pair_virial(g_over_r, pg, geometry.system, geometry.n_systems) if compute_virial else None
        return EnergyForces(energy=self._system_energies(geometry, pair), forces=forces, virial=virial)

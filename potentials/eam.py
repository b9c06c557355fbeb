"""Embedded-atom method with the semantics of ``ase.calculators.eam.EAM``.

For atoms ``i`` of species ``a`` with neighbours ``j`` of species ``b`` closer than
the file's cutoff (``r_ij <= cutoff``)::

    E = sum_i F_a(rho_i) + 1/2 sum_i sum_j phi_ab(r_ij),    rho_i = sum_j rho_ba(r_ij)

where ``rho_ba`` is the density species ``b`` gives to species ``a`` (the same for
every ``a`` in ``funcfl``/``setfl`` files). Every atom, even one without
neighbours, pays ``F_a(rho_i)``. ``F``, ``rho`` and ``phi`` are ASE's
not-a-knot cubic splines through the tabulated samples (:mod:`potentials.splines`),
extrapolated beyond the tables; ``phi`` is the spline through
``(r_k, (r phi)_k / r_k)`` for ``k >= 1`` (ASE drops ``r = 0``). Forces and stress
come from the engine's autodiff, which gives the spline derivatives ASE uses.

Beyond the tables (a density above ``(nrho - 1) drho``, a distance beyond
``(nr - 1) dr``) both ASE and this code extrapolate the end cubic; FITPACK's
evaluation far outside its knots is noisy (~1e-10 eV for a density 100 grid
steps out, measured), so parity there is only that good. LAMMPS does not
extrapolate this way: keep structures inside the tables. ADP (``.adp``) files
are not supported.

Read a file with :meth:`EAM.from_file` (host, numpy; see :mod:`potentials.eam_file`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from kups_relax.batch import Geometry
from kups_relax.neighbors import NeighborList, pair_vectors
from kups_relax.segments import segment_sum

from . import splines
from .eam_file import EAMTables, read_eam

#: Length of the atomic-number -> species lookup table.
_N_NUMBERS = 119


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class EAM:
    """EAM potential from tabulated functions (build with :meth:`from_file` or :meth:`from_tables`).

    Attributes:
        embedding: ``(N, nrho - 1, 4)`` spline coefficients of ``F_a(rho)``, eV, on ``rho = k drho``.
        density: ``(N, N, nr - 1, 4)`` coefficients of ``rho_ba(r)`` (``[b, a]``: from species
            ``b`` to species ``a``) on ``r = k dr``.
        pair: ``(N, N, nr - 2, 4)`` coefficients of ``phi_ab(r)``, eV, on ``r = k dr``, ``k >= 1``.
        species: ``(119,)`` int32 species index of every atomic number (``-1``: not covered).
        drho: density grid spacing.
        dr: distance grid spacing, Å.
        rc: cutoff, Å (static).
        elements: the species' chemical symbols, in file order (static).
    """

    embedding: jax.Array
    density: jax.Array
    pair: jax.Array
    species: jax.Array
    drho: float
    dr: float
    rc: float = dataclasses.field(metadata=dict(static=True))
    elements: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_file(cls, path: str | os.PathLike, form: str | None = None) -> "EAM":
        """Read a ``.eam`` (funcfl), ``.eam.alloy`` (setfl) or ``.eam.fs`` (Finnis-Sinclair) file.

        ``form`` (``"eam"``, ``"alloy"``, ``"fs"``) overrides the suffix, as ASE's ``form=``.
        """
        return cls.from_tables(read_eam(path, form))

    @classmethod
    def from_tables(cls, tables: EAMTables) -> "EAM":
        """Build the splines of ``tables`` (host work, done once)."""
        rho_grid = np.arange(tables.nrho) * tables.drho
        r_grid = np.arange(tables.nr) * tables.dr
        species = np.full(_N_NUMBERS, -1, dtype=np.int32)
        for index, z in enumerate(tables.numbers):
            species[z] = index
        return cls(
            embedding=jnp.asarray(splines.cubic_coefficients(rho_grid, tables.embedding)),
            density=jnp.asarray(splines.cubic_coefficients(r_grid, tables.density)),
            pair=jnp.asarray(splines.cubic_coefficients(r_grid[1:], tables.rphi[..., 1:] / r_grid[1:])),
            species=jnp.asarray(species),
            drho=float(tables.drho),
            dr=float(tables.dr),
            rc=float(tables.cutoff),
            elements=tuple(tables.elements),
        )

    def __repr__(self) -> str:  # the tables are thousands of numbers: name what they describe
        return f"EAM(elements={self.elements}, cutoff={self.rc}, nrho={self.embedding.shape[-2] + 1}, " \
               f"drho={self.drho}, nr={self.density.shape[-2] + 1}, dr={self.dr})"

    @property
    def cutoff(self) -> float:
        return self.rc

    @property
    def supported_numbers(self) -> frozenset[int]:
        from ase.data import atomic_numbers

        return frozenset(atomic_numbers[e] for e in self.elements)

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        dtype = geometry.positions.dtype
        A, S = geometry.n_atom_rows, geometry.n_systems
        species = jnp.clip(jnp.take(self.species, geometry.numbers, mode="clip"), 0, None)
        si, sj = species[neighbors.senders], species[neighbors.receivers]

        vec = pair_vectors(neighbors, geometry.positions, geometry.cell, geometry.system)
        r2 = jnp.sum(vec * vec, axis=-1)
        r = jnp.sqrt(jnp.where(neighbors.mask, r2, self.rc ** 2))  # padding pairs kept off r = 0
        inside = neighbors.mask & (r <= self.rc)  # ASE: r <= cutoff

        dr = jnp.asarray(self.dr, dtype)
        phi = splines.evaluate(self.pair.astype(dtype), (si, sj), r, dr, offset=1)
        rho_pair = splines.evaluate(self.density.astype(dtype), (sj, si), r, dr)
        phi = jnp.where(inside, phi, 0.0)
        rho = jax.ops.segment_sum(jnp.where(inside, rho_pair, 0.0), neighbors.senders, num_segments=A)

        embed = splines.evaluate(self.embedding.astype(dtype), (species,), rho, jnp.asarray(self.drho, dtype))
        embed = jnp.where(geometry.atom_mask, embed, 0.0)

        owner = jnp.where(neighbors.mask, geometry.system[neighbors.senders], S)  # padding pairs dropped
        return segment_sum(0.5 * phi, owner, S) + segment_sum(embed, geometry.system, S)

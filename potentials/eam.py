"""Embedded-atom method with the semantics of ``ase.calculators.eam.EAM``.

For atoms ``i`` of species ``a`` with neighbours ``j`` of species ``b`` closer than
the file's cutoff (``r_ij <= cutoff``)::

    E = sum_i F_a(rho_i) + 1/2 sum_i sum_j phi_ab(r_ij),    rho_i = sum_j rho_ba(r_ij)

where ``rho_ba`` is the density species ``b`` gives to species ``a`` (the same for
every ``a`` in ``funcfl``/``setfl`` files). Every atom, even one without
neighbours, pays ``F_a(rho_i)``. ``F``, ``rho`` and ``phi`` are ASE's
not-a-knot cubic splines through the tabulated samples (:mod:`potentials.splines`),
extrapolated beyond the tables; ``phi`` is the spline through
``(r_k, (r phi)_k / r_k)`` for ``k >= 1`` (ASE drops ``r = 0``).

Forces and stress are analytic (:meth:`EAM.energy_forces`, with the spline derivatives ASE
uses): the derivative of the energy by a pair's length, through both of its directed copies,
is ``g = phi_ab'(r) + F_a'(rho_i) rho_ba'(r) + F_b'(rho_j) rho_ab'(r)``
(:mod:`kups_relax.pairs`), which needs ``F'`` of the neighbours: a second pass over the
neighbor matrix after the densities.

Every pair reads its three radial cubics (``phi_ab``, ``rho_ba``, ``rho_ab``) from one table
of 1-D coefficient columns (:attr:`EAM.radial`) at one flat index ``(a, b, interval)``: ``phi``
is re-tabulated on the density's grid (the same breakpoints, shifted by one interval) so that
one interval index serves both.

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
from kups_relax.evaluate import EnergyForces
from kups_relax.neighbors import NeighborList
from kups_relax.pairs import gather_neighbors, pair_forces, pair_geometry, pair_virial
from kups_relax.precision import x64
from kups_relax.segments import segment_sum

from . import splines
from .eam_file import EAMTables, read_eam

#: Length of the atomic-number -> species lookup table.
_N_NUMBERS = 119

#: Columns of :attr:`EAM.radial`: a cubic's coefficients, then its derivative's. The derivative
#: has columns of its own so that every gathered coefficient is read by one computation only:
#: XLA fuses such a gather into the arithmetic that reads it, but materializes one read by two
#: (the energy pass and the force pass), a ``(K, A)`` array written and read per coefficient
#: (measured: the forces ran markedly slower).
VALUE, SLOPE = range(0, 4), range(4, 7)


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
        radial: ``(F, 7, N * N * (nr - 1))`` what every pair ``(a, b)`` reads at distance
            ``r = k dr + u`` (``k`` the interval), as 1-D columns: row ``(a N + b) (nr - 1) + k``
            of ``[f, m]`` holds, for ``phi_ab`` (``f = 0``), ``rho_ba`` (``f = 1``, the density
            ``a`` receives) and, when ``N > 1``, ``rho_ab`` (``f = 2``, the density ``a`` gives;
            for one species it is ``f = 1``'s), the cubic's coefficients of ``u**m`` (``m < 4``,
            :data:`VALUE`) and its derivative's, ``1, 2, 3`` times ``c1, c2, c3``
            (:data:`SLOPE`). Built from ``density`` and ``pair`` by :meth:`from_tables`.
        drho: density grid spacing.
        dr: distance grid spacing, Å.
        rc: cutoff, Å (static).
        elements: the species' chemical symbols, in file order (static).
    """

    embedding: jax.Array
    density: jax.Array
    pair: jax.Array
    species: jax.Array
    radial: jax.Array
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
    @x64
    def from_tables(cls, tables: EAMTables) -> "EAM":
        """Build the splines of ``tables`` (host work, done once)."""
        rho_grid = np.arange(tables.nrho) * tables.drho
        r_grid = np.arange(tables.nr) * tables.dr
        species = np.full(_N_NUMBERS, -1, dtype=np.int32)
        for index, z in enumerate(tables.numbers):
            species[z] = index
        density = splines.cubic_coefficients(r_grid, tables.density)
        pair = splines.cubic_coefficients(r_grid[1:], tables.rphi[..., 1:] / r_grid[1:])
        return cls(
            embedding=jnp.asarray(splines.cubic_coefficients(rho_grid, tables.embedding)),
            density=jnp.asarray(density),
            pair=jnp.asarray(pair),
            species=jnp.asarray(species),
            radial=jnp.asarray(_radial_columns(density, pair, tables.dr)),
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

    def _pair_terms(self, geometry: Geometry, neighbors: NeighborList) -> dict:
        """Pass 1 over the neighbor matrix: pair geometry, densities, embedding energies.

        Returns a dict: ``pg`` (:class:`~kups_relax.pairs.PairGeometry`), ``inside`` (``(K, A)``
        pairs within the cutoff), ``r`` and ``u`` (``(K, A)`` distances and offsets into their
        grid intervals, Å), ``row`` (``(K, A)`` rows of :attr:`radial`), ``per_atom`` (``(A,)``
        energies, eV) and ``dembed`` (``(A,)`` ``F_a'(rho_i)``, eV per density unit; zero on
        padding rows).
        """
        dtype = geometry.positions.dtype
        n_species, n_intervals = self.embedding.shape[0], self.density.shape[-2]
        species = jnp.clip(jnp.take(self.species, geometry.numbers, mode="clip"), 0, None)

        pg = pair_geometry(neighbors, geometry.positions, geometry.cell, geometry.system)
        r = jnp.sqrt(jnp.where(pg.valid, pg.r2, self.rc ** 2))  # padding entries kept off r = 0
        inside = pg.valid & (r <= self.rc)  # ASE: r <= cutoff

        k, u = splines.interval(r, jnp.asarray(self.dr, dtype), n_intervals)
        if n_species == 1:
            row = k
        else:
            (sj,) = gather_neighbors(neighbors, species)
            row = (species[None, :] * n_species + sj) * n_intervals + k
        phi = jnp.where(inside, splines.polynomial(self._radial(0, VALUE, row, dtype), u), 0.0)
        rho = jnp.sum(jnp.where(inside, splines.polynomial(self._radial(1, VALUE, row, dtype), u), 0.0), axis=0)

        embed, dembed = splines.evaluate_with_derivative(
            self.embedding.astype(dtype), (species,), rho, jnp.asarray(self.drho, dtype))
        embed = jnp.where(geometry.atom_mask, embed, 0.0)
        per_atom = jnp.where(geometry.atom_mask, 0.5 * jnp.sum(phi, axis=0) + embed, 0.0)
        return dict(pg=pg, inside=inside, r=r, u=u, row=row, per_atom=per_atom,
                    dembed=jnp.where(geometry.atom_mask, dembed, 0.0))

    def _radial(self, function: int, columns: range, row: jax.Array, dtype) -> tuple[jax.Array, ...]:
        """Columns ``columns`` of :attr:`radial`'s ``function`` at ``row`` ``(K, A)``: 1-D gathers
        from a small table, which fuse into the arithmetic that reads them."""
        radial = self.radial.astype(dtype)
        return tuple(jnp.take(radial[function, m], row, mode="clip") for m in columns)

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        """Per-system energies ``(S,)``, eV."""
        t = self._pair_terms(geometry, neighbors)
        return segment_sum(t["per_atom"], geometry.system, geometry.n_systems)

    def energy_forces(self, geometry: Geometry, neighbors: NeighborList, compute_virial: bool = False) -> EnergyForces:
        """Energies ``(S,)``, forces ``(A, 3)`` and (optionally) virials ``(S, 3, 3)`` analytically.

        Pass 1 (:meth:`_pair_terms`) gives every atom's density, energy and ``F'(rho)``; pass 2
        gathers the neighbours' ``F'`` and reduces ``g = phi' + F_i' rho_ba' + F_j' rho_ab'``
        over each column (module docstring). The energies are :meth:`energy`'s.
        """
        t = self._pair_terms(geometry, neighbors)
        dtype, u, row = t["u"].dtype, t["u"], t["row"]
        dembed = t["dembed"]
        (dembed_j,) = gather_neighbors(neighbors, dembed)
        dphi = splines.polynomial(self._radial(0, SLOPE, row, dtype), u)
        received = splines.polynomial(self._radial(1, SLOPE, row, dtype), u)
        if self.radial.shape[0] > 2:  # several species: what i gives j is not what it receives
            g = dphi + dembed[None, :] * received + dembed_j * splines.polynomial(self._radial(2, SLOPE, row, dtype), u)
        else:
            g = dphi + (dembed[None, :] + dembed_j) * received
        g_over_r = jnp.where(t["inside"], g / t["r"], 0.0)
        pg = t["pg"]
        forces = pair_forces(g_over_r, pg)
        virial = pair_virial(g_over_r, pg, geometry.system, geometry.n_systems) if compute_virial else None
        energy = segment_sum(t["per_atom"], geometry.system, geometry.n_systems)
        return EnergyForces(energy=energy, forces=forces, virial=virial)


def _radial_columns(density: np.ndarray, pair: np.ndarray, dr: float) -> np.ndarray:
    """:attr:`EAM.radial` from the density ``(N, N, nr - 1, 4)`` and pair ``(N, N, nr - 2, 4)``
    spline coefficients (host, numpy).

    ``phi`` is tabulated from ``r = dr``: its interval ``k - 1`` starts where the density's
    interval ``k`` does, and its first interval, which extrapolates below ``dr``, is rewritten
    around ``r = 0`` for the density's first interval.
    """
    n = density.shape[0]
    first = splines.shift_origin(pair[..., :1, :], -dr)
    phi = np.concatenate([first, pair], axis=-2)  # (N, N, nr - 1, 4), [a, b]
    received = np.swapaxes(density, 0, 1)  # [a, b] = rho_ba, what a receives from b
    functions = [phi, received] + ([density] if n > 1 else [])  # density[a, b] = rho_ab
    columns = [np.concatenate([f, splines.derivative_coefficients(f)], axis=-1) for f in functions]
    return np.stack([np.moveaxis(c, -1, 0).reshape(len(VALUE) + len(SLOPE), -1) for c in columns])

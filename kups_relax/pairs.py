"""Pair geometry on the neighbor matrix, and forces and virials from pair derivatives.

Everything here works on the neighbour-major matrix of :class:`~kups_relax.neighbors.NeighborList`
(``(K, A)``: column ``i`` holds atom ``i``'s neighbours). A potential computes per-pair
quantities as ``(K, A)`` arrays and reduces them over the neighbour axis (``axis=0``); the
only gathers are 1-D reads of per-atom columns at the neighbour indices
(:func:`gather_neighbors`).

**Forces without scatters.** Write the energy as a function of the directed pair distances
``r_ik`` (every pair appears from both ends). With ``g_ik = dE/dr_ik + dE/dr_ki`` -- the
derivative of the energy by the pair's length through *both* of its directed copies, which
a potential computes at column ``i`` from per-atom quantities of ``i`` and of the gathered
neighbour ``j`` -- the force on atom ``i`` is

    F_i = sum_k g_ik (x_j + shift - x_i) / r_ik,

a reduction over column ``i`` only (:func:`pair_forces`). The virial (the derivative of the
energy by a homogeneous strain ``eps``, ``r -> r (1 + eps)``) is
``W = 1/2 sum_i sum_k g_ik d_ik (x) d_ik / r_ik`` per system (:func:`pair_virial`); the stress is
``W / V``. Both need the list to hold every pair from both ends, which it does.

**Gathered columns are computed once.** XLA's CPU backend fuses whatever computes a per-atom
column into the gather that reads it at every neighbour, so the column would be recomputed
``K`` times; :func:`gather_neighbors` writes each column out first (:func:`materialized`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .neighbors import NeighborList
from .segments import segment_sum


class PairGeometry(NamedTuple):
    """Vectors from every atom to its neighbours (neighbour-major, ``(K, A)`` each).

    Attributes:
        d: ``(dx, dy, dz)``, each ``(K, A)``: ``x_j + shift @ cell - x_i``, Å (garbage where
            ``valid`` is False).
        r2: ``(K, A)`` squared lengths, Å² (1 where ``valid`` is False, so ``sqrt`` and
            divisions stay finite).
        valid: ``(K, A)`` True for real neighbours.
    """

    d: tuple[jax.Array, jax.Array, jax.Array]
    r2: jax.Array
    valid: jax.Array


def gather_neighbors(neighbors: NeighborList, *columns: jax.Array) -> tuple[jax.Array, ...]:
    """Each per-atom ``(A,)`` column read at every neighbour: ``(K, A)`` arrays (padding entries
    read the last atom; mask them).

    Each column is computed once before it is read (:func:`materialized`).
    """
    index = neighbors.neighbors
    return tuple(jnp.take(materialized(c), index, mode="clip") for c in columns)


def materialized(values: jax.Array) -> jax.Array:
    """``values``, written out to memory: what produces them is not fused into what reads them.

    XLA's CPU backend fuses the arithmetic that produces a per-atom column into a gather of it,
    redoing it for every neighbour (measured on EAM's ``F'(rho)``, a spline lookup redone per
    pair), and it removes optimization barriers before fusing. A
    reduction is never fused into a gather, and ``x + 0`` is ``x``.
    """
    return jnp.sum(jnp.stack([values, jnp.zeros_like(values)]), axis=0)


def pair_geometry(neighbors: NeighborList, positions: jax.Array, cell: jax.Array, system: jax.Array) -> PairGeometry:
    """The :class:`PairGeometry` of ``positions (A, 3)`` with cells ``cell (S, 3, 3)`` (rows are
    lattice vectors; may be strained copies) and the system index ``system (A,)``."""
    S = cell.shape[0]
    cell_i = jnp.take(cell, jnp.clip(system, 0, S - 1), axis=0)  # (A, 3, 3)
    t = neighbors.shifts.astype(positions.dtype)  # (K, A, 3)
    gathered = gather_neighbors(neighbors, positions[:, 0], positions[:, 1], positions[:, 2])
    d = tuple(xj - positions[None, :, a] + t[..., 0] * cell_i[None, :, 0, a] + t[..., 1] * cell_i[None, :, 1, a]
              + t[..., 2] * cell_i[None, :, 2, a] for a, xj in enumerate(gathered))
    valid = neighbors.mask
    r2 = jnp.where(valid, d[0] * d[0] + d[1] * d[1] + d[2] * d[2], 1.0)
    return PairGeometry(d=d, r2=r2, valid=valid)


def pair_vectors(neighbors: NeighborList, positions: jax.Array, cell: jax.Array, system: jax.Array) -> jax.Array:
    """``(K, A, 3)`` vectors from each atom to its neighbours (zero for padding entries); for
    potentials that prefer one array (autodiff-only potentials, message passing)."""
    pg = pair_geometry(neighbors, positions, cell, system)
    return jnp.where(pg.valid[..., None], jnp.stack(pg.d, axis=-1), 0.0)


def pair_forces(g_over_r: jax.Array, pg: PairGeometry) -> jax.Array:
    """``(A, 3)`` forces ``F_i = sum_k g_ik d_ik / r_ik`` from ``g_over_r = g / r`` ``(K, A)``
    (zero on padding entries; see the module docstring for ``g``)."""
    return jnp.stack([jnp.sum(g_over_r * d, axis=0) for d in pg.d], axis=-1)


def pair_virial(g_over_r: jax.Array, pg: PairGeometry, system: jax.Array, n_systems: int) -> jax.Array:
    """``(S, 3, 3)`` virial ``W = 1/2 sum_i sum_k g_ik d_ik (x) d_ik / r_ik`` per system, eV
    (the strain derivative of the energy; stress = ``W / V``)."""
    dx, dy, dz = pg.d
    half = 0.5 * g_over_r
    xx, yy, zz = (jnp.sum(half * a * a, axis=0) for a in (dx, dy, dz))
    yz, xz, xy = (jnp.sum(half * a * b, axis=0) for a, b in ((dy, dz), (dx, dz), (dx, dy)))
    per_atom = jnp.stack([xx, xy, xz, xy, yy, yz, xz, yz, zz], axis=-1)
    return segment_sum(per_atom, system, n_systems).reshape(n_systems, 3, 3)


def neighbor_sum(values: jax.Array) -> jax.Array:
    """Sum over each atom's neighbours: ``(K, A, ...) -> (A, ...)``."""
    return jnp.sum(values, axis=0)

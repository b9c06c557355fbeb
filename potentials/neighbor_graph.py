"""The neighbor matrix as a message-passing graph: per evaluation, only the entries within a
model's cutoff, in tiles that skip the empty part of the matrix, each entry with the index of
its reverse entry.

Works on the neighbour-major matrix of :class:`~kups_relax.neighbors.NeighborList` (``(K, A)``;
column ``i`` holds atom ``i``'s neighbours out to cutoff + skin, every pair from both ends).
:func:`graph` builds a :class:`Graph` of the entries within the cutoff:

* **Compaction.** Every column is partitioned into the entries within the cutoff (first, in
  list order) and the rest (dropped: the dummy atom), so entries in the skin cost nothing.
* **Sorted columns.** The atoms (columns) are put in order of decreasing neighbour count, so
  the entries fill a staircase: row ``k`` is needed only by the atoms with more than ``k``
  neighbours. A model visits the matrix in tiles of ``rows x cols`` entries and skips the
  empty ones: a batch pays for its entries, not for the width its densest structure needs
  nor for its padding rows. The model runs on the atoms in this order (:func:`permute`).
* **Reverse entries.** Entry ``(k, i)`` (atom ``i`` sees ``j`` through lattice shift ``s``)
  has a reverse entry ``(k', j)`` (``j`` sees ``i`` through ``-s``) at the same distance (bit
  for bit), so kept too. The transpose of reading per-atom rows at the neighbours
  (:func:`gather_rows`, the backward pass of autodiff) reads the cotangents at the reverse
  entries and sums them over each column instead of scattering them: on XLA's CPU backend a
  scatter-add costs far more per element than a row gather, which costs about a memory copy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kups_relax.neighbors import NeighborList
from kups_relax.pairs import pair_geometry

#: Matrix entries per tile (:func:`tile_shape`): small enough for a tile's temporaries to stay in cache.
TILE_ENTRIES = 512
#: Most matrix rows per tile.
TILE_ROWS = 8


class Graph(NamedTuple):
    """The entries of a neighbor matrix within a cutoff, columns in sorted atom order.

    ``W`` is the list's width rounded up to a multiple of ``rows``; column ``c`` belongs to atom
    ``order[c]``, and neighbours are numbered in that order too.

    Attributes:
        neighbors: ``(W, A)`` int32 neighbour (sorted numbering) of each entry; the dummy atom
            ``A`` for entries beyond the cutoff and padding.
        shifts: ``(W, A, 3)`` lattice shifts (zero where ``neighbors`` is the dummy atom).
        inside: ``(W, A)`` True for entries within the cutoff.
        reverse: ``(W, A)`` int32 flat index (into ``W * A``, row-major) of each entry's
            reverse entry; ``W * A`` (out of range) for entries not ``inside``.
        order: ``(A,)`` int32 atom of every column (decreasing neighbour count, stable).
        rank: ``(A,)`` int32 column of every atom (the inverse of ``order``).
        tiles: ``(T, 2)`` int32 ``(row block, column block)`` of every tile holding an entry
            within the cutoff, first ``n_tiles`` rows (the rest repeat the last).
        n_tiles: ``()`` int32.
        rows, cols: tile shape (static).
    """

    neighbors: jax.Array
    shifts: jax.Array
    inside: jax.Array
    reverse: jax.Array
    order: jax.Array
    rank: jax.Array
    tiles: jax.Array
    n_tiles: jax.Array
    rows: int
    cols: int


def tile_shape(n_atoms: int) -> tuple[int, int]:
    """``(rows, cols)`` of a tile for ``n_atoms`` columns: powers of two, ``cols`` dividing
    ``n_atoms``, about :data:`TILE_ENTRIES` entries."""
    cols = 1
    while cols * 2 <= max(1, TILE_ENTRIES // TILE_ROWS) and n_atoms % (cols * 2) == 0:
        cols *= 2
    rows = 1
    while rows * 2 <= TILE_ROWS and rows * 2 * cols <= TILE_ENTRIES:
        rows *= 2
    return rows, cols


def graph(neighbors: NeighborList, positions: jax.Array, cell: jax.Array, system: jax.Array,
          cutoff: float) -> Graph:
    """The :class:`Graph` of the entries closer than ``cutoff`` (Å) at ``positions (A, 3)``.
    Not differentiated (a selection)."""
    K, A = neighbors.neighbors.shape
    rows, cols = tile_shape(A)
    W = -(-K // rows) * rows
    pg = pair_geometry(neighbors, jax.lax.stop_gradient(positions), jax.lax.stop_gradient(cell), system)
    inside = pg.valid & (pg.r2 < cutoff * cutoff)
    count = jnp.sum(inside, axis=0, dtype=jnp.int32)
    order = jnp.argsort(-count, stable=True).astype(jnp.int32)
    rank = jnp.zeros(A, jnp.int32).at[order].set(jnp.arange(A, dtype=jnp.int32))
    count = count[order]
    # stable partition of every column: entries within the cutoff first, in list order
    key = jnp.where(inside, 0, 1).astype(jnp.int32)[:, order]
    shifts = neighbors.shifts[:, order]
    _, nbr, s0, s1, s2 = jax.lax.sort((key, neighbors.neighbors[:, order], shifts[..., 0], shifts[..., 1],
                                       shifts[..., 2]), dimension=0, is_stable=True, num_keys=1)
    if W > K:
        nbr, s0, s1, s2 = (jnp.pad(v, ((0, W - K), (0, 0))) for v in (nbr, s0, s1, s2))
    inside = jnp.arange(W, dtype=jnp.int32)[:, None] < count[None, :]
    nbr = jnp.where(inside, jnp.take(rank, jnp.clip(nbr, 0, A - 1)), A)
    shifts = jnp.where(inside[..., None], jnp.stack([s0, s1, s2], axis=-1), 0).astype(neighbors.shifts.dtype)
    # tiles: row block r is needed by the column blocks of the atoms with more than r * rows entries
    n_row_blocks, n_col_blocks = W // rows, A // cols
    atoms_needing = jnp.sum(count[None, :] > jnp.arange(n_row_blocks, dtype=jnp.int32)[:, None] * rows, axis=1)
    blocks = (atoms_needing + cols - 1) // cols  # (n_row_blocks,)
    t = jnp.arange(n_row_blocks * n_col_blocks, dtype=jnp.int32)
    row_block, col_block = t // n_col_blocks, t % n_col_blocks
    used = col_block < blocks[row_block]
    n_tiles = jnp.sum(used, dtype=jnp.int32)
    # the used tiles first, in (row block, column block) order (a stable partition)
    position = jnp.where(used, jnp.cumsum(used) - 1, n_tiles + jnp.cumsum(~used) - 1)
    tiles = jnp.zeros((t.shape[0], 2), jnp.int32).at[position].set(jnp.stack([row_block, col_block], axis=-1))
    used_rows = jnp.max(count)
    return Graph(neighbors=nbr, shifts=shifts, inside=inside, reverse=_reverse(nbr, shifts, inside, used_rows, rows),
                 order=order, rank=rank, tiles=tiles, n_tiles=n_tiles, rows=rows, cols=cols)


def _reverse(nbr: jax.Array, shifts: jax.Array, inside: jax.Array, used_rows: jax.Array, rows: int) -> jax.Array:
    """Flat index of every inside entry's reverse entry (``W * A`` for the others): each entry
    ``(k, i)`` with neighbour ``j`` compares the used rows of column ``j`` with ``(i, -s)``."""
    W, A = nbr.shape
    atoms = jnp.arange(A, dtype=nbr.dtype)
    j = jnp.clip(nbr, 0, A - 1)
    wanted = -shifts

    def block(c, found):
        # candidates: rows c*rows ... of column j, for every entry: (rows, W, A)
        def candidates(v):
            return jnp.take(jax.lax.dynamic_slice_in_dim(v, c * rows, rows, axis=0), j, axis=1)

        match = candidates(nbr) == atoms
        for d in range(3):
            match &= candidates(shifts[..., d]) == wanted[..., d]
        row = jnp.argmax(match, axis=0).astype(jnp.int32) + c * rows
        return jnp.where(jnp.any(match, axis=0), row, found)

    found = jax.lax.fori_loop(0, (used_rows + rows - 1) // rows, block, jnp.zeros((W, A), jnp.int32))
    return jnp.where(inside, found * A + j, W * A)


@jax.custom_vjp
def permute(values: jax.Array, order: jax.Array, rank: jax.Array) -> jax.Array:
    """``values[order]`` (rows); the transpose is ``cotangent[rank]`` (``rank`` the inverse
    permutation), a gather instead of a scatter."""
    return jnp.take(values, order, axis=0)


def _permute_fwd(values, order, rank):
    return permute(values, order, rank), rank


def _permute_bwd(rank, g):
    return jnp.take(g, rank, axis=0), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def gather_rows(table: jax.Array, neighbors: jax.Array, reverse: jax.Array) -> jax.Array:
    """``table (A, ...)`` read at every entry's neighbour: ``(W, A, ...)`` (the dummy atom
    reads the last row; mask it). Materialized behind an optimization barrier (a gather
    inside a fusion with heavy arithmetic stops it from vectorizing on XLA's CPU backend).

    The transpose sums each column's cotangents read at the reverse entries (``reverse`` of
    :class:`Graph`), exact when only ``inside`` entries have nonzero cotangents.
    """
    return jax.lax.optimization_barrier(jnp.take(table, neighbors, axis=0, mode="clip"))


def _gather_rows_fwd(table, neighbors, reverse):
    return gather_rows(table, neighbors, reverse), reverse


def _gather_rows_bwd(reverse, g):
    W, A = reverse.shape
    at_reverse = jnp.take(g.reshape((W * A,) + g.shape[2:]), reverse, axis=0, mode="fill", fill_value=0)
    return jnp.sum(jax.lax.optimization_barrier(at_reverse), axis=0), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def edge_vectors(g: Graph, positions: jax.Array, cell: jax.Array, system: jax.Array) -> jax.Array:
    """``(W, A, 3)`` vectors ``x_j + s @ cell - x_i`` of the graph's entries, Å (garbage where
    not ``inside``), for ``positions (A, 3)`` and ``system (A,)`` in the graph's atom order;
    differentiable in ``positions`` and ``cell``."""
    S = cell.shape[0]
    cell_i = jnp.take(cell, jnp.clip(system, 0, S - 1), axis=0)  # (A, 3, 3)
    xj = gather_rows(positions, g.neighbors, g.reverse)
    t = g.shifts.astype(positions.dtype)
    image = sum(t[..., d, None] * cell_i[None, :, d] for d in range(3))
    return xj - positions[None] + image

"""Batched neighbor lists with explicit capacities, an overflow flag and a Verlet skin.

A :class:`NeighborList` holds every ordered pair ``(i, j)`` (both directions, as
ASE's ``bothways=True``) of atoms of the same system closer than
``cutoff + skin``, with the integer lattice ``shifts`` of the periodic image:
the pair vector is ``positions[j] - positions[i] + shifts @ cell[system[i]]``.
There are never pairs across systems. Positions are never wrapped by the engine;
shifts are computed for the unwrapped positions, so they stay valid as atoms move.

Shapes are capacities (jax-md style): ``allocate`` on the host chooses them,
``update`` under jit rebuilds the list when some atom moved more than half the
skin since the last build and raises ``overflow`` when a capacity was too small;
the host then grows the capacity and redoes the step.

Candidate pairs are enumerated per system, in one of two ways, whichever is
expected to test fewer candidates (:func:`_bin_plan`): all atom pairs of the
system times all periodic images needed to reach ``cutoff + skin`` (a ragged
enumeration whose length is the sum over systems of ``n_atoms**2 * n_images``,
so a batch of small systems costs what its systems cost), or a cell list with
bins half the radius wide. Either way a system's pairs come out in the same
order whatever slot it sits in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .batch import Geometry
from .buckets import bucket
from .executables import cached_jit


class Capacities(NamedTuple):
    """Static sizes of a neighbor-list build (all bucketed).

    Attributes:
        pairs: pair rows ``E``.
        dense_candidates: candidate pairs of the systems enumerated all-pairs.
        cell_rows: atoms of the systems enumerated with a cell list.
        bins: cell-list bins over all those systems.
        bin_size: atoms per bin.
        offsets: neighbouring bins visited per atom (27 unless a cell is thinner than the cutoff).
        partial_candidates: candidate pairs of a partial rebuild (only the systems that need
            one); a larger partial rebuild falls back to a full one.
        partial_cell_rows: atoms of a partial rebuild's cell-list systems (likewise).
    """

    pairs: int
    dense_candidates: int = 64
    cell_rows: int = 8
    bins: int = 8
    bin_size: int = 8
    offsets: int = 27
    partial_candidates: int = 64
    partial_cell_rows: int = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NeighborList:
    """Fixed-capacity pair list of a batch (a pytree).

    Attributes:
        senders: ``(E,)`` atom ``i`` of each pair (0 for padding pairs).
        receivers: ``(E,)`` atom ``j`` of each pair.
        shifts: ``(E, 3)`` integer image shifts (stored as floats), in lattice vectors.
        mask: ``(E,)`` True for real pairs.
        reference_positions: ``(A, 3)`` positions at the last build, Å.
        n_pairs: ``()`` pairs found at the last build (may exceed ``E`` on overflow).
        needed: ``(5,)`` what the last build needed of ``dense_candidates, cell_rows, bins,
            bin_size, offsets`` (compared with ``capacities`` to detect overflow).
        overflow: ``()`` True when a capacity was too small at the last build.
        n_builds: ``()`` builds so far (diagnostics).
        cutoff: interaction cutoff, Å (static).
        skin: Verlet skin, Å (static).
        capacities: the static :class:`Capacities`.
    """

    senders: jax.Array
    receivers: jax.Array
    shifts: jax.Array
    mask: jax.Array
    reference_positions: jax.Array
    n_pairs: jax.Array
    needed: jax.Array
    overflow: jax.Array
    n_builds: jax.Array
    cutoff: float = dataclasses.field(metadata=dict(static=True))
    skin: float = dataclasses.field(metadata=dict(static=True))
    capacities: Capacities = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.senders.shape[0]


#: Bins are at least this fraction of ``cutoff + skin`` wide. Half-width bins visit
#: 5 x 5 x 5 bins of ~1/8 the atoms each: about 2x fewer candidates than 3 x 3 x 3 full-width
#: bins, and they make a cell list worth it already for periodic cells of ~10 Å.
BIN_WIDTH_FRACTION = 0.5
#: Bins per direction are capped (a 3-D cell list over a huge vacuum gains nothing).
MAX_BINS_PER_DIRECTION = 64
#: Systems whose bins would hold more atoms than this (twice their mean) enumerate all pairs.
MAX_CELL_OCCUPANCY = 8


def _bin_plan(xp, extent, spacing, pbc, n_atoms, radius):
    """Bins, neighbouring bins and images per system, and which enumeration each system uses.

    Written once for numpy (host estimate) and jax.numpy (device build), which must agree.
    ``extent`` and ``spacing`` are ``(S, 3)`` Å, ``pbc (S, 3)``, ``n_atoms (S,)``.
    A system uses the cell list when its estimated candidates (atoms x neighbouring bins x
    twice the mean bin occupancy) are fewer than all pairs times images.
    """
    has_atoms = (n_atoms > 0)[:, None]
    n_bins = xp.clip(xp.floor(extent / (BIN_WIDTH_FRACTION * radius)), 1, MAX_BINS_PER_DIRECTION).astype(xp.int64)
    width = xp.where(has_atoms, extent / n_bins, 1.0)
    reach = xp.ceil(radius / xp.maximum(width, 1e-12))
    # along a non-periodic direction there is nothing beyond the last bin
    k_cells = xp.where(pbc, reach, xp.minimum(reach, n_bins - 1)).astype(xp.int64)
    k_dense = xp.where(pbc, xp.ceil(radius / spacing), 0).astype(xp.int64)
    n = n_atoms.astype(xp.int64)
    bins = xp.prod(n_bins, axis=-1)
    dense_cost = n * n * xp.prod(2 * k_dense + 1, axis=-1)
    occupancy = 2 * ((n + bins - 1) // bins)  # a guess at the fullest bin
    cell_cost = n * xp.prod(2 * k_cells + 1, axis=-1) * occupancy
    # bins are padded to the fullest bin of the whole batch: a system with crowded bins
    # (a thin slab in one layer of bins) would make every cell-list system pay for it
    use_cells = (cell_cost < dense_cost) & (occupancy <= MAX_CELL_OCCUPANCY) & (n > 0)
    return n_bins, width, k_cells, k_dense, use_cells


class _Layout(NamedTuple):
    """Per-atom and per-system quantities shared by both enumerations."""

    system: jax.Array  # (A,) clipped system index
    whole: jax.Array  # (A, 3) lattice translations that wrap each atom into its cell (periodic dims)
    bin_coord: jax.Array  # (A, 3) int bin of each atom (cell-list systems)
    n_bins: jax.Array  # (S, 3) bins per direction
    k_dense: jax.Array  # (S, 3) images per direction for the all-pairs enumeration
    k_cells: jax.Array  # (S, 3) neighbouring bins per direction for the cell list
    use_cells: jax.Array  # (S,) bool
    bin_offset: jax.Array  # (S,) first global bin of each cell-list system


def _layout(geometry: Geometry, radius) -> _Layout:
    S = geometry.n_systems
    system = jnp.clip(geometry.system, 0, S - 1)
    inv = jnp.linalg.inv(geometry.wrap_cell)  # columns are the reciprocal vectors b_d
    spacing = 1.0 / jnp.linalg.norm(inv, axis=-2)  # (S, 3) distance between lattice planes, Å
    frac = matvec_rows(geometry.positions, inv[system])
    pbc_atom = geometry.pbc[system]
    whole = jnp.where(pbc_atom, jnp.floor(frac), 0.0)
    u = frac - whole  # in [0, 1) along periodic directions; Å along the (unit) non-periodic rows
    mask = geometry.atom_mask[:, None]
    lo = jax.ops.segment_min(jnp.where(mask, u, jnp.inf), geometry.system, num_segments=S)
    hi = jax.ops.segment_max(jnp.where(mask, u, -jnp.inf), geometry.system, num_segments=S)
    has_atoms = (geometry.n_atoms > 0)[:, None]
    extent = jnp.where(geometry.pbc, spacing, jnp.where(has_atoms, hi - lo, 0.0))
    n_bins, width, k_cells, k_dense, use_cells = _bin_plan(jnp, extent, spacing, geometry.pbc, geometry.n_atoms, radius)
    cell_bins = jnp.where(use_cells, jnp.prod(n_bins, axis=-1), 0)
    bin_offset = jnp.cumsum(cell_bins) - cell_bins
    scaled = jnp.where(pbc_atom, u * n_bins[system], (u - lo[system]) / width[system])
    bin_coord = jnp.clip(jnp.floor(scaled), 0, n_bins[system] - 1).astype(jnp.int64)
    return _Layout(system, whole, bin_coord, n_bins, k_dense, k_cells, use_cells, bin_offset)


def _mixed_radix(index: jax.Array, k: jax.Array) -> jax.Array:
    """Index in ``[0, prod(2k+1))`` -> integer offsets ``(..., 3)`` in ``[-k, k]`` per direction."""
    width = 2 * k + 1
    t0 = index % width[..., 0]
    t1 = (index // width[..., 0]) % width[..., 1]
    t2 = index // (width[..., 0] * width[..., 1])
    return jnp.stack([t0, t1, t2], axis=-1) - k


def _dense_counts(geometry: Geometry, lay: _Layout, systems: jax.Array) -> jax.Array:
    n_images = jnp.prod(2 * lay.k_dense + 1, axis=-1)
    n = geometry.n_atoms.astype(jnp.int64)
    return jnp.where(lay.use_cells | ~systems, 0, n * n * n_images)


class _Dense(NamedTuple):
    """Ragged all-pairs x images enumeration; candidate ``c`` decodes to ``(system, i, j, image)``."""

    counts: jax.Array  # (S,) candidates of each system (0 if not enumerated)
    ends: jax.Array  # (S,) inclusive cumulative candidate counts
    total: jax.Array  # () candidates


def _dense(geometry: Geometry, lay: _Layout, systems: jax.Array) -> _Dense:
    counts = _dense_counts(geometry, lay, systems)
    ends = jnp.cumsum(counts)
    return _Dense(counts=counts, ends=ends, total=ends[-1])


def _dense_decode(geometry: Geometry, lay: _Layout, dense: _Dense, c: jax.Array):
    """Candidate ids -> ``(i, j, translation (.., 3), valid)``."""
    S = geometry.n_systems
    s = jnp.clip(jnp.searchsorted(dense.ends, c, side="right", method="scan_unrolled"), 0, S - 1)
    valid = c < dense.total
    n_images = jnp.prod(2 * lay.k_dense + 1, axis=-1)[s]
    local = c - (dense.ends[s] - dense.counts[s])
    img = local % n_images
    pair = local // n_images
    n_s = jnp.maximum(geometry.n_atoms[s].astype(c.dtype), 1)
    first = geometry.first_atom[s].astype(c.dtype)
    i = jnp.where(valid, first + pair // n_s, 0)
    j = jnp.where(valid, first + pair % n_s, 0)
    return i, j, _mixed_radix(img, lay.k_dense[s]), valid


class _Cells(NamedTuple):
    """Cell-list enumeration; candidate ``(r, o, m)``: row ``r``'s atom, neighbouring bin ``o``, slot ``m``."""

    rows: jax.Array  # (R,) atom of each row (A for unused rows)
    neighbours: jax.Array  # (R, O, M) candidate atom j (A if none)
    translation: jax.Array  # (R, O, 3) image translation of each neighbouring bin
    needs: tuple


def _cells(geometry: Geometry, lay: _Layout, caps: Capacities, systems: jax.Array, partial: bool = False) -> _Cells:
    """Bin the atoms of the cell-list systems; list each atom's neighbouring bins' atoms."""
    A = geometry.n_atom_rows
    R, B, M, O = caps.cell_rows, caps.bins, caps.bin_size, caps.offsets
    if partial:
        R = caps.partial_cell_rows
    in_cells = (lay.use_cells & systems)[lay.system] & geometry.atom_mask
    n_rows = jnp.sum(in_cells)
    (rows,) = jnp.nonzero(in_cells, size=R, fill_value=A)
    row_ok = rows < A
    rows_c = jnp.clip(rows, 0, A - 1)
    nb = lay.n_bins

    def flat_bin(s, b):
        return lay.bin_offset[s] + (b[..., 0] * nb[s, 1] + b[..., 1]) * nb[s, 2] + b[..., 2]

    s_row = lay.system[rows_c]
    key = jnp.where(row_ok, flat_bin(s_row, lay.bin_coord[rows_c]), B)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    sorted_atom = rows[order]
    bin_ids = jnp.arange(B)
    start = jnp.searchsorted(sorted_key, bin_ids, side="left")
    stop = jnp.searchsorted(sorted_key, bin_ids, side="right")
    max_occupancy = jnp.max(stop - start)
    rank = jnp.arange(R) - start[jnp.clip(sorted_key, 0, B - 1)]
    table = jnp.full((B, M), A, dtype=jnp.int32).at[
        jnp.where(sorted_key < B, sorted_key, B), rank].set(sorted_atom.astype(jnp.int32), mode="drop")

    k = lay.k_cells[s_row]  # (R, 3)
    n_offsets = jnp.prod(2 * k + 1, axis=-1)
    o = jnp.arange(O)
    offset = _mixed_radix(o[None, :], k[:, None, :])  # (R, O, 3)
    target = lay.bin_coord[rows_c][:, None, :] + offset
    nb_r = nb[s_row][:, None, :]
    pbc_r = geometry.pbc[s_row][:, None, :]
    translation = jnp.where(pbc_r, jnp.floor_divide(target, nb_r), 0)
    wrapped = target - translation * nb_r
    inside = jnp.all(pbc_r | ((target >= 0) & (target < nb_r)), axis=-1)
    pair_ok = row_ok[:, None] & (o[None, :] < n_offsets[:, None]) & inside  # (R, O)
    b_target = flat_bin(s_row[:, None], jnp.clip(wrapped, 0, nb_r - 1))
    neighbours = jnp.where(pair_ok[:, :, None], table[jnp.clip(b_target, 0, B - 1)], A)  # (R, O, M)
    n_cell_bins = jnp.sum(jnp.where(lay.use_cells, jnp.prod(nb, axis=-1), 0))
    max_offsets = jnp.max(jnp.where(lay.use_cells, jnp.prod(2 * lay.k_cells + 1, axis=-1), 0))
    return _Cells(rows=rows, neighbours=neighbours, translation=translation,
                  needs=(n_rows, n_cell_bins, max_occupancy, max_offsets))


def build(geometry: Geometry, cutoff: float, skin: float, capacities: Capacities,
          n_builds: jax.Array | int = 0, systems: jax.Array | None = None,
          keep: "NeighborList | None" = None) -> NeighborList:
    """Build the pair list (jit-compatible; capacities are static).

    Systems for which it is cheaper (:func:`_bin_plan`; bins at least
    :data:`BIN_WIDTH_FRACTION` of ``cutoff + skin`` wide) use a cell list (cost linear in their atoms); the others
    enumerate all their atom pairs times the periodic images needed (cheapest for
    small systems and cells thinner than the cutoff). Either way a system's pairs come
    out in an order that does not depend on its slot.

    Candidates are only tested (one distance each, from wrapped positions); the pair
    rows are decoded afterwards for the candidates kept, so the cost per candidate is small.

    A partial rebuild (``systems``, an ``(S,)`` mask, and ``keep``, the current list)
    enumerates only the selected systems, within ``capacities.partial_candidates``, and
    keeps the other systems' pairs as they are.
    """
    radius = cutoff + skin
    S, A = geometry.n_systems, geometry.n_atom_rows
    partial = systems is not None
    systems = jnp.ones(S, bool) if systems is None else systems
    lay = _layout(geometry, radius)
    positions = geometry.positions
    cell_of_atom = geometry.cell[lay.system]
    wrapped = positions - matvec_rows(lay.whole, cell_of_atom)  # Cartesian, inside the cell

    # dense candidates: decode, one distance each
    C = capacities.partial_candidates if partial else capacities.dense_candidates
    dense = _dense(geometry, lay, systems)
    c = jnp.arange(C, dtype=jnp.int32)
    i_d, j_d, t_d, ok_d = _dense_decode(geometry, lay, dense, c)
    vec_d = wrapped[j_d] - wrapped[i_d] + matvec_rows(t_d.astype(positions.dtype), cell_of_atom[i_d])
    self_d = (i_d == j_d) & jnp.all(t_d == 0, axis=-1)
    found_d = ok_d & (jnp.sum(vec_d * vec_d, axis=-1) < radius * radius) & ~self_d

    # cell-list candidates: (R, O, M), one distance each
    cells = _cells(geometry, lay, capacities, systems, partial)
    rows_c = jnp.clip(cells.rows, 0, A - 1)
    tvec = (cells.translation[..., 0, None] * cell_of_atom[rows_c][:, None, 0]
            + cells.translation[..., 1, None] * cell_of_atom[rows_c][:, None, 1]
            + cells.translation[..., 2, None] * cell_of_atom[rows_c][:, None, 2])  # (R, O, 3)
    j_c = cells.neighbours
    vec_c = wrapped[jnp.clip(j_c, 0, A - 1)] + (tvec - wrapped[rows_c][:, None, :])[:, :, None, :]
    self_c = (j_c == rows_c[:, None, None]) & jnp.all(cells.translation == 0, axis=-1)[:, :, None]
    found_c = (j_c < A) & (jnp.sum(vec_c * vec_c, axis=-1) < radius * radius) & ~self_c

    found = jnp.concatenate([found_d, found_c.reshape(-1)])
    n_kept = 0
    if partial:
        # the other systems keep their pairs (a slot emptied since has padding rows: dropped)
        sender_system = geometry.system[keep.senders]
        kept = keep.mask & (sender_system < S) & ~systems[jnp.clip(sender_system, 0, S - 1)]
        found = jnp.concatenate([kept, found])
        n_kept = keep.capacity

    E = capacities.pairs
    slot = jnp.cumsum(found.astype(jnp.int32)) - 1
    n_pairs = jnp.sum(found)
    target = jnp.where(found & (slot < E), slot, E)  # out of range -> dropped
    total = found.shape[0]
    pick = jnp.full(E, total, jnp.int32).at[target].set(jnp.arange(total, dtype=jnp.int32), mode="drop")
    real = pick < total

    # decode the kept candidates into pair rows
    cand = pick - n_kept
    is_dense = (cand >= 0) & (cand < C)
    i_e, j_e, t_e, _ = _dense_decode(geometry, lay, dense, jnp.clip(cand, 0, C - 1))
    flat = jnp.clip(cand - C, 0, j_c.size - 1)
    O, M = j_c.shape[1], j_c.shape[2]
    r, om = flat // (O * M), flat % (O * M)
    i_cell = rows_c[r]
    j_cell = j_c.reshape(-1)[flat]
    t_cell = cells.translation[r, om // M]
    i = jnp.where(is_dense, i_e, i_cell)
    j = jnp.where(is_dense, j_e, j_cell)
    t = jnp.where(is_dense[:, None], t_e, t_cell).astype(positions.dtype)
    shift = t - lay.whole[j] + lay.whole[i]
    if partial:
        from_keep = pick < n_kept
        src = jnp.clip(pick, 0, n_kept - 1)
        i = jnp.where(from_keep, keep.senders[src], i)
        j = jnp.where(from_keep, keep.receivers[src], j)
        shift = jnp.where(from_keep[:, None], keep.shifts[src], shift)
        reference = jnp.where(geometry.atom_mask[:, None] & systems[lay.system][:, None],
                              positions, keep.reference_positions)
    else:
        reference = positions

    n_rows, n_bins, occupancy, n_offsets = cells.needs
    needed = jnp.stack([dense.total, n_rows, n_bins, occupancy, n_offsets]).astype(jnp.int64)
    limits = jnp.asarray([C, capacities.partial_cell_rows if partial else capacities.cell_rows, capacities.bins,
                          capacities.bin_size, capacities.offsets], dtype=jnp.int64)
    overflow = (n_pairs > E) | jnp.any(needed > limits)
    if partial:
        needed = jnp.maximum(keep.needed, needed)  # what a full build needs, as far as known
    return NeighborList(
        senders=jnp.where(real, i, 0).astype(jnp.int32),
        receivers=jnp.where(real, j, 0).astype(jnp.int32),
        shifts=jnp.where(real[:, None], shift, 0.0),
        mask=real,
        reference_positions=reference, n_pairs=n_pairs, needed=needed,
        overflow=overflow, n_builds=jnp.asarray(n_builds) + 1,
        cutoff=float(cutoff), skin=float(skin), capacities=capacities,
    )


def matvec_rows(vectors: jax.Array, matrices: jax.Array) -> jax.Array:
    """Row-wise ``vectors[e] @ matrices[e]`` for ``(E, 3)`` and ``(E, 3, 3)``.

    Written as broadcasting element-wise products: XLA's CPU batched 3x3 dot is far slower.
    """
    return vectors[:, 0, None] * matrices[:, 0] + vectors[:, 1, None] * matrices[:, 1] + vectors[:, 2, None] * matrices[:, 2]


def rebuild(neighbors: NeighborList, geometry: Geometry, systems: jax.Array | None = None) -> NeighborList:
    """Build again with the same cutoff, skin and capacities (jit-compatible).

    With ``systems`` (an ``(S,)`` mask), only those systems are rebuilt when their
    candidates fit the partial capacity, else everything is.
    """
    if systems is None:
        return build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities, neighbors.n_builds)
    fits = _partial_fits(neighbors, geometry, systems)
    return jax.lax.cond(
        fits,
        lambda: build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities, neighbors.n_builds,
                      systems=systems, keep=neighbors),
        lambda: build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities, neighbors.n_builds),
    )


def moved_too_far(neighbors: NeighborList, geometry: Geometry) -> jax.Array:
    """``(S,)`` True for the systems with an atom that moved more than half the skin since the last build."""
    moved = jnp.sum((geometry.positions - neighbors.reference_positions) ** 2, axis=-1) > (0.5 * neighbors.skin) ** 2
    return jax.ops.segment_max(moved.astype(jnp.int32), geometry.system, num_segments=geometry.n_systems) > 0


def needs_rebuild(neighbors: NeighborList, positions: jax.Array) -> jax.Array:
    """True when some atom moved more than half the skin since the last build."""
    moved = jnp.sum((positions - neighbors.reference_positions) ** 2, axis=-1)
    return jnp.max(moved) > (0.5 * neighbors.skin) ** 2


def update(neighbors: NeighborList, geometry: Geometry) -> NeighborList:
    """Rebuild the systems whose skin is used up (jit-compatible); the others keep their pairs.

    Capacities are kept; check ``overflow`` afterwards.
    """
    flagged = moved_too_far(neighbors, geometry)
    return jax.lax.cond(jnp.any(flagged), lambda: rebuild(neighbors, geometry, flagged), lambda: neighbors)


def pair_vectors(neighbors: NeighborList, positions: jax.Array, cell: jax.Array, system: jax.Array) -> jax.Array:
    """``(E, 3)`` vectors from atom ``i`` to its neighbour ``j`` (Å); zero for padding pairs.

    ``cell`` may be a strained cell (for stress); ``shifts`` are in lattice vectors.
    """
    S = cell.shape[0]
    s = jnp.clip(system[neighbors.senders], 0, S - 1)
    vec = positions[neighbors.receivers] - positions[neighbors.senders] + matvec_rows(neighbors.shifts, cell[s])
    return jnp.where(neighbors.mask[:, None], vec, 0.0)


_build_jit = cached_jit(build, static_argnames=("cutoff", "skin", "capacities"))


def estimate_capacities(geometry: Geometry, radius: float) -> Capacities:
    """Capacities for a first build, computed on the host (numpy) so that it usually fits.

    Everything but the pair count is what :func:`build` will need, recomputed the same way
    (a last-bit difference only costs a second build); the pair capacity is an upper
    estimate from each system's density. Each build with new capacities is a compilation,
    so a good first guess saves seconds per new batch shape.
    """
    g = jax.device_get(geometry)
    S = g.cell.shape[0]
    n = np.asarray(g.n_atoms, np.int64)
    mask = np.asarray(g.system) < S
    system = np.clip(np.asarray(g.system), 0, S - 1)
    inv = np.linalg.inv(np.asarray(g.wrap_cell, np.float64))
    spacing = 1.0 / np.linalg.norm(inv, axis=-2)
    pbc = np.asarray(g.pbc)
    frac = np.einsum("ad,adk->ak", np.asarray(g.positions, np.float64), inv[system])
    pbc_atom = pbc[system]
    u = frac - np.where(pbc_atom, np.floor(frac), 0.0)
    lo = np.full((S, 3), np.inf)
    hi = np.full((S, 3), -np.inf)
    np.minimum.at(lo, system[mask], u[mask])
    np.maximum.at(hi, system[mask], u[mask])
    has = (n > 0)[:, None]
    extent = np.where(pbc, spacing, np.where(has, hi - lo, 0.0))
    n_bins, width, k_cells, k_dense, use_cells = _bin_plan(np, extent, spacing, pbc, n, radius)
    images = np.prod(2 * k_dense + 1, axis=-1)
    dense = int(np.sum(np.where(use_cells, 0, n * n * images)))
    rows = int(np.sum(n[use_cells]))
    bins = int(np.sum(np.prod(n_bins, axis=-1)[use_cells]))
    occupancy, offsets = 1, 1
    if use_cells.any():
        offsets = int(np.max(np.prod(2 * k_cells + 1, axis=-1)[use_cells]))
        in_cells = mask & use_cells[system]
        s_c = system[in_cells]
        scaled = np.where(pbc_atom[in_cells], u[in_cells] * n_bins[s_c], (u[in_cells] - lo[s_c]) / width[s_c])
        b = np.clip(np.floor(scaled), 0, n_bins[s_c] - 1).astype(np.int64)
        offset = np.cumsum(np.where(use_cells, np.prod(n_bins, axis=-1), 0)) - np.where(use_cells, np.prod(n_bins, axis=-1), 0)
        key = offset[s_c] + (b[:, 0] * n_bins[s_c, 1] + b[:, 1]) * n_bins[s_c, 2] + b[:, 2]
        occupancy = int(np.bincount(key).max())
    # pairs: neighbours within the radius at the system's own density (3-D periodic) or at a
    # dense packing (0.1 atoms/A^3) otherwise, never more than all pairs and images
    volume = np.abs(np.linalg.det(np.asarray(g.cell, np.float64)))
    density = np.where(pbc.all(axis=-1) & (volume > 1e-9), n / np.where(volume > 1e-9, volume, 1.0), 0.1)
    sphere = density * 4.0 / 3.0 * np.pi * radius ** 3
    pairs = int(np.sum(np.minimum(n * np.maximum(n - 1, 0) * images + n * (images - 1), n * sphere)))
    grow = lambda x: bucket(int(x * 1.25) + 1, minimum=8)  # noqa: E731
    return Capacities(pairs=bucket(int(pairs * 1.25) + 1, minimum=64), dense_candidates=bucket(dense, minimum=64),
                      cell_rows=grow(rows), bins=grow(bins), bin_size=grow(occupancy), offsets=max(offsets, 1),
                      partial_candidates=bucket(dense // 8, minimum=64), partial_cell_rows=bucket(rows // 8, minimum=8))


def allocate(geometry: Geometry, cutoff: float, skin: float, capacity: int | None = None,
             capacities: Capacities | None = None) -> NeighborList:
    """Build a list on the host, choosing bucketed capacities large enough (jax-md's ``allocate``).

    ``capacity`` (pairs) and ``capacities`` are lower bounds. The first build uses
    :func:`estimate_capacities`; builds are repeated with grown capacities until nothing
    overflows (every build reports what it needed); the pair capacity is at least 25 %
    above the pairs found, so the list can grow as atoms move.
    """
    estimate = estimate_capacities(geometry, cutoff + skin)
    caps = Capacities(*(max(a, b) for a, b in zip(capacities, estimate))) if capacities else estimate
    caps = caps._replace(pairs=max(caps.pairs, capacity or 0))
    for _ in range(8):
        # partial rebuilds (a few systems at a time) are what the loop mostly does
        caps = caps._replace(partial_candidates=max(caps.partial_candidates,
                                                    bucket(caps.dense_candidates // 8, minimum=64)),
                             partial_cell_rows=max(caps.partial_cell_rows, bucket(caps.cell_rows // 8, minimum=8)))
        nl = _build_jit(geometry, cutoff=float(cutoff), skin=float(skin), capacities=caps)
        needed = [int(nl.n_pairs)] + [int(x) for x in np.asarray(nl.needed)]
        tight = bucket(int(needed[0] * 1.25) + 1, minimum=64)
        if not bool(nl.overflow) and tight <= caps.pairs:
            if caps.pairs > tight and (capacity or 0) <= tight and not capacities:
                # the estimate was too generous, and padding pairs cost every evaluation: the
                # real pairs come first, so keep the first ``tight`` rows (no second build)
                return _truncated(nl, tight)
            return nl
        grown = [max(c, bucket(int(n * 1.25) + 1, minimum=8)) for c, n in zip(caps, needed)]
        caps = Capacities(*grown, partial_candidates=caps.partial_candidates, partial_cell_rows=caps.partial_cell_rows)
        caps = caps._replace(offsets=max(capacities.offsets if capacities else 1, needed[5], 1))
    raise RuntimeError(f"neighbor list capacities did not settle: {caps}")


def _truncated(neighbors: NeighborList, pairs: int) -> NeighborList:
    """The list with only its first ``pairs`` rows (all its real pairs must be among them)."""
    assert int(neighbors.n_pairs) <= pairs
    return _truncate_jit(neighbors, pairs)


@cached_jit(static_argnames=("pairs",))
def _truncate_jit(neighbors: NeighborList, pairs: int) -> NeighborList:
    return dataclasses.replace(
        neighbors, senders=neighbors.senders[:pairs], receivers=neighbors.receivers[:pairs],
        shifts=neighbors.shifts[:pairs], mask=neighbors.mask[:pairs],
        capacities=neighbors.capacities._replace(pairs=pairs))


def grow(neighbors: NeighborList, geometry: Geometry) -> NeighborList:
    """A list with capacities large enough for ``geometry`` (after an overflow).

    Every capacity that overflowed at least doubles (pairs: at least the next bucket, as
    padding pairs cost every evaluation; bins visited per atom: what is needed), so a stream whose structures keep asking for a
    little more grows a capacity a few times, not once per structure: each growth is a
    compilation of every program of the batch.
    """
    caps = neighbors.capacities
    needed = [int(neighbors.n_pairs), *(int(x) for x in np.asarray(neighbors.needed))]
    larger = [caps.pairs if needed[0] <= caps.pairs else max(bucket(caps.pairs + 1), needed[0])]
    larger += [c if n <= c else max(2 * c, n) for c, n in zip(caps[1:5], needed[1:5])]
    larger += [max(caps.offsets, needed[5])]  # neighbouring bins: exactly what a thin cell needs
    floor = Capacities(*larger, partial_candidates=caps.partial_candidates, partial_cell_rows=caps.partial_cell_rows)
    return allocate(geometry, neighbors.cutoff, neighbors.skin, capacities=floor)


def rebuilt_systems(neighbors: NeighborList, geometry: Geometry, systems: jax.Array) -> jax.Array:
    """``(S,)`` the systems that ``rebuild(neighbors, geometry, systems)`` builds anew.

    ``systems`` when the partial rebuild fits its capacity, else every system (the same test as
    :func:`rebuild`). The variable-cell loop uses it to know at which cell each system's pairs were found.
    """
    return systems | ~_partial_fits(neighbors, geometry, systems)


def _partial_fits(neighbors: NeighborList, geometry: Geometry, systems: jax.Array) -> jax.Array:
    """Whether a partial rebuild of ``systems`` fits its capacities (else a full one is done)."""
    caps = neighbors.capacities
    lay = _layout(geometry, neighbors.cutoff + neighbors.skin)
    cell_rows = jnp.sum(jnp.where(lay.use_cells & systems, geometry.n_atoms, 0))
    return (jnp.sum(_dense_counts(geometry, lay, systems)) <= caps.partial_candidates) & (cell_rows <= caps.partial_cell_rows)

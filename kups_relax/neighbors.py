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
        cell_candidates: candidate pairs of the cell-list systems (each atom times the atoms
            of its neighbouring bins).
        offsets: neighbouring bins visited per atom (27 unless a cell is thinner than the cutoff).
        partial_candidates: candidate pairs of a partial rebuild (only the systems that need
            one); a larger partial rebuild falls back to a full one.
        partial_cell_rows: atoms of a partial rebuild's cell-list systems (likewise).
        partial_cell_candidates: cell-list candidates of a partial rebuild (likewise, found
            only after binning: a partial rebuild that needs more is redone in full).

    The partial capacities are a quarter of the full ones, and at least twice what the
    largest system needs, so that rebuilding one or two systems never takes a full build.
    """

    pairs: int
    dense_candidates: int = 64
    cell_rows: int = 8
    bins: int = 8
    cell_candidates: int = 64
    offsets: int = 27
    partial_candidates: int = 64
    partial_cell_rows: int = 8
    partial_cell_candidates: int = 64


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
            cell_candidates, offsets`` (compared with ``capacities`` to detect overflow).
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
    # atoms sit closer together than the mean over the bins suggests (a cluster leaves the
    # corners of its box empty): twice the mean occupancy
    occupancy = 2 * ((n + bins - 1) // bins)
    cell_cost = n * xp.prod(2 * k_cells + 1, axis=-1) * occupancy
    use_cells = (cell_cost < dense_cost) & (n > 0)
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
    width = (2 * k + 1).astype(jnp.int32)
    q0, t0 = _divmod(index.astype(jnp.int32), width[..., 0])
    t2, t1 = _divmod(q0, width[..., 1])
    return jnp.stack([t0, t1, t2], axis=-1).astype(k.dtype) - k


def _divmod(x: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x // d, x % d)`` for int32 ``0 <= x < 2**31``, ``d >= 1``, exactly.

    x86 has no vector integer division, so XLA divides integers one element at a time (~100
    cycles for int64): this was most of the cost of the all-pairs enumeration. A float64
    quotient is vectorised and off by at most one, which one integer multiply corrects.
    """
    q = jnp.floor(x.astype(jnp.float64) / d.astype(jnp.float64)).astype(jnp.int32)
    r = x - q * d
    q = jnp.where(r < 0, q - 1, jnp.where(r >= d, q + 1, q))
    return q, x - q * d


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


def _dense_decode(geometry: Geometry, lay: _Layout, dense: _Dense, c: jax.Array, sorted_ids: bool = False):
    """Candidate ids -> ``(i, j, translation (.., 3), valid)``.

    ``sorted_ids``: ``c`` is ``arange(len(c))``, so each candidate's system comes from one
    cumulative sum instead of a binary search. Every per-system quantity is read with a single
    1-D gather (XLA fuses those into the arithmetic; gathering rows of a table costs ~25 ns
    per candidate on a CPU).
    """
    S = geometry.n_systems
    if sorted_ids:
        starts = jnp.zeros(c.shape[0] + 1, jnp.int32).at[jnp.minimum(dense.ends[:-1], c.shape[0])].add(1)
        s = jnp.minimum(jnp.cumsum(starts)[:-1], S - 1)
    else:
        s = jnp.clip(jnp.searchsorted(dense.ends, c, side="right", method="scan_unrolled"), 0, S - 1)
    valid = c < dense.total

    def per_system(values):  # a 1-D gather from a small table fuses into the arithmetic
        return values.astype(jnp.int32)[s]

    local = jnp.clip(c - per_system(dense.ends - dense.counts), 0, 2**31 - 1).astype(jnp.int32)
    pair, img = _divmod(local, per_system(jnp.prod(2 * lay.k_dense + 1, axis=-1)))
    a, b = _divmod(pair, per_system(jnp.maximum(geometry.n_atoms, 1)))
    first = per_system(geometry.first_atom)
    i = jnp.where(valid, first + a, 0)
    j = jnp.where(valid, first + b, 0)
    k = [per_system(lay.k_dense[:, d]) for d in range(3)]
    q0, t0 = _divmod(img, 2 * k[0] + 1)
    t2, t1 = _divmod(q0, 2 * k[1] + 1)
    return i, j, jnp.stack([t0 - k[0], t1 - k[1], t2 - k[2]], axis=-1), valid


class _Cells(NamedTuple):
    """Ragged cell-list enumeration: candidate ``c`` pairs row ``q // O``'s atom with atom
    ``neighbours[c]`` of its neighbouring bin ``q % O`` (``q = segment[c]``)."""

    rows: jax.Array  # (R,) atom of each row (A for unused rows)
    segment: jax.Array  # (K,) (row, neighbouring bin) of each candidate, flattened as r * O + o
    neighbours: jax.Array  # (K,) candidate atom j (A if none)
    translation: jax.Array  # (R * O, 3) image translation of each neighbouring bin
    needs: tuple


def _neighbour_bins(xp, bin_coord, k, n_bins, pbc, n_offsets: int):
    """The ``n_offsets`` neighbouring bins of atoms in bins ``bin_coord (R, 3)``.

    Written for numpy (host estimate) and jax.numpy (device build). ``k (R, 3)`` bins to
    reach per direction, ``n_bins, pbc (R, 3)`` of each atom's system. Returns the wrapped
    target bins ``(R, O, 3)``, their image translations ``(R, O, 3)`` and which are real ``(R, O)``.
    """
    o = xp.arange(n_offsets)[None, :]
    width = 2 * k + 1
    if xp is np:
        q0, t0 = np.divmod(o, width[:, None, 0])
        t2, t1 = np.divmod(q0, width[:, None, 1])
        offset = np.stack([t0, t1, t2], axis=-1) - k[:, None, :]
    else:
        offset = _mixed_radix(xp.broadcast_to(o, k.shape[:1] + (n_offsets,)), k[:, None, :])
    target = bin_coord[:, None, :] + offset
    nb = n_bins[:, None, :]
    periodic = pbc[:, None, :]
    translation = xp.where(periodic, xp.floor_divide(target, nb), 0)
    wrapped = target - translation * nb
    inside = xp.all(periodic | ((target >= 0) & (target < nb)), axis=-1)
    real = (o < xp.prod(width, axis=-1)[:, None]) & inside
    return xp.clip(wrapped, 0, nb - 1), translation, real


def _flat_bin(lay_offset, n_bins, b):
    """Global bin id of bin ``b (..., 3)`` of a system with ``n_bins (..., 3)`` starting at ``lay_offset``."""
    return lay_offset + (b[..., 0] * n_bins[..., 1] + b[..., 1]) * n_bins[..., 2] + b[..., 2]


def _cells(geometry: Geometry, lay: _Layout, caps: Capacities, systems: jax.Array) -> _Cells:
    """Bin the atoms of the selected cell-list systems (``caps.cell_rows`` of them at most); list
    each atom's neighbouring bins' atoms as ``caps.cell_candidates`` candidates (ragged: a bin
    contributes as many candidates as it holds atoms, so crowded bins cost nothing elsewhere)."""
    A = geometry.n_atom_rows
    R, B, K, O = caps.cell_rows, caps.bins, caps.cell_candidates, caps.offsets
    in_cells = (lay.use_cells & systems)[lay.system] & geometry.atom_mask
    n_rows = jnp.sum(in_cells)
    (rows,) = jnp.nonzero(in_cells, size=R, fill_value=A)
    row_ok = rows < A
    rows_c = jnp.clip(rows, 0, A - 1)
    s_row = lay.system[rows_c]
    nb_row = lay.n_bins[s_row]
    key = jnp.where(row_ok, _flat_bin(lay.bin_offset[s_row], nb_row, lay.bin_coord[rows_c]), B)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    sorted_atom = rows[order].astype(jnp.int32)
    bin_ids = jnp.arange(B)
    start = jnp.searchsorted(sorted_key, bin_ids, side="left").astype(jnp.int32)
    occupancy = jnp.searchsorted(sorted_key, bin_ids, side="right").astype(jnp.int32) - start

    target, translation, real = _neighbour_bins(jnp, lay.bin_coord[rows_c], lay.k_cells[s_row], nb_row,
                                                geometry.pbc[s_row], O)
    b_target = jnp.clip(_flat_bin(lay.bin_offset[s_row][:, None], nb_row[:, None, :], target), 0, B - 1)
    count = jnp.where(row_ok[:, None] & real, occupancy[b_target], 0).reshape(-1)  # (R * O,)
    ends = jnp.cumsum(count)
    total = ends[-1]
    # candidate c belongs to segment q = #{segments ending at or before c}
    marks = jnp.zeros(K + 1, jnp.int32).at[jnp.minimum(ends[:-1], K)].add(1)
    segment = jnp.minimum(jnp.cumsum(marks)[:-1], R * O - 1)
    c = jnp.arange(K, dtype=jnp.int32)
    m = c - (ends - count)[segment]
    slot = start[b_target.reshape(-1)[segment]] + m
    neighbours = jnp.where(c < total, sorted_atom[jnp.clip(slot, 0, R - 1)], A)
    n_cell_bins = jnp.sum(jnp.where(lay.use_cells, jnp.prod(lay.n_bins, axis=-1), 0))
    max_offsets = jnp.max(jnp.where(lay.use_cells, jnp.prod(2 * lay.k_cells + 1, axis=-1), 0))
    return _Cells(rows=rows, segment=segment, neighbours=neighbours, translation=translation.reshape(-1, 3),
                  needs=(n_rows, n_cell_bins, total, max_offsets))


def build(geometry: Geometry, cutoff: float, skin: float, capacities: Capacities,
          n_builds: jax.Array | int = 0, systems: jax.Array | None = None,
          keep: "NeighborList | None" = None) -> NeighborList:
    """Build the pair list (jit-compatible; capacities are static); see :func:`_build`."""
    return _build(geometry, cutoff, skin, capacities, n_builds, systems, keep)[0]


def _build(geometry: Geometry, cutoff: float, skin: float, capacities: Capacities,
           n_builds: jax.Array | int = 0, systems: jax.Array | None = None,
           keep: "NeighborList | None" = None) -> tuple[NeighborList, jax.Array]:
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

    Returns the list and, for a partial rebuild, whether its new pairs exceeded
    :func:`partial_pair_capacity` (the list is then incomplete: :func:`rebuild` builds in full).
    """
    radius = cutoff + skin
    S, A = geometry.n_systems, geometry.n_atom_rows
    partial = systems is not None
    systems = jnp.ones(S, bool) if systems is None else systems
    lay = _layout(geometry, radius)
    positions = geometry.positions
    E = capacities.pairs

    def search(C, R, K, P):
        caps = capacities._replace(dense_candidates=C, cell_rows=R, cell_candidates=K)
        return _search(geometry, lay, radius, caps, systems, P)

    if not partial:
        C, R, K = capacities.dense_candidates, capacities.cell_rows, capacities.cell_candidates
        new = search(C, R, K, E)
        i, j, shift, real, n_pairs = new.senders, new.receivers, new.shifts, new.real, new.n_found
        reference = positions
        too_many_new = jnp.asarray(False)
    else:
        # the selected systems' new pairs are found, compacted and decoded in a buffer of their
        # own, then merged behind the pairs the other systems keep (a slot emptied since has
        # padding rows: dropped). Searching costs what the capacities are, not what is needed,
        # so a quarter-size search is tried first (the common one- or two-system rebuild in the
        # loop; the full partial size is for refills).
        P = partial_pair_capacity(E)
        C, R = capacities.partial_candidates, capacities.partial_cell_rows
        K = capacities.partial_cell_candidates
        C4, R4, K4 = bucket(C // 4, minimum=64), bucket(R // 4, minimum=8), bucket(K // 4, minimum=64)
        dense_needed, rows_needed = _selection_size(geometry, lay, systems)
        small = (dense_needed <= C4) & (rows_needed <= R4)
        new = jax.lax.cond(small, lambda: search(C4, R4, K4, P), lambda: search(C, R, K, P))
        # more new pairs or cell-list candidates than the partial buffers hold: build in full
        too_many_new = (new.n_found > P) | (new.cell_needs[2] > jnp.where(small, K4, K))
        sender_system = geometry.system[keep.senders]
        kept = keep.mask & (sender_system < S) & ~systems[jnp.clip(sender_system, 0, S - 1)]
        pick, real, _ = _compact(jnp.concatenate([kept, new.real]), E)
        n_pairs = jnp.sum(kept) + new.n_found
        i = jnp.concatenate([keep.senders, new.senders.astype(keep.senders.dtype)])[pick]
        j = jnp.concatenate([keep.receivers, new.receivers.astype(keep.receivers.dtype)])[pick]
        shift = jnp.concatenate([keep.shifts, new.shifts])[pick]
        reference = jnp.where(geometry.atom_mask[:, None] & systems[lay.system][:, None],
                              positions, keep.reference_positions)
        K = jnp.iinfo(jnp.int64).max  # handled by too_many_new, not an overflow

    dense_total, (n_rows, n_bins, cell_total, n_offsets) = new.dense_total, new.cell_needs
    needed = jnp.stack([dense_total, n_rows, n_bins, cell_total, n_offsets]).astype(jnp.int64)
    limits = jnp.asarray([C, R, capacities.bins,
                          K, capacities.offsets], dtype=jnp.int64)
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
    ), too_many_new


class _Found(NamedTuple):
    """The pairs one search found, compacted into ``P`` rows."""

    senders: jax.Array  # (P,)
    receivers: jax.Array  # (P,)
    shifts: jax.Array  # (P, 3)
    real: jax.Array  # (P,)
    n_found: jax.Array  # () pairs found (may exceed P)
    dense_total: jax.Array  # () dense candidates needed
    cell_needs: tuple  # cell-list rows, bins, cell-list candidates, neighbouring bins needed


def _candidate_masks(geometry: Geometry, lay: _Layout, radius: float, caps: Capacities, systems: jax.Array):
    """``(found_dense (C,), found_cells (K,), dense, cells)``: which candidates are pairs."""
    A = geometry.n_atom_rows
    positions = geometry.positions
    cell_of_atom = geometry.cell[lay.system]
    wrapped = positions - matvec_rows(lay.whole, cell_of_atom)  # Cartesian, inside the cell

    # dense candidates: decode, one distance each
    C = caps.dense_candidates
    dense = _dense(geometry, lay, systems)
    c = jnp.arange(C, dtype=jnp.int32)
    i_d, j_d, t_d, ok_d = _dense_decode(geometry, lay, dense, c, sorted_ids=True)
    # coordinates one column at a time: 1-D gathers fuse into the arithmetic, row gathers do not
    x = [wrapped[:, k] for k in range(3)]
    s_d = lay.system[i_d]
    t = [t_d[:, k].astype(positions.dtype) for k in range(3)]
    d2 = 0.0
    for k in range(3):
        image = sum(t[a] * geometry.cell[:, a, k][s_d] for a in range(3))
        d2 = d2 + (x[k][j_d] - x[k][i_d] + image) ** 2
    self_d = (i_d == j_d) & (t_d[:, 0] == 0) & (t_d[:, 1] == 0) & (t_d[:, 2] == 0)
    found_d = ok_d & (d2 < radius * radius) & ~self_d

    # cell-list candidates: (K,), one distance each
    cells = _cells(geometry, lay, caps, systems)
    O = caps.offsets
    rows_c = jnp.clip(cells.rows, 0, A - 1)
    row_cell = cell_of_atom[rows_c]  # (R, 3, 3)
    q, r = cells.segment, cells.segment // O
    t = [cells.translation[:, k].astype(positions.dtype)[q] for k in range(3)]
    j_c = cells.neighbours
    j_safe = jnp.clip(j_c, 0, A - 1)
    i_c = rows_c[r]
    d2 = 0.0
    for k in range(3):
        image = sum(t[a] * row_cell[:, a, k][r] for a in range(3))
        d2 = d2 + (x[k][j_safe] - x[k][i_c] + image) ** 2
    self_c = (j_c == i_c) & (t[0] == 0) & (t[1] == 0) & (t[2] == 0)
    found_c = (j_c < A) & (d2 < radius * radius) & ~self_c
    return found_d, found_c, dense, cells


def _search(geometry: Geometry, lay: _Layout, radius: float, caps: Capacities, systems: jax.Array,
            P: int) -> _Found:
    """Test every candidate of the selected systems (``caps.dense_candidates`` dense ones and
    ``caps.cell_candidates`` from ``caps.cell_rows`` cell-list rows); keep the first ``P`` pairs
    within ``radius``, decoded."""
    A = geometry.n_atom_rows
    positions = geometry.positions
    found_d, found_c, dense, cells = _candidate_masks(geometry, lay, radius, caps, systems)
    C = caps.dense_candidates
    rows_c = jnp.clip(cells.rows, 0, A - 1)
    j_c = cells.neighbours
    # keep the first P, then decode only those: candidate ids < C are dense, the rest cell list
    pick, real, n_found = _compact(jnp.concatenate([found_d, found_c]), P)
    is_dense = pick < C
    i_e, j_e, t_e, _ = _dense_decode(geometry, lay, dense, jnp.clip(pick, 0, C - 1))
    flat = jnp.clip(pick - C, 0, j_c.shape[0] - 1)
    q = cells.segment[flat]
    i = jnp.where(is_dense, i_e, rows_c[q // caps.offsets])
    j = jnp.where(is_dense, j_e, j_c[flat])
    t = jnp.where(is_dense[:, None], t_e, cells.translation[q]).astype(positions.dtype)
    shift = t - lay.whole[j] + lay.whole[i]
    return _Found(senders=i, receivers=j, shifts=shift, real=real, n_found=n_found,
                  dense_total=dense.total, cell_needs=cells.needs)


def partial_pair_capacity(pairs: int) -> int:
    """Rows for the new pairs of a partial rebuild (more -> :func:`rebuild` does a full one)."""
    return bucket(pairs // 3, minimum=64)


def _compact(found: jax.Array, size: int):
    """Indices of the first ``size`` True entries of ``found``, in order: ``(pick (size,), real (size,), count)``.

    ``pick`` is ``len(found)`` (clipped to the last index) where ``real`` is False.
    """
    total = found.shape[0]
    # (lax.associative_scan runs ~2x faster on a CPU but doubled the compile time of every
    # program holding a rebuild)
    slot = jnp.cumsum(found.astype(jnp.int32)) - 1
    target = jnp.where(found & (slot < size), slot, size)  # out of range -> dropped
    pick = jnp.full(size, total, jnp.int32).at[target].set(jnp.arange(total, dtype=jnp.int32), mode="drop")
    real = pick < total
    return jnp.minimum(pick, total - 1), real, jnp.sum(found)


def matvec_rows(vectors: jax.Array, matrices: jax.Array) -> jax.Array:
    """Row-wise ``vectors[e] @ matrices[e]`` for ``(E, 3)`` and ``(E, 3, 3)``.

    Written as broadcasting element-wise products: XLA's CPU batched 3x3 dot is far slower.
    """
    return vectors[:, 0, None] * matrices[:, 0] + vectors[:, 1, None] * matrices[:, 1] + vectors[:, 2, None] * matrices[:, 2]


def rebuild(neighbors: NeighborList, geometry: Geometry, systems: jax.Array | None = None) -> NeighborList:
    """Build again with the same cutoff, skin and capacities (jit-compatible).

    With ``systems`` (an ``(S,)`` mask), only those systems are rebuilt when their
    candidates and new pairs fit the partial capacities, else everything is.
    """
    if systems is None:
        return build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities, neighbors.n_builds)
    return rebuild_tracked(neighbors, geometry, systems)[0]


def rebuild_tracked(neighbors: NeighborList, geometry: Geometry, systems: jax.Array) -> tuple[NeighborList, jax.Array]:
    """:func:`rebuild` of ``systems``, and the ``(S,)`` systems actually built anew (all of them
    when the partial rebuild did not fit). The variable-cell loop uses it to know at which cell
    each system's pairs were found."""
    def full():
        return (build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities, neighbors.n_builds),
                jnp.ones_like(systems))

    def partial():
        return _build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities,
                      neighbors.n_builds, systems=systems, keep=neighbors)

    # one full build in the program, for both ways a partial one can fail
    out, need_full = jax.lax.cond(_partial_fits(neighbors, geometry, systems), partial,
                                  lambda: (neighbors, jnp.asarray(True)))
    return jax.lax.cond(need_full, full, lambda: (out, systems))


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
    S, E = cell.shape[0], neighbors.capacity
    s = jnp.clip(system[neighbors.senders], 0, S - 1)
    # one gather for both ends (its transpose, in the force pass, is one scatter instead of
    # two); padding pairs are (0, 0) with a zero shift, so their vector is exactly zero
    ends = positions[jnp.concatenate([neighbors.receivers, neighbors.senders])]
    return ends[:E] - ends[E:] + matvec_rows(neighbors.shifts, cell[s])


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
    candidates, offsets, largest_candidates = 1, 1, 1
    if use_cells.any():
        offsets = int(np.max(np.prod(2 * k_cells + 1, axis=-1)[use_cells]))
        in_cells = mask & use_cells[system]
        s_c = system[in_cells]
        scaled = np.where(pbc_atom[in_cells], u[in_cells] * n_bins[s_c], (u[in_cells] - lo[s_c]) / width[s_c])
        b = np.clip(np.floor(scaled), 0, n_bins[s_c] - 1).astype(np.int64)
        cell_bins = np.where(use_cells, np.prod(n_bins, axis=-1), 0)
        offset = np.cumsum(cell_bins) - cell_bins
        occupancy = np.bincount(_flat_bin(offset[s_c], n_bins[s_c], b), minlength=int(cell_bins.sum()))
        target, _, real = _neighbour_bins(np, b, k_cells[s_c], n_bins[s_c], pbc[s_c], offsets)
        neighbour_bins = _flat_bin(offset[s_c][:, None], n_bins[s_c][:, None, :], target)
        per_row = np.sum(np.where(real, occupancy[neighbour_bins], 0), axis=-1)
        candidates = int(np.sum(per_row))
        largest_candidates = int(np.bincount(s_c, weights=per_row).max())
    # pairs: neighbours within the radius at the system's own density (3-D periodic) or at a
    # dense packing (0.1 atoms/A^3) otherwise, never more than all pairs and images
    volume = np.abs(np.linalg.det(np.asarray(g.cell, np.float64)))
    density = np.where(pbc.all(axis=-1) & (volume > 1e-9), n / np.where(volume > 1e-9, volume, 1.0), 0.1)
    sphere = density * 4.0 / 3.0 * np.pi * radius ** 3
    pairs = int(np.sum(np.minimum(n * np.maximum(n - 1, 0) * images + n * (images - 1), n * sphere)))
    grow = lambda x: bucket(int(x * 1.25) + 1, minimum=8)  # noqa: E731
    caps = Capacities(pairs=bucket(int(pairs * 1.25) + 1, minimum=64), dense_candidates=bucket(dense, minimum=64),
                      cell_rows=grow(rows), bins=grow(bins), cell_candidates=grow(candidates), offsets=max(offsets, 1))
    largest_dense = int(np.max(np.where(use_cells, 0, n * n * images), initial=0))
    largest_rows = int(np.max(np.where(use_cells, n, 0), initial=0))
    return with_partial_capacities(caps, largest_dense, largest_rows, largest_candidates)


def with_partial_capacities(caps: Capacities, largest_dense: int = 0, largest_rows: int = 0,
                            largest_candidates: int = 0) -> Capacities:
    """``caps`` with partial capacities of at least a quarter of the full ones (a refill of a
    quarter of the slots is a partial rebuild) and twice the largest system's needs
    (``largest_*``), never more than the full ones."""
    def partial(full, largest, current, minimum):
        return min(full, max(current, bucket(max(full // 4, 2 * largest), minimum=minimum)))

    return caps._replace(
        partial_candidates=partial(caps.dense_candidates, largest_dense, caps.partial_candidates, 64),
        partial_cell_rows=partial(caps.cell_rows, largest_rows, caps.partial_cell_rows, 8),
        partial_cell_candidates=partial(caps.cell_candidates, largest_candidates, caps.partial_cell_candidates, 64))


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
        caps = with_partial_capacities(caps)
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
        caps = Capacities(*grown, partial_candidates=caps.partial_candidates, partial_cell_rows=caps.partial_cell_rows,
                          partial_cell_candidates=caps.partial_cell_candidates)
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
    floor = Capacities(*larger, partial_candidates=caps.partial_candidates, partial_cell_rows=caps.partial_cell_rows,
                       partial_cell_candidates=caps.partial_cell_candidates)
    return allocate(geometry, neighbors.cutoff, neighbors.skin, capacities=floor)


def _selection_size(geometry: Geometry, lay: _Layout, systems: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What enumerating the ``(S,)`` selected systems needs: ``(dense candidates, cell-list rows)``."""
    cell_rows = jnp.sum(jnp.where(lay.use_cells & systems, geometry.n_atoms, 0))
    return jnp.sum(_dense_counts(geometry, lay, systems)), cell_rows


def _partial_fits(neighbors: NeighborList, geometry: Geometry, systems: jax.Array) -> jax.Array:
    """Whether a partial rebuild of ``systems`` fits its capacities (else a full one is done)."""
    caps = neighbors.capacities
    dense, cell_rows = _selection_size(geometry, _layout(geometry, neighbors.cutoff + neighbors.skin), systems)
    return (dense <= caps.partial_candidates) & (cell_rows <= caps.partial_cell_rows)

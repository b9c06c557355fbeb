"""Batched neighbor lists: a per-atom neighbor matrix with explicit capacities, an overflow flag and a Verlet skin.

A :class:`NeighborList` holds, for every atom ``i``, the atoms ``j`` of the same system
closer than ``cutoff_s + skin`` (``cutoff_s`` the system's own interaction range, at most
``cutoff``) in a fixed-width column of a **neighbor matrix** ``neighbors (K, A)``: entry
``[k, i]`` is the ``k``-th neighbour of atom ``i``, with the integer lattice ``shifts[k, i]``
of its periodic image. The vector from ``i`` to that neighbour is
``positions[j] - positions[i] + shifts[k, i] @ cell[system[i]]``. Every pair appears from both
ends (ASE's ``bothways=True``), and never across systems. Unused entries point at the dummy
atom ``A`` (one past the last row) with a zero shift; :func:`kups_relax.pairs.pair_geometry`
masks them. Positions are never wrapped by the engine; shifts are computed for the
unwrapped positions, so they stay valid as atoms move.

The matrix is stored neighbour-major, ``(K, A)``: every per-pair quantity of a potential is
then an array whose rows are contiguous over atoms, a reduction over a row's neighbours is an
element-wise sum of ``K`` such rows, and the only gathers are 1-D reads of per-atom columns at
``neighbors`` (``x[neighbors]``). Analytic forces need nothing else (no scatter, no transposed
gather): see :mod:`kups_relax.pairs`.

Shapes are capacities (jax-md style): ``allocate`` on the host chooses them,
``update`` under jit rebuilds the systems in which some atom moved more than half the
skin since the last build, and raises ``overflow`` when a capacity was too small (the
matrix width ``K`` included); the host then grows the capacity and redoes the step.

Candidate pairs are enumerated per system, in one of two ways, whichever is
expected to test fewer candidates (:func:`_bin_plan`): all atom pairs of the
system times all periodic images needed to reach ``cutoff + skin`` (a ragged
enumeration whose length is the sum over systems of ``n_atoms**2 * n_images``,
so a batch of small systems costs what its systems cost), or a cell list with
bins half the radius wide. The pairs found are compacted into a flat buffer (``pairs``
rows) with each atom's pairs contiguous, then written into the matrix. Either way an atom's
neighbours come out in the same order whatever slot its system sits in.
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
from .segments import segment_any


class Capacities(NamedTuple):
    """Static sizes of neighbor-list builds.

    Systems are enumerated one at a time (a build of every system is a loop over them), at a
    cost that is the system's own, not the batch's. A system of up to ``block`` atoms whose
    periodic spacings are at least the search radius is tested atom pair by atom pair, against
    the two nearest images per periodic direction, in a dense block (:func:`_block_columns`: no
    gathers, no scatters); any other (a batch of large structures, a cell thinner than the
    radius) goes through a cell list or an all-pairs list (:func:`_search`) sized by the other
    fields.

    Attributes:
        neighbors: width ``K`` of the neighbor matrix (most neighbours of any atom).
        block: most atom rows of one system (a batch's largest slot).
        images: images per pair a dense block tests (``2**d``, ``d`` periodic directions; ``0``: no
            dense blocks).
        dense_candidates: candidate pairs of one system enumerated all-pairs (x images).
        cell_rows: atoms of one system enumerated with a cell list.
        bins: cell-list bins of one system.
        cell_candidates: cell-list candidates of one system (each atom times the atoms of its
            neighbouring bins).
        offsets: neighbouring bins visited per atom (27 unless a cell is thinner than the cutoff).
    """

    neighbors: int = 8
    block: int = 8
    images: int = 8
    dense_candidates: int = 64
    cell_rows: int = 8
    bins: int = 8
    cell_candidates: int = 64
    offsets: int = 27



def _needs(**named) -> Capacities:
    """What a build needed, by capacity name (``NeighborList.needed``): int64 device scalars,
    ``0`` for the capacities not named."""
    return Capacities(*(jnp.asarray(named.get(name, 0)).astype(jnp.int64) for name in Capacities._fields))


def _max_needs(a: Capacities, b: Capacities) -> Capacities:
    """Field by field the larger of two needs."""
    return Capacities(*(jnp.maximum(x, y) for x, y in zip(a, b)))

#: Largest dense block, ``block**2 * images`` candidate pairs; batches of larger systems go
#: through cell lists (a 256-row block with 8 images is 0.5M candidate pairs).
MAX_BLOCK_CANDIDATES = 2_000_000


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NeighborList:
    """Fixed-capacity neighbor matrix of a batch (a pytree).

    Attributes:
        neighbors: ``(K, A)`` int32, ``neighbors[k, i]`` is atom ``i``'s ``k``-th neighbour
            (``A``, the dummy atom, where it has fewer than ``K``).
        shifts: ``(K, A, 3)`` int16 lattice shifts of each neighbour's periodic image.
        cutoffs: ``(S,)`` every system's interaction range, Å (at most ``cutoff``); pairs are
            listed out to ``cutoffs + skin``.
        reference_positions: ``(A, 3)`` positions at the last build, Å.
        needed: what the builds so far needed of every capacity, by name (a :class:`Capacities`
            of int64 device scalars; compared with ``capacities`` to detect overflow).
        overflow: ``()`` True when a capacity was too small at the last build.
        n_builds: ``()`` builds so far (diagnostics).
        cutoff: largest interaction cutoff, Å (static).
        skin: Verlet skin, Å (static).
        capacities: the static :class:`Capacities`.
    """

    neighbors: jax.Array
    shifts: jax.Array
    cutoffs: jax.Array
    reference_positions: jax.Array
    needed: Capacities
    overflow: jax.Array
    n_builds: jax.Array
    cutoff: float = dataclasses.field(metadata=dict(static=True))
    skin: float = dataclasses.field(metadata=dict(static=True))
    capacities: Capacities = dataclasses.field(metadata=dict(static=True))

    @property
    def width(self) -> int:
        """Matrix width ``K`` (static)."""
        return self.neighbors.shape[0]

    @property
    def mask(self) -> jax.Array:
        """``(K, A)`` True for real neighbours."""
        return self.neighbors < self.neighbors.shape[1]

    @property
    def n_pairs(self) -> jax.Array:
        """``()`` pairs listed (matrix entries in use; diagnostics, counted when asked for)."""
        return jnp.sum(self.mask)


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

    x86 has no vector integer division, so XLA divides integers one element at a time (slow,
    above all for int64): this was most of the cost of the all-pairs enumeration. A float64
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
    1-D gather (XLA fuses those into the arithmetic; gathering rows of a table is not fused
    and costs far more per candidate on a CPU).
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
    needs: Capacities  # what the cell list needed: cell_rows, bins, cell_candidates, offsets


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
    A, S = geometry.n_atom_rows, geometry.n_systems
    R, B, K, O = caps.cell_rows, caps.bins, caps.cell_candidates, caps.offsets
    selected = lay.use_cells & systems
    # bins are numbered over the selected systems only, so one system's search needs its own bins
    cell_bins = jnp.where(selected, jnp.prod(lay.n_bins, axis=-1), 0)
    bin_offset = jnp.cumsum(cell_bins) - cell_bins
    in_cells = selected[lay.system] & geometry.atom_mask
    n_rows = jnp.sum(in_cells)
    (rows,) = jnp.nonzero(in_cells, size=R, fill_value=A)
    row_ok = rows < A
    rows_c = jnp.clip(rows, 0, A - 1)
    s_row = lay.system[rows_c]
    nb_row = lay.n_bins[s_row]
    key = jnp.where(row_ok, _flat_bin(bin_offset[s_row], nb_row, lay.bin_coord[rows_c]), B)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    sorted_atom = rows[order].astype(jnp.int32)
    bin_ids = jnp.arange(B)
    start = jnp.searchsorted(sorted_key, bin_ids, side="left").astype(jnp.int32)
    occupancy = jnp.searchsorted(sorted_key, bin_ids, side="right").astype(jnp.int32) - start

    target, translation, real = _neighbour_bins(jnp, lay.bin_coord[rows_c], lay.k_cells[s_row], nb_row,
                                                geometry.pbc[s_row], O)
    b_target = jnp.clip(_flat_bin(bin_offset[s_row][:, None], nb_row[:, None, :], target), 0, B - 1)
    count = jnp.where(row_ok[:, None] & real, occupancy[b_target], 0)  # (R, O)
    count = count.reshape(-1)
    ends = jnp.cumsum(count)
    total = ends[-1]
    # candidate c belongs to segment q = #{segments ending at or before c}
    marks = jnp.zeros(K + 1, jnp.int32).at[jnp.minimum(ends[:-1], K)].add(1)
    segment = jnp.minimum(jnp.cumsum(marks)[:-1], R * O - 1)
    c = jnp.arange(K, dtype=jnp.int32)
    m = c - (ends - count)[segment]
    slot = start[b_target.reshape(-1)[segment]] + m
    neighbours = jnp.where(c < total, sorted_atom[jnp.clip(slot, 0, R - 1)], A)
    max_offsets = jnp.max(jnp.where(selected, jnp.prod(2 * lay.k_cells + 1, axis=-1), 0))
    return _Cells(rows=rows, segment=segment, neighbours=neighbours, translation=translation.reshape(-1, 3),
                  needs=_needs(cell_rows=n_rows, bins=jnp.sum(cell_bins), cell_candidates=total, offsets=max_offsets))


def build(geometry: Geometry, cutoff: float, skin: float, capacities: Capacities,
          n_builds: jax.Array | int = 0, cutoffs: jax.Array | None = None) -> NeighborList:
    """Build the neighbor matrix of every system (jit-compatible; capacities are static).

    ``cutoffs`` (``(S,)``, Å, at most ``cutoff``): every system's interaction range (default
    ``cutoff`` for all). Every system is enumerated on its own (:func:`_rebuild_systems`), so a
    system's neighbours come out in the same order whether it is built with the whole batch or
    alone. ``needed`` reports what every capacity must be; ``overflow`` flags one that is short.
    """
    S, A = geometry.n_systems, geometry.n_atom_rows
    dtype = geometry.positions.dtype
    cutoffs = jnp.full(S, cutoff, dtype) if cutoffs is None else jnp.minimum(jnp.asarray(cutoffs, dtype), cutoff)
    K = capacities.neighbors
    empty = NeighborList(
        neighbors=jnp.full((K, A), A, jnp.int32), shifts=jnp.zeros((K, A, 3), jnp.int16), cutoffs=cutoffs,
        reference_positions=geometry.positions, needed=_needs(),
        overflow=jnp.asarray(False), n_builds=jnp.asarray(n_builds), cutoff=float(cutoff), skin=float(skin),
        capacities=capacities)
    return _rebuild_systems(empty, geometry, jnp.ones(S, bool), cutoffs)


def _block_tiers(W: int) -> tuple[int, ...]:
    """Dense block sizes tried for a system (the smallest that holds it): a 13-atom cluster in a
    batch whose largest slot is 256 rows tests 32**2 pairs per image, not 256**2."""
    tiers = [W]  # multiples of 32: a block packs its hits 32 to a word (_block_columns)
    while tiers[-1] % 64 == 0 and tiers[-1] // 2 >= 32 and len(tiers) < 4:
        tiers.append(tiers[-1] // 2)
    return tuple(reversed(tiers))


def _block_columns(geometry: Geometry, lay: "_Layout", s, radius2, W: int, I: int, K: int, padded, whole_padded):
    """One system's neighbor-matrix columns by a dense test of its ``W`` rows against themselves:
    ``(neighbors (K, W), shifts (K, W, 3), widest)``.

    For a system whose periodic cell spacings are all at least the search radius, a pair can
    only be within reach through the image on either side of its wrapped fractional difference
    ``f = u_j - u_i`` in ``(-1, 1)``: ``t = -floor(f) - c`` with ``c`` in ``{0, 1}`` per
    periodic direction, so ``I = 2**(periodic directions)`` images per pair instead of
    ``3**d``. Row ``i``'s neighbours come in the order ``(j, c)``; the ``k``-th is found by a
    search over row ``i``'s hits packed into bits (:func:`_first_hits`; no gather from the batch,
    no scatter).
    """
    A = geometry.n_atom_rows
    first, n = geometry.first_atom[s], geometry.n_atoms[s]
    start = (first, jnp.zeros_like(first))
    x = jax.lax.dynamic_slice(padded, start, (W, 3))
    whole = jax.lax.dynamic_slice(whole_padded, start, (W, 3))
    basis = geometry.wrap_cell[s]  # periodic rows = the cell's; the others unit vectors
    periodic = geometry.pbc[s]
    u = x @ jnp.linalg.inv(basis) - whole  # in [0, 1) along periodic directions
    # Hits are packed 32 to a word as they are computed: word (i, jw) holds, at bit jg * I + c, the
    # test of j = jw * G + jg under corner c (G = 32 / I), i.e. the flat order j * I + c. The
    # arrays are laid out (jg, c, i, jw), so the packing sums over leading axes, which XLA
    # vectorizes (with the bits innermost the packing ran several times slower).
    G = 32 // I
    uj = u.reshape(W // G, G, 3).transpose(1, 0, 2)[:, None, None, :, :]  # (G, 1, 1, W/G, 3)
    ui = u[None, None, :, None, :]  # (1, 1, W, 1, 3)
    corners = jnp.asarray([[(c >> a) & 1 for a in range(3)] for c in range(8)][:I], u.dtype)  # (I, 3)
    usable = jnp.all(periodic[None, :] | (corners == 0), axis=-1)  # (I,)
    f = [uj[..., a] - ui[..., a] for a in range(3)]  # (G, 1, W, W/G)
    base = [jnp.where(periodic[a], -jnp.floor(f[a]), 0.0) for a in range(3)]
    d = [f[a] + base[a] - corners[None, :, None, None, a] for a in range(3)]  # (G, I, W, W/G)
    cart = [d[0] * basis[0, c] + d[1] * basis[1, c] + d[2] * basis[2, c] for c in range(3)]
    d2 = cart[0] * cart[0] + cart[1] * cart[1] + cart[2] * cart[2]
    i_index = jnp.arange(W)[None, None, :, None]
    j_index = (jnp.arange(W // G)[None, :] * G + jnp.arange(G)[:, None])[:, None, None, :]
    no_shift = (base[0] == corners[None, :, None, None, 0]) & (base[1] == corners[None, :, None, None, 1]) & (
        base[2] == corners[None, :, None, None, 2])
    hit = ((i_index < n) & (j_index < n) & usable[None, :, None, None] & (d2 < radius2[s])
           & ~((i_index == j_index) & no_shift))
    bit = (jnp.arange(G, dtype=jnp.uint32)[:, None] * I + jnp.arange(I, dtype=jnp.uint32)[None, :])[:, :, None, None]
    words = jnp.sum(hit.astype(jnp.uint32) << bit, axis=(0, 1), dtype=jnp.uint32)  # (W, W/G); distinct bits: sum = or
    where, total = _first_hits(words, K)  # (W, K), (W,)
    has = jnp.arange(K)[None, :] < total[:, None]
    where = jnp.clip(where, 0, W * I - 1)
    j, corner = where // I, where % I
    f_selected = jnp.take(u, j, axis=0) - u[:, None, :]  # (W, K, 3)
    image = jnp.where(periodic, -jnp.floor(f_selected), 0.0) - corners[corner]
    neighbors = jnp.where(has, first + j, A).T.astype(jnp.int32)
    shifts = image - whole[j] + whole[:, None, :]
    shifts = jnp.where(has[..., None], jnp.rint(shifts), 0).astype(jnp.int16).transpose(1, 0, 2)
    return neighbors, shifts, jnp.max(total)


def _first_hits(words: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the first ``K`` set bits of every row of ``words (W, n_words)`` (uint32, bit
    ``b`` of word ``w`` is entry ``32 w + b`` of the row): ``(where (W, K), total (W,))``
    (``where`` is undefined past a row's ``total``).

    A running count over every entry is slow on XLA's CPU backend; the count runs over words
    instead, and the ``k``-th hit is found by a binary search over words and then over the
    bits of its word.
    """
    n_words = words.shape[1]
    counts = jax.lax.population_count(words).astype(jnp.int32)
    ends = jnp.cumsum(counts, axis=1)  # (W, n_words) hits up to and including each word
    k = jnp.arange(K, dtype=jnp.int32)
    word = jax.vmap(lambda e: jnp.searchsorted(e, k + 1, side="left", method="scan"))(ends)
    word = jnp.clip(word, 0, n_words - 1)
    m = k[None, :] - jnp.take_along_axis(ends - counts, word, axis=1)  # rank of the hit in its word
    w = jnp.take_along_axis(words, word, axis=1)
    position = jnp.zeros_like(m)
    for width in (16, 8, 4, 2, 1):  # which half of what is left holds the m-th set bit
        low = jax.lax.population_count((w >> position.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1))
        upper = m >= low.astype(jnp.int32)
        m = jnp.where(upper, m - low.astype(jnp.int32), m)
        position = jnp.where(upper, position + width, position)
    return word * 32 + position, ends[:, -1]


def _block_images(pbc) -> int:
    """Images per pair a dense block tests for systems with these periodic directions."""
    return 2 ** int(np.max(np.sum(np.asarray(pbc), axis=-1), initial=0))


def _searched_columns(geometry: Geometry, lay: "_Layout", s, radius2, caps: Capacities, W: int, K: int):
    """One system's columns from a cell list or an all-pairs list (:func:`_search`), for systems a
    dense block cannot take: ``(neighbors (K, W), shifts (K, W, 3), widest, needs, short)`` (``short``:
    more pairs found than the ``K x W`` columns hold)."""
    S, A = geometry.n_systems, geometry.n_atom_rows
    first = geometry.first_atom[s]
    selected = jnp.arange(S) == s
    # a system is enumerated one way: search with that way's capacities only
    cells_only = caps._replace(dense_candidates=64)
    dense_only = caps._replace(cell_rows=8, bins=8, cell_candidates=64)
    found = jax.lax.cond(lay.use_cells[s], lambda: _search(geometry, lay, radius2, cells_only, selected, W * K),
                         lambda: _search(geometry, lay, radius2, dense_only, selected, W * K))
    P = found.senders.shape[0]
    e = jnp.arange(P, dtype=jnp.int32)
    local = jnp.where(found.real, found.senders - first, W).astype(jnp.int32)
    rank = e - jax.ops.segment_min(e, local, num_segments=W + 1)[local]
    widest = jnp.max(jnp.where(found.real, rank + 1, 0))
    column = jnp.where(found.real & (rank < K), rank, K)
    neighbors = jnp.full((K, W), A, jnp.int32).at[column, local].set(found.receivers.astype(jnp.int32), mode="drop")
    shifts = jnp.zeros((K, W, 3), jnp.int16).at[column, local].set(jnp.rint(found.shifts).astype(jnp.int16),
                                                                    mode="drop")
    return neighbors, shifts, widest, found.needs, found.n_found > W * K


def _rebuild_systems(neighbors: NeighborList, geometry: Geometry, systems: jax.Array,
                     cutoffs: jax.Array) -> NeighborList:
    """Enumerate the ``(S,)`` selected systems one after another and write their columns; the
    other columns are kept as they are. Reports what it needed (``needed``, ``overflow``)."""
    caps = neighbors.capacities
    S, A, K, W, I = geometry.n_systems, geometry.n_atom_rows, caps.neighbors, caps.block, caps.images
    dtype = geometry.positions.dtype
    lay = _layout(geometry, neighbors.cutoff + neighbors.skin)
    radius2 = (cutoffs + neighbors.skin) ** 2
    use_blocks = 0 < I and W * W * I <= MAX_BLOCK_CANDIDATES
    Wc = max(W, 8)  # columns a system may own
    padded = jnp.concatenate([geometry.positions, jnp.zeros((Wc, 3), dtype)])
    whole_padded = jnp.concatenate([lay.whole, jnp.zeros((Wc, 3), lay.whole.dtype)])
    (order,) = jnp.nonzero(systems & (geometry.n_atoms > 0), size=S, fill_value=S)
    n_selected = jnp.sum(systems & (geometry.n_atoms > 0))
    columns = jnp.arange(Wc, dtype=jnp.int32)
    tiers = _block_tiers(W) if use_blocks else ()

    def searched(s):
        return _searched_columns(geometry, lay, s, radius2, caps, Wc, K)

    def blocked(s, tier):
        def run():
            nbr, sh, widest = _block_columns(geometry, lay, s, radius2, tier, I, K, padded, whole_padded)
            pad = Wc - tier
            nbr = jnp.pad(nbr, ((0, 0), (0, pad)), constant_values=A)
            sh = jnp.pad(sh, ((0, 0), (0, pad), (0, 0)))
            return nbr, sh, widest, _needs(), jnp.asarray(False)
        return run

    def body(carry):
        i, matrix, shifts, reference, needed, short = carry
        s = order[i]
        first, n = geometry.first_atom[s], geometry.n_atoms[s]
        if tiers:
            # every periodic spacing at least the radius, and the images the block tests
            fits = jnp.all(lay.k_dense[s] <= 1) & (2 ** jnp.sum(geometry.pbc[s]) <= I) & (n <= W)
            tier = jnp.sum(jnp.asarray(tiers) < n)  # the smallest tier that holds the system
            branch = jnp.where(fits, tier, len(tiers))
            out = jax.lax.switch(branch, [blocked(s, t) for t in tiers] + [lambda: searched(s)])
        else:
            out = searched(s)
        nbr, sh, widest, search_needs, pairs_short = out
        cols = jnp.where(columns < n, first + columns, A)  # the system's own columns; past the end: dropped
        matrix = matrix.at[:, cols].set(nbr, mode="drop")
        shifts = shifts.at[:, cols].set(sh, mode="drop")
        reference = reference.at[cols].set(jnp.take(geometry.positions, cols, axis=0, mode="clip"), mode="drop")
        images = (2 ** jnp.sum(geometry.pbc[s])).astype(jnp.int64)
        these = search_needs._replace(neighbors=widest.astype(jnp.int64), block=n.astype(jnp.int64), images=images)
        return i + 1, matrix, shifts, reference, _max_needs(needed, these), short | pairs_short

    _, matrix, shifts, reference, needed, short = jax.lax.while_loop(
        lambda c: c[0] < n_selected, body,
        (jnp.asarray(0), neighbors.neighbors, neighbors.shifts, neighbors.reference_positions,
         _needs(), jnp.asarray(False)))
    # a system beyond the dense blocks' images goes through the search: images are not a limit
    short_of = [getattr(needed, name) > getattr(caps, name) for name in Capacities._fields if name != "images"]
    overflow = jnp.any(jnp.stack(short_of)) | short
    return dataclasses.replace(
        neighbors, neighbors=matrix, shifts=shifts, reference_positions=reference, cutoffs=cutoffs,
        needed=_max_needs(neighbors.needed, needed), overflow=overflow,
        n_builds=neighbors.n_builds + 1)


class _Found(NamedTuple):
    """The pairs one search found, compacted into ``P`` rows."""

    senders: jax.Array  # (P,)
    receivers: jax.Array  # (P,)
    shifts: jax.Array  # (P, 3)
    real: jax.Array  # (P,)
    n_found: jax.Array  # () pairs found (may exceed P)
    needs: Capacities  # what the search needed: dense_candidates and the cell list's


def _candidate_masks(geometry: Geometry, lay: _Layout, radius2: jax.Array, caps: Capacities, systems: jax.Array):
    """``(found_dense (C,), found_cells (K,), dense, cells)``: which candidates are pairs
    (closer than their system's ``sqrt(radius2[s])``)."""
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
    found_d = ok_d & (d2 < radius2[s_d]) & ~self_d

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
    found_c = (j_c < A) & (d2 < radius2[lay.system[i_c]]) & ~self_c
    return found_d, found_c, dense, cells


def _search(geometry: Geometry, lay: _Layout, radius2: jax.Array, caps: Capacities, systems: jax.Array,
            P: int) -> _Found:
    """Test every candidate of the selected systems (``caps.dense_candidates`` dense ones and
    ``caps.cell_candidates`` from ``caps.cell_rows`` cell-list rows); keep the first ``P`` pairs
    within ``radius``, decoded."""
    A = geometry.n_atom_rows
    positions = geometry.positions
    found_d, found_c, dense, cells = _candidate_masks(geometry, lay, radius2, caps, systems)
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
                  needs=cells.needs._replace(dense_candidates=jnp.asarray(dense.total).astype(jnp.int64)))


def _compact(found: jax.Array, size: int):
    """Indices of the first ``size`` True entries of ``found``, in order: ``(pick (size,), real (size,), count)``.

    ``pick`` is ``len(found)`` (clipped to the last index) where ``real`` is False.
    """
    total = found.shape[0]
    # (lax.associative_scan runs faster on a CPU but made every program holding a rebuild
    # much slower to compile)
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


def rebuild(neighbors: NeighborList, geometry: Geometry, systems: jax.Array | None = None,
            cutoffs: jax.Array | None = None) -> NeighborList:
    """Build again with the same cutoff, skin and capacities (jit-compatible): every system, or
    only those in the ``(S,)`` mask ``systems`` (their cost is theirs; the others keep their
    columns). ``cutoffs`` replaces the systems' interaction ranges (default: the list's).
    """
    cutoffs = neighbors.cutoffs if cutoffs is None else cutoffs
    if systems is None:
        return build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacities, neighbors.n_builds,
                     cutoffs=cutoffs)
    return _rebuild_systems(neighbors, geometry, systems, cutoffs)


def rebuild_tracked(neighbors: NeighborList, geometry: Geometry, systems: jax.Array,
                    cutoffs: jax.Array | None = None) -> tuple[NeighborList, jax.Array]:
    """:func:`rebuild` of ``systems``, and the ``(S,)`` systems built anew (the selection). The
    variable-cell loop uses it to know at which cell each system's pairs were found."""
    return rebuild(neighbors, geometry, systems, cutoffs), systems


def clear_padding(neighbors: NeighborList, geometry: Geometry) -> NeighborList:
    """The list with empty columns for the padding rows (a slot whose new structure is smaller
    than the old one: :func:`rebuild` writes only the new structure's atoms' columns)."""
    A = geometry.n_atom_rows
    return dataclasses.replace(neighbors, neighbors=jnp.where(geometry.atom_mask[None, :], neighbors.neighbors, A))


def moved_too_far(neighbors: NeighborList, geometry: Geometry) -> jax.Array:
    """``(S,)`` True for the systems with an atom that moved more than half the skin since the last build."""
    moved = jnp.sum((geometry.positions - neighbors.reference_positions) ** 2, axis=-1) > (0.5 * neighbors.skin) ** 2
    return segment_any(moved & geometry.atom_mask, geometry.system, geometry.n_systems)


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


_build_jit = cached_jit(build, static_argnames=("cutoff", "skin", "capacities"))


def estimate_capacities(geometry: Geometry, radius: float) -> Capacities:
    """Capacities for a first build, computed on the host (numpy) so that it usually fits.

    Everything but the matrix width is what :func:`build` will need, recomputed the same way
    (the cell-list sizes with a quarter to spare; a last-bit difference only costs a second
    build). The width is an upper estimate: every candidate of the fullest atom, but not
    beyond twice the neighbours at a dense packing (0.1 atoms/Å³) or 1.25 times those at a
    periodic system's own density; :func:`allocate` keeps only the columns the build filled.
    Each build with new capacities is a compilation, so a good first guess saves a
    compilation per new batch shape.
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
    candidates, offsets, largest_candidates, largest_bins = 1, 1, 1, 1
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
        largest_bins = int(cell_bins.max())
        row_candidates = int(per_row.max())
    else:
        row_candidates = 1
    # pairs: neighbours within the radius at the system's own density (3-D periodic) or at a
    # dense packing (0.1 atoms/A^3) otherwise, never more than all pairs and images
    volume = np.abs(np.linalg.det(np.asarray(g.cell, np.float64)))
    density = np.where(pbc.all(axis=-1) & (volume > 1e-9), n / np.where(volume > 1e-9, volume, 1.0), 0.1)
    sphere = density * 4.0 / 3.0 * np.pi * radius ** 3
    per_atom = np.minimum(np.maximum(n - 1, 0) * images + (images - 1), sphere)
    pairs = int(np.sum(n * per_atom))
    # matrix width: every candidate of the fullest atom (an upper bound), but not beyond twice a
    # dense packing's sphere; allocate() then keeps only the columns the build filled
    dense_rows = np.where(use_cells | (n == 0), 0, n * images - 1)
    widest = max(row_candidates, int(dense_rows.max(initial=0)))
    sphere_dense = 0.1 * 4.0 / 3.0 * np.pi * radius ** 3
    widest = min(widest, max(int(2 * sphere_dense), int(1.25 * per_atom.max(initial=0)) + 1))
    grow = lambda x: bucket(int(x * 1.25) + 1, minimum=8)  # noqa: E731
    return Capacities(
        neighbors=matrix_width(widest), block=aligned_block(int(n.max(initial=1))),
        images=_block_images(pbc[n > 0]),
        dense_candidates=bucket(int(np.max(np.where(use_cells, 0, n * n * images), initial=0)), minimum=64),
        cell_rows=grow(np.max(np.where(use_cells, n, 0), initial=0)), bins=grow(largest_bins),
        cell_candidates=grow(largest_candidates), offsets=max(offsets, 1))


def aligned_block(rows: int) -> int:
    """Columns a system of up to ``rows`` atoms may own, and its dense block: a multiple of 32."""
    return max(32, -(-int(rows) // 32) * 32)


def matrix_width(widest: int) -> int:
    """Neighbor-matrix width for atoms with at most ``widest`` neighbours: ~10 % to spare (atoms
    move within the skin), in multiples of 8. Every column costs every evaluation, so the ladder
    is finer than :func:`~kups_relax.buckets.bucket`'s."""
    return max(8, -(-(int(widest * 1.1) + 2) // 8) * 8)


def allocate(geometry: Geometry, cutoff: float, skin: float, capacities: Capacities | None = None,
             cutoffs: jax.Array | None = None, block: int | None = None) -> NeighborList:
    """Build a list on the host, choosing capacities large enough (jax-md's ``allocate``).

    ``capacities`` are lower bounds; ``cutoffs`` (``(S,)`` Å) every system's interaction range
    (default ``cutoff``); ``block`` the most atom rows a system may have (a batch's largest
    slot; default: its largest system). The first build uses :func:`estimate_capacities`; builds
    are repeated with grown capacities until nothing overflows (every build reports what it
    needed), and the matrix keeps only the columns its fullest atom needs (:func:`matrix_width`),
    without another build.
    """
    estimate = estimate_capacities(geometry, cutoff + skin)
    caps = Capacities(*(max(a, b) for a, b in zip(capacities, estimate))) if capacities else estimate
    caps = caps._replace(block=max(caps.block, aligned_block(block or 0)))
    if cutoffs is None:
        cutoffs = jnp.full(geometry.n_systems, cutoff, geometry.positions.dtype)
    for _ in range(8):
        nl = _build_jit(geometry, cutoff=float(cutoff), skin=float(skin), capacities=caps, cutoffs=cutoffs)
        if not bool(nl.overflow):
            needed = int(nl.needed.neighbors)
            width = max(matrix_width(needed), capacities.neighbors if capacities else 0)
            return _narrowed(nl, width) if width < caps.neighbors else nl
        caps = _grown(caps, nl)
    raise RuntimeError(f"neighbor list capacities did not settle: {caps}")


def _grown(caps: Capacities, neighbors: NeighborList) -> Capacities:
    """``caps`` with every capacity the list needed more of at least doubled (matrix width and
    neighbouring bins: what is needed, the width with its margin; block: the largest system)."""
    needed = Capacities(*(int(x) for x in neighbors.needed))
    larger = {name: (getattr(caps, name) if getattr(needed, name) <= getattr(caps, name)
                     else max(2 * getattr(caps, name), bucket(getattr(needed, name), minimum=8)))
              for name in ("dense_candidates", "cell_rows", "bins", "cell_candidates")}
    return caps._replace(**larger, offsets=max(caps.offsets, needed.offsets),
                         neighbors=max(caps.neighbors, matrix_width(needed.neighbors)),
                         block=max(caps.block, aligned_block(needed.block)))


def _narrowed(neighbors: NeighborList, width: int) -> NeighborList:
    """The list with only the first ``width`` matrix rows (no atom may have more neighbours)."""
    assert int(neighbors.needed.neighbors) <= width
    return _narrow_jit(neighbors, width)


@cached_jit(static_argnames=("width",))
def _narrow_jit(neighbors: NeighborList, width: int) -> NeighborList:
    return dataclasses.replace(neighbors, neighbors=neighbors.neighbors[:width], shifts=neighbors.shifts[:width],
                               capacities=neighbors.capacities._replace(neighbors=width))


def grow(neighbors: NeighborList, geometry: Geometry) -> NeighborList:
    """A list with capacities large enough for ``geometry`` (after an overflow).

    Every capacity that overflowed at least doubles (see :func:`_grown`), so a stream whose
    structures keep asking for a little more grows a capacity a few times, not once per
    structure: each growth is a compilation of every program of the batch.
    """
    floor = _grown(neighbors.capacities, neighbors)
    return allocate(geometry, neighbors.cutoff, neighbors.skin, capacities=floor, cutoffs=neighbors.cutoffs)

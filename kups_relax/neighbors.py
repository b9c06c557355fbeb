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

Candidate pairs are enumerated per system: all atom pairs of the system times
all periodic images needed to reach ``cutoff + skin``. The enumeration is
ragged (its length is the sum over systems of ``n_atoms**2 * n_images``), so a
batch of small systems costs what its systems cost, and a system's pairs come
out in the same order whatever slot it sits in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .batch import Geometry
from .buckets import bucket


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
        n_candidates: ``()`` candidate pairs enumerated at the last build.
        overflow: ``()`` True when a capacity was too small at the last build.
        n_builds: ``()`` builds so far (diagnostics).
        cutoff: interaction cutoff, Å (static).
        skin: Verlet skin, Å (static).
        candidate_capacity: length of the candidate enumeration (static).
    """

    senders: jax.Array
    receivers: jax.Array
    shifts: jax.Array
    mask: jax.Array
    reference_positions: jax.Array
    n_pairs: jax.Array
    n_candidates: jax.Array
    overflow: jax.Array
    n_builds: jax.Array
    cutoff: float = dataclasses.field(metadata=dict(static=True))
    skin: float = dataclasses.field(metadata=dict(static=True))
    candidate_capacity: int = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.senders.shape[0]


def image_counts(geometry: Geometry, radius: float | jax.Array) -> jax.Array:
    """Periodic images needed along each lattice direction -> int ``(S, 3)``.

    Along a periodic direction ``d`` two atoms closer than ``radius`` differ in the
    fractional coordinate by at most ``radius * |b_d|`` (``b_d`` the reciprocal vector),
    so images ``-k..k`` with ``k = ceil(radius * |b_d|)`` around the wrapped cell suffice.
    """
    reciprocal = jnp.linalg.inv(geometry.wrap_cell)  # columns are b_d
    k = jnp.ceil(radius * jnp.linalg.norm(reciprocal, axis=-2))
    return jnp.where(geometry.pbc, k, 0).astype(jnp.int64)


def _candidate_counts(geometry: Geometry, radius) -> tuple[jax.Array, jax.Array]:
    k = image_counts(geometry, radius)
    n_images = jnp.prod(2 * k + 1, axis=-1)
    n = geometry.n_atoms.astype(jnp.int64)
    return n * n * n_images, k


def build(geometry: Geometry, cutoff: float, skin: float, capacity: int, candidate_capacity: int,
          n_builds: jax.Array | int = 0) -> NeighborList:
    """Build the pair list from scratch (jit-compatible; capacities are static)."""
    radius = cutoff + skin
    S = geometry.n_systems
    counts, k = _candidate_counts(geometry, radius)
    ends = jnp.cumsum(counts)
    starts = ends - counts
    total = ends[-1]

    c = jnp.arange(candidate_capacity, dtype=jnp.int64)
    s = jnp.clip(jnp.searchsorted(ends, c, side="right"), 0, S - 1)
    valid = c < total
    local = c - starts[s]
    n_img = jnp.prod(2 * k + 1, axis=-1)[s]
    n = geometry.n_atoms[s].astype(jnp.int64)
    img = local % n_img
    pair = local // n_img
    first = geometry.first_atom[s].astype(jnp.int64)
    i = jnp.where(valid, first + pair // jnp.maximum(n, 1), 0)
    j = jnp.where(valid, first + pair % jnp.maximum(n, 1), 0)

    # image index -> integer translation (mixed radix over 2k+1 per direction)
    ks = k[s]
    width = 2 * ks + 1
    t0 = img % width[:, 0]
    t1 = (img // width[:, 0]) % width[:, 1]
    t2 = img // (width[:, 0] * width[:, 1])
    translation = jnp.stack([t0, t1, t2], axis=-1) - ks

    # wrap positions into the cell along periodic directions only
    positions = geometry.positions
    system = jnp.clip(geometry.system, 0, S - 1)
    inv = jnp.linalg.inv(geometry.wrap_cell)
    frac = matvec_rows(positions, inv[system])
    whole = jnp.where(geometry.pbc[system], jnp.floor(frac), 0.0)

    shift = translation.astype(positions.dtype) - whole[j] + whole[i]
    vec = positions[j] - positions[i] + matvec_rows(shift, geometry.cell[s])
    d2 = jnp.sum(vec * vec, axis=-1)
    is_self = (i == j) & jnp.all(translation == 0, axis=-1)
    keep = valid & (d2 < radius * radius) & ~is_self

    slot = jnp.cumsum(keep) - 1
    n_pairs = jnp.sum(keep)
    target = jnp.where(keep & (slot < capacity), slot, capacity)  # out of range -> dropped
    senders = jnp.zeros(capacity, jnp.int32).at[target].set(i.astype(jnp.int32), mode="drop")
    receivers = jnp.zeros(capacity, jnp.int32).at[target].set(j.astype(jnp.int32), mode="drop")
    shifts = jnp.zeros((capacity, 3), positions.dtype).at[target].set(shift, mode="drop")
    mask = jnp.zeros(capacity, bool).at[target].set(True, mode="drop")
    overflow = (n_pairs > capacity) | (total > candidate_capacity)
    return NeighborList(
        senders=senders, receivers=receivers, shifts=shifts, mask=mask,
        reference_positions=positions, n_pairs=n_pairs, n_candidates=total,
        overflow=overflow, n_builds=jnp.asarray(n_builds) + 1,
        cutoff=float(cutoff), skin=float(skin), candidate_capacity=int(candidate_capacity),
    )


def matvec_rows(vectors: jax.Array, matrices: jax.Array) -> jax.Array:
    """Row-wise ``vectors[e] @ matrices[e]`` for ``(E, 3)`` and ``(E, 3, 3)``.

    Written as broadcasting element-wise products: XLA's CPU batched 3x3 dot is far slower.
    """
    return vectors[:, 0, None] * matrices[:, 0] + vectors[:, 1, None] * matrices[:, 1] + vectors[:, 2, None] * matrices[:, 2]


def needs_rebuild(neighbors: NeighborList, positions: jax.Array) -> jax.Array:
    """True when some atom moved more than half the skin since the last build."""
    moved = jnp.sum((positions - neighbors.reference_positions) ** 2, axis=-1)
    return jnp.max(moved) > (0.5 * neighbors.skin) ** 2


def update(neighbors: NeighborList, geometry: Geometry) -> NeighborList:
    """Rebuild ``neighbors`` for ``geometry.positions`` if the skin is exhausted (jit-compatible).

    Capacities are kept; check ``overflow`` afterwards.
    """
    return jax.lax.cond(
        needs_rebuild(neighbors, geometry.positions),
        lambda: build(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacity,
                      neighbors.candidate_capacity, neighbors.n_builds),
        lambda: neighbors,
    )


def pair_vectors(neighbors: NeighborList, positions: jax.Array, cell: jax.Array, system: jax.Array) -> jax.Array:
    """``(E, 3)`` vectors from atom ``i`` to its neighbour ``j`` (Å); zero for padding pairs.

    ``cell`` may be a strained cell (for stress); ``shifts`` are in lattice vectors.
    """
    S = cell.shape[0]
    s = jnp.clip(system[neighbors.senders], 0, S - 1)
    vec = positions[neighbors.receivers] - positions[neighbors.senders] + matvec_rows(neighbors.shifts, cell[s])
    return jnp.where(neighbors.mask[:, None], vec, 0.0)


_build_jit = jax.jit(build, static_argnames=("cutoff", "skin", "capacity", "candidate_capacity"))


def allocate(geometry: Geometry, cutoff: float, skin: float, capacity: int | None = None,
             candidate_capacity: int | None = None) -> NeighborList:
    """Build a list on the host, choosing bucketed capacities large enough (jax-md's ``allocate``).

    ``capacity`` and ``candidate_capacity`` are lower bounds; the pair capacity is at
    least 25 % above the pairs found now, so the list can grow as atoms move.
    """
    counts, _ = _candidate_counts(geometry, cutoff + skin)
    needed_candidates = int(np.sum(np.asarray(counts)))
    candidate_capacity = max(candidate_capacity or 0, bucket(needed_candidates, minimum=64))
    # a counting pass (n_pairs is exact whatever the capacity), then room to grow as atoms move
    probe = _build_jit(geometry, cutoff=float(cutoff), skin=float(skin), capacity=64,
                       candidate_capacity=candidate_capacity)
    capacity = max(capacity or 0, bucket(int(int(probe.n_pairs) * 1.25) + 1, minimum=64))
    nl = _build_jit(geometry, cutoff=float(cutoff), skin=float(skin), capacity=capacity,
                    candidate_capacity=candidate_capacity)
    assert not bool(nl.overflow), "neighbor capacities were computed from an exact count"
    return nl


def grow(neighbors: NeighborList, geometry: Geometry) -> NeighborList:
    """A list with capacities large enough for ``geometry`` (after an overflow)."""
    return allocate(geometry, neighbors.cutoff, neighbors.skin, neighbors.capacity, neighbors.candidate_capacity)

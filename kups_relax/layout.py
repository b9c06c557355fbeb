"""Capacity planning: how many slots of which sizes one batch holds, from a budget of atom rows.

A batch is ``A`` atom rows cut into ``S`` slots of fixed sizes (a slot holds one structure at a
time; the rows it does not use are padding). Slots of different sizes share one batch, so a
stream of structures of mixed sizes runs through one set of compiled programs; every slot size
is a capacity bucket (:func:`kups_relax.buckets.bucket`), so a structure wastes at most a third
of its slot.

The budget (``atoms_per_batch``) is split between slot sizes in proportion to the rows the
structures of each size need, so every size class advances at the same pace. A structure larger
than ``atoms_per_batch * SHARED_FRACTION`` does not share: it gets a batch of slots of its own
bucket. The budget comes from the user (``atoms_per_batch=``, ``--atoms-per-batch``) or from
:func:`atoms_budget`, which reads the accelerator's memory.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Sequence

import numpy as np

from .batch import aligned_rows
from .buckets import bucket

logger = logging.getLogger(__name__)

#: Atom rows per batch on a CPU. Force throughput is flat from ~1k atoms up (benchmarks/
#: RESULTS.md), and a smaller batch finishes its slowest structure sooner.
CPU_ATOMS_PER_BATCH = 8192

#: A structure larger than this fraction of the budget gets a batch of its own.
SHARED_FRACTION = 1 / 8

#: Smallest slot, atom rows.
MIN_SLOT = 8

#: Device bytes one atom row costs in the loop, float64, L-BFGS with 100 pairs of history
#: (2 x 100 x 3 x 8 B = 4.8 kB) plus ~80 neighbour pairs of ~150 B of indices, shifts and
#: autodiff intermediates each. An upper estimate: used only to size batches from memory.
BYTES_PER_ATOM_ROW = 20_000


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Slot sizes of one batch.

    Attributes:
        slot_atoms: ``(S,)`` atom rows of every slot, largest first; trailing zeros are spare
            system slots (``S`` is a capacity bucket).
        n_rows: atom capacity ``A`` (a bucket, at least ``sum(slot_atoms)``).
    """

    slot_atoms: tuple[int, ...]
    n_rows: int

    @property
    def n_slots(self) -> int:
        return len(self.slot_atoms)

    @property
    def first_atom(self) -> np.ndarray:
        """``(S,)`` first row of every slot."""
        sizes = np.asarray(self.slot_atoms, np.int64)
        return np.cumsum(sizes) - sizes

    @property
    def largest(self) -> int:
        return max(self.slot_atoms)

    @classmethod
    def uniform(cls, slot_atoms: int, n_slots: int) -> "SlotLayout":
        """``n_slots`` slots of ``slot_atoms`` rows each."""
        S = bucket(n_slots, minimum=1)
        return cls(tuple([slot_atoms] * n_slots + [0] * (S - n_slots)), bucket(slot_atoms * n_slots, minimum=8))


def slot_size(n_atoms: int) -> int:
    """The slot a structure of ``n_atoms`` atoms needs: its capacity bucket, in whole row blocks
    (:data:`~kups_relax.segments.ROW_BLOCK`; so 9-12 atoms take 16 rows, not 12)."""
    return aligned_rows(bucket(n_atoms, minimum=MIN_SLOT))


def shares_batch(n_atoms: int, atoms_per_batch: int) -> bool:
    """Whether a structure runs in the shared mixed-size batch (else in a batch of its own size)."""
    return slot_size(n_atoms) <= max(MIN_SLOT, int(atoms_per_batch * SHARED_FRACTION))


def plan_layout(sizes: Sequence[int], atoms_per_batch: int, known: bool = True) -> SlotLayout:
    """Choose the slots of a shared batch for structures of these atom counts.

    Args:
        sizes: atom counts of the structures the batch will hold: all of them (``known``)
            or a sample of the stream read so far.
        atoms_per_batch: budget of atom rows.
        known: with the complete list, never more slots of a size than structures need it.

    If everything fits the budget, every structure gets a slot (one pass, no refill).
    Otherwise each slot size gets rows in proportion to ``count * size`` of its structures
    (at least one slot each), and the rows left over go to the sizes furthest below their share.
    """
    if not sizes:
        raise ValueError("plan_layout needs at least one structure size")
    counts = collections.Counter(slot_size(n) for n in sizes)
    demand = {size: count * size for size, count in counts.items()}
    total = sum(demand.values())
    if known and total <= atoms_per_batch:
        slots = dict(counts)
    else:
        slots = {size: max(1, int(atoms_per_batch * demand[size] / total) // size) for size in counts}
        if known:
            slots = {size: min(n, counts[size]) for size, n in slots.items()}
        while True:
            left = atoms_per_batch - sum(size * n for size, n in slots.items())
            open_sizes = [size for size in slots if size <= left and (not known or slots[size] < counts[size])]
            if not open_sizes:
                break
            # the size whose rows are furthest below its share of the demand
            neediest = min(open_sizes, key=lambda size: slots[size] * size / demand[size])
            slots[neediest] += 1
    sizes_desc = sorted(slots, reverse=True)
    slot_atoms = [size for size in sizes_desc for _ in range(slots[size])]
    S = bucket(len(slot_atoms), minimum=1)
    layout = SlotLayout(tuple(slot_atoms + [0] * (S - len(slot_atoms))), bucket(sum(slot_atoms), minimum=8))
    logger.debug("slot layout: %s slots of sizes %s in %d rows",
                 len(slot_atoms), {size: slots[size] for size in sizes_desc}, layout.n_rows)
    return layout


def atoms_budget(device=None, fraction: float = 0.5) -> int:
    """Atom rows per batch for ``device`` (default: JAX's first device).

    On an accelerator that reports its memory, ``fraction`` of it divided by
    :data:`BYTES_PER_ATOM_ROW`; on a CPU (no memory limit worth filling),
    :data:`CPU_ATOMS_PER_BATCH`.
    """
    import jax

    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- backends without memory statistics
        stats = None
    limit = (stats or {}).get("bytes_limit")
    if device.platform == "cpu" or not limit:
        return CPU_ATOMS_PER_BATCH
    return max(CPU_ATOMS_PER_BATCH, int(limit * fraction) // BYTES_PER_ATOM_ROW)

"""Host-side neighbor-list capacity estimates against brute-force counts (ASE's neighbor list).

:func:`kups_relax.neighbors.estimate_capacities` sizes the first build of a batch in numpy, so
that it usually fits without a second compilation; :func:`~kups_relax.neighbors.matrix_width`
gives a matrix width its margin. Both are otherwise only exercised through whole builds. Here
no JAX program is compiled: the true needs come from ``ase.neighborlist.neighbor_list``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.buckets import bucket

RADIUS = 6.88  # EMT's list radius (5.88 Å) plus the engine's 1 Å skin: cutoff + skin

#: Atoms/Å³ of the "dense packing" whose neighbours, twice over, cap the estimated matrix width.
DENSE_PACKING = 0.1


def structures() -> dict[str, Atoms]:
    """Bulk fcc (small, large, one-atom primitive), a slab, molecules in a periodic box and in
    free space, and small triclinic cells."""
    rng = np.random.default_rng(3)
    out = {
        "fcc 108": bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3),
        "fcc 320": bulk("Cu", "fcc", a=3.6, cubic=True) * (4, 4, 5),
        "fcc primitive": bulk("Cu", "fcc", a=3.6),
        "slab": fcc111("Pt", size=(4, 4, 4), vacuum=6.0),
        "benzene in a box": molecule("C6H6"),
        "methane, no cell": molecule("CH4"),
        "triclinic": Atoms("Al8", cell=[[4.0, 0.0, 0.0], [1.5, 4.2, 0.0], [0.8, 1.1, 4.5]], pbc=True,
                           scaled_positions=rng.random((8, 3))),
        "fcc primitive x 8": bulk("Al", "fcc", a=4.05) * (2, 2, 2),
    }
    out["benzene in a box"].center(vacuum=6.0)
    out["benzene in a box"].pbc = True
    out["methane, no cell"].center(vacuum=4.0)
    out["methane, no cell"].pbc = False
    for k, atoms in enumerate(out.values()):
        atoms.rattle(0.05, seed=k)
    return out


STRUCTURES = structures()


class Need:
    """What a structure truly needs, counted by ASE (every pair from both ends, as the engine lists them)."""

    def __init__(self, atoms: Atoms, radius: float = RADIUS):
        i, _, shifts = neighbor_list("ijS", atoms, radius)
        self.n = len(atoms)
        self.widest = int(np.bincount(i, minlength=len(atoms)).max()) if len(i) else 0
        self.pairs = len(i)
        # images the pairs reach: |shift| per direction
        reach = np.abs(shifts).max(axis=0) if len(shifts) else np.zeros(3, int)
        self.images = int(np.prod(2 * reach + 1))
        self.periodic = int(np.sum(atoms.pbc))
        # images "needed to reach cutoff + skin" through the lattice planes: the documented plan
        spacing = 1.0 / np.linalg.norm(atoms.cell.reciprocal(), axis=1) if atoms.pbc.any() else np.ones(3)
        k_planes = np.where(atoms.pbc, np.ceil(radius / np.where(atoms.pbc, spacing, 1.0)), 0)
        self.plane_images = int(np.prod(2 * k_planes + 1))


def estimate(*atoms: Atoms) -> nl.Capacities:
    return nl.estimate_capacities(Batch.from_atoms(list(atoms)).geometry, RADIUS)


def dense_covers(caps: nl.Capacities, need: Need) -> bool:
    """The all-pairs x images enumeration of this structure has room for every true pair."""
    return caps.dense_candidates >= need.n * need.n * need.images


def cells_cover(caps: nl.Capacities, need: Need) -> bool:
    """The cell-list enumeration has room for the structure's atoms and every true pair (a cell
    list's candidates of an atom include all its neighbours)."""
    return caps.cell_rows >= need.n and caps.cell_candidates >= need.pairs and caps.offsets >= 27


# --- matrix_width -------------------------------------------------------------------------------

def test_matrix_width_keeps_about_ten_percent_to_spare_in_multiples_of_eight():
    previous = 0
    for widest in range(0, 3000):
        width = nl.matrix_width(widest)
        assert width % 8 == 0 and width >= 8
        assert width >= widest * 1.1, f"{widest} neighbours: width {width} leaves under 10 % to spare"
        assert width <= widest * 1.1 + 2 + 8, f"{widest} neighbours: width {width} wastes more than the margin"
        assert width >= previous, "a wider need never gets a narrower matrix"
        previous = width


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_matrix_width_of_the_true_need(name):
    need = Need(STRUCTURES[name])
    width = nl.matrix_width(need.widest)
    assert need.widest < width <= max(8, math.ceil((need.widest * 1.1 + 2) / 8) * 8)


def test_aligned_block():
    for rows in range(0, 1000):
        block = nl.aligned_block(rows)
        assert block % 32 == 0 and block >= max(rows, 32) and block < max(rows, 32) + 32


# --- estimate_capacities, one structure at a time -----------------------------------------------

@pytest.mark.parametrize("name", list(STRUCTURES))
def test_estimate_covers_the_true_need(name):
    atoms = STRUCTURES[name]
    need = Need(atoms)
    caps = estimate(atoms)
    # matrix width: at least the fullest atom's neighbours, and the documented cap (twice the
    # neighbours at a dense packing's density) for structures no denser than that packing
    assert caps.neighbors >= need.widest, f"width {caps.neighbors} < {need.widest} neighbours"
    assert caps.neighbors <= nl.matrix_width(int(2 * DENSE_PACKING * 4.0 / 3.0 * math.pi * RADIUS ** 3))
    # dense blocks: every system's rows, and images for each periodic direction
    assert caps.block >= need.n and caps.block % 32 == 0
    assert caps.images == 2 ** need.periodic
    # whichever enumeration the structure gets has room for all its pairs
    assert dense_covers(caps, need) or cells_cover(caps, need), f"{name}: {caps} for {vars(need)}"


@pytest.mark.parametrize("name", ["fcc primitive", "slab", "triclinic", "fcc primitive x 8"])
def test_all_pairs_estimate_is_pairs_times_the_images_to_reach_the_radius(name):
    # small or thin cells: all atom pairs x the images within reach of cutoff + skin, in a bucket
    need = Need(STRUCTURES[name])
    caps = estimate(STRUCTURES[name])
    assert dense_covers(caps, need)
    assert caps.dense_candidates <= bucket(need.n * need.n * need.plane_images, minimum=64)


@pytest.mark.parametrize("name", ["fcc 108", "fcc 320", "benzene in a box"])
def test_cell_list_estimate_has_a_quarter_to_spare(name):
    # larger periodic cells (and a molecule in a big box) go through cell lists
    need = Need(STRUCTURES[name])
    caps = estimate(STRUCTURES[name])
    assert cells_cover(caps, need)
    assert caps.cell_rows <= bucket(int(1.25 * need.n) + 1, minimum=8)
    assert caps.offsets == 125, "half-width bins: 5 x 5 x 5 neighbouring bins"


def test_free_molecule_needs_no_images():
    need = Need(STRUCTURES["methane, no cell"])
    caps = estimate(STRUCTURES["methane, no cell"])
    assert need.widest == 4 and caps.neighbors == 8  # the narrowest matrix
    assert caps.images == 1
    assert caps.dense_candidates >= need.n * need.n


# --- estimate_capacities, one batch of mixed structures ------------------------------------------

def test_estimate_for_a_mixed_batch_covers_every_system():
    atoms = list(STRUCTURES.values())
    needs = [Need(a) for a in atoms]
    caps = estimate(*atoms)
    assert caps.neighbors >= max(n.widest for n in needs)
    assert caps.block >= max(n.n for n in needs)
    assert caps.images == 8
    for name, need in zip(STRUCTURES, needs):
        assert dense_covers(caps, need) or cells_cover(caps, need), name


def test_estimate_is_the_largest_of_the_systems():
    # capacities are per system (systems are enumerated one at a time): a batch needs what its
    # largest system needs, not the sum
    atoms = list(STRUCTURES.values())
    alone = [estimate(a) for a in atoms]
    together = estimate(*atoms)
    for field in nl.Capacities._fields:
        largest = max(getattr(c, field) for c in alone)
        if field == "neighbors":  # the width's cap is taken over the batch, so it may be wider
            assert together.neighbors >= largest
        else:
            assert getattr(together, field) == largest, field

"""The overlap check's pair search equals ASE's neighbor list (periodic, slab, cluster, triclinic, thin cells)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.cluster import Icosahedron
from ase.neighborlist import neighbor_list

from kups_relax.validate import InvalidStructure, _close_pairs, check_structure


def structures():
    rng = np.random.default_rng(3)
    out = [
        bulk("Cu", "fcc", a=3.6) * (2, 2, 2),             # primitive (triclinic) cell
        bulk("Al", "fcc", a=4.05, cubic=True) * (2, 1, 3),
        fcc111("Pt", size=(3, 3, 3), vacuum=5.0),         # periodic in two directions
        Icosahedron("Cu", 3),                              # no cell
        bulk("Cu", "fcc", a=3.6),                          # one atom, cell thinner than the radius: ASE's list
    ]
    for k, atoms in enumerate(out):
        atoms.rattle(0.3, seed=k)
        atoms.positions += rng.normal(scale=0.6, size=atoms.positions.shape)  # some atoms outside the cell
    return out


def as_set(i, j, d):
    return sorted({(min(a, b), max(a, b), round(float(x), 9)) for a, b, x in zip(i, j, d)})


@pytest.mark.parametrize("radius", [1.5, 2.6])
@pytest.mark.parametrize("k", range(5))
def test_close_pairs_equal_ase(k, radius):
    atoms = structures()[k]
    assert as_set(*_close_pairs(atoms, radius)) == as_set(*neighbor_list("ijd", atoms, radius))


def test_atoms_at_one_place_across_the_cell_boundary_are_rejected():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[2] = atoms.positions[1] + atoms.cell[0] + 1e-4  # an image of atom 1
    with pytest.raises(InvalidStructure, match="atom 1 is 1.7.e-04 Å from atom 2"):
        check_structure(atoms, "dup")

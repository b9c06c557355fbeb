"""The batched neighbor list finds exactly ASE's pairs, whichever enumeration a system gets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.cluster import Icosahedron
from ase.neighborlist import neighbor_list

from kups_relax import neighbors as nl
from kups_relax.batch import Batch

RADIUS = 6.88  # EMT's default list radius (5.88 Å) plus the engine's 1 Å skin
CUTOFF, SKIN = 5.88, 1.0


def mixed_structures() -> list[Atoms]:
    """Clusters, a molecule, slabs, small and large bulk, triclinic and thin cells, unwrapped atoms."""
    rng = np.random.default_rng(7)
    out = [
        Icosahedron("Cu", 2),                          # 13-atom cluster: all pairs
        Icosahedron("Cu", 4),                          # 147-atom cluster: cell list along 3 free directions
        molecule("CH4"),                               # no cell at all
        bulk("Cu", "fcc", a=3.6),                      # 1 atom, cell far thinner than the radius
        bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2),   # 32 atoms, 7.2 Å
        bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3),   # 108 atoms, 10.8 Å
        bulk("Cu", "fcc", a=3.6, cubic=True) * (4, 4, 5),   # 320 atoms: cell list
        bulk("Al", "fcc", a=4.05) * (5, 4, 3),         # primitive (triclinic) cell, 60 atoms
        fcc111("Pt", size=(4, 4, 4), vacuum=6.0),      # slab: periodic in x, y only
        fcc111("Au", size=(6, 6, 3), vacuum=5.0),      # wider slab
    ]
    for k, atoms in enumerate(out):
        if not atoms.cell.any():
            atoms.center(vacuum=4.0)
            atoms.pbc = False
        atoms.rattle(0.05, seed=k)
    out[5].positions += rng.normal(scale=4.0, size=out[5].positions.shape)  # atoms outside their cell
    return out


def ase_pairs(atoms: Atoms, radius: float) -> set:
    i, j, S = neighbor_list("ijS", atoms, radius)
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


def our_pairs(neighbors, first: np.ndarray, system_of_atom: np.ndarray, n_systems: int) -> list[set]:
    """Every system's pairs ``(i, j, shift)`` (rows counted from the system's first), from the matrix."""
    matrix = np.asarray(neighbors.neighbors)
    mask = matrix < matrix.shape[1]
    k_idx, i = np.nonzero(mask)
    j = matrix[k_idx, i]
    S = np.asarray(neighbors.shifts)[k_idx, i].astype(int)
    # a column's neighbours come first, padding after
    assert (np.cumsum(~mask, axis=0)[mask] == 0).all(), "padding entries precede real ones"
    out = [set() for _ in range(n_systems)]
    for a, b, s in zip(i, j, S):
        k = system_of_atom[a]
        assert system_of_atom[b] == k, "a pair crosses systems"
        pair = (int(a - first[k]), int(b - first[k]), tuple(s.tolist()))
        assert pair not in out[k], "a pair listed twice"
        out[k].add(pair)
    return out


@pytest.fixture(scope="module")
def packed():
    structures = mixed_structures()
    batch = Batch.from_atoms(structures)
    first = np.asarray(batch.starts)
    system = np.full(batch.geometry.n_atom_rows, -1)
    for k, atoms in enumerate(structures):
        system[batch.atom_slice(k)] = k
    return structures, batch.geometry, first, system


@pytest.mark.parametrize("way", ["blocks", "searched"])
def test_pairs_equal_ase_for_every_system(packed, way):
    """Every system's pairs equal ASE's, through dense blocks (with a search for the cells needing
    more than 27 images) or through cell lists and all-pairs lists alone."""
    import dataclasses

    structures, geometry, first, system = packed
    neighbors = nl.allocate(geometry, CUTOFF, SKIN)
    assert not bool(neighbors.overflow)
    if way == "searched":  # no dense blocks: every system through _search
        neighbors = nl.rebuild(dataclasses.replace(neighbors, capacities=neighbors.capacities._replace(images=0)),
                               geometry)
        layout = nl._layout(geometry, RADIUS)
        use_cells = np.asarray(layout.use_cells)[: len(structures)]
        assert use_cells.any() and (~use_cells).any(), "both enumerations are exercised"
    assert not bool(neighbors.overflow)
    ours = our_pairs(neighbors, first, system, len(structures))
    for k, atoms in enumerate(structures):
        assert ours[k] == ase_pairs(atoms, RADIUS), f"structure {k} ({atoms.get_chemical_formula()})"


@pytest.mark.parametrize("chosen, capacities", [((0, 3, 4), "estimated"), ((1, 3, 6), "tiny"),
                                                ((0, 1, 4, 5, 6, 7, 8, 9), "estimated")])
def test_rebuild_of_some_systems_keeps_the_others(packed, chosen, capacities):
    """The selected systems are rebuilt, each on its own; the others keep their pairs (even where
    stale). With search capacities too small for a system that needs the search (the 1-atom cell
    needs more than 27 images), the rebuild says so (overflow) and the host grows them."""
    import dataclasses

    structures, geometry, first, system = packed
    neighbors = nl.allocate(geometry, CUTOFF, SKIN)
    if capacities == "tiny":
        neighbors = dataclasses.replace(neighbors, capacities=neighbors.capacities._replace(
            dense_candidates=64, cell_rows=8, cell_candidates=64))
    moved = [a.copy() for a in structures]
    for k in chosen:
        moved[k].rattle(0.4, seed=100 + k)
    moved_geometry = Batch.from_atoms(moved).geometry
    selected = jnp.zeros(geometry.n_systems, bool).at[jnp.array(chosen)].set(True)
    after, rebuilt = jax.jit(nl.rebuild_tracked)(neighbors, moved_geometry, selected)
    assert set(np.flatnonzero(np.asarray(rebuilt))) == set(chosen)
    assert bool(after.overflow) == (capacities == "tiny")
    if capacities == "tiny":
        after = nl.grow(after, moved_geometry)
        assert not bool(after.overflow)
        structures = moved  # grow builds every system anew
    ours = our_pairs(after, first, system, len(structures))
    for k in range(len(structures)):
        # a system that was not rebuilt keeps the pairs of its old positions
        expected = ase_pairs(moved[k] if k in chosen else structures[k], RADIUS)
        assert ours[k] == expected, f"structure {k}"


def test_per_system_cutoffs_and_matrix_width(packed):
    """Systems list pairs out to their own ``cutoffs + skin``; the matrix is as wide as the fullest
    atom needs (with its margin), and a width too small is an overflow that ``grow`` repairs."""
    import dataclasses

    structures, geometry, first, system = packed
    cutoffs = np.full(geometry.n_systems, CUTOFF)
    cutoffs[1::2] = 3.0
    neighbors = nl.allocate(geometry, CUTOFF, SKIN, cutoffs=jnp.asarray(cutoffs))
    ours = our_pairs(neighbors, first, system, len(structures))
    widest = 0
    for k, atoms in enumerate(structures):
        expected = ase_pairs(atoms, cutoffs[k] + SKIN)
        assert ours[k] == expected, f"structure {k}"
        if expected:
            widest = max(widest, np.bincount([p[0] for p in expected]).max())
    assert neighbors.width == nl.matrix_width(widest)
    narrow = dataclasses.replace(neighbors, capacities=neighbors.capacities._replace(neighbors=8))
    rebuilt = nl.rebuild(narrow, geometry)
    assert bool(rebuilt.overflow)
    grown = nl.grow(rebuilt, geometry)
    assert not bool(grown.overflow) and grown.width == neighbors.width
    assert our_pairs(grown, first, system, len(structures)) == ours

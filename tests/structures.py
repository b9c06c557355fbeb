"""Test structures of mixed kinds, built with ASE (deterministic: every random draw is seeded)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.cluster import Icosahedron

#: Argon-like Lennard-Jones parameters (Å, eV) used by the LJ tests.
LJ_PARAMS = dict(sigma=3.4, epsilon=0.0104, rc=8.5)


def random_cluster(n: int, seed: int, spacing: float = 3.9) -> Atoms:
    """``n`` atoms on a jittered cubic grid (no overlaps), non-periodic, no cell."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)], float)[:n]
    positions = grid * spacing + rng.normal(scale=0.25, size=(n, 3))
    return Atoms("Ar" * n, positions=positions)


def lj_structures() -> list[tuple[str, Atoms]]:
    """At least 30 named LJ structures: clusters, bulk, triclinic, small cells, slabs, molecules in boxes."""
    out: list[tuple[str, Atoms]] = []
    for k, (shell, seed) in enumerate([(2, 1), (3, 2)]):
        a = Icosahedron("Ar", shell)
        a.rattle(0.15, seed=seed)
        out.append((f"icosahedron-{k}", a))
    for k, n in enumerate([5, 8, 13, 19, 27, 38]):
        out.append((f"cluster-{n}", random_cluster(n, seed=10 + k)))
    for k, (reps, seed) in enumerate([((1, 1, 1), 3), ((2, 1, 1), 4), ((2, 2, 1), 5), ((2, 2, 2), 6)]):
        a = bulk("Ar", "fcc", a=5.26, cubic=True) * reps
        a.rattle(0.1, seed=seed)
        out.append((f"bulk-{k}", a))
    rng = np.random.default_rng(7)
    for k in range(5):
        a = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 1, 1)
        strain = np.eye(3) + rng.uniform(-0.06, 0.06, size=(3, 3))
        a.set_cell(a.cell.array @ strain, scale_atoms=True)
        a.rattle(0.1, seed=20 + k)
        out.append((f"triclinic-{k}", a))
    for k, seed in enumerate([30, 31, 32, 33]):
        # primitive cells far smaller than the 8.5 Å cutoff: many periodic images of every atom
        a = bulk("Ar", "fcc", a=5.26) * (1, 1, 2)
        a.rattle(0.15, seed=seed)
        if k % 2:
            a.set_cell(a.cell.array @ (np.eye(3) + 0.03 * k * np.ones((3, 3))), scale_atoms=True)
        out.append((f"small-cell-{k}", a))
    hcp = bulk("Ar", "hcp", a=3.76)
    hcp.rattle(0.1, seed=34)
    out.append(("small-cell-hcp", hcp))
    for k, (size, seed) in enumerate([((2, 2, 3), 40), ((3, 3, 2), 41), ((2, 3, 2), 42)]):
        a = fcc111("Ar", size=size, a=5.26, vacuum=8.0)
        a.rattle(0.1, seed=seed)
        out.append((f"slab-{k}", a))
    slab = fcc111("Ar", size=(2, 2, 2), a=5.26, vacuum=None, periodic=False)
    slab.pbc = (True, True, False)
    slab.cell[2] = 0.0  # a slab with no third lattice vector at all
    slab.rattle(0.1, seed=43)
    out.append(("slab-no-c", slab))
    for k, name in enumerate(["CH4", "H2O", "C6H6"]):
        m = molecule(name)
        m.set_chemical_symbols(["Ar"] * len(m))
        m.positions *= 3.3
        m.rattle(0.1, seed=50 + k)
        m.center(vacuum=6.0)
        if k == 0:
            m.pbc = True  # a molecule in a periodic box
        out.append((f"molecule-{name}", m))
    wire = bulk("Ar", "fcc", a=5.26, cubic=True) * (1, 1, 2)
    wire.pbc = (False, False, True)
    wire.rattle(0.1, seed=60)
    out.append(("wire", wire))
    return out

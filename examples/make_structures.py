"""Write the example inputs in examples/structures/ with ASE (run once; the files are committed).

Small EMT metals in the formats people have: xyz, a multi-frame extxyz (each frame is
one system), cif and VASP POSCAR (with selective dynamics). Every structure is rattled
with a fixed seed so that it has something to relax.
"""

from pathlib import Path

from ase.build import bulk, fcc111
from ase.cluster import Icosahedron, Octahedron
from ase.constraints import FixAtoms
from ase.io import write

HERE = Path(__file__).resolve().parent / "structures"


def main() -> None:
    HERE.mkdir(exist_ok=True)

    cluster = Icosahedron("Cu", noshells=2)  # 13 atoms
    cluster.rattle(0.08, seed=1)
    write(HERE / "cu13_icosahedron.xyz", cluster)

    clusters = []
    for k, (symbol, length) in enumerate([("Au", 2), ("Ag", 3), ("Pt", 3)]):
        c = Octahedron(symbol, length)  # 6, 19, 19 atoms
        c.rattle(0.08, seed=10 + k)
        c.center(vacuum=5.0)
        clusters.append(c)
    write(HERE / "octahedra.extxyz", clusters)

    ni = bulk("Ni", "fcc", a=3.60, cubic=True) * (2, 2, 2)  # 32 atoms, 2 % compressed
    ni.rattle(0.05, seed=20)
    write(HERE / "ni_bulk.cif", ni)

    alloy = bulk("Cu", "fcc", a=3.70, cubic=True) * (2, 2, 1)
    alloy.symbols[::3] = "Au"  # an ordered-ish Cu-Au cell, off its lattice constant
    alloy.rattle(0.05, seed=21)
    write(HERE / "POSCAR_CuAu", alloy, format="vasp", direct=True)

    slab = fcc111("Pt", size=(2, 2, 4), vacuum=6.0)  # bottom two layers fixed
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag >= 3]))
    slab.rattle(0.05, seed=22)
    write(HERE / "pt111_slab.vasp", slab, format="vasp", direct=True)


if __name__ == "__main__":
    main()

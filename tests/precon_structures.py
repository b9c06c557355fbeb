"""Structures for the preconditioned L-BFGS (issue 17): the parity set and the benchmark's large set.

    >>> from precon_structures import parity_structures, large_structures
    >>> for name, atoms, kind, fmax in parity_structures(): ...   # kind: "emt" or "lj"

Deterministic: every random draw has its own seed. Every structure has a cell, also the
clusters (``pbc=False``, centred with vacuum): ASE's Exp preconditioner estimates the
nearest-neighbour distance with a cutoff that grows up to twice the longest cell vector, so a
cluster without a cell makes ASE's ``PreconLBFGS`` raise.

The parity set (:func:`parity_structures`): 25 structures of 55 to 1,370 atoms, most below
500 so that ASE relaxes the whole set in well under a minute. EMT (ASE's seven metals, ordered
and random alloys) for bulk with vacancies, an interstitial, fcc(111)/(100) slabs with and
without a fixed bottom layer, and clusters; Lennard-Jones argon (``LJ_PARAMS``) for the
largest, as ASE's LJ costs about half of ASE's EMT per atom.

The large set (:func:`large_structures`): 500 to 5,000 EMT atoms, the regime the
preconditioner is for: slabs, vacancy supercells, two misoriented blocks joined at a
grain-boundary-like interface, strongly rattled supercells.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.cluster import Icosahedron, Octahedron
from ase.constraints import FixAtoms
from ase.data import atomic_numbers, reference_states

from structures import LJ_PARAMS  # noqa: F401  (re-exported: the LJ kind's parameters)

AR_A = 5.26  # fcc argon lattice constant for LJ_PARAMS, Å (as tests/structures.py)


def lattice_constant(symbols) -> float:
    """Vegard's-law fcc lattice constant (Å) from ASE's reference states."""
    return float(np.mean([reference_states[atomic_numbers[s]]["a"] for s in symbols]))


def _fcc(symbols_or_element, reps, a=None, seed=None, fractions=None) -> Atoms:
    """Cubic fcc supercell ``reps`` of one element, or of a random alloy of ``fractions``."""
    n = 4 * int(np.prod(reps))
    if fractions is None:
        symbols = [symbols_or_element] * n
    else:
        rng = np.random.default_rng(seed)
        symbols = list(rng.choice(list(fractions), size=n, p=list(fractions.values())))
    atoms = bulk("Cu", "fcc", a=a or lattice_constant(symbols), cubic=True) * reps
    atoms.symbols = symbols
    return atoms


def _vacancies(atoms: Atoms, count: int, seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    del atoms[sorted(rng.choice(len(atoms), size=count, replace=False))]
    return atoms


def _ordered_l12(reps, minority: str, majority: str) -> Atoms:
    """L1_2 (Cu3Au-type): the minority on the cube corners."""
    cell = bulk("Cu", "fcc", a=lattice_constant([majority] * 3 + [minority]), cubic=True)
    cell.symbols = [minority, majority, majority, majority]
    return cell * reps


def _slab(build, element, size, vacuum=6.0, fixed_layers=0, fractions=None, seed=None) -> Atoms:
    n = int(np.prod(size))
    if fractions is None:
        symbols = [element] * n
    else:
        rng = np.random.default_rng(seed)
        symbols = list(rng.choice(list(fractions), size=n, p=list(fractions.values())))
    slab = build("Cu", size=size, a=lattice_constant(symbols), vacuum=vacuum)
    slab.symbols = symbols
    slab.info.pop("adsorbate_info", None)
    if fixed_layers:
        # ASE's fcc111/fcc100 tag layers 1 (top) .. size[2] (bottom)
        slab.set_constraint(FixAtoms(mask=slab.get_tags() > size[2] - fixed_layers))
    return slab


def _cluster(atoms: Atoms, vacuum=6.0) -> Atoms:
    atoms.center(vacuum=vacuum)
    atoms.pbc = False
    return atoms


def _interstitial(element: str, reps) -> Atoms:
    """An fcc supercell with one extra atom in an octahedral hole (a/2 along x from a corner)."""
    atoms = _fcc(element, reps)
    a = atoms.cell.array[0, 0] / reps[0]
    corner = np.array([reps[0] // 2, reps[1] // 2, reps[2] // 2]) * a
    atoms += Atoms(element, positions=[corner + [a / 2, 0.0, 0.0]])
    return atoms


def _misoriented_blocks(element: str, reps, angle_deg: float, a=None, gap=0.4) -> Atoms:
    """Grain-boundary-like: a block and a copy rotated by ``angle_deg`` about z stacked along z.

    Each block is carved from a larger rotated crystal as the atoms inside the (periodic in x, y)
    box, so the rotated block fits the box; atoms closer than 0.7 nearest-neighbour distances
    across the interfaces are dropped. Periodic in all three directions (two interfaces).
    """
    a = a or lattice_constant([element])
    lower = bulk(element, "fcc", a=a, cubic=True) * reps
    lx, ly, lz = np.diag(lower.cell.array)
    big = bulk(element, "fcc", a=a, cubic=True) * (2 * reps[0] + 2, 2 * reps[1] + 2, reps[2])
    big.positions -= big.cell.array.sum(0) * [0.5, 0.5, 0.0]
    big.rotate(angle_deg, "z")
    p = big.positions + [lx / 2, ly / 2, 0.0]
    inside = (p[:, 0] >= 0) & (p[:, 0] < lx) & (p[:, 1] >= 0) & (p[:, 1] < ly)
    upper = Atoms(element * int(inside.sum()), positions=p[inside] + [0.0, 0.0, lz + gap])
    atoms = lower + upper
    atoms.set_cell([lx, ly, 2 * lz + 2 * gap])
    atoms.pbc = True
    atoms.wrap()
    # drop atoms too close to another (the rotated block's edges and both interfaces)
    from ase.neighborlist import neighbor_list

    r_nn = a / np.sqrt(2)
    i, j = neighbor_list("ij", atoms, 0.7 * r_nn)
    dropped: set[int] = set()
    for a_i, a_j in zip(i.tolist(), j.tolist()):
        if a_i < a_j and a_i not in dropped and a_j not in dropped:
            dropped.add(a_j)  # the upper block's atom (it was added second)
    del atoms[sorted(dropped)]
    return atoms


class ParityStructure(NamedTuple):
    """One structure of the parity set: its name, the input, the potential kind and the fmax (eV/Å)."""

    name: str
    atoms: Atoms
    kind: str  # "emt" (ASE's EMT) or "lj" (ASE's LennardJones with LJ_PARAMS)
    fmax: float


#: convergence criterion of each kind (eV/Å): argon's forces are ~100x weaker than the metals'
FMAX = {"emt": 0.01, "lj": 0.01}


def parity_structures() -> list[ParityStructure]:
    """25 structures of 55 to 1,370 atoms: 20 EMT, 5 LJ (see :class:`ParityStructure`).

    Every structure is rattled (Gaussian, its own seed) so that it needs relaxing; defects
    (vacancies, an interstitial, surfaces) give long-range relaxations, the preconditioner's
    point. Slabs named ``-fixed`` have their bottom layer(s) fixed by ``FixAtoms``. Exp's
    estimate of mu falls below 1 (ASE then takes mu = 1) for most; the ``-compressed``
    supercells (lattice constant 3 % below ASE's reference) are stiff enough for mu > 1.
    """
    out: list[ParityStructure] = []

    def add(name, atoms, kind, rattle, seed, fmax=None):
        atoms.rattle(rattle, seed=seed)
        atoms.info["name"] = name
        out.append(ParityStructure(name, atoms, kind, fmax or FMAX[kind]))

    def compressed(element, reps):
        return _fcc(element, reps, a=0.97 * lattice_constant([element]))

    # EMT: bulk with vacancies, ordered and random alloys, an interstitial
    add("cu-vacancy-2x3x3", _vacancies(_fcc("Cu", (2, 3, 3)), 1, seed=1), "emt", 0.05, 101)  # 71
    add("ni-compressed-divacancy-3x3x3", _vacancies(compressed("Ni", (3, 3, 3)), 2, seed=2), "emt", 0.05,
        102)  # 106
    add("pd-compressed-vacancies-4x4x4", _vacancies(compressed("Pd", (4, 4, 4)), 3, seed=3), "emt", 0.04,
        103)  # 253
    add("pt-compressed-vacancy-3x3x3", _vacancies(compressed("Pt", (3, 3, 3)), 1, seed=11), "emt", 0.05,
        125)  # 107
    add("al-vacancy-3x3x3", _vacancies(_fcc("Al", (3, 3, 3)), 1, seed=4), "emt", 0.05, 104)  # 107
    add("cu3au-l12-vacancy", _vacancies(_ordered_l12((3, 3, 3), "Au", "Cu"), 1, seed=5), "emt", 0.05, 105)  # 107
    add("ni3al-l12-vacancy", _vacancies(_ordered_l12((3, 3, 2), "Al", "Ni"), 1, seed=6), "emt", 0.05, 106)  # 71
    add("cuau-random-vacancy", _vacancies(_fcc(None, (3, 3, 4), seed=7, fractions={"Cu": 0.5, "Au": 0.5}), 1,
                                           seed=8), "emt", 0.05, 107)  # 143
    add("agptni-random", _fcc(None, (3, 3, 3), seed=9, fractions={"Ag": 0.4, "Pt": 0.4, "Ni": 0.2}), "emt",
        0.05, 108)  # 108
    add("ag-interstitial-3x3x3", _interstitial("Ag", (3, 3, 3)), "emt", 0.03, 109)  # 109
    add("au-vacancies-5x5x5", _vacancies(_fcc("Au", (5, 5, 5)), 4, seed=10), "emt", 0.03, 110)  # 496
    # EMT slabs
    add("cu-fcc111-fixed", _slab(fcc111, "Cu", (4, 4, 5), fixed_layers=1), "emt", 0.05, 111)  # 80
    add("pt-fcc100", _slab(fcc100, "Pt", (4, 4, 5)), "emt", 0.05, 112)  # 80
    add("au-fcc111-fixed", _slab(fcc111, "Au", (6, 6, 6), fixed_layers=2), "emt", 0.04, 113)  # 216
    add("nicu-fcc100-random", _slab(fcc100, None, (5, 5, 6), fractions={"Ni": 0.5, "Cu": 0.5}, seed=14), "emt",
        0.05, 114)  # 150
    add("al-fcc111", _slab(fcc111, "Al", (3, 4, 6)), "emt", 0.05, 115)  # 72
    # EMT clusters (rattled, non-periodic, in a box)
    add("cu-icosahedron-147", _cluster(Icosahedron("Cu", 4)), "emt", 0.05, 116)
    add("pd-octahedron-201", _cluster(Octahedron("Pd", 7, 2)), "emt", 0.05, 117)
    cluster = Octahedron("Ag", 5, 1)  # 79 atoms; a random AgAu alloy
    cluster.symbols = list(np.random.default_rng(18).choice(["Ag", "Au"], size=len(cluster)))
    add("agau-octahedron-79", _cluster(cluster), "emt", 0.05, 118)
    add("ni-icosahedron-55", _cluster(Icosahedron("Ni", 3)), "emt", 0.05, 119)
    # LJ argon: the largest ones (ASE's LJ costs about half its EMT per atom; ASE's spsolve of
    # P, ~140 entries per row, costs ~0.5 s per step at 1,400 atoms, ~1 s at 2,000)
    add("ar-vacancies-4x4x4", _vacancies(_fcc("Ar", (4, 4, 4), a=AR_A), 3, seed=20), "lj", 0.1, 120)  # 253
    add("ar-fcc111-fixed", _slab(fcc111, "Ar", (6, 6, 8), fixed_layers=1), "lj", 0.1, 121)  # 288
    add("ar-icosahedron-309", _cluster(Icosahedron("Ar", 5, latticeconstant=AR_A)), "lj", 0.1, 122)
    add("ar-vacancies-6x6x6", _vacancies(_fcc("Ar", (6, 6, 6), a=AR_A), 5, seed=23), "lj", 0.1, 123)  # 859
    add("ar-vacancies-7x7x7", _vacancies(_fcc("Ar", (7, 7, 7), a=AR_A), 2, seed=24), "lj", 0.08, 124,
        fmax=0.02)  # 1370: ASE's PreconLBFGS spends ~0.5 s a step in spsolve
    return out


def large_structures() -> list[tuple[str, Atoms]]:
    """EMT structures of 500 to 5,000 atoms for the benchmark: ``(name, atoms)``.

    Slabs (one with a fixed bottom layer), vacancy supercells, two misoriented blocks (a
    grain-boundary-like interface, rattled), and strongly rattled supercells.
    """
    out: list[tuple[str, Atoms]] = []

    def add(name, atoms, rattle, seed):
        atoms.rattle(rattle, seed=seed)
        atoms.info["name"] = name
        out.append((name, atoms))

    add("cu-vacancies-6x6x6", _vacancies(_fcc("Cu", (6, 6, 6)), 6, seed=201), 0.05, 301)  # 858
    add("pt-vacancies-8x8x8", _vacancies(_fcc("Pt", (8, 8, 8)), 10, seed=202), 0.05, 302)  # 2038
    add("ni-vacancies-10x10x10", _vacancies(_fcc("Ni", (10, 10, 10)), 20, seed=203), 0.05, 303)  # 3980
    add("cu-fcc111-slab-10x10x8", _slab(fcc111, "Cu", (10, 10, 8)), 0.05, 304)  # 800
    add("au-fcc100-slab-12x12x10-fixed", _slab(fcc100, "Au", (12, 12, 10), fixed_layers=2), 0.05, 305)  # 1440
    add("agpd-fcc111-slab-16x16x12", _slab(fcc111, None, (16, 16, 12), fractions={"Ag": 0.5, "Pd": 0.5}, seed=206),
        0.05, 306)  # 3072
    add("cu-twisted-blocks-5x5x4", _misoriented_blocks("Cu", (5, 5, 4), 36.87), 0.1, 307)
    add("al-twisted-blocks-8x8x5", _misoriented_blocks("Al", (8, 8, 5), 22.6), 0.1, 308)
    add("pd-rattled-5x5x5", _fcc("Pd", (5, 5, 5)), 0.2, 309)  # 500
    add("cuni-random-rattled-9x9x9", _fcc(None, (9, 9, 9), seed=210, fractions={"Cu": 0.5, "Ni": 0.5}), 0.15,
        310)  # 2916
    return out


if __name__ == "__main__":
    for label, rows in (("parity", parity_structures()),
                        ("large", [(n, a, "emt", None) for n, a in large_structures()])):
        sizes = [len(a) for _, a, _, _ in rows]
        print(f"{label}: {len(rows)} structures, {sum(sizes)} atoms, {min(sizes)}..{max(sizes)}")
        for name, atoms, kind, _ in rows:
            fixed = sum(len(c.index) for c in atoms.constraints)
            print(f"  {name:32s} {len(atoms):5d} {kind:4s} pbc={''.join('TF'[not p] for p in atoms.pbc)}"
                  + (f" fixed={fixed}" if fixed else ""))

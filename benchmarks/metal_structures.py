"""Deterministic mixed metal structures for the EMT benchmarks (13 to 256 atoms).

    >>> from metal_structures import metal_structures
    >>> structures = metal_structures(2048)   # the first 64 are metal_structures(64)

Structure ``k`` depends only on ``k`` (its own random generator, seeded with ``k``), so
``metal_structures(64)`` is a prefix of ``metal_structures(2048)``. Ten kinds, in turn:
pure fcc bulk, bulk with vacancies, random fcc alloys, random alloys with a vacancy,
fcc(111) and fcc(100) slabs (pure and alloyed), icosahedra, truncated octahedra, Ino
decahedra and alloyed clusters. Elements are EMT's seven metals (Al, Cu, Ag, Au, Ni,
Pd, Pt); alloy lattice constants follow Vegard's law over ASE's reference lattice
constants. Every structure is rattled (0.05 Å, Gaussian) so that it needs relaxing;
clusters are centred in a box with 6 Å of vacuum and ``pbc=False`` (asap3 needs a cell).
Every structure's ``info["name"]`` is ``"<kind>-<k>"``.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.cluster import Decahedron, Icosahedron, Octahedron
from ase.data import atomic_numbers, reference_states

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
MIN_ATOMS, MAX_ATOMS = 13, 256
KINDS = ("bulk", "vacancy", "alloy", "alloy-vacancy", "slab111", "slab100", "icosahedron",
         "octahedron", "decahedron", "alloy-cluster")

# supercell repetitions of the 4-atom cubic fcc cell: 32 to 256 atoms
_BULK_REPS = [(2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3), (2, 2, 4), (3, 3, 4), (2, 4, 4), (4, 4, 4)]
# (size, layers) of slabs: 27 to 256 atoms
_SLAB_SIZES = [(3, 3, 3), (3, 3, 4), (4, 4, 4), (3, 3, 6), (4, 4, 6), (5, 5, 4), (4, 4, 8), (6, 6, 5)]
# (noshells) of icosahedra: 13, 55, 147 atoms
_ICOSAHEDRA = [2, 3, 4]
# (length, cutoff) of truncated octahedra: 38, 79, 116, 201 atoms (and 44, 85)
_OCTAHEDRA = [(4, 1), (5, 2), (6, 2), (7, 2), (6, 1), (5, 1)]
# (p, q, r) of Ino decahedra: 13 to 192 atoms
_DECAHEDRA = [(2, 2, 0), (3, 2, 0), (2, 3, 1), (3, 3, 1), (4, 2, 1), (4, 3, 0)]


def lattice_constant(symbols) -> float:
    """Vegard's-law fcc lattice constant (Å) of a composition, from ASE's reference states."""
    return float(np.mean([reference_states[atomic_numbers[s]]["a"] for s in symbols]))


def _alloy_symbols(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` symbols drawn from 2 or 3 random metals with random fractions."""
    k = int(rng.integers(2, 4))
    elements = list(rng.choice(METALS, size=k, replace=False))
    weights = rng.dirichlet(np.ones(k))
    return list(rng.choice(elements, size=n, p=weights))


def _cluster(kind: str, k: int, rng: np.random.Generator, element: str) -> Atoms:
    if kind == "icosahedron":
        return Icosahedron(element, _ICOSAHEDRA[k % len(_ICOSAHEDRA)])
    if kind == "octahedron":
        length, cutoff = _OCTAHEDRA[k % len(_OCTAHEDRA)]
        return Octahedron(element, length, cutoff)
    if kind == "decahedron":
        p, q, r = _DECAHEDRA[k % len(_DECAHEDRA)]
        return Decahedron(element, p, q, r)
    # alloy-cluster: an icosahedron, octahedron or decahedron with random species
    shape = ("icosahedron", "octahedron", "decahedron")[k % 3]
    a = _cluster(shape, k // 3, rng, "Cu")
    symbols = _alloy_symbols(rng, len(a))
    out = _cluster(shape, k // 3, rng, symbols[0])
    scale = lattice_constant(symbols) / lattice_constant([symbols[0]])
    out.positions *= scale
    out.symbols = symbols
    return out


def metal_structure(k: int) -> Atoms:
    """Structure number ``k`` (kind ``KINDS[k % 10]``), 13 to 256 atoms, rattled 0.05 Å."""
    rng = np.random.default_rng(k)
    kind = KINDS[k % len(KINDS)]
    j = k // len(KINDS)  # index within the kind
    element = METALS[int(rng.integers(len(METALS)))]
    if kind in ("bulk", "vacancy", "alloy", "alloy-vacancy"):
        reps = _BULK_REPS[j % len(_BULK_REPS)]
        n = 4 * int(np.prod(reps))
        symbols = [element] * n if kind in ("bulk", "vacancy") else _alloy_symbols(rng, n)
        a = bulk("Cu", "fcc", a=lattice_constant(symbols), cubic=True) * reps
        a.symbols = symbols
        if kind.endswith("vacancy"):
            n_vac = 1 + int(rng.integers(0, 3 if n >= 100 else 2))
            del a[list(rng.choice(n, size=n_vac, replace=False))]
    elif kind in ("slab111", "slab100"):
        size = _SLAB_SIZES[j % len(_SLAB_SIZES)]
        alloyed = j % 2 == 1
        n = int(np.prod(size))
        symbols = _alloy_symbols(rng, n) if alloyed else [element] * n
        build = fcc111 if kind == "slab111" else fcc100
        a = build("Cu", size=size, a=lattice_constant(symbols), vacuum=6.0)
        a.symbols = symbols
    else:
        a = _cluster(kind, j, rng, element)
        a.center(vacuum=6.0)
        a.pbc = False
    if not MIN_ATOMS <= len(a) <= MAX_ATOMS:
        raise AssertionError(f"{kind}-{k}: {len(a)} atoms, outside {MIN_ATOMS}..{MAX_ATOMS}")
    a.rattle(0.05, seed=10_000 + k)
    a.info.pop("adsorbate_info", None)  # slabs' dict, which extxyz cannot store
    a.info["name"] = f"{kind}-{k}"
    return a


def metal_structures(n: int) -> list[Atoms]:
    """The first ``n`` structures (see :func:`metal_structure`)."""
    return [metal_structure(k) for k in range(n)]


def write_stream_input(n: int, keep: str | None, prefix: str):
    """The end-to-end benchmarks' untimed preparation: the first ``n`` structures written to one
    extxyz in a work folder (``keep``, or a new temporary folder named ``prefix...``).

    Returns ``(work folder, structures, extxyz path, 1-minute load average now)``.
    """
    import os
    import tempfile
    from pathlib import Path

    import ase.io

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    structures = metal_structures(n)
    source = work / "structures.extxyz"
    ase.io.write(source, structures, format="extxyz")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return work, structures, source, load


if __name__ == "__main__":
    import collections

    structures = metal_structures(2048)
    sizes = [len(a) for a in structures]
    print(f"{len(structures)} structures, {sum(sizes)} atoms, sizes {min(sizes)}..{max(sizes)}")
    print(collections.Counter(a.info["name"].rsplit("-", 1)[0] for a in structures))
    first = metal_structures(64)
    print(f"first 64: {sum(len(a) for a in first)} atoms, sizes {min(map(len, first))}..{max(map(len, first))}")

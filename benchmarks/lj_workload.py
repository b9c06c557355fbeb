"""The Lennard-Jones structures of bench_lj_relax.py in a form every batched library can take.

kups (1.0.8) cannot put cells of different periodicity in one batch and torch-sim has one
``pbc`` for a whole batch (0.3.0: one flag; 0.6.2: one 3-vector, and ``atoms_to_state`` refuses
mixed periodicity). So here every
structure with mixed periodicity (slabs, the wire) is rewritten as the same physics in a
fully periodic cell: each non-periodic direction gets a lattice vector along its axis with
more than ``rc + 10`` Å of vacuum (no atom sees a periodic image of that direction within the
cutoff, also after relaxing). Fully periodic structures are unchanged; a non-periodic
structure without a cell gets a box with 6 Å of vacuum (kups needs a cell; ``pbc`` stays False).
Every engine in bench_lj_alternatives.py relaxes exactly these ``Atoms``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from ase import Atoms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from structures import LJ_PARAMS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lj_relax import workload  # noqa: E402

__all__ = ["LJ_PARAMS", "lj_workload", "periodic_equivalent"]


def periodic_equivalent(atoms: Atoms, rc: float, vacuum: float = 10.0) -> Atoms:
    """``atoms`` with every non-periodic direction made periodic with ``rc + vacuum`` Å of empty space.

    Only for cells whose non-periodic vectors are zero or orthogonal to the periodic ones and
    lie along a Cartesian axis (true for ASE's slabs and the wire of the test set).
    """
    pbc = np.asarray(atoms.pbc, bool)
    if pbc.all():
        return atoms.copy()
    if not pbc.any():  # a box around a cluster (kups needs a cell; it changes nothing physical)
        out = atoms.copy()
        if out.cell.rank < 3:
            out.center(vacuum=6.0)
        return out
    out = atoms.copy()
    cell = out.cell.array.copy()
    for i in np.flatnonzero(~pbc):
        for j in np.flatnonzero(pbc):
            if abs(cell[j, i]) > 1e-9:
                raise ValueError(f"periodic vector {j} has a component along non-periodic axis {i}")
        extent = np.ptp(out.positions[:, i])
        cell[i] = 0.0
        cell[i, i] = extent + rc + vacuum
    out.set_cell(cell, scale_atoms=False)
    out.pbc = True
    out.center(axis=tuple(int(i) for i in np.flatnonzero(~pbc)))
    return out


def lj_workload(n: int) -> list[tuple[str, Atoms]]:
    """bench_lj_relax.py's ``workload(n)`` with mixed periodicity rewritten (see the module docstring)."""
    rc = LJ_PARAMS["rc"]
    return [(name, periodic_equivalent(atoms, rc)) for name, atoms in workload(n)]

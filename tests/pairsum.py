"""An independent numpy pair sum: energy, forces and stress of any pair potential on one ``Atoms``.

Pairs come from ``ase.neighborlist.neighbor_list`` (both directions, weight 1/2),
so nothing here shares code with the engine's neighbor list or autodiff.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list


def pair_sum(atoms: Atoms, cutoff: float, pair):
    """``pair(d, Zi, Zj) -> (u, du/dd)`` per pair -> energy (eV), forces (eV/Å), stress (eV/Å³ or None).

    ``pair`` must return zero beyond each pair's own cutoff; ``cutoff`` is the largest one.
    """
    i, j, d, D = neighbor_list("ijdD", atoms, cutoff)
    u, du = pair(d, atoms.numbers[i], atoms.numbers[j])
    energy = 0.5 * np.sum(u)
    f = (du / d)[:, None] * D  # the force on i from j is +dU/dd along r_j - r_i
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, i, f)
    stress = 0.5 * (D.T @ f) / atoms.get_volume() if atoms.cell.rank == 3 else None
    return energy, forces, stress


def assert_matches(batch, results, references, label):
    """Per-structure energy (1e-10 eV/atom), forces (1e-9 eV/A) and stress (1e-10 eV/A^3) against references.

    ``results`` is ``(energy (S,), forces (A, 3), stress (S, 3, 3))`` of ``batch``; ``references``
    one ``(energy, forces, stress or None)`` per structure.
    """
    energy, forces, stress = results
    for s, (atoms, (e_ref, f_ref, s_ref)) in enumerate(zip(batch.atoms, references)):
        assert abs(energy[s] - e_ref) <= 1e-10 * max(1, len(atoms)), (label, s, energy[s] - e_ref)
        np.testing.assert_allclose(forces[batch.atom_slice(s)], f_ref, rtol=0, atol=1e-9, err_msg=f"{label} {s}")
        if s_ref is not None:
            np.testing.assert_allclose(stress[s], s_ref, rtol=0, atol=1e-10, err_msg=f"{label} {s}")

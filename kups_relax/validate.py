"""Host-side checks that keep a bad structure from ever reaching the device.

Each check names the structure and the problem. The engine runs them on every
input before packing; a structure that fails is reported with status
``"invalid"`` and its reason, and the others relax as usual.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

from .batch import movable_mask

#: Two atoms closer than this (Å) are "at the same place".
MIN_DISTANCE = 1e-3


class InvalidStructure(ValueError):
    """A structure that cannot be relaxed; ``str()`` names the structure and the problem."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"structure {name!r}: {reason}")
        self.name = name
        self.reason = reason


def check_structure(atoms: Atoms, name: str, supported_numbers: Iterable[int] | None = None) -> None:
    """Raise :class:`InvalidStructure` if ``atoms`` cannot be relaxed.

    Checks: an ``Atoms`` object with at least one atom; finite positions and cell;
    the periodic lattice vectors span a non-zero volume (area, length); no two
    atoms (or an atom and a periodic image) closer than :data:`MIN_DISTANCE`;
    supported constraints; elements covered by the potential.
    """
    if not isinstance(atoms, Atoms):
        raise InvalidStructure(name, f"expected ase.Atoms, got {type(atoms).__name__}")
    if len(atoms) == 0:
        raise InvalidStructure(name, "no atoms")
    if not np.all(np.isfinite(atoms.positions)):
        bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
        raise InvalidStructure(name, f"non-finite positions (NaN or inf) at atoms {bad[:10].tolist()}")
    cell = atoms.cell.array
    if not np.all(np.isfinite(cell)):
        raise InvalidStructure(name, "non-finite cell")
    periodic = cell[atoms.pbc]
    if len(periodic):
        singular = np.linalg.svd(periodic, compute_uv=False)
        if singular.min() < 1e-6:
            raise InvalidStructure(
                name,
                f"periodic cell with zero volume: lattice vectors of periodic directions "
                f"{np.flatnonzero(atoms.pbc).tolist()} are degenerate (cell={cell.tolist()})",
            )
    if supported_numbers is not None:
        supported = set(int(z) for z in supported_numbers)
        from ase.data import chemical_symbols

        missing = sorted(set(atoms.numbers.tolist()) - supported)
        if missing:
            symbols = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in missing)
            raise InvalidStructure(name, f"element(s) {symbols} not covered by the potential")
    try:
        movable_mask(atoms, name)
    except ValueError as err:
        raise InvalidStructure(name, str(err).split(": ", 1)[-1]) from None
    _check_overlaps(atoms, name)


def _check_overlaps(atoms: Atoms, name: str) -> None:
    i, j, d = _close_pairs(atoms, MIN_DISTANCE)
    if len(i):
        k = int(np.argmin(d))
        what = "a periodic image of itself" if i[k] == j[k] else f"atom {j[k]}"
        raise InvalidStructure(
            name, f"atom {i[k]} is {d[k]:.2e} Å from {what} (atoms at the same place)"
        )


def _close_pairs(atoms: Atoms, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom pairs (and atom-image pairs) closer than ``radius``: ``(i, j, distance)``.

    A k-d tree over the atoms wrapped into the cell and their images one cell away along each
    periodic direction: much faster than ``ase.neighborlist``, which matters when every
    structure of a stream is checked. Exact while ``radius`` is under half
    of every lattice-plane spacing (else ASE's list is used).
    """
    from scipy.spatial import cKDTree

    positions = atoms.positions
    periodic = np.flatnonzero(atoms.pbc)
    cell = atoms.cell.array
    if len(periodic):
        inverse = np.linalg.pinv(cell[periodic])  # (3, p): Cartesian -> fractional along periodic vectors
        spacing = 1.0 / np.linalg.norm(inverse, axis=0)
        if spacing.min() < 2 * radius:
            probe = atoms.copy()
            probe.constraints = []
            return neighbor_list("ijd", probe, radius)
        frac = positions @ inverse
        positions = positions - np.floor(frac) @ cell[periodic]
        shifts = np.stack(np.meshgrid(*[[0, -1, 1]] * len(periodic), indexing="ij"), -1).reshape(-1, len(periodic))
        translations = shifts @ cell[periodic]  # (n_images, 3), the zero shift first
    else:
        translations = np.zeros((1, 3))
    n = len(atoms)
    points = (positions[None, :, :] + translations[:, None, :]).reshape(-1, 3)
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    # keep the pairs with one end in the home cell (an image pair repeats a home pair)
    pairs = pairs[(pairs[:, 0] < n) | (pairs[:, 1] < n)]
    d = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    return pairs[:, 0] % n, pairs[:, 1] % n, d

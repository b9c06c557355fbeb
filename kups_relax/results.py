"""What a relaxation gives back: one :class:`RelaxResult` per structure, with its
:class:`Trajectory` when frames were asked for."""

from __future__ import annotations

import collections.abc
import dataclasses

import numpy as np
from ase import Atoms

from .batch import with_results


@dataclasses.dataclass
class RelaxResult:
    """The outcome of relaxing one structure.

    Attributes:
        name: the structure's name.
        atoms: relaxed structure (input ``info``/``arrays``/constraints kept) with a
            ``SinglePointCalculator`` holding energy (eV), forces (eV/Å) and, for 3-D
            periodic systems, stress (eV/Å³); the unchanged input when ``status == "invalid"``.
        energy: final energy, eV (``nan`` if never evaluated).
        initial_energy: energy of the input geometry, eV.
        fmax: final largest per-atom force norm after constraints, eV/Å.
        steps: optimizer steps taken (ASE's ``opt.nsteps``).
        n_evaluations: energy-and-forces evaluations made for this structure (the input's
            included; ``steps + 1`` for optimizers without a line search).
        converged: ``fmax < fmax`` target reached.
        status: ``"converged"``, ``"unconverged"`` (step limit), ``"diverged"`` (non-finite
            energy/forces, or an atom moved further than ``max_displacement``; the geometry is
            the last good one) or ``"invalid"``.
        reason: why, for any status but ``"converged"``.
        energies: ``(steps + 1,)`` energy after every step, eV (index 0 = input geometry).
        fmaxes: ``(steps + 1,)`` largest force after every step, eV/Å.
        spacegroup_initial, spacegroup_final: with ``FixSymmetry``, the space group spglib finds
            (at the constraint's ``symprec``) in the input as given and in the relaxed structure,
            e.g. ``"Fm-3m (225)"``; ``""`` otherwise.
        trajectory: every frame (a :class:`Trajectory`: a sequence of ``Atoms`` with energy and
            forces, backed by arrays), when requested.
    """

    name: str
    atoms: Atoms
    energy: float
    initial_energy: float
    fmax: float
    steps: int
    converged: bool
    status: str
    reason: str = ""
    energies: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    fmaxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    trajectory: "Trajectory | list[Atoms] | None" = None
    spacegroup_initial: str = ""
    spacegroup_final: str = ""
    n_evaluations: int = 0


class Trajectory(collections.abc.Sequence):
    """Every frame of one relaxation (frame 0 = the input geometry) as arrays; indexing gives
    ``Atoms`` with energy and forces (made when asked for: a stream of millions of frames
    should not build an ``Atoms`` object per frame just to write them to disk).

    Attributes:
        atoms: the input structure (``info``, ``arrays`` and constraints are kept in every frame).
        positions: ``(T, N, 3)`` Å.
        forces: ``(T, N, 3)`` eV/Å, before constraints.
        energies: ``(T,)`` eV.
        cells: ``(T, 3, 3)`` Å for variable-cell runs, else ``None`` (the input cell throughout).
    """

    def __init__(self, atoms: Atoms, positions: np.ndarray, forces: np.ndarray, energies: np.ndarray,
                 cells: np.ndarray | None = None):
        self.atoms, self.positions, self.forces, self.energies, self.cells = atoms, positions, forces, energies, cells

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        return with_results(self.atoms, self.positions[index], energy=self.energies[index], forces=self.forces[index],
                            cell=None if self.cells is None else self.cells[index])

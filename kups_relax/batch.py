"""Packing many ASE ``Atoms`` into one padded, indexed state and back.

Layout (``A`` = atom capacity, ``S`` = system capacity, both bucketed):

* per-atom rows, flat over the whole batch: ``positions (A, 3)``, ``numbers (A,)``,
  ``system (A,)``, the constraint projections ``projection (A, 3, 3)`` and ``masses (A,)``. A system's atoms are contiguous, starting at
  ``first_atom[s]``, a multiple of :data:`~kups_relax.segments.ROW_BLOCK`, and the rows up to
  the next multiple are its padding; padding rows carry ``system == S`` and are dropped by
  every per-system reduction (see :mod:`kups_relax.segments`).
* per-system tables: ``cell (S, 3, 3)`` (rows are lattice vectors, Å, as in ASE),
  ``wrap_cell (S, 3, 3)``, ``pbc (S, 3)``, ``n_atoms (S,)``, ``first_atom (S,)``, ``fix_com (S,)``.
  Padding systems have no atoms.

Readers build :class:`Batch` on the host; the jitted loop only ever sees its
:class:`Geometry` pytree.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .buckets import bucket
from .constraints import constraint_arrays
from .segments import ROW_BLOCK

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Geometry:
    """Device-side batch geometry (a pytree; shapes are capacities).

    Attributes:
        positions: ``(A, 3)`` Cartesian positions, Å.
        numbers: ``(A,)`` atomic numbers (0 for padding).
        system: ``(A,)`` system slot of every atom; ``S`` for padding rows.
        projection: ``(A, 3, 3)`` each atom's constraint projection, applied to its force and
            its step as ``P @ v`` (identity for a free atom, zero for ``FixAtoms``; see
            :mod:`kups_relax.constraints`); zero on padding rows.
        masses: ``(A,)`` atomic masses, amu (used by ``FixCom``); zero on padding rows.
        cell: ``(S, 3, 3)`` lattice vectors as rows, Å (ASE's ``atoms.cell``).
        wrap_cell: ``(S, 3, 3)`` ``cell`` with every non-periodic row replaced by a unit
            vector orthogonal to the others, so fractional coordinates are defined for
            slabs and molecules too (used only to find periodic images).
        pbc: ``(S, 3)`` periodic directions.
        n_atoms: ``(S,)`` atoms in each system (0 for padding systems).
        first_atom: ``(S,)`` row of each system's first atom.
        fix_com: ``(S,)`` True for systems with ASE's ``FixCom`` constraint.
    """

    positions: jax.Array
    numbers: jax.Array
    system: jax.Array
    projection: jax.Array
    masses: jax.Array
    cell: jax.Array
    wrap_cell: jax.Array
    pbc: jax.Array
    n_atoms: jax.Array
    first_atom: jax.Array
    fix_com: jax.Array

    @property
    def n_systems(self) -> int:
        """System capacity ``S`` (static)."""
        return self.cell.shape[0]

    @property
    def n_atom_rows(self) -> int:
        """Atom capacity ``A`` (static)."""
        return self.positions.shape[0]

    @property
    def atom_mask(self) -> jax.Array:
        """``(A,)`` True for real atoms."""
        return self.system < self.n_systems

    def replace(self, **changes) -> "Geometry":
        return dataclasses.replace(self, **changes)


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Replace the non-periodic rows of ``cell`` by unit vectors orthogonal to the rest.

    Periodic rows are kept as they are; they must be linearly independent
    (checked by :func:`kups_relax.validate.check_structure`).
    """
    cell = np.asarray(cell, dtype=np.float64)
    out = cell.copy()
    basis: list[np.ndarray] = []
    for d in range(3):
        if pbc[d]:
            v = cell[d] - sum(np.dot(cell[d], b) * b for b in basis)
            basis.append(v / np.linalg.norm(v))
    for d in range(3):
        if pbc[d]:
            continue
        residuals = [e - sum(np.dot(e, b) * b for b in basis) for e in np.eye(3)]
        best = max(residuals, key=np.linalg.norm)
        best = best / np.linalg.norm(best)
        basis.append(best)
        out[d] = best
    return out


def movable_mask(atoms: Atoms, name: str) -> np.ndarray:
    """``(N, 3)`` bool: False where the constraints fix a Cartesian component outright.

    Raises:
        ValueError: for an unsupported constraint, naming it and the structure
            (see :func:`kups_relax.constraints.constraint_arrays`).
    """
    projection, _ = constraint_arrays(atoms, name)
    return np.any(projection != 0.0, axis=-2)


@dataclasses.dataclass
class Batch:
    """Many structures packed into one padded :class:`Geometry`, plus what is needed to unpack.

    Build with :meth:`from_atoms`; get relaxed structures back with :meth:`to_atoms`.

    Attributes:
        geometry: the device pytree.
        atoms: copies of the input structures, in slot order (slot ``i`` holds ``atoms[i]``).
        names: one name per structure (for error messages and outputs).
        starts: first atom row of every structure (multiples of
            :data:`~kups_relax.segments.ROW_BLOCK`).
    """

    geometry: Geometry
    atoms: list[Atoms]
    names: list[str]
    starts: list[int] = dataclasses.field(default_factory=list)

    @property
    def n_structures(self) -> int:
        return len(self.atoms)

    @classmethod
    def from_atoms(
        cls,
        structures: Sequence[Atoms],
        names: Sequence[str] | None = None,
        dtype: str = "float64",
        atom_capacity: int | None = None,
        system_capacity: int | None = None,
    ) -> "Batch":
        """Pack ``structures`` (any sizes, cells, periodicity) into one padded batch.

        Args:
            structures: the ASE ``Atoms`` to pack; each must already be valid
                (see :func:`kups_relax.validate.check_structure`).
            names: a name per structure (default ``"structure-<i>"``).
            dtype: ``"float64"`` (default, ASE parity) or ``"float32"``.
            atom_capacity, system_capacity: explicit capacities; default: the bucket
                (:func:`kups_relax.buckets.bucket`) of the total atoms / structures.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        structures = list(structures)
        names = list(names) if names is not None else [f"structure-{i}" for i in range(len(structures))]
        if len(names) != len(structures):
            raise ValueError("names must have one entry per structure")
        starts = aligned_starts([len(a) for a in structures])
        n_total = int(starts[-1]) if len(structures) else 0
        A = atom_capacity if atom_capacity is not None else bucket(n_total)
        S = system_capacity if system_capacity is not None else bucket(len(structures), minimum=1)
        if A < n_total or S < len(structures) or A % ROW_BLOCK:
            raise ValueError(f"capacities ({A} atoms, {S} systems) too small for {n_total} aligned atom rows, "
                             f"{len(structures)} systems (the atom capacity must be a multiple of {ROW_BLOCK})")

        host = empty_arrays(A, S, first_atom=np.full(S, n_total, dtype=np.int32))
        for s, (atoms, name) in enumerate(zip(structures, names)):
            pack_structure(host, s, int(starts[s]), atoms, name)
        geometry = device_geometry(host, dtype)
        return cls(geometry=geometry, atoms=[a.copy() for a in structures], names=names,
                   starts=[int(x) for x in starts[:-1]])

    def atom_slice(self, i: int) -> slice:
        """Rows of structure ``i`` in the per-atom arrays."""
        return slice(self.starts[i], self.starts[i] + len(self.atoms[i]))

    def to_atoms(
        self,
        positions: np.ndarray | None = None,
        energies: np.ndarray | None = None,
        forces: np.ndarray | None = None,
        stresses: np.ndarray | None = None,
    ) -> list[Atoms]:
        """Unpack into one ``Atoms`` per structure, in input order.

        ``info``, ``arrays`` and constraints of the inputs are kept. Given per-atom
        ``positions``/``forces`` ``(A, 3)`` and per-system ``energies (S,)`` /
        ``stresses (S, 3, 3)``, positions are set and a ``SinglePointCalculator`` with
        energy, forces (and stress for 3-D periodic systems) is attached.
        """
        positions = np.asarray(self.geometry.positions if positions is None else positions, dtype=np.float64)
        out = []
        for s, atoms in enumerate(self.atoms):
            rows = self.atom_slice(s)
            out.append(with_results(
                atoms, positions[rows],
                energy=None if energies is None else energies[s],
                forces=None if forces is None else forces[rows],
                stress=None if stresses is None else stresses[s]))
        return out


def aligned_rows(n_atoms: int) -> int:
    """Rows a structure of ``n_atoms`` atoms occupies when packed alone: whole row blocks."""
    return -(-int(n_atoms) // ROW_BLOCK) * ROW_BLOCK


def aligned_starts(sizes: Sequence[int]) -> np.ndarray:
    """``(n + 1,)`` first rows of structures of these sizes packed one after another in whole
    row blocks; the last entry is the rows used."""
    rows = np.array([aligned_rows(n) for n in sizes], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(rows)])


def check_row_blocks(system: np.ndarray, n_systems: int) -> None:
    """Raise ``ValueError`` unless every :data:`~kups_relax.segments.ROW_BLOCK`-row block holds
    rows of at most one system followed by padding (what the blocked reductions rely on)."""
    system = np.asarray(system)
    if system.shape[0] % ROW_BLOCK:
        raise ValueError(f"atom capacity {system.shape[0]} is not a multiple of {ROW_BLOCK}")
    blocks = system.reshape(-1, ROW_BLOCK)
    head = blocks[:, :1]
    ok = (blocks == head) | (blocks == n_systems)
    # padding rows may only follow a block's atoms, never precede them
    starts_padded = (head == n_systems) & (blocks != n_systems)
    if not ok.all() or starts_padded.any():
        bad = int(np.flatnonzero(~ok.all(axis=1) | starts_padded.any(axis=1))[0])
        raise ValueError(f"atom rows {bad * ROW_BLOCK}-{bad * ROW_BLOCK + ROW_BLOCK - 1} mix systems "
                         f"{sorted(set(blocks[bad].tolist()))}: systems must start on {ROW_BLOCK}-row blocks")


#: Host arrays of a :class:`Geometry` with one row per atom, and with one row per system.
PER_ATOM_FIELDS = ("positions", "numbers", "system", "projection", "masses")
PER_SYSTEM_FIELDS = ("cell", "wrap_cell", "pbc", "n_atoms", "first_atom", "fix_com")


def empty_arrays(n_atom_rows: int, n_systems: int, first_atom: np.ndarray) -> dict[str, np.ndarray]:
    """Host (numpy) arrays of an empty :class:`Geometry`: every row padding, every system empty."""
    A, S = n_atom_rows, n_systems
    return dict(
        positions=np.zeros((A, 3)), numbers=np.zeros(A, np.int32), system=np.full(A, S, np.int32),
        projection=np.zeros((A, 3, 3)), masses=np.zeros(A), cell=np.tile(np.eye(3), (S, 1, 1)),
        wrap_cell=np.tile(np.eye(3), (S, 1, 1)), pbc=np.zeros((S, 3), bool),
        n_atoms=np.zeros(S, np.int32), first_atom=np.asarray(first_atom, np.int32),
        fix_com=np.zeros(S, bool))


def pack_structure(host: dict[str, np.ndarray], slot: int, start: int, atoms: Atoms, name: str) -> None:
    """Write ``atoms`` into system ``slot`` of the host arrays, its atoms at rows ``start:start + n``."""
    rows = slice(start, start + len(atoms))
    host["positions"][rows] = atoms.positions
    host["numbers"][rows] = atoms.numbers
    host["system"][rows] = slot
    host["projection"][rows], host["fix_com"][slot] = constraint_arrays(atoms, name)
    host["masses"][rows] = atoms.get_masses()
    host["cell"][slot] = atoms.cell.array
    host["wrap_cell"][slot] = complete_cell(atoms.cell.array, atoms.pbc)
    host["pbc"][slot] = atoms.pbc
    host["n_atoms"][slot] = len(atoms)
    host["first_atom"][slot] = start


def device_geometry(host: dict[str, np.ndarray], dtype: str = "float64") -> Geometry:
    """The :class:`Geometry` of host arrays, floats in ``dtype``."""
    f = DTYPES[dtype]
    check_row_blocks(host["system"], host["cell"].shape[0])
    return Geometry(
        positions=jnp.asarray(host["positions"], f), numbers=jnp.asarray(host["numbers"]),
        system=jnp.asarray(host["system"]), projection=jnp.asarray(host["projection"], f),
        masses=jnp.asarray(host["masses"], f),
        cell=jnp.asarray(host["cell"], f), wrap_cell=jnp.asarray(host["wrap_cell"], f),
        pbc=jnp.asarray(host["pbc"]), n_atoms=jnp.asarray(host["n_atoms"]),
        first_atom=jnp.asarray(host["first_atom"]), fix_com=jnp.asarray(host["fix_com"]))


def with_results(atoms: Atoms, positions: np.ndarray, energy=None, forces=None, stress=None,
                 cell: np.ndarray | None = None) -> Atoms:
    """A copy of ``atoms`` at ``positions`` (and ``cell``, ``(3, 3)`` Å, if given) with a
    ``SinglePointCalculator`` of the results given.

    Stress (``(3, 3)``, eV/Å³) is attached only to 3-D periodic systems, in ASE's Voigt order.
    """
    atoms = atoms.copy()
    if cell is not None:
        atoms.set_cell(np.asarray(cell, dtype=np.float64), scale_atoms=False)
    atoms.positions = positions
    results = {}
    if energy is not None:
        results["energy"] = results["free_energy"] = float(energy)
    if forces is not None:
        results["forces"] = np.asarray(forces, dtype=np.float64)
    if stress is not None and atoms.pbc.all():
        results["stress"] = full_3x3_to_voigt(np.asarray(stress, dtype=np.float64))
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def full_3x3_to_voigt(stress: np.ndarray) -> np.ndarray:
    """ASE's Voigt order ``xx, yy, zz, yz, xz, xy`` from a symmetric ``(3, 3)`` stress."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])

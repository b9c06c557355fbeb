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
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .buckets import bucket
from .constraints import constraint_arrays
from .precision import x64
from .segments import ROW_BLOCK, row_mask

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
        sym_image: ``(A, P)`` ASE's ``FixSymmetry`` (:mod:`kups_relax.symmetry`): the atom each of
            the system's point operations moves the row's atom to, counted from the system's
            first atom. ``P`` is 48 in a run with symmetry, else 0 (and none of it is compiled).
        sym_class: ``(A,)`` the first atom of the row's orbit under the pure translations
            (counted from the system's first atom).
        sym_class_size: ``(A,)`` the size of that orbit (1 without symmetry).
        sym_rotations: ``(S, P, 3, 3)`` the point operations' fractional rotations.
        sym_ops: ``(S,)`` how many of them the system has (0: no symmetry constraint).
        sym_positions, sym_cell: ``(S,)`` ``FixSymmetry``'s ``adjust_positions`` and ``adjust_cell``.
        precon_neighbors: ``(A, K)`` the Exp preconditioner's pair partners of the row's atom
            (:mod:`kups_relax.precon`), counted from the system's first atom. ``K`` is 0 in a run
            without a preconditioner (none of it is compiled).
        precon_weight: ``(A, K)`` their unit weights ``exp(-A (r / r_NN - 1))`` (0: padding).
        precon_diag: ``(A,)`` the unit diagonal (weights summed, plus ``c_stab``).
        precon_fixed: ``(A,)`` ``FixAtoms`` (the preconditioner's identity rows).
        precon_kind: ``(S,)`` :data:`kups_relax.precon.EXP` or ``NONE``.
        precon_r_nn: ``(S,)`` nearest-neighbour distance ``r_NN``, Å.
        precon_inverse: ``(S, W, W)`` each system's inverse unit matrix (rows and columns from
            its first atom; :func:`kups_relax.precon.unit_inverse`) in batches that apply the
            preconditioner densely (``W``: the largest slot), else ``W = 0``.
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
    sym_image: jax.Array
    sym_class: jax.Array
    sym_class_size: jax.Array
    sym_rotations: jax.Array
    sym_ops: jax.Array
    sym_positions: jax.Array
    sym_cell: jax.Array
    precon_neighbors: jax.Array
    precon_weight: jax.Array
    precon_diag: jax.Array
    precon_fixed: jax.Array
    precon_kind: jax.Array
    precon_r_nn: jax.Array
    precon_inverse: jax.Array

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

    def rows_of(self, systems: jax.Array) -> jax.Array:
        """``(A,)`` bool: the atom rows of the systems selected in the ``(S,)`` mask (padding: False)."""
        return row_mask(systems, self.system, self.n_systems)

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
    @x64
    def from_atoms(
        cls,
        structures: Sequence[Atoms],
        names: Sequence[str] | None = None,
        dtype: str = "float64",
        atom_capacity: int | None = None,
        system_capacity: int | None = None,
        precon=None,
    ) -> "Batch":
        """Pack ``structures`` (any sizes, cells, periodicity) into one padded batch.

        Args:
            structures: the ASE ``Atoms`` to pack; each must already be valid
                (see :func:`kups_relax.validate.check_structure`).
            names: a name per structure (default ``"structure-<i>"``).
            dtype: ``"float64"`` (default, ASE parity) or ``"float32"``.
            atom_capacity, system_capacity: explicit capacities; default: the bucket
                (:func:`kups_relax.buckets.bucket`) of the total atoms / structures.
            precon: :class:`kups_relax.precon.ExpSettings` to build every structure's
                preconditioner tables with (runs of ``PreconLBFGS``); ``None``: none.
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

        from .symmetry import MAX_POINT_OPS, find_constraint

        symmetric = any(find_constraint(a) is not None for a in structures)
        from .precon import exp_tables, table_width

        tables = [None] * len(structures) if precon is None else [exp_tables(a, precon) for a in structures]
        width = max([0] + [table_width(t["precon_neighbors"].shape[1]) for t in tables if t is not None])
        from .precon import DENSE_LIMIT

        largest = max([0] + [len(a) for a in structures])
        dense = table_width(largest) if precon is not None and largest <= DENSE_LIMIT else 0
        host = empty_arrays(A, S, first_atom=np.full(S, n_total, dtype=np.int32),
                            point_ops=MAX_POINT_OPS if symmetric else 0, precon_pairs=width, precon_dense=dense)
        for s, (atoms, name) in enumerate(zip(structures, names)):
            pack_structure(host, s, int(starts[s]), atoms, name, precon=tables[s])
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


class GeometryField(NamedTuple):
    """One array of a :class:`Geometry`: how it is laid out, typed and padded on the host.

    Attributes:
        name: the :class:`Geometry` attribute.
        per_atom: one row per atom row (``A``), else one per system slot (``S``).
        shape: trailing shape of one row; ``"ops"`` stands for the batch's width of symmetry
            operations (:data:`kups_relax.symmetry.MAX_POINT_OPS` or 0).
        dtype: a numpy dtype, or ``FLOAT`` for the run's float type (``"float64"``/``"float32"``).
        fill: what padding rows and empty slots hold: a scalar, ``"eye"`` (the identity cell),
            ``"n_systems"`` (the padding system index ``S``) or ``None`` (not cleared: the
            slot's first row, set from its layout).
    """

    name: str
    per_atom: bool
    shape: tuple[int, ...]
    dtype: object
    fill: object


#: The run's float type, in :data:`GEOMETRY_FIELDS`.
FLOAT = "float"

#: Every array of a :class:`Geometry`, in its order: what :func:`empty_arrays`,
#: :func:`clear_slot`, :func:`pack_structure` and :func:`device_geometry` read. A new field is a
#: row here, an attribute of :class:`Geometry` and its value in :func:`structure_values`.
GEOMETRY_FIELDS = (
    GeometryField("positions", True, (3,), FLOAT, 0.0),
    GeometryField("numbers", True, (), np.int32, 0),
    GeometryField("system", True, (), np.int32, "n_systems"),
    GeometryField("projection", True, (3, 3), FLOAT, 0.0),
    GeometryField("masses", True, (), FLOAT, 0.0),
    GeometryField("cell", False, (3, 3), FLOAT, "eye"),
    GeometryField("wrap_cell", False, (3, 3), FLOAT, "eye"),
    GeometryField("pbc", False, (3,), bool, False),
    GeometryField("n_atoms", False, (), np.int32, 0),
    GeometryField("first_atom", False, (), np.int32, None),
    GeometryField("fix_com", False, (), bool, False),
    GeometryField("sym_image", True, ("ops",), np.int32, 0),
    GeometryField("sym_class", True, (), np.int32, 0),
    GeometryField("sym_class_size", True, (), FLOAT, 1.0),
    GeometryField("sym_rotations", False, ("ops", 3, 3), FLOAT, 0.0),
    GeometryField("sym_ops", False, (), np.int32, 0),
    GeometryField("sym_positions", False, (), bool, False),
    GeometryField("sym_cell", False, (), bool, False),
    GeometryField("precon_neighbors", True, ("pairs",), np.int32, 0),
    GeometryField("precon_weight", True, ("pairs",), FLOAT, 0.0),
    GeometryField("precon_diag", True, (), FLOAT, 1.0),
    GeometryField("precon_fixed", True, (), bool, False),
    GeometryField("precon_kind", False, (), np.int32, 0),
    GeometryField("precon_r_nn", False, (), FLOAT, 0.0),
    GeometryField("precon_inverse", False, ("dense", "dense"), FLOAT, 0.0),
)
assert tuple(f.name for f in GEOMETRY_FIELDS) == tuple(f.name for f in dataclasses.fields(Geometry))

#: Names of the per-atom and the per-system fields.
PER_ATOM_FIELDS = tuple(f.name for f in GEOMETRY_FIELDS if f.per_atom)
PER_SYSTEM_FIELDS = tuple(f.name for f in GEOMETRY_FIELDS if not f.per_atom)


def _fill(field: GeometryField, n_systems: int):
    if field.fill == "eye":
        return np.eye(3)
    if field.fill == "n_systems":
        return n_systems
    return field.fill


def empty_arrays(n_atom_rows: int, n_systems: int, first_atom: np.ndarray, point_ops: int = 0,
                 precon_pairs: int = 0, precon_dense: int = 0) -> dict[str, np.ndarray]:
    """Host (numpy) arrays of an empty :class:`Geometry`: every row padding, every system empty.

    ``first_atom (S,)``: every slot's first row (fixed by the batch's layout); ``point_ops``:
    the width of the symmetry tables (:data:`kups_relax.symmetry.MAX_POINT_OPS` in a run with
    ``FixSymmetry``, else 0)."""
    host = {}
    for field in GEOMETRY_FIELDS:
        rows = n_atom_rows if field.per_atom else n_systems
        dtype = np.float64 if field.dtype == FLOAT else field.dtype
        if field.fill is None:
            host[field.name] = np.asarray(first_atom, dtype)
        else:
            widths = {"ops": point_ops, "pairs": precon_pairs, "dense": precon_dense}
            shape = tuple(widths.get(d, d) for d in field.shape)
            host[field.name] = np.empty((rows,) + shape, dtype)
            host[field.name][...] = _fill(field, n_systems)
    return host


def clear_slot(host: dict[str, np.ndarray], slot: int, rows: slice) -> None:
    """Empty system ``slot`` of the host arrays and make its atom ``rows`` padding (its first row stays)."""
    n_systems = host["cell"].shape[0]
    for field in GEOMETRY_FIELDS:
        if field.fill is not None:
            host[field.name][rows if field.per_atom else slot] = _fill(field, n_systems)


def structure_values(atoms: Atoms, name: str, slot: int, start: int, point_ops: int = 0) -> dict[str, object]:
    """Every :data:`GEOMETRY_FIELDS` value of ``atoms`` in system ``slot``, atoms from row ``start``
    (per-atom values ``(N, ...)``, per-system values one row; symmetry tables ``point_ops`` wide)."""
    projection, fix_com = constraint_arrays(atoms, name)
    values = dict(positions=atoms.positions, numbers=atoms.numbers, system=slot, projection=projection,
                  masses=atoms.get_masses(), cell=atoms.cell.array,
                  wrap_cell=complete_cell(atoms.cell.array, atoms.pbc), pbc=atoms.pbc, n_atoms=len(atoms),
                  first_atom=start, fix_com=fix_com)
    return values | symmetry_values(atoms, name, point_ops) | no_precon_values(len(atoms))


def no_precon_values(n: int) -> dict[str, object]:
    """The ``precon_*`` values of a structure without a preconditioner."""
    return dict(precon_neighbors=np.zeros((n, 0), np.int32), precon_weight=np.zeros((n, 0)), precon_diag=1.0,
                precon_fixed=False, precon_kind=0, precon_r_nn=0.0, precon_inverse=np.zeros((0, 0)))


def precon_width(host: dict[str, np.ndarray]) -> int:
    """The width of the host arrays' preconditioner pair tables."""
    return host["precon_neighbors"].shape[1]


def widen_precon(host: dict[str, np.ndarray], width: int) -> None:
    """Make the preconditioner pair tables of ``host`` ``width`` wide (padding: weight 0)."""
    extra = width - precon_width(host)
    if extra > 0:
        for name in ("precon_neighbors", "precon_weight"):
            host[name] = np.pad(host[name], ((0, 0), (0, extra)))


def symmetry_values(atoms: Atoms, name: str, point_ops: int) -> dict[str, object]:
    """The ``sym_*`` values of ``atoms`` (its ``FixSymmetry``, if any) in tables ``point_ops`` wide.

    Raises:
        ValueError: the structure has a FixSymmetry and the batch has no symmetry tables (named).
    """
    from .symmetry import find_constraint, tables_of

    constraint = find_constraint(atoms)
    n = len(atoms)
    if constraint is None:
        return dict(sym_image=np.zeros((n, point_ops), np.int32), sym_class=np.arange(n), sym_class_size=1.0,
                    sym_rotations=0.0, sym_ops=0, sym_positions=False, sym_cell=False)
    if point_ops == 0:
        raise ValueError(f"structure {name!r} has a FixSymmetry constraint, but this run was started without "
                         "symmetry tables (pass fix_symmetry=True)")
    tables = tables_of(constraint, n)
    p = len(tables.rotations)
    image = np.zeros((n, point_ops), np.int32)
    image[:, :p] = tables.image
    rotations = np.zeros((point_ops, 3, 3))
    rotations[:p] = tables.rotations
    return dict(sym_image=image, sym_class=tables.klass, sym_class_size=tables.class_size, sym_rotations=rotations,
                sym_ops=p, sym_positions=tables.adjust_positions, sym_cell=tables.adjust_cell)


def pack_structure(host: dict[str, np.ndarray], slot: int, start: int, atoms: Atoms, name: str,
                   precon: dict | None = None) -> None:
    """Write ``atoms`` into system ``slot`` of the host arrays, its atoms at rows ``start:start + n``
    (``precon``: its preconditioner tables, :func:`kups_relax.precon.exp_tables`, no wider than the
    host's)."""
    rows = slice(start, start + len(atoms))
    values = structure_values(atoms, name, slot, start, point_ops=host["sym_image"].shape[1])
    if precon is not None:
        values |= precon
    if host["precon_inverse"].shape[1] and precon is not None:  # a batch that applies it densely
        from .precon import unit_inverse

        values["precon_inverse"] = unit_inverse(precon)
    for key in ("precon_neighbors", "precon_weight", "precon_inverse"):
        width = host[key].shape[-1]
        table = np.asarray(values[key])
        if table.shape[-1] > width:
            raise ValueError(f"structure {name!r}: {key} table {table.shape[-1]} wide, batch {width}")
        pad = width - table.shape[-1]
        values[key] = np.pad(table, ((0, pad), (0, pad)) if key == "precon_inverse" else ((0, 0), (0, pad)))
    for field in GEOMETRY_FIELDS:
        host[field.name][rows if field.per_atom else slot] = values[field.name]


def device_geometry(host: dict[str, np.ndarray], dtype: str = "float64") -> Geometry:
    """The :class:`Geometry` of host arrays, floats in ``dtype``."""
    check_row_blocks(host["system"], host["cell"].shape[0])
    return Geometry(**{f.name: jnp.asarray(host[f.name], DTYPES[dtype] if f.dtype == FLOAT else None)
                       for f in GEOMETRY_FIELDS})


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

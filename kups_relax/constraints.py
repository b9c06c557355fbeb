"""ASE constraints as per-atom projections, applied to forces and to steps inside the jitted loop.

Supported (with ASE's semantics for ``adjust_forces`` and ``adjust_positions``):

* ``FixAtoms``: the atom's step and force are zero;
* ``FixCartesian(a, mask)``: the masked Cartesian components are zero;
* ``FixedLine(a, direction)``: step and force are projected on the line ``d d^T``;
* ``FixedPlane(a, direction)``: the normal component is removed, ``I - n n^T``;
* ``FixCom()``: the mass-weighted mean of the step is removed (the centre of mass does
  not move) and the forces are corrected as in ASE (``f_i -= m_i (sum_j m_j f_j) / sum_j m_j^2``).

* ``FixSymmetry``: forces, stress and steps averaged over the space group
  (:mod:`kups_relax.symmetry`; supported as a structure's only constraint).

All per-atom constraints of one structure compose into one ``(3, 3)`` matrix per atom
(applied to column vectors: ``f' = P f``), in the order of ``atoms.constraints``, exactly as
ASE applies them one after another; ``FixCom`` acts after them (it must be the last
constraint of a structure). Any other constraint is refused with an error naming it and the
structure. A fixed degree of freedom never moves and its (zero) force never counts towards
``fmax``, as in ASE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms, FixCartesian, FixCom, FixedLine, FixedPlane, FixSymmetry

from .segments import per_atom, segment_sum
from .symmetry import symmetrize_vectors

SUPPORTED = ("FixAtoms", "FixCartesian", "FixedLine", "FixedPlane", "FixCom", "FixSymmetry")


def constraint_arrays(atoms: Atoms, name: str) -> tuple[np.ndarray, bool]:
    """The ``(N, 3, 3)`` per-atom projections and the ``FixCom`` flag of a structure's constraints.

    Raises:
        ValueError: for an unsupported constraint (naming it and the structure), or a
            ``FixCom`` that is followed by another constraint.
    """
    projection = np.tile(np.eye(3), (len(atoms), 1, 1))
    fix_com = False
    if any(isinstance(c, FixSymmetry) for c in atoms.constraints):
        if len(atoms.constraints) > 1:
            kinds = ", ".join(type(c).__name__ for c in atoms.constraints)
            raise ValueError(f"structure {name!r}: FixSymmetry is supported as the only constraint (has {kinds})")
        return projection, fix_com  # the symmetry tables hold it (kups_relax.batch.symmetry_values)
    for constraint in atoms.constraints:
        kind = type(constraint)
        if fix_com:
            raise ValueError(f"structure {name!r}: FixCom must be the last constraint "
                             f"(it is followed by {kind.__name__})")
        if kind is FixAtoms:
            projection[constraint.index] = 0.0
        elif kind is FixCartesian:
            keep = np.diag((~np.asarray(constraint.mask, bool)).astype(float))
            projection[constraint.index] = keep @ projection[constraint.index]
        elif kind is FixedLine:
            d = np.asarray(constraint.dir, float)
            projection[constraint.index] = np.outer(d, d) @ projection[constraint.index]
        elif kind is FixedPlane:
            n = np.asarray(constraint.dir, float)
            projection[constraint.index] = (np.eye(3) - np.outer(n, n)) @ projection[constraint.index]
        elif kind is FixCom:
            fix_com = True
        else:
            raise ValueError(
                f"structure {name!r}: constraint {kind.__name__} is not supported "
                f"(supported: {', '.join(SUPPORTED)})"
            )
    return projection, fix_com


def _apply(projection: jax.Array, vectors: jax.Array) -> jax.Array:
    """Row-wise ``P[a] @ v[a]`` for ``(A, 3, 3)`` and ``(A, 3)`` (broadcast products, no batched dot)."""
    return (vectors[:, 0, None] * projection[:, :, 0] + vectors[:, 1, None] * projection[:, :, 1]
            + vectors[:, 2, None] * projection[:, :, 2])


def _com_rows(geometry) -> jax.Array:
    return per_atom(geometry.fix_com, geometry.system) & geometry.atom_mask


def adjust_forces(forces: jax.Array, geometry, cell: jax.Array | None = None) -> jax.Array:
    """Forces ``(A, 3)`` eV/Å after the constraints (ASE's ``adjust_forces``, in order); ``cell
    (S, 3, 3)``: the current cells (default ``geometry.cell``), for ``FixSymmetry``."""
    forces = symmetrize_vectors(forces, geometry, geometry.cell if cell is None else cell,
                                jnp.ones(geometry.n_systems, bool))
    forces = _apply(geometry.projection, forces)
    m = geometry.masses[:, None]
    S = geometry.n_systems
    lmd = segment_sum(m * forces, geometry.system, S) / jnp.maximum(segment_sum(m * m, geometry.system, S), 1e-300)
    return jnp.where(_com_rows(geometry)[:, None], forces - m * per_atom(lmd, geometry.system), forces)


def adjust_step(step: jax.Array, geometry, cell: jax.Array | None = None) -> jax.Array:
    """A proposed displacement ``(A, 3)`` Å after the constraints (ASE's ``adjust_positions``:
    ``new = old + adjusted step``); ``cell (S, 3, 3)``: the cells the atoms are in (default
    ``geometry.cell``), for ``FixSymmetry``."""
    step = symmetrize_vectors(step, geometry, geometry.cell if cell is None else cell, geometry.sym_positions)
    step = _apply(geometry.projection, step)
    m = geometry.masses[:, None]
    S = geometry.n_systems
    shift = segment_sum(m * step, geometry.system, S) / jnp.maximum(segment_sum(m, geometry.system, S), 1e-300)
    return jnp.where(_com_rows(geometry)[:, None], step - per_atom(shift, geometry.system), step)

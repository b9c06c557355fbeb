"""ASE's ``FixSymmetry`` per system, inside the jitted loop.

ASE's :class:`ase.constraints.FixSymmetry` (spglib through :mod:`ase.spacegroup.symmetrize`)
keeps a crystal's space group during a relaxation by averaging over the group's operations:

* forces and position steps as rank-1 tensors (``symmetrize_rank1``): in fractional
  coordinates, ``v'[map_g(i)] = (1/|G|) sum_g R_g v[i]``;
* the stress and the cell's deformation-gradient step as rank-2 tensors (``symmetrize_rank2``):
  ``(1/|G|) sum_g R_g^T (L s L^T) R_g``, back with ``L^-1``.

In a supercell ``G`` holds every point operation once per lattice translation of the
supercell (a 4x4x4 fcc supercell: 48 x 64 operations). The operations with one rotation form a
coset of the pure translations ``T``, so the average factors into (1) the point operations,
one representative ``(R_p, t_p)`` per distinct rotation (at most 48), each moving every atom
to its image, and (2) the mean over each atom's orbit under ``T`` (its *class*: the atoms a
pure translation maps it to, which all receive the same average). Both are gathers and
segment sums with tables of a fixed width, whatever the supercell: per atom row its image
under each point operation (``(A, 48)`` rows) and its class (a row), per system the fractional
rotations ``(S, 48, 3, 3)`` and their number. The result equals ASE's sum over all of ``G``
up to the order of the additions.

The tables come from the structure's ``FixSymmetry`` constraint (its ``rotations``,
``translations`` and ``symm_map``, found by spglib when the constraint was made: that is
also when ASE refines the structure's cell and positions to the symmetry it found). A run
without any symmetric structure has tables of width 0 and compiles none of this.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from .segments import per_atom

logger = logging.getLogger(__name__)

#: Most point operations of a crystal (the order of m-3m); the width of the tables of a run with symmetry.
MAX_POINT_OPS = 48

#: ASE's ``FixSymmetry.adjust_cell`` refuses a step whose deformation gradient exceeds this.
MAX_CELL_STEP = 0.25

__all__ = ["MAX_POINT_OPS", "SymmetryTables", "find_constraint", "fix_symmetry", "space_group", "tables_of",
           "symmetrize_vectors", "symmetrize_rank2", "adjust_cell"]


def find_constraint(atoms: Atoms):
    """The structure's ``FixSymmetry`` constraint, or ``None``."""
    from ase.constraints import FixSymmetry

    found = [c for c in atoms.constraints if isinstance(c, FixSymmetry)]
    return found[0] if found else None


def fix_symmetry(atoms: Atoms, symprec: float = 0.01, adjust_positions: bool = True,
                 adjust_cell: bool = True) -> Atoms:
    """A copy of ``atoms`` with ASE's ``FixSymmetry(symprec)`` set, as ASE users set it
    (``atoms.set_constraint(FixSymmetry(atoms))``): the copy's cell and positions are refined
    to the symmetry spglib finds (ASE's ``refine_symmetry``). A structure that already has a
    ``FixSymmetry`` is copied as it is.

    Raises:
        ValueError: the structure has other constraints (FixSymmetry is supported alone), or
            spglib finds no symmetry dataset (the message says why).
    """
    from ase.constraints import FixSymmetry

    return prepare(atoms, symprec, adjust_positions, adjust_cell)[0]


def prepare(atoms: Atoms, symprec: float = 0.01, adjust_positions: bool = True,
            adjust_cell: bool = True) -> tuple[Atoms, str]:
    """:func:`fix_symmetry` and the input's space group (:func:`space_group` at ``symprec``), together.

    ``FixSymmetry(atoms, symprec)`` asks spglib for a symmetry dataset five times (the input,
    once per refinement step, a final check whose answer it drops, and the operations). Here
    the same steps run in the same order with ASE's own functions, but the input's dataset
    doubles as its space group and the dropped check is skipped: 4 calls instead of the 6 that
    ``space_group`` + ``FixSymmetry`` make (spglib is most of the time it takes). The constraint
    is ASE's class with the attributes its constructor sets, so the results are the same.
    """
    from ase.constraints import FixSymmetry

    atoms = atoms.copy()
    if (own := find_constraint(atoms)) is not None:
        return atoms, space_group(atoms, own.symprec)
    if atoms.constraints:
        kinds = ", ".join(type(c).__name__ for c in atoms.constraints)
        raise ValueError(f"fix_symmetry with other constraints ({kinds}) is not supported")
    original = atoms.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's own, about its dict interface
        try:
            constraint, dataset = _fix_symmetry_steps(atoms, symprec, adjust_positions, adjust_cell)
        except ImportError:  # ASE moved its helpers: its constructor (two more spglib calls)
            constraint, dataset = None, None
        except Exception as err:  # spglib: no dataset (e.g. atoms too close), or not periodic
            raise ValueError(f"no symmetry found with symprec {symprec} ({type(err).__name__}: {err})") from None
        if constraint is None:
            try:
                constraint = FixSymmetry(atoms, symprec=symprec, adjust_positions=adjust_positions,
                                         adjust_cell=adjust_cell)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"no symmetry found with symprec {symprec} ({type(err).__name__}: {err})") from None
    group = space_group(original, symprec) if dataset is None or not original.pbc.all() else \
        f"{dataset.international} ({dataset.number})"
    atoms.set_constraint(constraint)
    return atoms, group


def _fix_symmetry_steps(atoms: Atoms, symprec: float, adjust_positions: bool, adjust_cell: bool):
    """ASE's ``FixSymmetry.__init__`` step by step (refine the cell, then the positions, then the
    operations), in place on ``atoms``; returns the constraint and the input's dataset."""
    from ase.constraints import FixSymmetry
    from ase.spacegroup.symmetrize import _check_and_symmetrize_positions, _symmetrize_cell, check_symmetry

    snapshot = atoms.copy()
    dataset = check_symmetry(atoms, symprec=symprec)  # refine_symmetry: _check_and_symmetrize_cell
    if dataset is None:
        raise ValueError("spglib found no symmetry dataset")
    _symmetrize_cell(atoms, dataset)
    _check_and_symmetrize_positions(atoms, symprec=symprec)
    constraint = FixSymmetry.__new__(FixSymmetry)
    constraint.atoms = snapshot
    constraint.symprec = symprec
    constraint.verbose = False
    constraint.rotations, constraint.translations, constraint.symm_map = _prep_symmetry(atoms, symprec)
    constraint.do_adjust_positions = adjust_positions
    constraint.do_adjust_cell = adjust_cell
    return constraint, dataset


def space_group(atoms: Atoms, symprec: float = 0.01) -> str:
    """``"Fm-3m (225)"``: the space group spglib finds at ``symprec`` (``""`` when it finds none,
    e.g. for a structure that is not periodic in 3 directions)."""
    if not atoms.pbc.all():
        return ""
    from ase.spacegroup.symmetrize import check_symmetry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            dataset = check_symmetry(atoms, symprec=symprec)
        except Exception:  # noqa: BLE001 - spglib's failures: no group to report
            return ""
    return "" if dataset is None else f"{dataset.international} ({dataset.number})"


def _prep_symmetry(atoms: Atoms, symprec: float):
    """ASE's ``prep_symmetry`` with its per-atom Python loop as array operations: for every
    operation, the atom nearest (minimum image, fractional) to each atom's image."""
    from ase.spacegroup.symmetrize import spglib_get_symmetry_dataset
    from ase.utils import atoms_to_spglib_cell

    dataset = spglib_get_symmetry_dataset(atoms_to_spglib_cell(atoms), symprec=symprec)
    rotations = dataset.rotations.copy()
    translations = dataset.translations.copy()
    scaled = atoms.get_scaled_positions()
    symm_map = []
    for rot, trans in zip(rotations, translations):
        images = scaled @ rot.T + trans  # (N, 3): rot @ p + trans for every atom
        dp = scaled[None, :, :] - images[:, None, :]
        dp -= np.round(dp)
        symm_map.append(np.argmin(np.linalg.norm(dp, axis=2), axis=1).tolist())
    return rotations, translations, symm_map


@dataclasses.dataclass(frozen=True)
class SymmetryTables:
    """One structure's symmetry tables (host).

    Attributes:
        rotations: ``(P, 3, 3)`` the distinct fractional rotation matrices (``P <= 48``), float.
        image: ``(N, P)`` the atom each point operation moves each atom to (index in the structure).
        klass: ``(N,)`` the lowest-numbered atom of each atom's orbit under the pure translations.
        class_size: ``(N,)`` the size of that orbit (the supercell's primitive cells).
        adjust_positions, adjust_cell: ASE's flags (the step of the positions / of the cell is symmetrized).
        operations: ``|G|``, every operation spglib found (``P`` times the translations).
    """

    rotations: np.ndarray
    image: np.ndarray
    klass: np.ndarray
    class_size: np.ndarray
    adjust_positions: bool
    adjust_cell: bool
    operations: int


def tables_of(constraint, n_atoms: int) -> SymmetryTables:
    """The :class:`SymmetryTables` of an ASE ``FixSymmetry`` constraint of a structure of ``n_atoms``.

    Raises:
        ValueError: the constraint's operations do not map the atoms one to one (its
            ``symm_map`` was made for another structure).
    """
    rotations = np.asarray(constraint.rotations)
    maps = np.asarray(constraint.symm_map, dtype=np.int64).reshape(len(rotations), -1)
    if maps.shape[1] != n_atoms or any(len(set(m.tolist())) != n_atoms for m in maps):
        raise ValueError("FixSymmetry's operations do not map this structure's atoms one to one "
                         "(was the constraint made for another structure?)")
    first_of = {}
    for k, rotation in enumerate(rotations):
        first_of.setdefault(rotation.astype(np.int64).tobytes(), k)
    representatives = sorted(first_of.values())
    if len(representatives) > MAX_POINT_OPS:
        raise ValueError(f"FixSymmetry lists {len(representatives)} distinct rotations (a crystal has at most "
                         f"{MAX_POINT_OPS})")
    translations = [k for k, rotation in enumerate(rotations) if np.array_equal(rotation, np.eye(3))]
    orbits = maps[translations]  # (T, N): where each pure translation moves each atom
    klass = orbits.min(axis=0)
    class_size = np.array([len(set(orbits[:, i].tolist())) for i in range(n_atoms)])
    return SymmetryTables(rotations=rotations[representatives].astype(np.float64),
                          image=maps[representatives].T.copy(), klass=klass, class_size=class_size,
                          adjust_positions=bool(constraint.do_adjust_positions),
                          adjust_cell=bool(constraint.do_adjust_cell), operations=len(rotations))


def timed_tables(atoms: Atoms) -> tuple[SymmetryTables | None, float]:
    """The tables of ``atoms``' FixSymmetry (or ``None``) and the seconds it took."""
    t = time.perf_counter()
    constraint = find_constraint(atoms)
    tables = None if constraint is None else tables_of(constraint, len(atoms))
    return tables, time.perf_counter() - t


# --- on the device -------------------------------------------------------------------------------

def _enabled(geometry) -> bool:
    """Whether the batch carries symmetry tables (static: their width)."""
    return geometry.sym_image.shape[-1] > 0


def symmetrize_vectors(vectors: jax.Array, geometry, cell: jax.Array, which: jax.Array) -> jax.Array:
    """``(A, 3)`` per-atom vectors (forces, eV/Å, or steps, Å) symmetrized as ASE's ``symmetrize_rank1``
    in the systems selected by ``which (S,)`` (the others, and padding rows, unchanged).

    ``cell (S, 3, 3)``: the systems' current cells (rows are lattice vectors, Å).
    """
    if not _enabled(geometry):
        return vectors
    A, P = geometry.sym_image.shape
    system = geometry.system
    safe = jnp.where(which[:, None, None], cell, jnp.eye(3, dtype=cell.dtype))
    inverse = jnp.linalg.inv(safe)
    scaled = jnp.einsum("ai,aij->aj", vectors, per_atom(inverse, system))  # v @ L^-1: fractional
    rotations = per_atom(geometry.sym_rotations, system)  # (A, P, 3, 3)
    moved = jnp.einsum("apij,aj->api", rotations, scaled)  # R_p s_i
    n_ops = per_atom(geometry.sym_ops, system)
    first = per_atom(geometry.first_atom, system)
    valid = (jnp.arange(P)[None, :] < n_ops[:, None]) & geometry.atom_mask[:, None]
    target = jnp.where(valid, first[:, None] + geometry.sym_image, A)  # dropped rows go past the end
    summed = jnp.zeros((A + 1, 3), vectors.dtype).at[target.reshape(-1)].add(moved.reshape(-1, 3))[:A]
    klass = jnp.where(geometry.atom_mask, first + geometry.sym_class, A)
    by_class = jnp.zeros((A + 1, 3), vectors.dtype).at[klass].add(summed)[klass]
    count = geometry.sym_class_size * jnp.maximum(n_ops, 1)
    averaged = by_class / count[:, None]
    cartesian = jnp.einsum("ai,aij->aj", averaged, per_atom(safe, system))  # back: s @ L
    rows = (per_atom(which & (geometry.sym_ops > 0), system) & geometry.atom_mask)[:, None]
    return jnp.where(rows, cartesian, vectors)


def symmetrize_rank2(tensor: jax.Array, geometry, cell: jax.Array, which: jax.Array) -> jax.Array:
    """``(S, 3, 3)`` tensors (stress, eV/Å³; a deformation step) symmetrized as ASE's
    ``symmetrize_rank2`` in the systems selected by ``which (S,)`` (the others unchanged)."""
    if not _enabled(geometry):
        return tensor
    P = geometry.sym_rotations.shape[1]
    which = which & (geometry.sym_ops > 0)
    safe = jnp.where(which[:, None, None], cell, jnp.eye(3, dtype=cell.dtype))
    inverse = jnp.linalg.inv(safe)
    scaled = safe @ tensor @ jnp.swapaxes(safe, -1, -2)  # L s L^T
    valid = jnp.arange(P)[None, :] < geometry.sym_ops[:, None]
    rotated = jnp.einsum("spji,sjk,spkl->spil", geometry.sym_rotations, scaled, geometry.sym_rotations)
    mean = jnp.sum(jnp.where(valid[..., None, None], rotated, 0.0), axis=1) / jnp.maximum(
        geometry.sym_ops, 1)[:, None, None]
    back = inverse @ mean @ jnp.swapaxes(inverse, -1, -2)
    return jnp.where(which[:, None, None], back, tensor)


def adjust_cell(current: jax.Array, proposed: jax.Array, geometry, which: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ASE's ``FixSymmetry.adjust_cell``: the proposed cells ``(S, 3, 3)`` with their step from
    ``current`` symmetrized (as a deformation gradient) in the systems selected by ``which``;
    and ``(S,)`` False where that step is larger than :data:`MAX_CELL_STEP` (ASE raises there)."""
    if not _enabled(geometry):
        return proposed, jnp.ones(proposed.shape[0], bool)
    which = which & (geometry.sym_ops > 0) & geometry.sym_cell
    eye = jnp.eye(3, dtype=current.dtype)
    safe = jnp.where(which[:, None, None], current, eye)
    delta = jnp.swapaxes(jnp.linalg.solve(safe, jnp.where(which[:, None, None], proposed, eye)), -1, -2) - eye
    ok = ~which | (jnp.max(jnp.abs(delta), axis=(-2, -1)) <= MAX_CELL_STEP)
    symmetric = symmetrize_rank2(delta, geometry, safe, which)
    adjusted = safe @ jnp.swapaxes(symmetric + eye, -1, -2)
    return jnp.where(which[:, None, None], adjusted, proposed), ok

"""Variable-cell relaxation with the semantics of ASE's ``FrechetCellFilter`` and ``UnitCellFilter``.

ASE's filters hand the optimizer ``N + 3`` rows per structure: the atoms' positions in the
undeformed cell, ``z = x F^-T``, and 3 cell rows; ``F`` is the deformation gradient from the
input (reference) cell ``C0`` to the current cell ``C = C0 F^T``. The cell rows are

* ``FrechetCellFilter``: ``exp_cell_factor * logm(F)`` (default factor: the atom count), with
  forces ``L(U, W) / exp_cell_factor`` where ``U = logm(F)``, ``W = virial F^-T`` and ``L`` is
  the Fréchet derivative of the matrix exponential (its adjoint, ``L(U^T, W)``);
* ``UnitCellFilter``: ``cell_factor * F``, with forces ``virial F^-T / cell_factor``;

with ``virial = -V (stress + p I)`` (``p`` = ``scalar_pressure``, eV/Å³), optionally made
hydrostatic, masked, and made traceless (``constant_volume``) in ASE's order for each filter.
The atoms' rows have forces ``f F`` (``f`` after the constraints). A step sets the cell to
``C0 (I + D)`` with ``D = (F' - I)^T * mask`` and the atoms to ``z' (I + D)``, relative to the
atoms scaled with the cell, and then the constraints adjust that step (ASE's
``set_cell(scale_atoms=True)`` followed by ``set_positions``). Convergence is ASE's: the
largest norm over all ``N + 3`` rows.

In the loop the optimizer works on generalized rows ``(A + 3 S, 3)``: the atom rows followed
by 3 cell rows per system (``SystemIndex`` covers both), so every per-system transform
applies unchanged. A system without a periodic direction has no cell degrees of freedom (its
cell rows stay zero). A partially periodic system (a slab) is treated as ASE treats it when
wrapped in the filter: all 9 cell components are degrees of freedom (use ``mask`` to hold the
vacuum direction), so its cell must have a volume.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from .segments import per_atom, select_rows

KINDS = ("frechet", "unit")


def _voigt_mask_3x3(mask) -> tuple:
    m = np.asarray(mask, dtype=float)
    if m.shape == (6,):
        xx, yy, zz, yz, xz, xy = m
        m = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    elif m.shape != (3, 3):
        raise ValueError(f"cell filter mask must have shape (6,) (Voigt) or (3, 3), got {m.shape}")
    return tuple(tuple(float(v) for v in row) for row in m)


@dataclasses.dataclass(frozen=True)
class CellFilter:
    """Which cell degrees of freedom relax, with ASE's filter options (hashable).

    Attributes:
        kind: ``"frechet"`` (``ase.filters.FrechetCellFilter``, default) or ``"unit"``
            (``ase.filters.UnitCellFilter``).
        scalar_pressure: external pressure, eV/Å³ (enthalpy ``E + pV``).
        hydrostatic_strain: only hydrostatic deformation (the virial is replaced by its trace / 3).
        constant_volume: project the virial's trace out (approximately constant volume).
        mask: which strain components relax: 6 Voigt flags (``xx yy zz yz xz xy``) or 3x3;
            ``None`` = all.
        exp_cell_factor: ``FrechetCellFilter``'s scale of the cell rows; ``None`` = atom count.
        cell_factor: ``UnitCellFilter``'s scale of the cell rows; ``None`` = atom count.
    """

    kind: str = "frechet"
    scalar_pressure: float = 0.0
    hydrostatic_strain: bool = False
    constant_volume: bool = False
    mask: tuple | None = None
    exp_cell_factor: float | None = None
    cell_factor: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"cell filter kind must be one of {KINDS}, got {self.kind!r}")
        if self.mask is not None:
            object.__setattr__(self, "mask", _voigt_mask_3x3(self.mask))

    @property
    def factor_override(self) -> float | None:
        """The scale of the cell rows set by the user, for this filter's kind."""
        return self.exp_cell_factor if self.kind == "frechet" else self.cell_factor

    @classmethod
    def from_ase(cls, filt) -> "CellFilter":
        """The settings of an ``ase.filters.FrechetCellFilter`` / ``UnitCellFilter`` object."""
        from ase.filters import FrechetCellFilter, UnitCellFilter

        if isinstance(filt, FrechetCellFilter):
            kind, extra = "frechet", dict(exp_cell_factor=float(filt.exp_cell_factor))
        elif isinstance(filt, UnitCellFilter) and type(filt) is UnitCellFilter:
            kind, extra = "unit", dict(cell_factor=float(filt.cell_factor))
        else:
            raise ValueError(f"unsupported filter {type(filt).__name__} "
                             "(supported: FrechetCellFilter, UnitCellFilter)")
        if not np.allclose(filt.orig_cell, filt.atoms.cell.array, rtol=0, atol=1e-12):
            raise ValueError(f"{type(filt).__name__}: the atoms' cell differs from the filter's original "
                             "cell (a filter that has already moved); start from a fresh filter")
        mask = np.asarray(filt.mask, dtype=float)
        return cls(kind=kind, scalar_pressure=float(filt.scalar_pressure),
                   hydrostatic_strain=bool(filt.hydrostatic_strain), constant_volume=bool(filt.constant_volume),
                   mask=None if np.all(mask == 1.0) else mask, **extra)


def resolve_cell_filter(value: "None | str | CellFilter") -> CellFilter | None:
    """``None`` (positions only), a kind name (``"frechet"``, ``"unit"``) or a :class:`CellFilter`."""
    if value is None or isinstance(value, CellFilter):
        return value
    if isinstance(value, str):
        return CellFilter(kind=value.lower())
    raise TypeError(f"cell_filter must be None, 'frechet', 'unit' or a CellFilter, got {type(value).__name__}")


def resolve_cell_filters(value, n: int) -> list[CellFilter | None]:
    """One :class:`CellFilter` (or ``None``) per structure from a single setting or a sequence of ``n``."""
    if value is None or isinstance(value, (str, CellFilter)):
        return [resolve_cell_filter(value)] * n
    items = list(value)
    if len(items) != n:
        raise ValueError(f"cell_filter has {len(items)} entries for {n} structures")
    return [resolve_cell_filter(v) for v in items]


def has_cell_dof(atoms: Atoms) -> bool:
    """Whether a structure gets cell degrees of freedom (some periodic direction)."""
    return bool(np.any(atoms.pbc))


def check_variable_cell(atoms: Atoms) -> str | None:
    """Why ``atoms`` cannot relax its cell (``None`` if it can, or if it has no cell DOF)."""
    if not has_cell_dof(atoms):
        return None
    volume = abs(np.linalg.det(atoms.cell.array))
    if volume < 1e-6:
        return (f"variable-cell relaxation needs a cell with a volume (a slab needs its vacuum "
                f"lattice vector); cell={atoms.cell.array.tolist()}")
    return None


# ---------------------------------------------------------------------------------------------
# per-system tables


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CellParams:
    """Per-system settings of a variable-cell relaxation (a pytree).

    Attributes:
        reference_cell: ``(S, 3, 3)`` the input cell ``C0``, rows = lattice vectors, Å.
        mask: ``(S, 3, 3)`` 1.0 for relaxed strain components, 0.0 for fixed ones.
        scalar_pressure: ``(S,)`` eV/Å³.
        hydrostatic: ``(S,)`` bool.
        constant_volume: ``(S,)`` bool.
        factor: ``(S,)`` scale of the cell rows (``exp_cell_factor`` or ``cell_factor``).
        variable: ``(S,)`` bool, systems with cell degrees of freedom.
        full_mask: ``(S,)`` bool, whether ``mask`` is all ones.
        frechet: ``(S,)`` bool, ``FrechetCellFilter`` (else ``UnitCellFilter``); both kinds
            share one compiled program.
    """

    reference_cell: jax.Array
    mask: jax.Array
    scalar_pressure: jax.Array
    hydrostatic: jax.Array
    constant_volume: jax.Array
    factor: jax.Array
    variable: jax.Array
    full_mask: jax.Array
    frechet: jax.Array


def empty_cell_table(n_systems: int) -> dict[str, np.ndarray]:
    """Host arrays of :class:`CellParams` for ``n_systems`` empty slots."""
    S = n_systems
    return dict(reference_cell=np.tile(np.eye(3), (S, 1, 1)), mask=np.ones((S, 3, 3)),
                scalar_pressure=np.zeros(S), hydrostatic=np.zeros(S, bool), constant_volume=np.zeros(S, bool),
                factor=np.ones(S), variable=np.zeros(S, bool), frechet=np.ones(S, bool))


def pack_cell(table: dict[str, np.ndarray], slot: int, atoms: Atoms | None, cell_filter: CellFilter | None) -> None:
    """Write the settings for ``atoms`` into ``slot`` of the host table (``atoms`` or
    ``cell_filter`` ``None``: no cell degrees of freedom)."""
    empty = empty_cell_table(1)
    for key, value in empty.items():
        table[key][slot] = value[0]
    if atoms is None or cell_filter is None or not has_cell_dof(atoms):
        return
    factor = cell_filter.factor_override
    table["reference_cell"][slot] = atoms.cell.array
    table["mask"][slot] = np.asarray(cell_filter.mask) if cell_filter.mask is not None else 1.0
    table["scalar_pressure"][slot] = cell_filter.scalar_pressure
    table["hydrostatic"][slot] = cell_filter.hydrostatic_strain
    table["constant_volume"][slot] = cell_filter.constant_volume
    table["factor"][slot] = float(len(atoms)) if factor is None else float(factor)
    table["variable"][slot] = True
    table["frechet"][slot] = cell_filter.kind == "frechet"


def device_cell_params(table: dict[str, np.ndarray], dtype) -> CellParams:
    """The :class:`CellParams` of a host table, floats in ``dtype``."""
    f = dtype
    return CellParams(
        reference_cell=jnp.asarray(table["reference_cell"], f), mask=jnp.asarray(table["mask"], f),
        scalar_pressure=jnp.asarray(table["scalar_pressure"], f), hydrostatic=jnp.asarray(table["hydrostatic"]),
        constant_volume=jnp.asarray(table["constant_volume"]), factor=jnp.asarray(table["factor"], f),
        variable=jnp.asarray(table["variable"]), full_mask=jnp.asarray(np.all(table["mask"] == 1.0, axis=(1, 2))),
        frechet=jnp.asarray(table["frechet"]))


# ---------------------------------------------------------------------------------------------
# device maths (every function is per system, batched over the leading axis)


def _eye_like(x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(3, dtype=x.dtype), x.shape)


def _trace(m: jax.Array) -> jax.Array:
    return jnp.trace(m, axis1=-2, axis2=-1)


def deformation_gradient(cell: jax.Array, params: CellParams) -> jax.Array:
    """``(S, 3, 3)`` ``F`` with ``cell = C0 F^T`` (ASE's ``deform_grad``); ``I`` without cell DOF."""
    ref = select_rows(params.variable, params.reference_cell, _eye_like(cell))
    F = jnp.swapaxes(jnp.linalg.solve(ref, cell), -1, -2)
    return select_rows(params.variable, F, _eye_like(cell))


def initial_dof(params: CellParams) -> jax.Array:
    """``(S, 3, 3)`` cell rows of the input geometry (``F = I``): 0 (Fréchet) or ``cell_factor * I``."""
    eye = _eye_like(params.reference_cell)
    dof = select_rows(params.frechet, jnp.zeros_like(eye), params.factor[:, None, None] * eye)
    return select_rows(params.variable, dof, jnp.zeros_like(eye))


def _expm(A: jax.Array, terms: int = 14, max_squarings: int = 24) -> jax.Array:
    """Matrix exponential of ``(S, n, n)`` matrices: Taylor series with scaling and squaring.

    Each matrix is scaled by ``2^-s`` to an infinity norm <= 1/4, where ``terms`` Taylor terms
    are exact to double precision, and squared back ``s`` times. Small fixed loops: cheap to
    compile, unlike a switch over Padé orders.
    """
    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
    norm = jnp.max(jnp.sum(jnp.abs(A), axis=-1), axis=-1)
    s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-300) / 0.25)), 0, max_squarings)
    X = A / (2.0 ** s)[:, None, None]

    def horner(k, R):
        j = terms - k  # terms, terms - 1, ..., 1
        return eye + (X @ R) / j

    R = jax.lax.fori_loop(0, terms, horner, eye)

    def square(i, R):
        return jnp.where((i < s)[:, None, None], R @ R, R)

    return jax.lax.fori_loop(0, max_squarings, square, R)


def _expm_frechet(A: jax.Array, E: jax.Array) -> jax.Array:
    """Fréchet derivative ``L(A, E)`` of the matrix exponential for ``(S, 3, 3)`` matrices
    (the upper right block of ``exp([[A, E], [0, A]])``; ``E`` is normalised first, ``L`` being linear in it)."""
    scale = jnp.sqrt(jnp.sum(E * E, axis=(-2, -1)))
    safe = jnp.where(scale > 0, scale, 1.0)[:, None, None]
    zero = jnp.zeros_like(A)
    block = jnp.concatenate([jnp.concatenate([A, E / safe], axis=-1), jnp.concatenate([zero, A], axis=-1)], axis=-2)
    return _expm(block)[:, :3, 3:] * safe


def _logm_near_identity(F: jax.Array, roots: int = 6, terms: int = 10) -> jax.Array:
    """Principal matrix logarithm of ``(S, 3, 3)`` matrices with eigenvalues near 1.

    Inverse scaling and squaring: ``roots`` square roots (Denman-Beavers iterations), then
    ``log(A) = 2 atanh((A - I)(A + I)^-1)`` as a series (error ~1e-14 for ``|F - I| < 0.5``).
    """
    eye = _eye_like(F)

    def denman_beavers(_, yz):
        Y, Z = yz
        return 0.5 * (Y + jnp.linalg.inv(Z)), 0.5 * (Z + jnp.linalg.inv(Y))

    def square_root(_, A):
        return jax.lax.fori_loop(0, 12, denman_beavers, (A, eye))[0]

    A = jax.lax.fori_loop(0, roots, square_root, F)
    X = jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(A + eye, -1, -2), jnp.swapaxes(A - eye, -1, -2)), -1, -2)
    X2 = X @ X

    def series(k, carry):
        term, total = carry
        term = term @ X2
        return term, total + term / (2 * k + 1)

    _, total = jax.lax.fori_loop(1, terms, series, (X, X))
    return (2.0 ** roots) * 2.0 * total


def cell_forces(stress: jax.Array, cell: jax.Array, dof: jax.Array, params: CellParams) -> jax.Array:
    """``(S, 3, 3)`` the filter's forces on the cell rows (eV/Å-like, ASE's ``get_forces()[N:]``).

    Args:
        stress: ``(S, 3, 3)`` eV/Å³ at ``cell``.
        cell: ``(S, 3, 3)`` current cell, Å.
        dof: ``(S, 3, 3)`` the current cell rows (:func:`initial_dof` at the start).
    """
    eye = _eye_like(cell)
    volume = jnp.abs(jnp.linalg.det(cell))
    virial = -volume[:, None, None] * (stress + params.scalar_pressure[:, None, None] * eye)
    F = deformation_gradient(cell, params)
    F_inv_T = jnp.swapaxes(jnp.linalg.inv(F), -1, -2)
    hydro = lambda v: _trace(v)[:, None, None] / 3.0 * eye  # noqa: E731
    traceless = lambda v: v - _trace(v)[:, None, None] / 3.0 * eye  # noqa: E731
    # FrechetCellFilter: hydrostatic and mask on the virial, then W = virial F^-T
    W = (select_rows(params.hydrostatic, hydro(virial), virial) * params.mask) @ F_inv_T
    U = dof / params.factor[:, None, None]
    # <L(U, E_mn), W> for every direction E_mn is the adjoint Fréchet derivative L(U^T, W)
    G_frechet = _expm_frechet(jnp.swapaxes(U, -1, -2), jnp.where(params.frechet[:, None, None], W, 0.0))
    # UnitCellFilter: W = virial F^-T first, then hydrostatic, mask and constant volume
    W = virial @ F_inv_T
    G_unit = select_rows(params.hydrostatic, hydro(W), W) * params.mask
    G = select_rows(params.frechet, G_frechet, G_unit)
    rows = select_rows(params.constant_volume, traceless(G), G) / params.factor[:, None, None]
    return select_rows(params.variable, rows, jnp.zeros_like(rows))


def row_matmul(vectors: jax.Array, matrices: jax.Array, system: jax.Array) -> jax.Array:
    """``(A, 3)`` row vectors times their system's ``(S, 3, 3)`` matrix (broadcast products)."""
    Ma = per_atom(matrices, system)
    return vectors[:, 0, None] * Ma[:, 0] + vectors[:, 1, None] * Ma[:, 1] + vectors[:, 2, None] * Ma[:, 2]


def atom_forces(forces: jax.Array, F: jax.Array, system: jax.Array) -> jax.Array:
    """``(A, 3)`` the filter's forces on the atom rows, ``f F`` (row vectors)."""
    return row_matmul(forces, F, system)


def to_reference(positions: jax.Array, F: jax.Array, system: jax.Array) -> jax.Array:
    """``(A, 3)`` positions in the undeformed cell, ``z = x F^-T`` (ASE's filter positions)."""
    return row_matmul(positions, jnp.swapaxes(jnp.linalg.inv(F), -1, -2), system)


def new_cell(dof: jax.Array, params: CellParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cell from proposed cell rows: ``(cell (S,3,3), I + D (S,3,3), cell rows as ASE reads them back)``.

    ``D = (F' - I)^T * mask`` with ``F' = expm(dof / factor)`` (Fréchet) or ``dof / factor``
    (unit cell); the cell is ``C0 (I + D)``. Without cell DOF: the reference cell and ``I``.
    """
    eye = _eye_like(dof)
    scaled = dof / params.factor[:, None, None]
    F_new = select_rows(params.frechet, _expm(jnp.where(params.frechet[:, None, None], scaled, 0.0)), scaled)
    deform = jnp.swapaxes(F_new - eye, -1, -2) * params.mask
    deform = select_rows(params.variable, deform, jnp.zeros_like(deform))
    stretch = eye + deform
    cell = params.reference_cell @ stretch
    F_read = jnp.swapaxes(stretch, -1, -2)
    relog = params.frechet & ~params.full_mask
    logm = params.factor[:, None, None] * _logm_near_identity(select_rows(relog, F_read, eye))
    read = select_rows(params.frechet, select_rows(params.full_mask, dof, logm), params.factor[:, None, None] * F_read)
    read = select_rows(params.variable, read, jnp.zeros_like(read))
    return cell, stretch, read


def read_cell_dof(cell: jax.Array, params: CellParams) -> jax.Array:
    """``(S, 3, 3)`` the cell rows ASE's filter reads from ``cell``: ``factor * logm(F)``
    (Fréchet) or ``factor * F`` (unit cell), ``F = deform_grad(cell)``; 0 without cell DOF."""
    F = deformation_gradient(cell, params)
    eye = _eye_like(cell)
    logm = _logm_near_identity(select_rows(params.frechet, F, eye))
    read = params.factor[:, None, None] * select_rows(params.frechet, logm, F)
    return select_rows(params.variable, read, jnp.zeros_like(read))


def complete_cell(cell: jax.Array, pbc: jax.Array) -> jax.Array:
    """jit version of :func:`kups_relax.batch.complete_cell` for ``(S, 3, 3)`` cells."""
    eye3 = jnp.eye(3, dtype=cell.dtype)
    basis = jnp.zeros_like(cell)  # orthonormal rows found so far (zero rows unused)

    def residual(v, basis):
        return v - jnp.sum(jnp.einsum("sk,sbk->sb", v, basis)[..., None] * basis, axis=1)

    n = jnp.zeros(cell.shape[0], jnp.int32)
    for d in range(3):
        v = residual(cell[:, d], basis)
        v = v / jnp.linalg.norm(jnp.where(pbc[:, d, None], v, 1.0), axis=-1, keepdims=True)
        basis = jnp.where((pbc[:, d, None] & (jnp.arange(3)[None, :] == n[:, None]))[..., None], v[:, None], basis)
        n = n + pbc[:, d]
    out = cell
    for d in range(3):
        res = jnp.stack([residual(jnp.broadcast_to(eye3[k], cell[:, 0].shape), basis) for k in range(3)], axis=1)
        norms = jnp.linalg.norm(res, axis=-1)
        best = jnp.take_along_axis(res, jnp.argmax(norms, axis=-1)[:, None, None], axis=1)[:, 0]
        best = best / jnp.linalg.norm(best, axis=-1, keepdims=True)
        take = ~pbc[:, d]
        basis = jnp.where((take[:, None] & (jnp.arange(3)[None, :] == n[:, None]))[..., None], best[:, None], basis)
        n = n + take
        out = out.at[:, d].set(jnp.where(take[:, None], best, cell[:, d]))
    return out


def neighbor_strain_exceeded(positions: jax.Array, reference_positions: jax.Array, cell: jax.Array,
                             reference_cell: jax.Array, variable: jax.Array, system: jax.Array,
                             n_systems: int, cutoff: float, skin: float) -> jax.Array:
    """``(S,)`` True where a pair list built at ``(reference_positions, reference_cell)`` may miss pairs.

    With ``M = C_ref^-1 C`` and the non-affine displacement ``d = x - x_ref M``, a pair closer
    than ``cutoff`` now was closer than ``cutoff + skin`` at the build if
    ``2 max|d| <= (cutoff + skin) s - cutoff``, ``s >= 1 - |M - I|_F`` bounding ``M``'s smallest
    singular value. Without a strain (and for systems without cell DOF, ``variable (S,)``
    False) this is the usual half-skin rule.
    """
    eye = _eye_like(cell)
    M = select_rows(variable, jnp.linalg.solve(select_rows(variable, reference_cell, eye), select_rows(variable, cell, eye)), eye)
    Ma = per_atom(M, system)
    affine = (reference_positions[:, 0, None] * Ma[:, 0] + reference_positions[:, 1, None] * Ma[:, 1]
              + reference_positions[:, 2, None] * Ma[:, 2])
    d2 = jnp.sum((positions - affine) ** 2, axis=-1)
    largest = jnp.sqrt(jax.ops.segment_max(d2, system, num_segments=n_systems))
    s = 1.0 - jnp.sqrt(jnp.sum((M - jnp.eye(3, dtype=M.dtype)) ** 2, axis=(-2, -1)))
    allowed = 0.5 * ((cutoff + skin) * s - cutoff)
    return largest > allowed

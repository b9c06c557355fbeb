"""The Exp preconditioner of Packwood et al., per system: tables on the host, solves on the device.

D. Packwood, J. R. Kermode, L. Mones, N. Bernstein, J. Woolley, N. Gould, C. Ortner and
G. Csányi, "A universal preconditioner for simulating condensed phase materials",
J. Chem. Phys. 144, 164109 (2016); ASE's ``ase.optimize.precon.Exp`` (whose defaults, names and
steps this follows: ``A = 3``, ``r_cut = 2 r_NN``, ``c_stab = 0.1``, ``mu`` from a sine
perturbation).

For one system of ``N`` atoms the preconditioner is ``P ⊗ I_3`` with the ``N x N`` matrix

    P_ij = -mu exp(-A (r_ij / r_NN - 1))      for every pair i != j within r_cut (images summed)
    P_ii = mu (sum_j exp(-A (r_ij / r_NN - 1)) + c_stab)

-- a weighted graph Laplacian made positive definite by the ``c_stab`` shift (which ASE leaves
out when the system has ``FixAtoms``: then the fixed atoms' rows are the identity and their
couplings are dropped, which pins the Laplacian instead). ``r_NN`` is the largest
nearest-neighbour distance of any atom (ASE's ``estimate_nearest_neighbour_distance``).

Host (:func:`exp_tables`, when a structure is read): the pairs within ``r_cut``, the same as
ASE's neighbour list finds (:func:`pairs_within`), so the matrix is exactly ASE's, in a
per-atom table ``(N, K)`` of neighbour rows (relative to the system's first atom) and unit
weights ``exp(-A (r/r_NN - 1))``. The
matrix is built from the input geometry; ASE rebuilds it only when an atom moves more than
``r_NN / 2`` in one step, which its line search cannot do for ``maxstep < r_NN / 4`` (a step is at
most twice ``maxstep``); a structure for which it could is refused (``maxstep`` 0.04 Å, ASE's
default, needs ``r_NN > 0.16`` Å).

Device (:func:`solve`), two ways chosen per batch (:data:`DENSE_LIMIT`):

* batches of structures up to 1,024 atoms: the dense inverse of each system's unit matrix,
  computed once on the host by Cholesky when the structure takes its slot (the matrix is built
  once, see above), applied each step as one batched matrix product over the slots;
* larger ones: conjugate gradients with a Jacobi preconditioner, matrix-free on the pair table
  (three 1-D gathers of ``N K`` per product), every system to its own relative residual; the
  Exp matrix is well conditioned apart from its ``c_stab`` mode (a translation, which CG
  resolves in one iteration): ~40 products to 1e-12 for 500-1,000 atoms. A dense inverse
  would cost ``8 N^2`` bytes and ``N^3 / 3`` flops (5,000 atoms: 200 MB, 40 GFLOP), and a sparse
  direct solve is sequential work that XLA does not do well.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from .segments import per_atom, per_system_dot, segment_max, segment_min, segment_sum

logger = logging.getLogger(__name__)

#: Kinds of preconditioner per system (``Geometry.precon_kind``).
NONE, EXP = 0, 1

#: Width of a per-atom neighbour table is a multiple of this (fewer distinct programs).
WIDTH_STEP = 8

#: Batches whose largest slot holds at most this many atoms apply the preconditioner as a dense
#: inverse (``(W, W)`` per slot, ``W`` the largest slot, computed on the host when a structure is
#: placed); larger ones solve by conjugate gradients. Per step the dense product costs ``3 N``
#: multiply-adds per atom in one batched matrix product, CG ~40 iterations x ``3 K`` gathered
#: values (``K`` ~ 55 pairs), so dense is cheaper up to ~2,000 atoms; the host's inverse
#: (``N^3 / 3`` flops: 40 ms at 1,024 atoms, 1 s at 3,000) and its ``8 N^2`` bytes set the
#: limit lower.
DENSE_LIMIT = 1024


@dataclasses.dataclass(frozen=True)
class ExpSettings:
    """ASE's ``Exp`` parameters (names and defaults as ASE's).

    Attributes:
        A: decay of the weights, ``exp(-A (r / r_NN - 1))``.
        r_cut: pair cutoff, Å (``None``: ``2 r_NN``; below ``r_NN`` it becomes ``1.1 r_NN``).
        r_NN: nearest-neighbour distance, Å (``None``: estimated per structure, as ASE).
        c_stab: diagonal shift (times ``mu``) that makes the matrix positive definite.
        force_stab: add the shift also to systems with ``FixAtoms``.
        precon: ``"Exp"``, ``"auto"`` (Exp for systems of >= 100 atoms, none below: ASE's
            default) or ``None`` (no preconditioner: ASE's ``IdentityPrecon``, ``P = I`` in
            eV/Å², whatever the optimizer's ``alpha`` is: ``make_precon(None)`` is the identity,
            so ASE's ``H0 = 1 / alpha`` branch never runs).
        maxstep: the optimizer's ``maxstep``, Å: a structure whose atoms could move ``r_NN / 2``
            in one step (``2 maxstep >= r_NN / 2``), where ASE would rebuild the matrix, is refused.
    """

    A: float = 3.0
    r_cut: float | None = None
    r_NN: float | None = None
    c_stab: float = 0.1
    force_stab: bool = False
    precon: str | None = "Exp"
    maxstep: float = 0.04

    def applies_to(self, atoms: Atoms) -> bool:
        """Whether ``atoms`` gets the Exp preconditioner (ASE's ``precon='auto'`` rule)."""
        if self.precon is None:
            return False
        return self.precon == "Exp" or len(atoms) >= 100


def pairs_within(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, d)``: every pair of atoms (periodic images included, not an atom with itself
    unshifted) closer than ``cutoff`` Å, sorted by ``i``.

    The same pairs and the same distances, bit for bit, as ASE's
    ``neighbor_list("ijd", atoms, cutoff)``: candidates come from a k-d tree over the periodic
    images of the wrapped positions (10-100x faster than ASE's binning), and every distance is
    then computed with ASE's own arithmetic, ``|x_j - x_i + S cell|``, and compared with ``<``.
    """
    from ase.geometry import complete_cell
    from scipy.spatial import cKDTree

    positions = np.asarray(atoms.positions, np.float64)
    n = len(atoms)
    if n == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    cell = atoms.cell.array
    full = complete_cell(cell)
    pbc = np.asarray(atoms.pbc, bool)
    fractional = np.linalg.solve(full.T, positions.T).T
    wrap = np.where(pbc, np.floor(fractional), 0.0)
    wrapped = (fractional - wrap) @ full
    volume = abs(np.linalg.det(full))
    spacing = np.array([volume / np.linalg.norm(np.cross(full[(c + 1) % 3], full[(c + 2) % 3])) for c in range(3)])
    reach = np.where(pbc, np.ceil(cutoff / spacing), 0).astype(int)
    shifts = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    images = (wrapped[None, :, :] + (shifts @ full)[:, None, :]).reshape(-1, 3)
    # a little beyond the cutoff: the exact test below decides
    found = cKDTree(wrapped).sparse_distance_matrix(cKDTree(images), cutoff * (1 + 1e-9) + 1e-9,
                                                      output_type="ndarray")
    i = found["i"].astype(np.int64)
    image, j = np.divmod(found["j"].astype(np.int64), n)
    S = shifts[image] + wrap[i].astype(np.int64) - wrap[j].astype(np.int64)
    keep = ~((i == j) & (S == 0).all(axis=1))
    i, j, S = i[keep], j[keep], S[keep]
    vector = positions[j] - positions[i] + S.dot(cell)
    d = np.sqrt(np.sum(vector * vector, axis=1))
    keep = d < cutoff
    order = np.lexsort((j, i))
    order = order[keep[order]]
    return i[order], j[order], d[order]


def nearest_neighbour_distance(atoms: Atoms) -> float:
    """ASE's ``estimate_nearest_neighbour_distance``: the largest distance of any atom to its
    nearest neighbour (periodic images of itself included).

    ASE searches with cutoffs growing by the golden ratio from 1 Å while they are below twice
    the longest cell vector; the result is the same wherever it succeeds, and it fails where
    ASE does.

    Raises:
        ValueError: no such cutoff finds a neighbour of every atom (ASE raises too: a molecule
            or cluster without a cell of its size; give ``r_NN``).
    """
    from ase.geometry.cell import cell_to_cellpar

    extent = max(cell_to_cellpar(atoms.cell)[:3])
    phi = (1.0 + np.sqrt(5.0)) / 2.0
    cutoff = 1.0
    while cutoff < 2.0 * extent:
        i, _, d = pairs_within(atoms, cutoff)
        if len(i) and (np.bincount(i, minlength=len(atoms)) != 0).all():
            nearest = np.full(len(atoms), np.inf)
            np.minimum.at(nearest, i, d)
            return float(nearest.max())
        cutoff *= phi
    raise ValueError("the Exp preconditioner found no neighbour of some atom within twice the longest cell vector "
                     "(a molecule or cluster needs a cell around it, or pass r_NN)")


def _fixed_atoms(atoms: Atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
    return fixed


def exp_tables(atoms: Atoms, settings: ExpSettings) -> dict[str, np.ndarray | float | int]:
    """The preconditioner of one structure as per-atom tables (``N`` atoms, ``K`` pairs per atom).

    Returns the :class:`~kups_relax.batch.Geometry` values ``precon_neighbors (N, K)`` (pair
    partner, counted from the system's first atom; padding: the atom itself), ``precon_weight
    (N, K)`` (``exp(-A (r/r_NN - 1))``, 0 for padding), ``precon_diag (N,)`` (sum of the row's
    weights plus ``c_stab`` where ASE adds it; 1 without a preconditioner),
    ``precon_fixed (N,)`` (``FixAtoms``), ``precon_kind`` (:data:`EXP` or :data:`NONE`: the
    identity, ASE's ``IdentityPrecon``) and
    ``precon_r_nn`` (Å).
    """
    n = len(atoms)
    if not settings.applies_to(atoms):
        return dict(precon_neighbors=np.arange(n)[:, None], precon_weight=np.zeros((n, 1)),
                    precon_diag=np.ones(n), precon_fixed=np.zeros(n, bool), precon_kind=NONE,
                    precon_r_nn=0.0)
    r_nn = settings.r_NN if settings.r_NN is not None else nearest_neighbour_distance(atoms)
    r_cut = 2.0 * r_nn if settings.r_cut is None else settings.r_cut
    if r_cut < r_nn:
        logger.warning("r_cut (%.2f) < r_NN (%.2f), increasing to 1.1*r_NN = %.2f", r_cut, r_nn, 1.1 * r_nn)
        r_cut = 1.1 * r_nn
    if 2.0 * settings.maxstep >= 0.5 * r_nn:
        # a line-search step is at most 2 maxstep (ASE rounds a1 in [0.5, 1.5] to 1 after clipping it to
        # maxstep); ASE rebuilds P after a step of r_NN / 2, which the engine does not do
        raise ValueError(f"maxstep {settings.maxstep:g} Å can move an atom by r_NN / 2 = {r_nn / 2:.3g} Å in one step, "
                         f"where ASE rebuilds the Exp preconditioner (not supported): use maxstep < {r_nn / 4:.3g} Å")
    i, j, d = pairs_within(atoms, r_cut)
    keep = i != j  # ASE drops every pair of an atom with itself, periodic images included
    i, j, d = i[keep], j[keep], d[keep]
    weight = np.exp(-settings.A * (d / r_nn - 1.0))
    fixed = _fixed_atoms(atoms)
    diag = np.bincount(i, weight, minlength=n).astype(np.float64)
    if settings.force_stab or not fixed.any():
        diag += settings.c_stab
    count = np.bincount(i, minlength=n)
    width = max(1, int(count.max()) if n else 1)
    order = np.argsort(i, kind="stable")
    i, j, weight = i[order], j[order], weight[order]
    column = np.arange(len(i)) - np.repeat(np.cumsum(count) - count, count)
    neighbors = np.repeat(np.arange(n)[:, None], width, axis=1)
    weights = np.zeros((n, width))
    neighbors[i, column] = j
    weights[i, column] = weight
    return dict(precon_neighbors=neighbors, precon_weight=weights, precon_diag=diag, precon_fixed=fixed,
                precon_kind=EXP, precon_r_nn=r_nn)


def unit_inverse(tables: dict) -> np.ndarray:
    """``(N, N)`` the inverse of the unit matrix (``mu = 1``) of :func:`exp_tables`' tables, with
    ``FixAtoms`` rows and columns decoupled (identity there), as the loop applies it: ``P^-1 q =
    (U q) / mu`` on free atoms. Zero for a structure without the preconditioner (the identity).

    LAPACK's Cholesky factor and inverse from it (``potrf`` + ``potri``, ``N^3`` flops): half the
    time of solving for the identity's columns (``cho_solve``; 41 vs 89 ms at 858 atoms)."""
    from scipy.linalg import lapack

    neighbors, weight = tables["precon_neighbors"], tables["precon_weight"]
    n = len(neighbors)
    if tables["precon_kind"] != EXP:
        return np.zeros((n, n))
    free = ~np.asarray(tables["precon_fixed"], bool)
    matrix = np.zeros((n, n))
    rows = np.repeat(np.arange(n), neighbors.shape[1])
    coupled = (weight.reshape(-1) != 0) & free[rows] & free[neighbors.reshape(-1)]
    np.add.at(matrix, (rows[coupled], neighbors.reshape(-1)[coupled]), -weight.reshape(-1)[coupled])
    matrix[np.diag_indices(n)] = np.where(free, tables["precon_diag"], 1.0)
    factor, info = lapack.dpotrf(matrix, lower=False, clean=False)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=False)  # the upper triangle of the inverse
    if info != 0:
        raise np.linalg.LinAlgError(f"the Exp preconditioner's matrix is not positive definite (LAPACK info {info})")
    return np.triu(inverse) + np.triu(inverse, 1).T


def table_width(needed: int) -> int:
    """The table width for ``needed`` pairs per atom (a multiple of :data:`WIDTH_STEP`)."""
    return WIDTH_STEP * max(1, -(-needed // WIDTH_STEP))


# ----------------------------------------------------------------------------- device


class Operator:
    """``P`` of every system of a batch at ``mu (S,)`` (``unit=True``: ASE's initial assembly,
    ``mu = 1`` and no ``FixAtoms`` rows, used to estimate ``mu``). Systems without the
    preconditioner are the identity."""

    def __init__(self, geometry, mu: jax.Array, unit: bool = False) -> None:
        A = geometry.n_atom_rows
        system = geometry.system
        first = per_atom(geometry.first_atom, system)
        self.columns = jnp.clip(first[:, None] + geometry.precon_neighbors, 0, A - 1)
        kind = per_atom(geometry.precon_kind, system)
        mu_row = jnp.where(kind == EXP, per_atom(mu, system), 1.0).astype(geometry.precon_weight.dtype)
        real = geometry.atom_mask
        if unit:
            self.weight = geometry.precon_weight
            self.diag = jnp.where(real, geometry.precon_diag, 1.0)
        else:
            free = ~geometry.precon_fixed
            free_partner = free[self.columns]
            self.weight = mu_row[:, None] * geometry.precon_weight * (free[:, None] & free_partner)
            self.diag = jnp.where(real & ~(geometry.precon_fixed & (kind == EXP)), mu_row * geometry.precon_diag, 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``P x`` for ``x (A, 3)``: the three columns gathered one at a time (1-D gathers fuse)."""
        coupled = jnp.stack([jnp.sum(self.weight * x[:, c][self.columns], axis=1) for c in range(3)], axis=1)
        return self.diag[:, None] * x - coupled


def solve(geometry, b: jax.Array, mu: jax.Array, systems: jax.Array, tol: float, max_iterations: int) -> jax.Array:
    """``P^-1 b`` for ``b (A, 3)``; systems outside the ``(S,)`` mask get 0. With the batch's
    dense inverses (``Geometry.precon_inverse`` wider than 0) a product, else conjugate gradients."""
    if geometry.precon_inverse.shape[1] > 0:  # (S, W, W), W > 0: dense inverses
        return _dense_solve(geometry, b, mu, systems)
    return _cg_solve(geometry, b, mu, systems, tol, max_iterations)


def _dense_solve(geometry, b: jax.Array, mu: jax.Array, systems: jax.Array) -> jax.Array:
    """``P^-1 b = (U b) / mu`` with each system's unit inverse ``U`` ``(W, W)``: the system's rows
    of ``b`` as a window from its first atom, one batched product (BLAS; the matrices are read
    once), the result picked back per row; rows without the preconditioner: ``b`` (identity)."""
    S, W = geometry.precon_inverse.shape[:2]
    A = b.shape[0]
    system = geometry.system
    row_on = geometry.rows_of(systems)[:, None]
    b = jnp.where(row_on, b, 0.0)
    window = jnp.clip(geometry.first_atom[:, None] + jnp.arange(W, dtype=geometry.first_atom.dtype)[None, :], 0, A - 1)
    b_windows = jnp.stack([b[:, c][window] for c in range(3)], axis=-1)  # (S, W, 3)
    z_windows = jnp.einsum("svw,swc->svc", geometry.precon_inverse, b_windows).reshape(S * W, 3)
    slot = jnp.clip(system, 0, S - 1)
    local = jnp.clip(jnp.arange(A, dtype=system.dtype) - per_atom(geometry.first_atom, system), 0, W - 1)
    at = slot * W + local
    z = jnp.stack([z_windows[:, c][at] for c in range(3)], axis=1)
    kind = per_atom(geometry.precon_kind, system)[:, None]
    z = jnp.where(kind == EXP, z / per_atom(mu, system)[:, None], b / geometry.precon_diag[:, None])
    return jnp.where(row_on, z, 0.0)


def _cg_solve(geometry, b: jax.Array, mu: jax.Array, systems: jax.Array, tol: float, max_iterations: int) -> jax.Array:
    """``P^-1 b`` by Jacobi-preconditioned conjugate gradients, every system to a relative
    residual ``tol`` (or ``max_iterations``)."""
    S = geometry.n_systems
    system = geometry.system
    P = Operator(geometry, mu)

    def dot(u, v):
        return per_system_dot(u, v, system, S)

    def rows(t):
        return per_atom(t, system)[:, None]

    row_on = geometry.rows_of(systems)[:, None]
    b = jnp.where(row_on, b, 0.0)
    inv_diag = (1.0 / P.diag)[:, None]
    x = b * inv_diag
    r = b - P(x)
    z = r * inv_diag
    rz = dot(r, z)
    limit = tol * jnp.sqrt(dot(b, b))

    def running(r):
        return systems & (jnp.sqrt(dot(r, r)) > limit)

    def cond(carry):
        _, r, _, _, k = carry
        return jnp.any(running(r)) & (k < max_iterations)

    def body(carry):
        x, r, p, rz, k = carry
        on = running(r)
        Ap = P(p)
        pAp = dot(p, Ap)
        alpha = jnp.where(on, rz / jnp.where(on, pAp, 1.0), 0.0)
        x = x + rows(alpha) * p
        r = r - rows(alpha) * Ap
        z = r * inv_diag
        rz_new = dot(r, z)
        beta = jnp.where(on, rz_new / jnp.where(on, rz, 1.0), 0.0)
        p = jnp.where(rows(on) > 0, z + rows(beta) * p, p)
        return x, r, p, jnp.where(on, rz_new, rz), k + 1

    x, *_ = jax.lax.while_loop(cond, body, (x, r, z, rz, jnp.asarray(0)))
    return jnp.where(row_on, x, 0.0)


def sine_perturbation(geometry, positions: jax.Array) -> jax.Array:
    """ASE's ``estimate_mu`` displacement ``(A, 3)``, Å: ``v = 0.01 r_NN sin(x / L_x)`` (and y, z),
    ``L`` the extent of the system's atoms along each axis (a zero extent gives 0)."""
    S = geometry.n_systems
    system = geometry.system
    real = geometry.atom_mask[:, None]
    high = segment_max(jnp.where(real, positions, -jnp.inf), system, S)
    low = segment_min(jnp.where(real, positions, jnp.inf), system, S)
    extent = per_atom(high - low, system)
    safe = jnp.where(extent == 0, 1.0, extent)
    h = per_atom(0.01 * geometry.precon_r_nn, system)[:, None]
    return jnp.where(real & (extent != 0), h * jnp.sin(positions / safe), 0.0)


def mu_from_perturbation(geometry, v: jax.Array, gradient: jax.Array, gradient_moved: jax.Array) -> jax.Array:
    """``(S,)`` ASE's ``mu = [(g(p + v) - g(p)) . v] / [P1 v . v]`` (``P1``: the matrix at
    ``mu = 1``), at least 1; gradients ``(A, 3)`` after constraints, eV/Å."""
    S = geometry.n_systems
    lhs = per_system_dot(gradient_moved - gradient, v, geometry.system, S)
    rhs = per_system_dot(Operator(geometry, jnp.ones(S, v.dtype), unit=True)(v), v, geometry.system, S)
    return jnp.maximum(lhs / jnp.where(rhs != 0, rhs, 1.0), 1.0)


def per_system_count(geometry) -> jax.Array:
    """``(S,)`` atoms per system as a float (ASE's ``len(atoms)``)."""
    return segment_sum(geometry.atom_mask.astype(geometry.positions.dtype), geometry.system, geometry.n_systems)

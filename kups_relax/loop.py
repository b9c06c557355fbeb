"""The jitted relaxation loop: many steps of every system per device call.

One step, for the systems still running (the others do not move and keep
their state bit for bit):

1. ``grads = -forces`` (forces after constraints), through the optimizer transform;
2. ``positions += updates``;
3. neighbor list update (Verlet skin; overflow is a flag, see below);
4. energy, forces and stress at the new positions;
5. ``steps += 1``; convergence with ASE's criterion (largest per-atom force norm
   ``< fmax``), the step limit, and divergence (non-finite energy or forces: the
   system stops at its last finite geometry).

So a system's ``steps`` counts like ASE's ``nsteps``, and the geometry it ends
with is the one whose forces met ``fmax``. If the neighbor list overflows its
capacity, the step is not taken (the whole state is returned as it was before
the step, with ``overflow`` set); the host grows the capacity and calls again.

Constraints (:mod:`kups_relax.constraints`) adjust the forces before the optimizer
and its step after it, as ASE's ``adjust_forces``/``adjust_positions`` do.

Variable-cell programs (``cell_params`` given, :mod:`kups_relax.filters`) run the
optimizer on ASE's filter rows ``(A + 3 S, 3)``, move cells with the atoms, compute
the stress at every step and converge on the filter's forces. Positions-only
programs (``cell_params=None``) carry no cell state and compute no stress.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import filters
from . import neighbors as nl
from .batch import Geometry
from . import symmetry
from .constraints import adjust_forces, adjust_step
from .executables import cached_jit
from .evaluate import evaluate
from .filters import CellParams
from .segments import segment_max, select_rows
from .transforms.base import merge_rewritten, partition_rewritten

class Status(enum.IntEnum):
    """Where a system stands (``LoopState.status``, one per system slot).

    ``RUNNING`` systems take steps; the others keep their state bit for bit. Both ways of
    failing are reported to users as ``"diverged"`` (:attr:`label`); the code says which
    (non-finite energy or forces, or an atom further than ``Targets.max_displacement`` from its
    start). ``EMPTY`` is a slot without a structure.
    """

    RUNNING = 0
    CONVERGED = 1
    UNCONVERGED = 2
    DIVERGED = 3
    EMPTY = 4
    BLEW_APART = 5
    LINE_SEARCH_FAILED = 6

    @property
    def label(self) -> str:
        """The name users see (``RelaxResult.status``): ``BLEW_APART`` is ``"diverged"``,
        ``LINE_SEARCH_FAILED`` (a line search failed right after a history reset, where ASE's
        ``PreconLBFGS`` raises) ``"unconverged"``."""
        if self is Status.BLEW_APART:
            return "diverged"
        if self is Status.LINE_SEARCH_FAILED:
            return "unconverged"
        return self.name.lower()


#: ``BLEW_APART`` also stands for a cell step ASE's ``FixSymmetry.adjust_cell`` refuses (a
#: deformation gradient step over :data:`kups_relax.symmetry.MAX_CELL_STEP`): the step is not
#: taken and the system stops where it was; :func:`kups_relax.scheduler.stop_reason` tells them apart.


class Targets(NamedTuple):
    """Per-system stopping rules.

    Attributes:
        fmax: ``(S,)`` convergence threshold, eV/Å.
        max_steps: ``(S,)`` step limit.
        max_displacement: ``(S,)`` Å, or ``None``: a step that would take any atom further
            than this from where the system started is not taken and the system stops as
            diverged (:attr:`Status.BLEW_APART`); ``inf`` switches it off for that system.
    """

    fmax: jax.Array
    max_steps: jax.Array
    max_displacement: jax.Array | None = None


class LoopState(NamedTuple):
    """Everything the loop carries between steps and between chunks.

    Attributes:
        positions: ``(A, 3)`` Å.
        opt_state: the optimizer transform's state.
        neighbors: the :class:`~kups_relax.neighbors.NeighborList`.
        energy: ``(S,)`` eV at ``positions``.
        forces: ``(A, 3)`` eV/Å at ``positions`` (raw, before constraints).
        stress: ``(S, 3, 3)`` eV/Å³ (a positions-only relaxation computes it at step 0 and once
            more when a system stops, at the end of that chunk).
        fmax: ``(S,)`` largest per-atom force norm after constraints, eV/Å (variable cell:
            the largest row norm of the filter's forces, cell rows included, as ASE's).
        steps: ``(S,)`` steps taken (ASE's ``nsteps``).
        status: ``(S,)`` int32, a :class:`Status`.
        cell: ``(S, 3, 3)`` current cells, Å (variable cell only, else ``None``).
        cell_dof: ``(S, 3, 3)`` the filter's cell rows (variable cell only).
        nl_cell: ``(S, 3, 3)`` the cell at which each system's pairs were last found
            (variable cell only).
        evaluations: ``(S,)`` energy-and-forces evaluations of each system so far (the input
            geometry's included; a line search evaluates more than once per step).
    """

    positions: jax.Array
    opt_state: Any
    neighbors: nl.NeighborList
    energy: jax.Array
    forces: jax.Array
    stress: jax.Array
    fmax: jax.Array
    steps: jax.Array
    status: jax.Array
    cell: jax.Array | None = None
    cell_dof: jax.Array | None = None
    nl_cell: jax.Array | None = None
    evaluations: jax.Array | None = None


class Frames(NamedTuple):
    """Per-step records of one chunk (row ``t`` = the ``t``-th step of the chunk).

    ``taken[t, s]`` says whether system ``s`` took step ``t``; positions and forces
    are recorded only when the loop runs with ``record=True`` (else empty), and cells
    only when it also relaxes cells (else ``None``).
    """

    taken: jax.Array  # (K, S) bool
    step: jax.Array  # (K, S) int, the system's step number after step t
    energy: jax.Array  # (K, S)
    fmax: jax.Array  # (K, S)
    positions: jax.Array  # (K, A, 3) or (0, A, 3)
    forces: jax.Array  # (K, A, 3) or (0, A, 3)
    cell: jax.Array | None = None  # (K, S, 3, 3) or (0, S, 3, 3); None for positions-only runs


def _max_force(forces: jax.Array, geometry: Geometry) -> jax.Array:
    norms = jnp.sqrt(jnp.sum(forces * forces, axis=-1))
    fmax = segment_max(norms, geometry.system, geometry.n_systems)
    return jnp.where(geometry.n_atoms > 0, fmax, 0.0)


def _finite(energy: jax.Array, forces: jax.Array, geometry: Geometry) -> jax.Array:
    bad_atom = ~jnp.all(jnp.isfinite(forces), axis=-1)
    bad = segment_max(bad_atom.astype(jnp.int32), geometry.system, geometry.n_systems) > 0
    return jnp.isfinite(energy) & ~bad


def _within_reach(positions: jax.Array, geometry: Geometry, targets: Targets,
                  cell: jax.Array | None = None, variable: jax.Array | None = None) -> jax.Array:
    """``(S,)`` True while every atom is within ``targets.max_displacement`` of its start.

    ``geometry.positions`` are the starting positions. With a moving ``cell`` the positions are
    first mapped back into the starting cell (same fractional coordinates), so that a uniform
    strain of a large cell does not count as atoms flying away; ``variable (S,)`` marks the
    systems whose cell moves (the others may have no invertible cell at all).
    """
    if targets.max_displacement is None:
        return jnp.ones(geometry.n_systems, bool)
    if cell is not None:
        eye = jnp.broadcast_to(jnp.eye(3, dtype=cell.dtype), cell.shape)
        back = jnp.linalg.solve(select_rows(variable, cell, eye), select_rows(variable, geometry.cell, eye))
        positions = filters.row_matmul(positions, back, geometry.system)  # x @ inv(cell) @ cell0
    distance = jnp.sqrt(jnp.sum((positions - geometry.positions) ** 2, axis=-1))
    farthest = segment_max(jnp.where(geometry.atom_mask, distance, 0.0), geometry.system, geometry.n_systems)
    return farthest <= targets.max_displacement


def _status_after_step(status, active, finite, within, fmax_new, steps, targets: Targets) -> jax.Array:
    """``(S,)`` status after a step: a failed step (non-finite, or out of reach) stops the system
    where it was; a step taken may converge or reach the step limit (the first that holds wins)."""
    moved = active & finite & within
    return jnp.select([active & ~finite, active & ~within, moved & (fmax_new < targets.fmax),
                       moved & (steps >= targets.max_steps)],
                      [Status.DIVERGED, Status.BLEW_APART, Status.CONVERGED, Status.UNCONVERGED], status)


def system_cutoffs(potential, geometry: Geometry, cutoff: float) -> jax.Array:
    """``(S,)`` every system's interaction range, Å: the potential's ``system_cutoffs`` when it
    has one (e.g. EMT with ASAP's cutoff, from the elements present), else ``cutoff`` (the
    potential's, read on the host: under jit a potential's parameters are tracers)."""
    per_system = getattr(potential, "system_cutoffs", None)
    if per_system is None:
        return jnp.full(geometry.n_systems, cutoff, geometry.positions.dtype)
    return jnp.minimum(per_system(geometry), cutoff)


def _step_zero(fmax: jax.Array, ev, geometry: Geometry, targets: Targets) -> jax.Array:
    """Status of freshly started systems (ASE's step 0: converged, or running)."""
    finite = _finite(ev.energy, ev.forces, geometry)
    return jnp.select([geometry.n_atoms == 0, ~finite, fmax < targets.fmax, targets.max_steps <= 0],
                      [Status.EMPTY, Status.DIVERGED, Status.CONVERGED, Status.UNCONVERGED], Status.RUNNING)


def _index(geometry: Geometry, cell_params: CellParams | None):
    """The optimizer's row index: atoms, then (variable cell) 3 cell rows per system."""
    from .transforms import SystemIndex

    S = geometry.n_systems
    A = geometry.n_atom_rows
    if cell_params is None:
        return SystemIndex(geometry.system, S, aligned=A)
    cell_rows = jnp.repeat(jnp.arange(S, dtype=geometry.system.dtype), 3)
    return SystemIndex(jnp.concatenate([geometry.system, cell_rows]), S, aligned=A)


def _filter_forces(forces, stress, cell, dof, geometry: Geometry, cell_params: CellParams):
    """The filter's forces ``(A + 3 S, 3)`` (atoms after constraints, times ``F``; cell rows) and ``F``."""
    F = filters.deformation_gradient(cell, cell_params)
    atom_rows = filters.atom_forces(adjust_forces(forces, geometry, cell), F, geometry.system)
    stress = symmetry.symmetrize_rank2(stress, geometry, cell, jnp.ones(geometry.n_systems, bool))
    cell_rows = filters.cell_forces(stress, cell, dof, cell_params)
    return jnp.concatenate([atom_rows, cell_rows.reshape(-1, 3)]), F


def _filter_fmax(generalized: jax.Array, geometry: Geometry) -> jax.Array:
    A, S = geometry.n_atom_rows, geometry.n_systems
    atoms = _max_force(generalized[:A], geometry)
    cell = jnp.max(jnp.linalg.norm(generalized[A:].reshape(S, 3, 3), axis=-1), axis=-1)
    return jnp.maximum(atoms, cell)


def _wrap_cells(cell: jax.Array, geometry: Geometry) -> jax.Array:
    """``wrap_cell`` for the current cells (systems without a periodic direction keep theirs)."""
    return select_rows(jnp.any(geometry.pbc, axis=-1), filters.complete_cell(cell, geometry.pbc), geometry.wrap_cell)


@cached_jit
def current_geometry(state: LoopState, geometry: Geometry) -> Geometry:
    """``geometry`` at the state's positions (and, variable cell, its cells)."""
    if state.cell is None:
        return geometry.replace(positions=state.positions)
    return geometry.replace(positions=state.positions, cell=state.cell, wrap_cell=_wrap_cells(state.cell, geometry))


def with_neighbors(state: LoopState, neighbors: nl.NeighborList) -> LoopState:
    """``state`` with a list fully rebuilt at its current geometry (after the host grew it)."""
    return state._replace(neighbors=neighbors, nl_cell=state.cell)


@cached_jit(static_argnames=("optimizer",))
def initial_state(geometry: Geometry, potential, neighbors: nl.NeighborList, targets: Targets,
                  optimizer, cell_params: CellParams | None = None) -> LoopState:
    """Evaluate the starting geometry and set every system's status (ASE's step 0)."""
    variable = cell_params is not None
    # the stress of every system, also for those that stop at step 0 (positions-only runs keep
    # the stress of where each system stopped, see run_chunk)
    ev = evaluate(potential, geometry, neighbors, compute_stress=True)
    index = _index(geometry, cell_params)
    if not variable:
        fmax = _max_force(adjust_forces(ev.forces, geometry), geometry)
        params, extra = geometry.positions, {}
    else:
        dof = filters.initial_dof(cell_params)
        generalized, _ = _filter_forces(ev.forces, ev.stress, geometry.cell, dof, geometry, cell_params)
        fmax = _filter_fmax(generalized, geometry)
        params = jnp.concatenate([geometry.positions, dof.reshape(-1, 3)])
        extra = dict(cell=geometry.cell, cell_dof=dof, nl_cell=geometry.cell)
    status = _step_zero(fmax, ev, geometry, targets)
    opt_state = optimizer.init(params, index)
    evaluations = (geometry.n_atoms > 0).astype(jnp.int32)
    if _is_line_search(optimizer):
        opt_state, neighbors, more = _estimate_mu(optimizer, opt_state, geometry, potential, neighbors, ev.forces,
                                                  status == Status.RUNNING)
        evaluations = evaluations + more
    return LoopState(
        positions=geometry.positions, opt_state=opt_state, neighbors=neighbors,
        energy=ev.energy, forces=ev.forces, stress=ev.stress, fmax=fmax,
        steps=jnp.zeros(geometry.n_systems, jnp.int32), status=status.astype(jnp.int32), **extra,
        evaluations=evaluations,
    )


def _is_line_search(optimizer) -> bool:
    return bool(getattr(optimizer, "line_search", False))


def _estimate_mu(optimizer, opt_state, geometry: Geometry, potential, neighbors: nl.NeighborList, forces: jax.Array,
                 systems: jax.Array):
    """ASE's ``Exp.estimate_mu`` for the systems in ``systems (S,)`` that have the Exp
    preconditioner and no ``mu`` given: one evaluation at a sine-perturbed geometry each.
    ``geometry`` holds the systems' positions. Returns the state, the neighbor list (updated for
    the perturbed geometry) and ``(S,)`` the evaluations made."""
    from . import precon

    estimate = systems & (geometry.precon_kind == precon.EXP)
    if optimizer.mu is not None:  # given: nothing to estimate, no evaluation
        return opt_state, neighbors, jnp.zeros_like(estimate, jnp.int32)

    def perturbed():
        v = precon.sine_perturbation(geometry, geometry.positions)
        v = jnp.where(geometry.rows_of(estimate)[:, None], v, 0.0)
        moved = geometry.replace(positions=geometry.positions + adjust_step(v, geometry))
        updated = nl.update(neighbors, moved)
        ev = evaluate(potential, moved, updated, compute_stress=False)
        mu = precon.mu_from_perturbation(geometry, v, -adjust_forces(forces, geometry),
                                         -adjust_forces(ev.forces, geometry))
        return optimizer.with_mu(opt_state, mu, estimate), updated

    # a refill of systems without the Exp preconditioner (or converged at step 0) evaluates nothing more
    opt_state, neighbors = jax.lax.cond(jnp.any(estimate), perturbed, lambda: (opt_state, neighbors))
    return opt_state, neighbors, estimate.astype(jnp.int32)


@cached_jit(static_argnames=("optimizer",))
def admit(state: LoopState, geometry: Geometry, potential, targets: Targets, admitted: jax.Array,
          optimizer, cell_params: CellParams | None = None) -> LoopState:
    """Start new structures in the slots marked in ``admitted (S,)`` (in-flight refill).

    ``geometry`` (and ``cell_params``) already hold the new structures in those slots (or no
    atoms, for a slot left empty); every other slot keeps its state bit for bit. The optimizer
    history of the admitted slots is reset, the neighbor list rebuilt (check
    ``neighbors.overflow``), and the new structures evaluated as at step 0.
    """
    variable = cell_params is not None
    rows = geometry.rows_of(admitted)
    positions = select_rows(rows, geometry.positions, state.positions)
    if variable:
        cell = select_rows(admitted, geometry.cell, state.cell)
        dof = select_rows(admitted, filters.initial_dof(cell_params), state.cell_dof)
        wrap = select_rows(admitted, geometry.wrap_cell, _wrap_cells(cell, geometry))
        current = geometry.replace(positions=positions, cell=cell, wrap_cell=wrap)
    else:
        current = geometry.replace(positions=positions)
    cutoffs = jnp.where(admitted, system_cutoffs(potential, current, state.neighbors.cutoff), state.neighbors.cutoffs)
    neighbors, rebuilt = nl.rebuild_tracked(state.neighbors, current, admitted, cutoffs)
    neighbors = nl.clear_padding(neighbors, current)
    ev = evaluate(potential, current, neighbors, compute_stress=True)
    if variable:
        generalized, _ = _filter_forces(ev.forces, ev.stress, cell, dof, geometry, cell_params)
        fmax = _filter_fmax(generalized, geometry)
        extra = dict(cell=cell, cell_dof=dof, nl_cell=select_rows(rebuilt, cell, state.nl_cell),
                     stress=select_rows(admitted, ev.stress, state.stress))
    else:
        fmax = _max_force(adjust_forces(ev.forces, geometry), geometry)
        extra = dict(stress=select_rows(admitted, ev.stress, state.stress))
    status = _step_zero(fmax, ev, geometry, targets)
    # the new occupants start afresh (their rows are the slot's rows: the index does not change)
    opt_state = optimizer.reset(state.opt_state, admitted, _index(geometry, cell_params))
    evaluations = jnp.where(admitted, (geometry.n_atoms > 0).astype(jnp.int32), state.evaluations)
    if _is_line_search(optimizer):
        opt_state, neighbors, more = _estimate_mu(optimizer, opt_state, current, potential, neighbors, ev.forces,
                                                  admitted & (status == Status.RUNNING))
        evaluations = evaluations + more
    return LoopState(
        positions=positions, opt_state=opt_state, neighbors=neighbors,
        energy=jnp.where(admitted, ev.energy, state.energy),
        forces=select_rows(rows, ev.forces, state.forces),
        fmax=jnp.where(admitted, fmax, state.fmax),
        steps=jnp.where(admitted, 0, state.steps),
        status=jnp.where(admitted, status, state.status).astype(jnp.int32),
        evaluations=evaluations,
        **extra,
    )


@cached_jit(static_argnames=("optimizer",))
def compact(state: LoopState, rows: jax.Array, systems: jax.Array, optimizer) -> LoopState:
    """The state of a smaller batch that keeps some systems (no-idle-slots compaction).

    ``rows (A',)``: the old atom row of every new row (``A``, one past the old last row, for new
    padding rows); ``systems (S',)``: the old slot of every new slot (``S`` for an empty slot).
    Whole systems move: their atoms keep their relative order, their optimizer state moves with
    them (:meth:`Transform.take`), and their neighbor-matrix columns are carried over with the
    atom indices renumbered, so nothing is rebuilt or re-evaluated and the systems continue
    exactly where they were (bit for bit, as if nothing had happened).
    """
    A, S = state.positions.shape[0], state.energy.shape[0]
    A_new, S_new = rows.shape[0], systems.shape[0]
    real_row = rows < A
    real_system = systems < S

    def by_row(x):
        return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)

    def by_system(x, fill=0):
        taken = jnp.take(x, systems, axis=0, mode="fill", fill_value=0)
        return jnp.where(real_system.reshape((-1,) + (1,) * (x.ndim - 1)), taken, fill)

    # old atom index -> new atom index (the dummy atom A -> the new dummy A_new)
    renumber = jnp.full(A + 1, A_new, jnp.int32).at[jnp.where(real_row, rows, A)].set(
        jnp.arange(A_new, dtype=jnp.int32), mode="drop").at[A].set(A_new)
    old = state.neighbors
    columns = jnp.take(old.neighbors, rows, axis=1, mode="fill", fill_value=A)
    neighbors = dataclasses.replace(
        old, neighbors=renumber[columns],
        shifts=jnp.take(old.shifts, rows, axis=1, mode="fill", fill_value=0),
        cutoffs=by_system(old.cutoffs), reference_positions=by_row(old.reference_positions),
        overflow=jnp.asarray(False))
    eye = jnp.eye(3, dtype=state.positions.dtype)
    extra = {}
    opt_rows = rows
    if state.cell is not None:
        # the optimizer's rows are the atoms, then 3 cell rows per system (see _index)
        n_opt = A + 3 * S
        cell_rows = jnp.where(real_system[:, None], A + 3 * systems[:, None] + jnp.arange(3)[None, :], n_opt)
        opt_rows = jnp.concatenate([jnp.where(real_row, rows, n_opt), cell_rows.reshape(-1)])
        extra = dict(cell=by_system(state.cell, eye), cell_dof=by_system(state.cell_dof),
                     nl_cell=by_system(state.nl_cell, eye))
    return LoopState(
        positions=by_row(state.positions), opt_state=optimizer.take(state.opt_state, opt_rows, systems),
        neighbors=neighbors, energy=by_system(state.energy), forces=by_row(state.forces),
        stress=by_system(state.stress), fmax=by_system(state.fmax), steps=by_system(state.steps),
        status=by_system(state.status, Status.EMPTY).astype(jnp.int32), evaluations=by_system(state.evaluations),
        **extra)


def _step(state: LoopState, geometry: Geometry, potential, targets: Targets, optimizer):
    active = state.status == Status.RUNNING
    row_active = geometry.rows_of(active)
    forces_c = adjust_forces(state.forces, geometry)
    updates, opt_state = optimizer.update(-forces_c, state.opt_state, state.positions, active,
                                          _index(geometry, None))
    updates = jnp.where(row_active[:, None], adjust_step(updates, geometry), 0.0)
    trial = geometry.replace(positions=state.positions + updates)

    neighbors = nl.update(state.neighbors, trial)
    ev = evaluate(potential, trial, neighbors, compute_stress=False)
    within = _within_reach(trial.positions, geometry, targets)
    fmax_new = _max_force(adjust_forces(ev.forces, geometry), geometry)
    return _accept(state, geometry, targets, active, trial.positions, ev, fmax_new, within, opt_state, neighbors)


def _accept(state: LoopState, geometry: Geometry, targets: Targets, active: jax.Array, positions: jax.Array, ev,
            fmax_new: jax.Array, within: jax.Array, opt_state, neighbors: nl.NeighborList,
            cell: dict[str, jax.Array] | None = None) -> tuple[LoopState, jax.Array]:
    """The state after the ``active (S,)`` systems stepped to ``positions (A, 3)``.

    ``ev`` holds the energy, forces and stress there, ``fmax_new (S,)`` the largest force (after
    constraints or through the filter), ``within (S,)`` whether every atom stayed within reach.
    A system whose step is taken (finite and within reach) moves; the others keep their state;
    the status follows from the step. ``cell`` (variable cell): the stepped ``cell`` and
    ``cell_dof`` (kept like the positions) and ``nl_cell`` (already the new value). Returns the
    state -- the old one if the neighbor list overflowed -- and ``(S,)`` which systems moved.
    """
    finite = _finite(ev.energy, ev.forces, geometry)
    moved = active & finite & within
    row_moved = geometry.rows_of(moved)
    steps = state.steps + moved.astype(jnp.int32)
    status = _status_after_step(state.status, active, finite, within, fmax_new, steps, targets)
    extra = {}
    if cell is not None:
        extra = dict(cell=select_rows(moved, cell["cell"], state.cell),
                     cell_dof=select_rows(moved, cell["cell_dof"], state.cell_dof), nl_cell=cell["nl_cell"])
    new = LoopState(
        positions=select_rows(row_moved, positions, state.positions),
        opt_state=opt_state,
        neighbors=neighbors,
        energy=select_rows(moved, ev.energy, state.energy),
        forces=select_rows(row_moved, ev.forces, state.forces),
        stress=select_rows(moved, ev.stress, state.stress),
        fmax=select_rows(moved, fmax_new, state.fmax),
        steps=steps,
        status=status.astype(jnp.int32),
        evaluations=state.evaluations + active.astype(jnp.int32),
        **extra,
    )
    return _keep_unless_overflow(new, state, neighbors), moved & ~neighbors.overflow


def _keep_unless_overflow(new: LoopState, state: LoopState, neighbors: nl.NeighborList) -> LoopState:
    # an overflowing neighbor list means wrong forces: keep the old state, flag it for the host.
    # Either branch of the cond copies what it returns, so the optimizer fields a redo rewrites
    # identically (the L-BFGS history: 2 x memory x atoms x 3 floats, a large share of a step)
    # stay out of it and are kept from the rejected step (transforms.base docstring)
    overflow = neighbors.overflow
    opt_rest, opt_rewritten = partition_rewritten(new.opt_state)
    old_rest, _ = partition_rewritten(state.opt_state)
    new = new._replace(neighbors=neighbors, opt_state=opt_rest)
    out = jax.lax.cond(overflow, lambda: state._replace(opt_state=old_rest), lambda: new)
    return out._replace(neighbors=dataclasses.replace(out.neighbors, overflow=overflow),
                        opt_state=merge_rewritten(out.opt_state, opt_rewritten))


def _step_line_search(state: LoopState, geometry: Geometry, potential, targets: Targets, optimizer):
    """One iteration of a line-search optimizer (:class:`~kups_relax.transforms.precon_lbfgs.PreconLBFGS`):
    every running system evaluates the trial point of its own line search; a system whose
    trial is accepted takes a step, one that must shrink its step length tries again next
    iteration (positions-only)."""
    active = state.status == Status.RUNNING
    index = _index(geometry, None)
    grads = -adjust_forces(state.forces, geometry)
    proposal, opt_state = optimizer.propose(grads, state.energy, state.opt_state, state.positions, active, index,
                                            geometry)
    row_try = geometry.rows_of(proposal.evaluate)
    trial_positions = state.positions + jnp.where(row_try[:, None], adjust_step(proposal.step, geometry), 0.0)
    trial = geometry.replace(positions=trial_positions)
    neighbors = nl.update(state.neighbors, trial)
    ev = evaluate(potential, trial, neighbors, compute_stress=False)
    finite = _finite(ev.energy, ev.forces, geometry)
    within = _within_reach(trial_positions, geometry, targets)
    verdict, opt_state = optimizer.judge(opt_state, proposal, state.energy, ev.energy, finite & within)
    tried = proposal.evaluate
    moved = verdict.accept
    row_moved = geometry.rows_of(moved)
    fmax_new = _max_force(adjust_forces(ev.forces, geometry), geometry)
    counted = moved | verdict.reset | proposal.reset  # ASE's nsteps: a failed line search is a step too
    steps = state.steps + counted.astype(jnp.int32)
    status = jnp.select(
        [tried & ~finite, tried & ~within, verdict.failed | proposal.failed, moved & (fmax_new < targets.fmax),
         counted & (steps >= targets.max_steps)],
        [Status.DIVERGED, Status.BLEW_APART, Status.LINE_SEARCH_FAILED, Status.CONVERGED, Status.UNCONVERGED],
        state.status)
    new = state._replace(
        positions=select_rows(row_moved, trial_positions, state.positions),
        opt_state=opt_state,
        neighbors=neighbors,
        energy=select_rows(moved, ev.energy, state.energy),
        forces=select_rows(row_moved, ev.forces, state.forces),
        fmax=select_rows(moved, fmax_new, state.fmax),
        steps=steps,
        status=status.astype(jnp.int32),
        evaluations=state.evaluations + tried.astype(jnp.int32),
    )
    return _keep_unless_overflow(new, state, neighbors), counted & ~neighbors.overflow


def _step_cell(state: LoopState, geometry: Geometry, potential, targets: Targets, optimizer,
               cell_params: CellParams):
    """One step on ASE's filter rows: atoms in the undeformed cell and the cell rows."""
    S, A = geometry.n_systems, geometry.n_atom_rows
    cp = cell_params
    active = state.status == Status.RUNNING
    row_active = geometry.rows_of(active)
    moving = active & cp.variable  # systems whose cell moves this step
    row_moving = geometry.rows_of(moving)

    generalized, F = _filter_forces(state.forces, state.stress, state.cell, state.cell_dof, geometry, cp)
    z = jnp.where(geometry.rows_of(cp.variable)[:, None],
                  filters.to_reference(state.positions, F, geometry.system), state.positions)
    params = jnp.concatenate([z, state.cell_dof.reshape(-1, 3)])
    updates, opt_state = optimizer.update(-generalized, state.opt_state, params, active, _index(geometry, cp))
    gen_active = jnp.concatenate([row_active, jnp.repeat(moving, 3)])
    updates = jnp.where(gen_active[:, None], updates, 0.0)

    # the cell from the new cell rows; the atoms scaled with it, then moved to z' (I + D)
    # relative to that, the move adjusted by the constraints (ASE's set_cell + set_positions)
    cell_new, stretch, dof_read = filters.new_cell(state.cell_dof + updates[A:].reshape(S, 3, 3), cp)
    eye = jnp.broadcast_to(jnp.eye(3, dtype=cell_new.dtype), cell_new.shape)
    # FixSymmetry (ASE's set_cell -> adjust_cell): the cell step symmetrized; the filter reads its
    # cell rows back from that cell, and the atoms' proposed move keeps the unsymmetrized stretch
    cell_new, cell_ok = symmetry.adjust_cell(state.cell, cell_new, geometry, moving)
    dof_read = select_rows(moving & (geometry.sym_ops > 0) & geometry.sym_cell,
                           filters.read_cell_dof(cell_new, cp), dof_read)
    cell_new = select_rows(moving, cell_new, state.cell)
    dof_read = select_rows(moving, dof_read, state.cell_dof)
    scale = select_rows(moving, jnp.linalg.solve(select_rows(moving, state.cell, eye), cell_new), eye)
    x_scaled = filters.row_matmul(state.positions, scale, geometry.system)
    x_proposed = filters.row_matmul(z + updates[:A], stretch, geometry.system)
    base = jnp.where(row_moving[:, None], x_scaled, state.positions)
    step = jnp.where(row_moving[:, None], x_proposed - x_scaled, updates[:A])
    positions = base + jnp.where(row_active[:, None], adjust_step(step, geometry, cell_new), 0.0)
    trial = geometry.replace(positions=positions, cell=cell_new, wrap_cell=_wrap_cells(cell_new, geometry))

    flagged = filters.neighbor_strain_exceeded(
        positions, state.neighbors.reference_positions, cell_new, state.nl_cell, cp.variable,
        geometry.system, S, state.neighbors.cutoff, state.neighbors.skin)
    neighbors, rebuilt = jax.lax.cond(
        jnp.any(flagged),
        lambda: nl.rebuild_tracked(state.neighbors, trial, flagged),
        lambda: (state.neighbors, jnp.zeros_like(flagged)))
    ev = evaluate(potential, trial, neighbors, compute_stress=True)
    within = _within_reach(positions, geometry, targets, cell_new, cp.variable)
    generalized_new, _ = _filter_forces(ev.forces, ev.stress, cell_new, dof_read, geometry, cp)
    # a cell step FixSymmetry refuses (ASE raises) stops the system where it was
    within = within & cell_ok
    fmax_new = _filter_fmax(generalized_new, geometry)
    return _accept(state, geometry, targets, active, positions, ev, fmax_new, within, opt_state, neighbors,
                   cell=dict(cell=cell_new, cell_dof=dof_read, nl_cell=select_rows(rebuilt, cell_new, state.nl_cell)))


@cached_jit(static_argnames=("optimizer", "n_steps", "record"))
def run_chunk(state: LoopState, geometry: Geometry, potential, targets: Targets, *, optimizer,
              n_steps: int, record: bool = False, stop_after: jax.Array | int = 2**30,
              cell_params: CellParams | None = None) -> tuple[LoopState, Frames]:
    """Run up to ``n_steps`` steps (variable cell when ``cell_params`` is given; ``geometry``
    then holds the input cells, the state the current ones).

    Stops early when every system has stopped, when the neighbor list overflows, or when
    ``stop_after`` systems have stopped during this chunk (so the host can refill their slots).
    """
    S, A = geometry.n_systems, geometry.n_atom_rows
    dtype = state.positions.dtype
    K_rec = n_steps if record else 0
    frames = Frames(
        taken=jnp.zeros((n_steps, S), bool),
        step=jnp.zeros((n_steps, S), jnp.int32),
        energy=jnp.zeros((n_steps, S), dtype),
        fmax=jnp.zeros((n_steps, S), dtype),
        positions=jnp.zeros((K_rec, A, 3), dtype),
        forces=jnp.zeros((K_rec, A, 3), dtype),
        cell=None if cell_params is None else jnp.zeros((K_rec, S, 3, 3), dtype),
    )

    running_at_start = state.status == Status.RUNNING

    def cond(carry):
        st, _, t = carry
        stopped = jnp.sum(running_at_start & (st.status != Status.RUNNING))
        return (t < n_steps) & jnp.any(st.status == Status.RUNNING) & ~st.neighbors.overflow & (stopped < stop_after)

    def body(carry):
        st, fr, t = carry
        if _is_line_search(optimizer):
            st, moved = _step_line_search(st, geometry, potential, targets, optimizer)
        elif cell_params is None:
            st, moved = _step(st, geometry, potential, targets, optimizer)
        else:
            st, moved = _step_cell(st, geometry, potential, targets, optimizer, cell_params)
        fr = fr._replace(
            taken=fr.taken.at[t].set(moved),
            step=fr.step.at[t].set(st.steps),
            energy=fr.energy.at[t].set(st.energy),
            fmax=fr.fmax.at[t].set(st.fmax),
        )
        if record:
            fr = fr._replace(positions=fr.positions.at[t].set(st.positions),
                             forces=fr.forces.at[t].set(st.forces))
            if cell_params is not None:
                fr = fr._replace(cell=fr.cell.at[t].set(st.cell))
        return st, fr, t + 1

    state = state._replace(neighbors=dataclasses.replace(state.neighbors, overflow=jnp.asarray(False)))
    state, frames, _ = jax.lax.while_loop(cond, body, (state, frames, jnp.asarray(0)))
    if cell_params is None:
        # positions-only steps compute no stress: evaluate it once for the systems that stopped
        stopped = running_at_start & (state.status != Status.RUNNING)

        def with_stress():
            ev = evaluate(potential, geometry.replace(positions=state.positions), state.neighbors, compute_stress=True)
            return state._replace(stress=select_rows(stopped, ev.stress, state.stress))

        state = jax.lax.cond(jnp.any(stopped) & ~state.neighbors.overflow, with_stress, lambda: state)
    return state, frames

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import neighbors as nl
from .batch import Geometry
from .evaluate import evaluate
from .segments import segment_max

RUNNING, CONVERGED, UNCONVERGED, DIVERGED, EMPTY = 0, 1, 2, 3, 4
STATUS_NAMES = {RUNNING: "running", CONVERGED: "converged", UNCONVERGED: "unconverged",
                DIVERGED: "diverged", EMPTY: "empty"}


class Targets(NamedTuple):
    """Per-system stopping rules: ``fmax (S,)`` eV/Å and ``max_steps (S,)``."""

    fmax: jax.Array
    max_steps: jax.Array


class LoopState(NamedTuple):
    """Everything the loop carries between steps and between chunks.

    Attributes:
        positions: ``(A, 3)`` Å.
        opt_state: the optimizer transform's state.
        neighbors: the :class:`~kups_relax.neighbors.NeighborList`.
        energy: ``(S,)`` eV at ``positions``.
        forces: ``(A, 3)`` eV/Å at ``positions`` (raw, before constraints).
        stress: ``(S, 3, 3)`` eV/Å³ (not computed during a positions-only relaxation: zeros;
            the engine evaluates the final stress once at the end).
        fmax: ``(S,)`` largest per-atom force norm after constraints, eV/Å.
        steps: ``(S,)`` steps taken (ASE's ``nsteps``).
        status: ``(S,)`` one of ``RUNNING, CONVERGED, UNCONVERGED, DIVERGED, EMPTY``.
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


class Frames(NamedTuple):
    """Per-step records of one chunk (row ``t`` = the ``t``-th step of the chunk).

    ``taken[t, s]`` says whether system ``s`` took step ``t``; positions and forces
    are recorded only when the loop runs with ``record=True`` (else empty).
    """

    taken: jax.Array  # (K, S) bool
    step: jax.Array  # (K, S) int, the system's step number after step t
    energy: jax.Array  # (K, S)
    fmax: jax.Array  # (K, S)
    positions: jax.Array  # (K, A, 3) or (0, A, 3)
    forces: jax.Array  # (K, A, 3) or (0, A, 3)


def _max_force(forces: jax.Array, geometry: Geometry) -> jax.Array:
    norms = jnp.sqrt(jnp.sum(forces * forces, axis=-1))
    fmax = segment_max(norms, geometry.system, geometry.n_systems)
    return jnp.where(geometry.n_atoms > 0, fmax, 0.0)


def _finite(energy: jax.Array, forces: jax.Array, geometry: Geometry) -> jax.Array:
    bad_atom = ~jnp.all(jnp.isfinite(forces), axis=-1)
    bad = segment_max(bad_atom.astype(jnp.int32), geometry.system, geometry.n_systems) > 0
    return jnp.isfinite(energy) & ~bad


def _rows(geometry: Geometry, systems: jax.Array) -> jax.Array:
    padded = jnp.concatenate([systems, jnp.zeros((1,), bool)])
    return padded[jnp.clip(geometry.system, 0, geometry.n_systems)]


def _step_zero(ev, geometry: Geometry, targets: Targets) -> tuple[jax.Array, jax.Array]:
    """Largest force and status of freshly started systems (ASE's step 0: converged, or running)."""
    fmax = _max_force(jnp.where(geometry.movable, ev.forces, 0.0), geometry)
    finite = _finite(ev.energy, ev.forces, geometry)
    status = jnp.where(geometry.n_atoms == 0, EMPTY,
             jnp.where(~finite, DIVERGED,
             jnp.where(fmax < targets.fmax, CONVERGED,
             jnp.where(targets.max_steps <= 0, UNCONVERGED, RUNNING))))
    return fmax, status


@functools.partial(jax.jit, static_argnames=("optimizer",))
def initial_state(geometry: Geometry, potential, neighbors: nl.NeighborList, targets: Targets,
                  optimizer) -> LoopState:
    """Evaluate the starting geometry and set every system's status (ASE's step 0)."""
    from .transforms import SystemIndex

    ev = evaluate(potential, geometry, neighbors, compute_stress=False)
    fmax, status = _step_zero(ev, geometry, targets)
    opt_state = optimizer.init(geometry.positions, SystemIndex(geometry.system, geometry.n_systems))
    return LoopState(
        positions=geometry.positions, opt_state=opt_state, neighbors=neighbors,
        energy=ev.energy, forces=ev.forces, stress=ev.stress, fmax=fmax,
        steps=jnp.zeros(geometry.n_systems, jnp.int32), status=status.astype(jnp.int32),
    )


def _reindex(opt_state, geometry: Geometry):
    from .transforms import SystemIndex

    index = SystemIndex(geometry.system, geometry.n_systems)
    return jax.tree.map(lambda x: index if isinstance(x, SystemIndex) else x, opt_state,
                        is_leaf=lambda x: isinstance(x, SystemIndex))


@functools.partial(jax.jit, static_argnames=("optimizer",))
def admit(state: LoopState, geometry: Geometry, potential, targets: Targets, admitted: jax.Array,
          optimizer) -> LoopState:
    """Start new structures in the slots marked in ``admitted (S,)`` (in-flight refill).

    ``geometry`` already holds the new structures in those slots (or no atoms, for a slot
    left empty); every other slot keeps its state bit for bit. The optimizer history of the
    admitted slots is reset, the neighbor list rebuilt (check ``neighbors.overflow``), and
    the new structures evaluated as at step 0.
    """
    rows = _rows(geometry, admitted)
    positions = jnp.where(rows[:, None], geometry.positions, state.positions)
    current = geometry.replace(positions=positions)
    neighbors = nl.rebuild(state.neighbors, current, admitted)
    ev = evaluate(potential, current, neighbors, compute_stress=False)
    fmax, status = _step_zero(ev, geometry, targets)
    # forget the old occupants' history under the old row index, then the new one's rows
    opt_state = optimizer.reset(state.opt_state, admitted)
    opt_state = optimizer.reset(_reindex(opt_state, geometry), admitted)
    return LoopState(
        positions=positions, opt_state=opt_state, neighbors=neighbors,
        energy=jnp.where(admitted, ev.energy, state.energy),
        forces=jnp.where(rows[:, None], ev.forces, state.forces),
        stress=state.stress,
        fmax=jnp.where(admitted, fmax, state.fmax),
        steps=jnp.where(admitted, 0, state.steps),
        status=jnp.where(admitted, status, state.status).astype(jnp.int32),
    )


def _step(state: LoopState, geometry: Geometry, potential, targets: Targets, optimizer):
    active = state.status == RUNNING
    row_active = _rows(geometry, active)
    forces_c = jnp.where(geometry.movable, state.forces, 0.0)
    updates, opt_state = optimizer.update(-forces_c, state.opt_state, state.positions, active)
    updates = jnp.where(geometry.movable & row_active[:, None], updates, 0.0)
    trial = geometry.replace(positions=state.positions + updates)

    neighbors = nl.update(state.neighbors, trial)
    ev = evaluate(potential, trial, neighbors, compute_stress=False)
    finite = _finite(ev.energy, ev.forces, geometry)
    moved = active & finite
    row_moved = _rows(geometry, moved)
    forces_new_c = jnp.where(geometry.movable, ev.forces, 0.0)
    fmax_new = _max_force(forces_new_c, geometry)
    steps = state.steps + moved.astype(jnp.int32)
    status = jnp.where(active & ~finite, DIVERGED,
             jnp.where(moved & (fmax_new < targets.fmax), CONVERGED,
             jnp.where(moved & (steps >= targets.max_steps), UNCONVERGED, state.status)))
    new = LoopState(
        positions=jnp.where(row_moved[:, None], trial.positions, state.positions),
        opt_state=opt_state,
        neighbors=neighbors,
        energy=jnp.where(moved, ev.energy, state.energy),
        forces=jnp.where(row_moved[:, None], ev.forces, state.forces),
        stress=jnp.where(moved[:, None, None], ev.stress, state.stress),
        fmax=jnp.where(moved, fmax_new, state.fmax),
        steps=steps,
        status=status.astype(jnp.int32),
    )
    # an overflowing neighbor list means wrong forces: keep the old state, flag it for the host
    overflow = neighbors.overflow
    keep_old = lambda n, o: jnp.where(overflow, o, n)  # noqa: E731
    out = jax.tree.map(keep_old, new._replace(neighbors=None), state._replace(neighbors=None))
    kept_neighbors = jax.tree.map(keep_old, neighbors, state.neighbors)
    out = out._replace(neighbors=dataclasses.replace(kept_neighbors, overflow=overflow))
    return out, moved & ~overflow


@functools.partial(jax.jit, static_argnames=("optimizer", "n_steps", "record"))
def run_chunk(state: LoopState, geometry: Geometry, potential, targets: Targets, *, optimizer,
              n_steps: int, record: bool = False, stop_after: jax.Array | int = 2**30
              ) -> tuple[LoopState, Frames]:
    """Run up to ``n_steps`` steps.

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
    )

    running_at_start = state.status == RUNNING

    def cond(carry):
        st, _, t = carry
        stopped = jnp.sum(running_at_start & (st.status != RUNNING))
        return (t < n_steps) & jnp.any(st.status == RUNNING) & ~st.neighbors.overflow & (stopped < stop_after)

    def body(carry):
        st, fr, t = carry
        st, moved = _step(st, geometry, potential, targets, optimizer)
        fr = fr._replace(
            taken=fr.taken.at[t].set(moved),
            step=fr.step.at[t].set(st.steps),
            energy=fr.energy.at[t].set(st.energy),
            fmax=fr.fmax.at[t].set(st.fmax),
        )
        if record:
            fr = fr._replace(positions=fr.positions.at[t].set(st.positions),
                             forces=fr.forces.at[t].set(st.forces))
        return st, fr, t + 1

    state = state._replace(neighbors=dataclasses.replace(state.neighbors, overflow=jnp.asarray(False)))
    state, frames, _ = jax.lax.while_loop(cond, body, (state, frames, jnp.asarray(0)))
    return state, frames

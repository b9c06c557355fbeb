"""Per-system L-BFGS with ASE's conventions (``ase.optimize.LBFGS``).

Nocedal's two-loop recursion (J. Nocedal, Math. Comp. 35, 773 (1980); Nocedal &
Wright, *Numerical Optimization*, Alg. 7.4) with ASE's choices: the initial
inverse Hessian is ``I / alpha`` (not rescaled by ``s.y / y.y``), the history
holds the last ``memory_size`` pairs, and a step is simply the preconditioned
direction (step-length control is :class:`~kups_relax.transforms.MaxStepSize`).

Every inner product is taken per system, the weights ``rho = 1 / (y.s)`` live
in an ``(S, memory_size)`` table and every system counts its own iterations,
so the inverse-Hessian estimate is block diagonal over systems and a system
relaxed in a batch follows the same path as when relaxed alone. A pair with
``y.s == 0`` (no curvature information) gets ``rho = 0`` and is skipped, where
ASE would divide by zero.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..segments import select_rows
from .base import SystemIndex, take_along


class ScaleByAseLbfgsState(NamedTuple):
    """State of :class:`ScaleByAseLbfgs` (``N`` rows, ``S`` systems, ``M`` memory).

    The history is one ring buffer shared by all systems and indexed by a global
    ``clock`` (one tick per ``update``): a system that is active writes its newest
    pair at slot ``clock % M``. A system is active over one unbroken run of updates
    (from its start or its last ``reset`` until it stops for good), so its pair of
    age ``a`` is always at slot ``(clock - a) % M`` -- the same slot for every
    system, which keeps the two-loop recursion free of per-row gathers.

    Attributes:
        clock: ``()`` updates so far.
        iteration: ``(S,)`` steps taken by each system (ASE's ``state.iteration``).
        params: ``(N, 3)`` parameters at each system's previous step.
        grads: ``(N, 3)`` gradients at each system's previous step.
        s_memory: ``(M, N, 3)`` ring buffer of parameter differences.
        y_memory: ``(M, N, 3)`` ring buffer of gradient differences.
        rho: ``(M, S)`` per-system weights ``1 / (y.s)`` of each ring slot.
    """

    clock: jax.Array
    iteration: jax.Array
    params: jax.Array
    grads: jax.Array
    s_memory: jax.Array
    y_memory: jax.Array
    rho: jax.Array

    # update() writes the newest pair into slot clock % M from (params, grads) - (self.params,
    # self.grads) before it reads the history: a redo of a rejected step (same clock, params and
    # grads) overwrites that slot with the same pair, so a rejected step may leave it written
    REWRITTEN_BY_REDO = ("s_memory", "y_memory", "rho")


@dataclasses.dataclass(frozen=True)
class ScaleByAseLbfgs:
    """L-BFGS direction per system (ASE flavour). Defaults are ASE's.

    Attributes:
        memory_size: number of past ``(s, y)`` pairs kept (ASE's ``memory``, 100).
        alpha: initial Hessian ``alpha * I`` in eV/Å² (ASE's ``alpha``, 70).
    """

    memory_size: int = 100
    alpha: float = 70.0

    def init(self, params: jax.Array, index: SystemIndex) -> ScaleByAseLbfgsState:
        M, S = self.memory_size, index.n_systems
        return ScaleByAseLbfgsState(
            clock=jnp.zeros((), jnp.int32),
            iteration=jnp.zeros(S, jnp.int32),
            params=jnp.zeros_like(params),
            grads=jnp.zeros_like(params),
            s_memory=jnp.zeros((M,) + params.shape, params.dtype),
            y_memory=jnp.zeros((M,) + params.shape, params.dtype),
            rho=jnp.zeros((M, S), params.dtype),
        )

    def update(self, updates, state: ScaleByAseLbfgsState, params, active, index: SystemIndex):
        """``updates`` are gradients ``(N, 3)``; returns the L-BFGS step ``-H g``."""
        S, M = index.n_systems, self.memory_size
        system = index.system
        row_system = jnp.clip(system, 0, S - 1)
        grads = updates

        # 1. store the newest pair (ASE's LBFGS.update), for systems past their first step
        it = state.iteration
        store = active & (it > 0)
        row_store = index.row_mask(store)[:, None]
        slot = state.clock % M
        s0 = params - state.params
        y0 = grads - state.grads
        ys = index.dot(y0, s0)
        rho0 = jnp.where(ys != 0, 1.0 / jnp.where(ys != 0, ys, 1.0), 0.0)
        s_memory = state.s_memory.at[slot].set(jnp.where(row_store, s0, state.s_memory[slot]))
        y_memory = state.y_memory.at[slot].set(jnp.where(row_store, y0, state.y_memory[slot]))
        rho = state.rho.at[slot].set(jnp.where(store, rho0, state.rho[slot]))

        # 2. two-loop recursion over each system's own history (age 0 = newest)
        n_pairs = jnp.where(active, jnp.minimum(it, M), 0)  # pairs stored after this update
        loopmax = jnp.max(n_pairs)

        def first_loop(age, carry):
            q, a_table = carry
            ring = (slot - age) % M
            a = jnp.where(age < n_pairs, rho[ring] * index.dot(s_memory[ring], q), 0.0)
            q = q - a[row_system][:, None] * y_memory[ring]
            return q, a_table.at[age].set(a)

        a_table = jnp.zeros((M, S), params.dtype)
        q, a_table = jax.lax.fori_loop(0, loopmax, first_loop, (grads, a_table))
        z = (1.0 / self.alpha) * q

        def second_loop(k, z):
            age = loopmax - 1 - k  # oldest first
            ring = (slot - age) % M
            b = rho[ring] * index.dot(y_memory[ring], z)
            coefficient = jnp.where(age < n_pairs, a_table[age] - b, 0.0)
            return z + s_memory[ring] * coefficient[row_system][:, None]

        z = jax.lax.fori_loop(0, loopmax, second_loop, z)

        row_active = index.row_mask(active)
        step = jnp.where(row_active[:, None], -z, 0.0)
        new_state = ScaleByAseLbfgsState(
            clock=state.clock + 1,
            iteration=jnp.where(active, it + 1, it),
            params=select_rows(row_active, params, state.params),
            grads=select_rows(row_active, grads, state.grads),
            s_memory=s_memory,
            y_memory=y_memory,
            rho=rho,
        )
        return step, new_state

    def reset(self, state: ScaleByAseLbfgsState, systems: jax.Array, index: SystemIndex) -> ScaleByAseLbfgsState:
        rows = index.row_mask(systems)
        return state._replace(
            iteration=jnp.where(systems, 0, state.iteration),
            params=select_rows(rows, 0.0, state.params),
            grads=select_rows(rows, 0.0, state.grads),
            s_memory=jnp.where(rows[None, :, None], 0.0, state.s_memory),
            y_memory=jnp.where(rows[None, :, None], 0.0, state.y_memory),
            rho=jnp.where(systems[None, :], 0.0, state.rho),
        )

    def take(self, state: ScaleByAseLbfgsState, rows: jax.Array, systems: jax.Array) -> ScaleByAseLbfgsState:
        # the ring is indexed by the global clock, which every system shares: its slots stay valid
        return state._replace(
            iteration=take_along(state.iteration, systems),
            params=take_along(state.params, rows), grads=take_along(state.grads, rows),
            s_memory=take_along(state.s_memory, rows, axis=1), y_memory=take_along(state.y_memory, rows, axis=1),
            rho=take_along(state.rho, systems, axis=1),
        )


def get_history(state: ScaleByAseLbfgsState, index: SystemIndex, system: int, memory_size: int) -> dict:
    """One system's memory in ASE's layout (the contents of an ``ase.optimize.LBFGS`` restart file).

    Returns a dict with ``iteration`` (int), ``s``, ``y`` (lists of ``(n_rows * 3,)`` arrays,
    oldest first), ``rho`` (list of floats), and ``r0``/``g0``: the parameters and gradient of
    the system's previous step, ``(n_rows, 3)``.
    """
    import numpy as np

    rows = np.flatnonzero(np.asarray(index.system) == system)
    it = int(state.iteration[system])
    n_pairs = min(max(it - 1, 0), memory_size)
    clock = int(state.clock)
    slots = [(clock - 1 - age) % memory_size for age in reversed(range(n_pairs))]  # oldest first
    s_mem, y_mem, rho = (np.asarray(x, dtype=np.float64) for x in (state.s_memory, state.y_memory, state.rho))
    return {
        "iteration": it,
        "s": [s_mem[k][rows].reshape(-1) for k in slots],
        "y": [y_mem[k][rows].reshape(-1) for k in slots],
        "rho": [float(rho[k, system]) for k in slots],
        "r0": np.asarray(state.params, dtype=np.float64)[rows],
        "g0": np.asarray(state.grads, dtype=np.float64)[rows],
    }


def set_history(state: ScaleByAseLbfgsState, index: SystemIndex, system: int, memory_size: int, iteration: int,
                s, y, rho, r0, g0) -> ScaleByAseLbfgsState:
    """Load one system's memory from ASE's layout (inverse of :func:`get_history`).

    ``s``, ``y`` and ``rho`` are oldest first; only the newest ``memory_size`` pairs are kept;
    ``r0``/``g0`` are the previous step's parameters and gradient, ``(n_rows, 3)``.
    """
    import numpy as np

    rows = np.flatnonzero(np.asarray(index.system) == system)
    pairs = list(zip(s, y, rho))[-memory_size:] if memory_size > 0 else []
    if len(pairs) > max(int(iteration) - 1, 0):
        raise ValueError(f"L-BFGS history has {len(pairs)} pairs for iteration {iteration}")
    clock = int(state.clock)
    s_mem = np.array(state.s_memory)
    y_mem = np.array(state.y_memory)
    rho_tab = np.array(state.rho)
    s_mem[:, rows] = 0.0
    y_mem[:, rows] = 0.0
    rho_tab[:, system] = 0.0
    for age, (s_i, y_i, rho_i) in enumerate(reversed(pairs)):
        k = (clock - 1 - age) % memory_size
        s_mem[k, rows] = np.reshape(s_i, (-1, 3))
        y_mem[k, rows] = np.reshape(y_i, (-1, 3))
        rho_tab[k, system] = float(rho_i)
    params = np.array(state.params)
    grads = np.array(state.grads)
    params[rows] = np.reshape(r0, (-1, 3))
    grads[rows] = np.reshape(g0, (-1, 3))
    dtype = state.params.dtype
    return state._replace(
        iteration=state.iteration.at[system].set(int(iteration)),
        params=jnp.asarray(params, dtype), grads=jnp.asarray(grads, dtype),
        s_memory=jnp.asarray(s_mem, dtype), y_memory=jnp.asarray(y_mem, dtype), rho=jnp.asarray(rho_tab, dtype),
    )

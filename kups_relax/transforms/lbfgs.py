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

from ..segments import per_system_dot
from .base import SystemIndex, select_rows


class ScaleByAseLbfgsState(NamedTuple):
    """State of :class:`ScaleByAseLbfgs` (``N`` rows, ``S`` systems, ``M`` memory).

    Attributes:
        iteration: ``(S,)`` steps taken by each system (ASE's ``state.iteration``).
        params: ``(N, 3)`` parameters at each system's previous step.
        grads: ``(N, 3)`` gradients at each system's previous step.
        s_memory: ``(M, N, 3)`` ring buffer of parameter differences.
        y_memory: ``(M, N, 3)`` ring buffer of gradient differences.
        rho: ``(S, M)`` per-system weights ``1 / (y.s)`` of each ring slot.
        index: the :class:`SystemIndex` of the rows.
    """

    iteration: jax.Array
    params: jax.Array
    grads: jax.Array
    s_memory: jax.Array
    y_memory: jax.Array
    rho: jax.Array
    index: SystemIndex


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
            iteration=jnp.zeros(S, jnp.int32),
            params=jnp.zeros_like(params),
            grads=jnp.zeros_like(params),
            s_memory=jnp.zeros((M,) + params.shape, params.dtype),
            y_memory=jnp.zeros((M,) + params.shape, params.dtype),
            rho=jnp.zeros((S, M), params.dtype),
            index=index,
        )

    def update(self, updates, state: ScaleByAseLbfgsState, params, active):
        """``updates`` are gradients ``(N, 3)``; returns the L-BFGS step ``-H g``."""
        index = state.index
        S, M = index.n_systems, self.memory_size
        system = index.system
        row_system = jnp.clip(system, 0, S - 1)
        rows = jnp.arange(params.shape[0])
        grads = updates

        # 1. store the newest pair (ASE's LBFGS.update), for systems past their first step
        it = state.iteration
        store = active & (it > 0)
        s0 = params - state.params
        y0 = grads - state.grads
        ys = per_system_dot(y0, s0, system, S)
        rho0 = jnp.where(ys != 0, 1.0 / jnp.where(ys != 0, ys, 1.0), 0.0)
        slot = (it - 1) % M  # (S,)
        row_store = index.row_mask(store)
        row_slot = jnp.where(row_store, slot[row_system], M)  # M -> dropped
        s_memory = state.s_memory.at[row_slot, rows].set(s0, mode="drop")
        y_memory = state.y_memory.at[row_slot, rows].set(y0, mode="drop")
        rho = state.rho.at[jnp.arange(S), jnp.where(store, slot, M)].set(rho0, mode="drop")

        # 2. two-loop recursion over each system's own history (newest = age 0)
        n_pairs = jnp.minimum(it, M)  # pairs stored after this update
        newest = (it - 1) % M

        def history(age):
            ring = (newest - age) % M  # (S,)
            valid = age < n_pairs
            ring_rows = ring[row_system]
            return ring, valid, s_memory[ring_rows, rows], y_memory[ring_rows, rows]

        loopmax = jnp.max(jnp.where(active, n_pairs, 0))

        def first_loop(age, carry):
            q, a_table = carry
            ring, valid, s_i, y_i = history(age)
            a = jnp.where(valid, rho[jnp.arange(S), ring] * per_system_dot(s_i, q, system, S), 0.0)
            q = q - a[row_system][:, None] * y_i
            return q, a_table.at[age].set(a)

        a_table = jnp.zeros((M, S), params.dtype)
        q, a_table = jax.lax.fori_loop(0, loopmax, first_loop, (grads, a_table))
        z = (1.0 / self.alpha) * q

        def second_loop(k, z):
            age = loopmax - 1 - k  # oldest first
            ring, valid, s_i, y_i = history(age)
            b = rho[jnp.arange(S), ring] * per_system_dot(y_i, z, system, S)
            coefficient = jnp.where(valid, a_table[age] - b, 0.0)
            return z + s_i * coefficient[row_system][:, None]

        z = jax.lax.fori_loop(0, loopmax, second_loop, z)

        row_active = index.row_mask(active)
        step = jnp.where(row_active[:, None], -z, 0.0)
        new_state = ScaleByAseLbfgsState(
            iteration=jnp.where(active, it + 1, it),
            params=select_rows(row_active, params, state.params),
            grads=select_rows(row_active, grads, state.grads),
            s_memory=s_memory,
            y_memory=y_memory,
            rho=rho,
            index=index,
        )
        return step, new_state

    def reset(self, state: ScaleByAseLbfgsState, systems: jax.Array) -> ScaleByAseLbfgsState:
        rows = state.index.row_mask(systems)
        return state._replace(
            iteration=jnp.where(systems, 0, state.iteration),
            params=select_rows(rows, 0.0, state.params),
            grads=select_rows(rows, 0.0, state.grads),
            s_memory=jnp.where(rows[None, :, None], 0.0, state.s_memory),
            y_memory=jnp.where(rows[None, :, None], 0.0, state.y_memory),
            rho=jnp.where(systems[:, None], 0.0, state.rho),
        )

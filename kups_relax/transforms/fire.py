"""Per-system FIRE with ASE's conventions (``ase.optimize.FIRE``).

FIRE (Bitzek et al., Phys. Rev. Lett. 97, 170201 (2006)) as ASE implements it:
velocity Verlet-like Euler steps ``v += dt F``, ``dr = dt v``, with the velocity
mixed towards the force direction while the power ``F.v`` stays positive, and
the time step increased after ``Nmin`` such steps; a step with ``F.v <= 0``
zeroes the velocity, resets the mixing and halves the time step. The step is
then limited as ASE does it: if the Euclidean norm of a system's WHOLE
displacement vector (all its atoms together) exceeds ``maxstep``, the whole
displacement is scaled to that norm (not the per-atom limit of L-BFGS).

Every inner product is per system (:mod:`kups_relax.segments`) and every
system keeps its own ``dt``, mixing ``a``, velocity and step counter, so a
system relaxed in a batch follows the same path as when relaxed alone.
ASE's ``downhill_check`` (off by default) is not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..segments import per_atom, select_rows
from .base import SystemIndex, take_along


class FireState(NamedTuple):
    """State of :class:`Fire` (``N`` rows, ``S`` systems).

    Attributes:
        velocity: ``(N, 3)`` FIRE velocities, Å/time unit (ASE's ``vel``).
        dt: ``(S,)`` current time step of each system (ASE's ``dt``).
        a: ``(S,)`` current velocity/force mixing coefficient (ASE's ``a``).
        n_positive: ``(S,)`` int, steps since the power ``F.v`` was last non-positive (ASE's ``Nsteps``).
        started: ``(S,)`` bool, whether the system has taken a step (ASE's ``vel is not None``).
    """

    velocity: jax.Array
    dt: jax.Array
    a: jax.Array
    n_positive: jax.Array
    started: jax.Array


@dataclasses.dataclass(frozen=True)
class Fire:
    """FIRE step per system (ASE flavour, including ASE's whole-vector ``maxstep``). Defaults are ASE's.

    ``updates`` given to :meth:`update` are gradients ``(N, 3)`` (eV/Å, i.e. minus
    the forces); the result is the displacement ``(N, 3)``, Å.

    Attributes:
        dt: initial time step (ASE's ``dt``, 0.1).
        maxstep: largest norm of a system's whole displacement in one step, Å (0.2).
        dtmax: largest time step (1.0).
        Nmin: positive-power steps to wait before increasing ``dt`` (5).
        finc: factor increasing ``dt`` (1.1).
        fdec: factor decreasing ``dt`` after a non-positive power (0.5).
        astart: mixing coefficient after a non-positive power (0.1).
        fa: factor decreasing the mixing coefficient (0.99).
        a: initial mixing coefficient (ASE's ``a``, 0.1).
    """

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1

    def init(self, params: jax.Array, index: SystemIndex) -> FireState:
        S = index.n_systems
        return FireState(
            velocity=jnp.zeros_like(params),
            dt=jnp.full((S,), self.dt, params.dtype),
            a=jnp.full((S,), self.a, params.dtype),
            n_positive=jnp.zeros((S,), jnp.int32),
            started=jnp.zeros((S,), bool),
        )

    def update(self, updates, state: FireState, params, active, index: SystemIndex):
        """``updates`` are gradients ``(N, 3)``; returns the FIRE displacement ``(N, 3)``."""
        S, system = index.n_systems, index.system
        force = -updates  # ASE's "gradient" (the negative gradient)
        v = state.velocity
        dt, a, n_pos = state.dt, state.a, state.n_positive

        vf = index.dot(force, v)
        f2 = index.dot(force, force)
        v2 = index.dot(v, v)

        # a started system with positive power mixes its velocity towards the force ...
        mix = state.started & (vf > 0.0)
        # ... one with non-positive power stops; a new system starts from rest
        stop = state.started & ~mix
        grow = mix & (n_pos > self.Nmin)

        f_norm = jnp.sqrt(jnp.where(mix, f2, 1.0))
        v_norm = jnp.sqrt(v2)
        a_row = per_atom(a, system)[:, None]
        mixed = (1.0 - a_row) * v + a_row * force / per_atom(f_norm, system)[:, None] * per_atom(v_norm, system)[:, None]
        v_new = jnp.where(per_atom(mix, system)[:, None], mixed, jnp.where(per_atom(stop, system)[:, None], 0.0 * v, v))
        dt_new = jnp.where(grow, jnp.minimum(dt * self.finc, self.dtmax), jnp.where(stop, dt * self.fdec, dt))
        a_new = jnp.where(grow, a * self.fa, jnp.where(stop, self.astart, a))
        n_new = jnp.where(mix, n_pos + 1, jnp.where(stop, 0, n_pos))

        dt_row = per_atom(dt_new, system)[:, None]
        v_new = v_new + dt_row * force
        dr = dt_row * v_new
        norm = jnp.sqrt(index.dot(dr, dr))
        clip = norm > self.maxstep
        safe_norm = per_atom(jnp.where(clip, norm, 1.0), system)[:, None]
        dr = jnp.where(per_atom(clip, system)[:, None], self.maxstep * dr / safe_norm, dr)

        row_active = index.row_mask(active)
        step = jnp.where(row_active[:, None], dr, 0.0)
        new_state = FireState(
            velocity=select_rows(row_active, v_new, v),
            dt=jnp.where(active, dt_new, dt),
            a=jnp.where(active, a_new, a),
            n_positive=jnp.where(active, n_new, n_pos),
            started=state.started | active,
        )
        return step, new_state

    def reset(self, state: FireState, systems: jax.Array, index: SystemIndex) -> FireState:
        rows = index.row_mask(systems)
        return state._replace(
            velocity=select_rows(rows, 0.0, state.velocity),
            dt=jnp.where(systems, self.dt, state.dt).astype(state.dt.dtype),
            a=jnp.where(systems, self.a, state.a).astype(state.a.dtype),
            n_positive=jnp.where(systems, 0, state.n_positive),
            started=jnp.where(systems, False, state.started),
        )

    def take(self, state: FireState, rows: jax.Array, systems: jax.Array) -> FireState:
        return FireState(velocity=take_along(state.velocity, rows), dt=take_along(state.dt, systems),
                         a=take_along(state.a, systems), n_positive=take_along(state.n_positive, systems),
                         started=take_along(state.started, systems))

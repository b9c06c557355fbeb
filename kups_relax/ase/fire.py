"""``kups_relax.ase.FIRE``: a drop-in for ``ase.optimize.FIRE`` whose steps come from the engine.

Arguments, defaults, attributes (``vel``, ``dt``, ``a``, ``Nsteps``), restart files
(``(vel, dt)``, ASE's layout) and ``downhill_check`` behave as in ASE's FIRE (ase 3.29);
the step itself is computed by the engine's per-system transform
:class:`kups_relax.transforms.Fire` (one system), so a structure relaxed here follows
the same path as in :func:`kups_relax.relax` with ``optimizer="fire"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from ase.optimize.fire import FIRE as _AseFIRE

from kups_relax.precision import x64
from kups_relax.transforms import Fire, FireState, SystemIndex


@functools.partial(jax.jit, static_argnums=0)
def _fire_update(transform: Fire, gradient, state: FireState, params):
    index = SystemIndex(jnp.zeros((gradient.shape[0],), jnp.int32), 1)
    return transform.update(gradient, state, params, jnp.ones((1,), bool), index)


class FIRE(_AseFIRE):
    """FIRE with the arguments and defaults of ``ase.optimize.FIRE``; the step comes from
    :class:`kups_relax.transforms.Fire` (lengths Å, forces eV/Å)."""

    def step(self, f=None):
        gradient = self._get_gradient(f)  # dE/dx, flat (ndofs,)
        optimizable = self.optimizable
        started = self.vel is not None
        if not started:
            self.vel = np.zeros(optimizable.ndofs())
            if self.downhill_check:
                self.e_last = optimizable.get_value()
                self.r_last = optimizable.get_x()
                self.vel_last = self.vel.copy()
        elif self.downhill_check:
            e = optimizable.get_value()
            if e > self.e_last:  # went uphill: back to the last positions, and stop (ASE's downhill check)
                if self.position_reset_callback is not None:
                    self.position_reset_callback(optimizable, self.r_last, e, self.e_last)
                optimizable.set_x(self.r_last)
                # the transform's "stop" branch, done here; it then starts afresh from rest
                self.vel = np.zeros_like(self.vel)
                self.a = self.astart
                self.dt *= self.fdec
                self.Nsteps = 0
                started = False
            self.e_last = optimizable.get_value()
            self.r_last = optimizable.get_x()
            self.vel_last = self.vel.copy()

        # The transform works on rows of 3. Every FIRE quantity is a whole-vector one (v.f, |f|, |v|,
        # |dr|), so any other number of degrees of freedom (a generic Optimizable) is padded with
        # zeros: a zero gradient keeps a zero velocity and a zero step there, and adds 0 to each sum.
        # dt and a live in the state (Fire's own dt/a are only initial values), so the compiled step is reused
        transform = Fire(maxstep=float(self.maxstep), dtmax=float(self.dtmax), Nmin=int(self.Nmin),
                         finc=float(self.finc), fdec=float(self.fdec), astart=float(self.astart), fa=float(self.fa))
        r = optimizable.get_x()
        dr, self.vel, self.dt, self.a, self.Nsteps = _engine_step(transform, gradient, r, self.vel, self.dt, self.a,
                                                                  self.Nsteps, started)
        optimizable.set_x(r + dr)
        self.dump((self.vel, self.dt))


@x64
def _engine_step(transform: Fire, gradient, r, velocity, dt: float, a: float, n_positive: int, started: bool):
    """The engine's FIRE step on flat ``(ndofs,)`` host arrays: ``(dr, velocity, dt, a, n_positive)``, host values.

    (Only this part runs with 64-bit JAX types: the calculator and callbacks of ``step`` run in
    the caller's mode.)
    """
    ndofs = gradient.size
    rows = -(-ndofs // 3)

    def as_rows(x):
        return jnp.asarray(np.pad(np.reshape(x, -1), (0, 3 * rows - ndofs)).reshape(rows, 3), jnp.float64)

    state = FireState(
        velocity=as_rows(velocity),
        dt=jnp.full((1,), dt, jnp.float64),
        a=jnp.full((1,), a, jnp.float64),
        n_positive=jnp.full((1,), n_positive, jnp.int32),
        started=jnp.full((1,), started, bool),
    )
    dr, state = _fire_update(transform, as_rows(gradient), state, as_rows(r))
    return (np.asarray(dr, dtype=np.float64).reshape(-1)[:ndofs],
            np.array(state.velocity, dtype=np.float64).reshape(-1)[:ndofs],
            float(state.dt[0]), float(state.a[0]), int(state.n_positive[0]))

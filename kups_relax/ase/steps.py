"""L-BFGS steps, computed by the engine's transforms, for gradients that come from the host.

Any ASE calculator can feed these: the host hands over each system's flat
coordinates and gradient (``Optimizable.get_x`` / ``get_gradient``, reshaped to
rows of three), and one jitted call of the engine's per-system transforms
(:class:`~kups_relax.transforms.ScaleByAseLbfgs`, then
:class:`~kups_relax.transforms.MaxStepSize`, then ASE's ``damping``) returns every
system's step. Rows are packed exactly like :class:`kups_relax.batch.Batch`
packs atoms (contiguous per system, capacity rounded up to a bucket), so the
state of one plain ``Atoms`` can move between these host steps and the jitted
loop unchanged.

The history of a system can be read and written in the layout of
``ase.optimize.LBFGS`` (lists ``s``, ``y``, ``rho``, newest last, plus ``r0``,
``f0`` and the iteration count) -- the contents of ASE's restart files.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kups_relax.buckets import bucket
from kups_relax.transforms import Chain, MaxStepSize, Scale, ScaleByAseLbfgs, SystemIndex, chain


def lbfgs_transform(maxstep: float, memory: int, damping: float, alpha: float) -> Chain:
    """``ase.optimize.LBFGS`` as engine transforms: direction, max-step clip, damping.

    ``damping`` is always a chain member (``Scale(1.0)`` is exact), so the state has
    the same structure whatever the damping.
    """
    return chain(ScaleByAseLbfgs(memory_size=int(memory), alpha=float(alpha)),
                 MaxStepSize(max_step=float(maxstep)), Scale(float(damping)))


@functools.partial(jax.jit, static_argnames=("transform",))
def _update(transform, gradient, state, params, active):
    return transform.update(gradient, state, params, active)


class HostSteps:
    """Per-system L-BFGS state and steps for systems of ``n_rows[i]`` rows of three.

    Args:
        n_rows: rows per system (atoms, plus e.g. the 3 cell rows of a cell filter).
        memory, alpha: ASE's LBFGS ``memory`` and ``alpha`` (eV/Å²).
        dtype: float dtype of the state.
    """

    def __init__(self, n_rows: Sequence[int], memory: int = 100, alpha: float = 70.0, dtype=jnp.float64):
        self.n_rows = tuple(int(n) for n in n_rows)
        self.memory = int(memory)
        self.alpha = float(alpha)
        starts = np.concatenate([[0], np.cumsum(self.n_rows)]).astype(int)
        self.slices = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        total = int(starts[-1])
        self.capacity = bucket(total)
        self.n_systems = bucket(len(self.n_rows), minimum=1)
        system = np.full(self.capacity, self.n_systems, dtype=np.int32)
        for s, rows in enumerate(self.slices):
            system[rows] = s
        self.index = SystemIndex(jnp.asarray(system), self.n_systems)
        self.state = self.transform(0.2, 1.0).init(jnp.zeros((self.capacity, 3), dtype), self.index)

    def transform(self, maxstep: float, damping: float) -> Chain:
        return lbfgs_transform(maxstep, self.memory, damping, self.alpha)

    def pack(self, arrays: Sequence[np.ndarray | None]) -> np.ndarray:
        """Per-system ``(n_rows[i], 3)`` arrays (``None`` = zeros) -> padded ``(capacity, 3)``."""
        out = np.zeros((self.capacity, 3))
        for rows, a in zip(self.slices, arrays):
            if a is not None:
                out[rows] = np.asarray(a, dtype=np.float64).reshape(-1, 3)
        return out

    def step(self, positions: Sequence[np.ndarray | None], gradients: Sequence[np.ndarray | None],
             active: Sequence[bool], maxstep: float, damping: float) -> list[np.ndarray]:
        """Steps ``(n_rows[i], 3)`` (Å) of every system; zero (and state kept) where not ``active``.

        ``positions`` and ``gradients`` are per system, any shape with ``n_rows[i] * 3``
        elements (``None`` allowed for inactive systems).
        """
        dtype = self.state.inner[0].params.dtype
        mask = np.zeros(self.n_systems, dtype=bool)
        mask[:len(self.n_rows)] = np.asarray(active, dtype=bool)
        updates, self.state = _update(self.transform(maxstep, damping),
                                      jnp.asarray(self.pack(gradients), dtype), self.state,
                                      jnp.asarray(self.pack(positions), dtype), jnp.asarray(mask))
        updates = np.asarray(updates, dtype=np.float64)
        return [updates[rows] for rows in self.slices]

    def iteration(self, system: int = 0) -> int:
        return int(self.state.inner[0].iteration[system])

    def history(self, system: int = 0) -> dict:
        """ASE's LBFGS memory of ``system``: ``iteration``, ``s``, ``y``, ``rho`` (oldest first), ``r0``, ``f0``.

        ``s``/``y``/``r0``/``f0`` are flat arrays of ``3 * n_rows`` entries; ``r0`` and
        ``f0`` (the coordinates and forces of the last step) are ``None`` before the first.
        """
        lb = self.state.inner[0]
        rows = self.slices[system]
        it = int(lb.iteration[system])
        M = self.memory
        n = min(max(it - 1, 0), M)
        ring = [(it - 2 - age) % M for age in reversed(range(n))]  # oldest first
        s_mem = np.asarray(lb.s_memory[:, rows], dtype=np.float64)
        y_mem = np.asarray(lb.y_memory[:, rows], dtype=np.float64)
        rho = np.asarray(lb.rho[system], dtype=np.float64)
        return {
            "iteration": it,
            "s": [s_mem[k].ravel() for k in ring],
            "y": [y_mem[k].ravel() for k in ring],
            "rho": [float(rho[k]) for k in ring],
            "r0": np.asarray(lb.params[rows], dtype=np.float64).ravel() if it > 0 else None,
            "f0": -np.asarray(lb.grads[rows], dtype=np.float64).ravel() if it > 0 else None,
        }

    def set_history(self, iteration: int, s, y, rho, r0, f0, system: int = 0) -> None:
        """Load ASE's LBFGS memory (the inverse of :meth:`history`) into ``system``'s slot.

        Only the newest ``memory`` pairs are kept. Raises ``ValueError`` when the arrays
        do not fit the system's rows.
        """
        lb = self.state.inner[0]
        rows = self.slices[system]
        n_values = 3 * self.n_rows[system]
        M = self.memory
        iteration = int(iteration)
        pairs = list(zip(s, y, rho))[-M:] if M > 0 else []
        if len(pairs) > max(iteration - 1, 0):
            raise ValueError(f"LBFGS history has {len(pairs)} pairs for iteration {iteration}")
        dtype = lb.params.dtype
        s_mem = np.array(lb.s_memory, dtype=np.float64)
        y_mem = np.array(lb.y_memory, dtype=np.float64)
        rho_tab = np.array(lb.rho, dtype=np.float64)
        s_mem[:, rows] = 0.0
        y_mem[:, rows] = 0.0
        rho_tab[system] = 0.0
        for age, (s_i, y_i, rho_i) in enumerate(reversed(pairs)):
            k = (iteration - 2 - age) % M
            s_mem[k, rows] = _rows_of(s_i, n_values)
            y_mem[k, rows] = _rows_of(y_i, n_values)
            rho_tab[system, k] = float(rho_i)
        params = np.array(lb.params, dtype=np.float64)
        grads = np.array(lb.grads, dtype=np.float64)
        params[rows] = 0.0 if r0 is None else _rows_of(r0, n_values)
        grads[rows] = 0.0 if f0 is None else -_rows_of(f0, n_values)
        lb = lb._replace(
            iteration=lb.iteration.at[system].set(iteration),
            params=jnp.asarray(params, dtype), grads=jnp.asarray(grads, dtype),
            s_memory=jnp.asarray(s_mem, dtype), y_memory=jnp.asarray(y_mem, dtype),
            rho=jnp.asarray(rho_tab, dtype),
        )
        self.state = self.state._replace(inner=(lb,) + tuple(self.state.inner[1:]))


def _rows_of(values, n_values: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size != n_values:
        raise ValueError(f"LBFGS history vector has {arr.size} entries, the system has {n_values}")
    return arr.reshape(-1, 3)

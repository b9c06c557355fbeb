"""L-BFGS steps, computed by the engine's transforms, for gradients that come from the host.

Any ASE calculator can feed these: the host hands over each system's flat
coordinates and gradient (``Optimizable.get_x`` / ``get_gradient``, reshaped to
rows of three), and one jitted call of the engine's per-system transforms
(:class:`~kups_relax.transforms.ScaleByAseLbfgs`, then
:class:`~kups_relax.transforms.MaxStepSize`, then ASE's ``damping``; built by
:func:`~kups_relax.transforms.ase_lbfgs`) returns every system's step. Rows are packed exactly like :class:`kups_relax.batch.Batch`
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
from kups_relax.precision import x64
from kups_relax.transforms import Chain, SystemIndex, ase_lbfgs
from kups_relax.transforms.base import ChainState, EmptyState
from kups_relax.transforms.lbfgs import get_history, set_history


def lbfgs_transform(maxstep: float, memory: int, damping: float, alpha: float) -> Chain:
    """``ase.optimize.LBFGS`` as engine transforms: the engine's own :func:`~kups_relax.transforms.ase_lbfgs`.

    (The same object :func:`kups_relax.relax` builds, so compiled loops are shared.)
    """
    return ase_lbfgs(maxstep=float(maxstep), memory=int(memory), damping=float(damping), alpha=float(alpha))


def match_state(state: ChainState, transform: Chain) -> ChainState:
    """``state`` reshaped for ``transform``: ``ase_lbfgs`` has a damping member only when damping != 1.

    The damping member is stateless, so the L-BFGS history carries over unchanged.
    """
    inner = tuple(state.inner[:2])
    if len(transform.transforms) > 2:
        inner += (EmptyState(),)
    return state._replace(inner=inner)


@functools.partial(jax.jit, static_argnames=("transform",))
def _update(transform, gradient, state, params, active, index):
    return transform.update(gradient, state, params, active, index)


class HostSteps:
    """Per-system L-BFGS state and steps for systems of ``n_rows[i]`` rows of three.

    Args:
        n_rows: rows per system (atoms, plus e.g. the 3 cell rows of a cell filter).
        memory, alpha: ASE's LBFGS ``memory`` and ``alpha`` (eV/Å²).
        dtype: float dtype of the state.
    """

    @x64
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

    @x64
    def step(self, positions: Sequence[np.ndarray | None], gradients: Sequence[np.ndarray | None],
             active: Sequence[bool], maxstep: float, damping: float) -> list[np.ndarray]:
        """Steps ``(n_rows[i], 3)`` (Å) of every system; zero (and state kept) where not ``active``.

        ``positions`` and ``gradients`` are per system, any shape with ``n_rows[i] * 3``
        elements (``None`` allowed for inactive systems).
        """
        dtype = self.state.inner[0].params.dtype
        mask = np.zeros(self.n_systems, dtype=bool)
        mask[:len(self.n_rows)] = np.asarray(active, dtype=bool)
        transform = self.transform(maxstep, damping)
        updates, self.state = _update(transform, jnp.asarray(self.pack(gradients), dtype),
                                      match_state(self.state, transform),
                                      jnp.asarray(self.pack(positions), dtype), jnp.asarray(mask), self.index)
        updates = np.asarray(updates, dtype=np.float64)
        return [updates[rows] for rows in self.slices]

    @x64
    def iteration(self, system: int = 0) -> int:
        return int(self.state.inner[0].iteration[system])

    @x64
    def history(self, system: int = 0) -> dict:
        """ASE's LBFGS memory of ``system``: ``iteration``, ``s``, ``y``, ``rho`` (oldest first), ``r0``, ``f0``.

        ``s``/``y``/``r0``/``f0`` are flat arrays of ``3 * n_rows`` entries; ``r0`` and
        ``f0`` (the coordinates and forces of the last step) are ``None`` before the first.
        """
        h = get_history(self.state.inner[0], self.index, system, self.memory)
        first = h["iteration"] == 0
        return {
            "iteration": h["iteration"], "s": h["s"], "y": h["y"], "rho": h["rho"],
            "r0": None if first else np.asarray(h["r0"], dtype=np.float64).ravel(),
            "f0": None if first else -np.asarray(h["g0"], dtype=np.float64).ravel(),
        }

    @x64
    def set_history(self, iteration: int, s, y, rho, r0, f0, system: int = 0) -> None:
        """Load ASE's LBFGS memory (the inverse of :meth:`history`) into ``system``'s slot.

        Raises ``ValueError`` when the arrays do not fit the system's rows.
        """
        n_values = 3 * self.n_rows[system]
        zeros = np.zeros(n_values)
        r0 = zeros if r0 is None else _checked(r0, n_values)
        g0 = zeros if f0 is None else -_checked(f0, n_values)
        s = [_checked(v, n_values) for v in s]
        y = [_checked(v, n_values) for v in y]
        lb = set_history(self.state.inner[0], self.index, system, self.memory, int(iteration), s, y, rho, r0, g0)
        self.state = self.state._replace(inner=(lb,) + tuple(self.state.inner[1:]))


def _checked(values, n_values: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size != n_values:
        raise ValueError(f"LBFGS history vector has {arr.size} entries, the system has {n_values}")
    return arr

"""The fast path: one structure whose calculator is ours, relaxed inside the engine's jitted loop.

:func:`fast_path_calculator` decides whether an object can take it (a plain
``Atoms`` -- no filter -- with a :class:`~kups_relax.ase.Calculator`, only
``FixAtoms``/``FixCartesian``/``FixedLine``/``FixedPlane``/``FixCom`` constraints, and a
structure the engine accepts; filters take the host path).
:class:`LoopRelaxation` then runs :func:`kups_relax.loop.run_chunk` chunk by
chunk from a given optimizer state and hands back every step's positions,
energy and forces, so the ASE-facing optimizer can write its log and
trajectory afterwards as if it had taken the steps one by one.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.loop import Status, Targets, initial_state, run_chunk
from kups_relax.precision import x64
from kups_relax.validate import InvalidStructure, check_structure

from .calculator import Calculator
from .steps import match_state

logger = logging.getLogger(__name__)

#: Steps per device call.
CHUNK_STEPS = 64

_INT32_MAX = 2**31 - 1


def fast_path_calculator(obj) -> Calculator | None:
    """Our calculator attached to ``obj`` if the whole relaxation can run in the jitted loop, else ``None``."""
    if type(obj) is not Atoms or not isinstance(obj.calc, Calculator):
        return None
    try:
        check_structure(obj, "atoms", obj.calc.potential.supported_numbers)
    except InvalidStructure as err:
        logger.debug("host path: %s", err)
        return None
    return obj.calc


@dataclasses.dataclass
class Frame:
    """One step of the loop: positions ``(N, 3)`` Å, energy eV, forces ``(N, 3)`` eV/Å (before constraints)."""

    positions: np.ndarray | None
    energy: float
    forces: np.ndarray | None


class LoopRelaxation:
    """Relax one ``Atoms`` with the engine's loop, continuing from an optimizer state.

    Construction evaluates the starting geometry (:attr:`energy`, :attr:`forces`; the
    loop computes no stress);
    :meth:`run` takes up to ``steps`` steps until ``fmax`` is met.

    Args:
        atoms: the structure (its calculator must be a :class:`Calculator`).
        transform: the optimizer transform (hashable; jit-static).
        fmax: convergence criterion, eV/Å.
        steps: step limit.
        opt_state: the transform's state to continue from (same row layout as a
            one-structure :class:`~kups_relax.batch.Batch`); ``None`` starts afresh.
    """

    @x64
    def __init__(self, atoms: Atoms, transform, fmax: float, steps: int, opt_state=None):
        calc: Calculator = atoms.calc
        self.potential = calc.potential
        self.transform = transform
        self.n_atoms = len(atoms)
        batch = Batch.from_atoms([atoms], dtype=calc.dtype, precon=getattr(transform, "exp_settings", None))
        self.geometry = batch.geometry
        dtype = self.geometry.positions.dtype
        self.targets = Targets(fmax=jnp.asarray([fmax], dtype),
                               max_steps=jnp.asarray([min(int(steps), _INT32_MAX)], jnp.int32))
        neighbors = nl.allocate(self.geometry, self.potential.cutoff, calc.skin)
        state = initial_state(self.geometry, self.potential, neighbors, self.targets, optimizer=transform)
        if opt_state is not None:
            opt_state = match_state(opt_state, transform) if hasattr(transform, "transforms") else opt_state
            state = state._replace(opt_state=jax.tree.map(lambda a: _cast(a, dtype), opt_state))
        self.state = state
        self.energy = float(np.asarray(state.energy)[0])
        self.forces = np.asarray(state.forces, dtype=np.float64)[:self.n_atoms]

    @x64
    def run(self, record: bool) -> list[Frame]:
        """Run until converged or out of steps; one :class:`Frame` per step (positions/forces if ``record``)."""
        n = self.n_atoms
        frames: list[Frame] = []
        state = self.state
        while int(np.asarray(state.status)[0]) == Status.RUNNING:
            state, chunk = run_chunk(state, self.geometry, self.potential, self.targets,
                                     optimizer=self.transform, n_steps=CHUNK_STEPS, record=record)
            rows = np.flatnonzero(np.asarray(chunk.taken)[:, 0])
            energies = np.asarray(chunk.energy, dtype=np.float64)[rows, 0]
            if record:
                positions = np.asarray(chunk.positions, dtype=np.float64)[rows, :n]
                forces = np.asarray(chunk.forces, dtype=np.float64)[rows, :n]
            for k in range(len(rows)):
                frames.append(Frame(positions[k] if record else None, float(energies[k]),
                                    forces[k] if record else None))
            if bool(state.neighbors.overflow):
                grown = nl.grow(state.neighbors, self.geometry.replace(positions=state.positions))
                state = state._replace(neighbors=grown)
        self.state = state
        status = int(np.asarray(state.status)[0])
        if Status(status).label == "diverged":
            logger.warning("energy or forces became non-finite; stopped at the last finite geometry")
        return frames

    @property
    def status(self) -> str:
        return Status(int(np.asarray(self.state.status)[0])).label

    @property
    def positions(self) -> np.ndarray:
        return np.asarray(self.state.positions, dtype=np.float64)[:self.n_atoms]

    @property
    def final(self) -> Frame:
        """The last geometry with its energy and forces (the loop computes no stress)."""
        return Frame(self.positions, float(np.asarray(self.state.energy)[0]),
                     np.asarray(self.state.forces, dtype=np.float64)[:self.n_atoms])

    @property
    def opt_state(self):
        return self.state.opt_state


def _cast(a, dtype):
    """A fresh copy (the loop donates its state), floats converted to ``dtype``."""
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.array(a, dtype=dtype, copy=True)
    return jnp.array(a, copy=True)

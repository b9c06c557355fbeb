"""The host driver: validate, pack, run the jitted loop chunk by chunk, unpack.

The host touches the device only between chunks of ``chunk_steps`` steps: to
see whether anything is still running, to collect per-step records, and to
grow the neighbor list after an overflow.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import jax
import numpy as np
from ase import Atoms

from . import neighbors as nl
from .batch import Batch
from .evaluate import evaluate
from .loop import RUNNING, STATUS_NAMES, Targets, initial_state, run_chunk
from .transforms import Transform, ase_lbfgs
from .validate import InvalidStructure, check_structure

logger = logging.getLogger(__name__)

#: Default step limit per system. ASE's is effectively unlimited (10**8); in a batch one
#: structure that never converges would hold the batch forever, so ours is finite.
DEFAULT_MAX_STEPS = 10_000

#: Default Verlet skin, Å.
DEFAULT_SKIN = 0.5


@dataclasses.dataclass
class RelaxResult:
    """The outcome of relaxing one structure.

    Attributes:
        name: the structure's name.
        atoms: relaxed structure (input ``info``/``arrays``/constraints kept) with a
            ``SinglePointCalculator`` holding energy (eV), forces (eV/Å) and, for 3-D
            periodic systems, stress (eV/Å³); the unchanged input when ``status == "invalid"``.
        energy: final energy, eV (``nan`` if never evaluated).
        initial_energy: energy of the input geometry, eV.
        fmax: final largest per-atom force norm after constraints, eV/Å.
        steps: optimizer steps taken (ASE's ``opt.nsteps``).
        converged: ``fmax < fmax`` target reached.
        status: ``"converged"``, ``"unconverged"`` (step limit), ``"diverged"`` (non-finite
            energy/forces; the geometry is the last finite one) or ``"invalid"``.
        reason: why, for any status but ``"converged"``.
        energies: ``(steps + 1,)`` energy after every step, eV (index 0 = input geometry).
        fmaxes: ``(steps + 1,)`` largest force after every step, eV/Å.
        trajectory: every frame as ``Atoms`` with energy and forces, when requested.
    """

    name: str
    atoms: Atoms
    energy: float
    initial_energy: float
    fmax: float
    steps: int
    converged: bool
    status: str
    reason: str = ""
    energies: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    fmaxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    trajectory: list[Atoms] | None = None


def resolve_optimizer(optimizer: str | Transform | None) -> Transform:
    """An optimizer transform from a name (``"lbfgs"``) or a transform; default ASE's LBFGS."""
    if optimizer is None or (isinstance(optimizer, str) and optimizer.lower() == "lbfgs"):
        return ase_lbfgs()
    if isinstance(optimizer, str):
        raise ValueError(f"unknown optimizer {optimizer!r} (available: 'lbfgs')")
    return optimizer


def _per_system(value, n: int, name: str, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one entry per structure ({n}), got shape {arr.shape}")
    return arr


def relax(
    structures: Sequence[Atoms],
    potential,
    fmax: float | Sequence[float] = 0.05,
    max_steps: int | Sequence[int] = DEFAULT_MAX_STEPS,
    optimizer: str | Transform | None = None,
    *,
    names: Sequence[str] | None = None,
    dtype: str = "float64",
    skin: float = DEFAULT_SKIN,
    chunk_steps: int = 64,
    trajectory: bool = False,
) -> list[RelaxResult]:
    """Relax many structures together, each on its own, with one jitted loop.

    Args:
        structures: ASE ``Atoms`` of any sizes, cells and periodicity.
        potential: a potential from :mod:`potentials` (e.g. ``LennardJones()``).
        fmax: force convergence criterion, eV/Å: largest per-atom force norm (after
            constraints) ``< fmax``, as in ASE. A scalar or one per structure.
        max_steps: step limit per structure (ASE's ``steps``); scalar or one per structure.
        optimizer: ``"lbfgs"`` (default; ``ase.optimize.LBFGS`` defaults) or a transform
            such as ``kups_relax.transforms.ase_lbfgs(maxstep=0.1)``.
        names: a name per structure for results and messages (default ``structure-<i>``).
        dtype: ``"float64"`` (default) or ``"float32"``.
        skin: neighbor-list skin, Å.
        chunk_steps: steps per device call between host checks.
        trajectory: also return every frame of every structure (``RelaxResult.trajectory``).

    Returns:
        One :class:`RelaxResult` per input, in input order. A structure that cannot be
        relaxed gets ``status="invalid"`` and a reason; the others are unaffected.
    """
    structures = list(structures)
    n = len(structures)
    names = list(names) if names is not None else [f"structure-{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"names has {len(names)} entries for {n} structures")
    fmax_all = _per_system(fmax, n, "fmax", np.float64)
    max_steps_all = _per_system(max_steps, n, "max_steps", np.int64)
    transform = resolve_optimizer(optimizer)

    results: list[RelaxResult | None] = [None] * n
    valid: list[int] = []
    for i, (atoms, name) in enumerate(zip(structures, names)):
        try:
            check_structure(atoms, name, potential.supported_numbers)
        except InvalidStructure as err:
            logger.warning("%s", err)
            results[i] = RelaxResult(
                name=name, atoms=atoms.copy() if isinstance(atoms, Atoms) else atoms,
                energy=float("nan"), initial_energy=float("nan"), fmax=float("nan"), steps=0,
                converged=False, status="invalid", reason=err.reason)
        else:
            valid.append(i)
    if not valid:
        return results  # type: ignore[return-value]

    batch = Batch.from_atoms([structures[i] for i in valid], names=[names[i] for i in valid], dtype=dtype)
    relaxed = _run(batch, potential, transform, fmax_all[valid], max_steps_all[valid], skin, chunk_steps, trajectory)
    for i, result in zip(valid, relaxed):
        results[i] = result
    return results  # type: ignore[return-value]


@jax.jit
def _final_stress(potential, geometry, neighbors):
    neighbors = nl.update(neighbors, geometry)
    return evaluate(potential, geometry, neighbors, compute_stress=True).stress


def _run(batch: Batch, potential, transform, fmax, max_steps, skin, chunk_steps, trajectory):
    geometry = batch.geometry
    S = geometry.n_systems
    n = batch.n_structures
    float_dtype = geometry.positions.dtype
    targets = Targets(
        fmax=np.concatenate([fmax, np.zeros(S - n)]).astype(float_dtype),
        max_steps=np.concatenate([max_steps, np.zeros(S - n, dtype=np.int64)]).astype(np.int32),
    )
    t0 = time.perf_counter()
    neighbors = nl.allocate(geometry, potential.cutoff, skin)
    state = initial_state(geometry, potential, neighbors, targets, optimizer=transform)
    energies = [[e] for e in np.asarray(state.energy)[:n]]
    fmaxes = [[f] for f in np.asarray(state.fmax)[:n]]
    frames: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
    slices = [batch.atom_slice(i) for i in range(n)]
    if trajectory:
        pos0, forces0 = np.asarray(state.positions), np.asarray(state.forces)
        for i in range(n):
            frames[i].append((pos0[slices[i]], forces0[slices[i]]))

    chunks = 0
    while (np.asarray(state.status) == RUNNING).any():
        state, chunk = run_chunk(state, geometry, potential, targets, optimizer=transform,
                                 n_steps=chunk_steps, record=trajectory)
        chunks += 1
        taken = np.asarray(chunk.taken)
        if taken.any():
            e, f = np.asarray(chunk.energy), np.asarray(chunk.fmax)
            if trajectory:
                pos, frc = np.asarray(chunk.positions), np.asarray(chunk.forces)
            for i in range(n):
                rows = np.flatnonzero(taken[:, i])
                energies[i].extend(e[rows, i])
                fmaxes[i].extend(f[rows, i])
                if trajectory:
                    frames[i].extend((pos[t, slices[i]], frc[t, slices[i]]) for t in rows)
        if bool(state.neighbors.overflow):
            old = state.neighbors.capacity
            grown = nl.grow(state.neighbors, geometry.replace(positions=state.positions))
            state = state._replace(neighbors=grown)
            logger.info("neighbor list overflow: capacity %d -> %d pairs", old, grown.capacity)
        logger.debug("chunk %d: %d systems running", chunks, int((np.asarray(state.status) == RUNNING).sum()))
    logger.info("relaxed %d structures in %.2f s (%d chunks, %d neighbor builds)", n,
                time.perf_counter() - t0, chunks, int(state.neighbors.n_builds))

    status = np.asarray(state.status)
    # the loop does not compute stress (positions-only relaxation): evaluate it once at the end
    stress = np.asarray(_final_stress(potential, geometry.replace(positions=state.positions), state.neighbors))
    out_atoms = batch.to_atoms(np.asarray(state.positions), np.asarray(state.energy),
                               np.asarray(state.forces), stress)
    steps = np.asarray(state.steps)
    final_fmax = np.asarray(state.fmax)
    results = []
    for i in range(n):
        name = STATUS_NAMES[int(status[i])]
        reason = {
            "converged": "",
            "unconverged": f"not converged within {int(max_steps[i])} steps (fmax {final_fmax[i]:.4g} eV/Å)",
            "diverged": "energy or forces became non-finite; stopped at the last finite geometry",
        }.get(name, name)
        traj = None
        if trajectory:
            traj = []
            for (pos, frc), e in zip(frames[i], energies[i]):
                atoms = batch.atoms[i].copy()
                atoms.positions = pos
                from ase.calculators.singlepoint import SinglePointCalculator

                atoms.calc = SinglePointCalculator(atoms, energy=float(e), forces=np.asarray(frc, np.float64))
                traj.append(atoms)
        results.append(RelaxResult(
            name=batch.names[i], atoms=out_atoms[i], energy=float(np.asarray(state.energy)[i]),
            initial_energy=float(energies[i][0]), fmax=float(final_fmax[i]), steps=int(steps[i]),
            converged=name == "converged", status=name, reason=reason,
            energies=np.asarray(energies[i], dtype=np.float64), fmaxes=np.asarray(fmaxes[i], dtype=np.float64),
            trajectory=traj,
        ))
    return results

"""The public API: :func:`relax` a list of structures, or :func:`relax_iter` a stream of them.

Both turn their inputs into jobs with per-structure stopping rules and hand them to the
:class:`~kups_relax.scheduler.Scheduler`, which streams them through batches of slots and the
jitted loop (:mod:`kups_relax.loop`); results come back as :class:`RelaxResult` objects.
With several devices (``devices=``, default every local device) one scheduler per device takes
structures from one shared queue (:func:`~kups_relax.scheduler.relax_on_devices`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from ase import Atoms

from .filters import CellFilter, resolve_cell_filter, resolve_cell_filters
from .layout import atoms_budget
from .precision import resolve_dtype, x64
from .results import RelaxResult, Trajectory
from .executables import target_device
from .feed import PENDING, Feed
from .symmetry import find_constraint
from .scheduler import Job, RunSettings, Scheduler, relax_on_devices
from .transforms import Transform, ase_fire, ase_lbfgs, is_optax_spec, optax_optimizer, precon_lbfgs
from .transforms.optax_spec import OPTIMIZERS as OPTAX_OPTIMIZERS

__all__ = ["DEFAULT_MAX_DISPLACEMENT", "DEFAULT_MAX_STEPS", "DEFAULT_SKIN", "OPTIMIZERS", "RelaxResult", "Trajectory",
           "relax", "relax_iter", "resolve_devices", "resolve_optimizer"]

logger = logging.getLogger(__name__)

#: Default step limit per system. ASE's is effectively unlimited (10**8); in a batch one
#: structure that never converges would hold the batch forever, so ours is finite.
DEFAULT_MAX_STEPS = 10_000

#: Default Verlet skin, Å. Every evaluation pays for the pairs out to cutoff + skin, every
#: rebuild for the candidates: a thinner skin makes steps cheaper and rebuilds more frequent
#: (measured trade-off: benchmarks/RESULTS.md, "Figures moved out of code comments").
DEFAULT_SKIN = 0.5

#: Default limit on how far any atom may move from its starting position, Å: a relaxation
#: that takes an atom further has almost surely blown apart (atoms evaporating, a cell
#: collapsing), and stops as ``"diverged"`` instead of running to the step limit.
DEFAULT_MAX_DISPLACEMENT = 20.0


#: Optimizer names and the factories of their transforms (ASE's defaults).
OPTIMIZERS: dict[str, Callable[[], Transform]] = {"lbfgs": ase_lbfgs, "fire": ase_fire, "precon_lbfgs": precon_lbfgs}


def resolve_optimizer(optimizer: str | Mapping | Transform | None) -> Transform:
    """An optimizer transform from a name or a transform; default ASE's LBFGS.

    Names: ``"lbfgs"``, ``"fire"``, or an optax optimizer ``"optax:adam(learning_rate=0.01)"``
    (also as a mapping ``{"name": "optax:adam", ...}``; see
    :mod:`kups_relax.transforms.optax_spec`), chained with ASE's 0.2 Å max step.
    """
    if optimizer is None:
        return ase_lbfgs()
    if is_optax_spec(optimizer):
        return optax_optimizer(optimizer)
    if isinstance(optimizer, str):
        factory = OPTIMIZERS.get(optimizer.lower())
        if factory is None:
            raise ValueError(f"unknown optimizer {optimizer!r} (available: {', '.join(map(repr, OPTIMIZERS))}, "
                             f"or 'optax:<name>' with <name> one of {', '.join(OPTAX_OPTIMIZERS)})")
        return factory()
    if isinstance(optimizer, Mapping):
        raise ValueError(f"optimizer {dict(optimizer)!r}: only optax optimizers take the mapping form "
                         f"({{'name': 'optax:adam', 'learning_rate': 0.01}}); use kups_relax.transforms.ase_lbfgs(...) "
                         f"or ase_fire(...) for LBFGS or FIRE settings")
    if isinstance(optimizer, tuple) and hasattr(optimizer, "init") and hasattr(optimizer, "update") \
            and not hasattr(optimizer, "reset"):
        raise ValueError("a bare optax GradientTransformation cannot be checked to keep systems apart; "
                         "name it instead, e.g. optimizer='optax:adam(learning_rate=0.01)'")
    return optimizer


def resolve_devices(devices: "int | jax.Device | Sequence[jax.Device] | None" = None) -> list[jax.Device]:
    """The devices a run uses.

    Args:
        devices: ``None``: every local device of JAX's default backend (``jax.local_devices()``);
            an int ``n``: the first ``n`` of them; a JAX device or a sequence of distinct devices
            of this process, all of one platform.
    """
    local = jax.local_devices()
    if devices is None:
        return local
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices}: this process has {len(local)} local {local[0].platform} "
                             f"device(s); choose 1 to {len(local)}, or all of them (the default)")
        return local[:int(devices)]
    if isinstance(devices, jax.Device):
        devices = [devices]
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Iterable):
        raise TypeError(f"devices must be None, a number of devices or a sequence of JAX devices, got {devices!r}")
    chosen = list(devices)
    if not chosen:
        raise ValueError("devices is empty: give at least one device (or None for every local device)")
    for device in chosen:
        if not isinstance(device, jax.Device):
            raise TypeError(f"devices must be JAX devices (e.g. jax.devices()[0]), got {device!r}")
        if device.process_index != jax.process_index():
            raise ValueError(f"device {device} belongs to process {device.process_index}, not to this one")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"devices lists a device more than once: {chosen}")
    if len({device.platform for device in chosen}) > 1:
        raise ValueError(f"devices mixes platforms: {chosen}")
    return chosen


def _stream(jobs, settings: RunSettings, devices: list[jax.Device], **known):
    """``(job, result)`` pairs as they finish: in this thread on JAX's default device, else one thread per device."""
    if len(devices) == 1 and devices[0] == target_device():
        logger.debug("relaxing on %s", devices[0])
        return Scheduler(jobs, settings, **known).irun()
    return relax_on_devices(jobs, settings, devices, **known)


def _per_system(value, n: int, name: str, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one entry per structure ({n}), got shape {arr.shape}")
    return arr


def _chosen_dtype(dtype: str | None, potential) -> str:
    chosen = resolve_dtype(dtype, potential)
    logger.info("precision %s (%s)", chosen, "asked for" if dtype is not None else
                f"the default of {getattr(potential, 'name', type(potential).__name__)}")
    return chosen


@x64(user_code=("structures", "on_result"))
def relax(
    structures: Sequence[Atoms],
    potential,
    fmax: float | Sequence[float] = 0.05,
    max_steps: int | Sequence[int] = DEFAULT_MAX_STEPS,
    optimizer: str | Transform | None = None,
    *,
    names: Sequence[str] | None = None,
    dtype: str | None = None,
    skin: float = DEFAULT_SKIN,
    chunk_steps: int = 64,
    trajectory: bool = False,
    atoms_per_batch: int | None = None,
    on_result: Callable[[int, RelaxResult], None] | None = None,
    cell_filter: "str | CellFilter | Sequence[str | CellFilter | None] | None" = None,
    max_displacement: float | Sequence[float] | None = DEFAULT_MAX_DISPLACEMENT,
    devices: "int | jax.Device | Sequence[jax.Device] | None" = None,
    fix_symmetry: bool = False,
    symprec: float = 0.01,
) -> list[RelaxResult]:
    """Relax many structures together, each on its own, with one jitted loop.

    Args:
        structures: ASE ``Atoms`` of any sizes, cells and periodicity.
        potential: a potential from :mod:`potentials` (e.g. ``get_potential("emt")``).
        fmax: force convergence criterion, eV/Å: largest per-atom force norm (after
            constraints) ``< fmax``, as in ASE. A scalar or one per structure.
        max_steps: step limit per structure (ASE's ``steps``); scalar or one per structure.
        optimizer: ``"lbfgs"`` (default; ``ase.optimize.LBFGS`` defaults), ``"fire"``
            (``ase.optimize.FIRE`` defaults) or a transform
            such as ``kups_relax.transforms.ase_lbfgs(maxstep=0.1)``.
        names: a name per structure for results and messages (default ``structure-<i>``).
        dtype: ``"float64"`` or ``"float32"``; ``None`` (default): the potential's own,
            float32 for learned potentials (SevenNet, as sevenn runs it), float64 for classical
            ones (:func:`kups_relax.precision.default_dtype`). Logged at INFO level.
        skin: neighbor-list skin, Å.
        chunk_steps: steps per device call between host checks.
        trajectory: also return every frame of every structure (``RelaxResult.trajectory``).
        atoms_per_batch: budget of atom rows per batch (see :mod:`kups_relax.layout`); default
            :func:`~kups_relax.layout.atoms_budget` (8192 on a CPU, from memory on a GPU).
        on_result: called as ``on_result(index, result)`` the moment each structure finishes
            (for writing outputs as they arrive); results also come back in the returned list.
        cell_filter: relax the cells too, as ASE's filters do: ``"frechet"``
            (``FrechetCellFilter``), ``"unit"`` (``UnitCellFilter``) or a
            :class:`~kups_relax.filters.CellFilter` with their options (pressure, mask, ...), or
            one of these per structure (``None``: that structure keeps its cell). Structures
            without a periodic direction relax their positions only.
        max_displacement: Å, scalar or one per structure: a system whose next step would take
            any atom further than this from its starting position (in the starting cell's
            frame) stops as ``"diverged"`` at its last geometry within reach; ``None``: no limit.
        devices: where to run: ``None`` (default) every local device of JAX's default backend,
            an int ``n`` the first ``n`` of them, or a sequence of JAX devices
            (:func:`resolve_devices`). Each device runs its own batches (``atoms_per_batch``
            rows each), taking the next waiting structure whenever one of its slots frees; a
            structure's result does not depend on the device it ran on.
        fix_symmetry: keep every structure's space group as ASE's
            ``atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))`` does: the structure is
            first refined to the symmetry spglib finds at ``symprec`` (ASE's ``refine_symmetry``;
            the result's frame 0 is the refined input), then forces, stress and the position
            and cell steps are averaged over its space group (:mod:`kups_relax.symmetry`). A
            structure with its own ``FixSymmetry`` constraint keeps it (with ``fix_symmetry``
            off too). ``RelaxResult.spacegroup_initial``/``spacegroup_final`` report the group.
        symprec: spglib's tolerance for ``fix_symmetry``, Å (ASE's default 0.01).

    Returns:
        One :class:`RelaxResult` per input, in input order. A structure that cannot be
        relaxed gets ``status="invalid"`` and a reason; the others are unaffected.
    """
    dtype = _chosen_dtype(dtype, potential)
    structures = list(structures)
    n = len(structures)
    names = list(names) if names is not None else [f"structure-{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"names has {len(names)} entries for {n} structures")
    fmax_all = _per_system(fmax, n, "fmax", np.float64)
    max_steps_all = _per_system(max_steps, n, "max_steps", np.int64)
    cell_filters = resolve_cell_filters(cell_filter, n)
    reach_all = _per_system(np.inf if max_displacement is None else max_displacement, n, "max_displacement",
                            np.float64)
    jobs = (Job(index=i, name=names[i], atoms=structures[i], fmax=float(fmax_all[i]),
                max_steps=int(max_steps_all[i]), cell_filter=cell_filters[i],
                max_displacement=float(reach_all[i])) for i in range(n))
    chosen = resolve_devices(devices)
    budget = atoms_per_batch or atoms_budget(chosen[0])
    sizes = [len(a) for a in structures if isinstance(a, Atoms)]
    results: list[RelaxResult | None] = [None] * n
    symmetric = fix_symmetry or any(isinstance(a, Atoms) and find_constraint(a) is not None for a in structures)
    settings = RunSettings(potential=potential, optimizer=resolve_optimizer(optimizer), atoms_per_batch=budget,
                           dtype=dtype, skin=skin, chunk_steps=chunk_steps, trajectory=trajectory,
                           variable_cell=any(f is not None for f in cell_filters), symmetry=symmetric,
                           symprec=float(symprec) if fix_symmetry else None)
    with contextlib.closing(_stream(jobs, settings, chosen, total=n, known_sizes=sizes)) as stream:
        for job, result in stream:
            results[job.index] = result
            if on_result is not None:
                on_result(job.index, result)
    return results  # type: ignore[return-value]


@x64(user_code=("structures",))
def relax_iter(
    structures: Iterable[Atoms | tuple[str, Atoms]],
    potential,
    fmax: float = 0.05,
    max_steps: int = DEFAULT_MAX_STEPS,
    optimizer: str | Transform | None = None,
    *,
    dtype: str | None = None,
    skin: float = DEFAULT_SKIN,
    chunk_steps: int = 64,
    trajectory: bool = False,
    atoms_per_batch: int | None = None,
    cell_filter: "str | CellFilter | None" = None,
    max_displacement: float | None = DEFAULT_MAX_DISPLACEMENT,
    devices: "int | jax.Device | Sequence[jax.Device] | None" = None,
    layout_sizes: Sequence[int] | None = None,
    fix_symmetry: bool = False,
    symprec: float = 0.01,
) -> Iterator[tuple[int, RelaxResult]]:
    """Stream structures of any number through fixed slots; yield ``(input index, result)`` as each finishes.

    Structures wait for a slot of their size (atoms rounded up to a capacity bucket) in one
    batch of mixed slot sizes planned from the first structures read and the
    ``atoms_per_batch`` budget (:mod:`kups_relax.layout`); a structure larger than an eighth
    of the budget gets a batch of its own size. When systems finish (converged, step limit,
    diverged), their slots take the next structures between chunks, with fresh optimizer
    state, without recompiling. Memory holds only the structures in flight and a short
    read-ahead, whatever the length of the stream.
    Items are ``Atoms`` (named ``structure-<i>``) or ``(name, Atoms)`` pairs. ``structures``
    may be a :class:`~kups_relax.feed.Feed` that other threads fill while the stream runs: the
    stream takes what is queued between chunks without waiting, waits only when it holds
    nothing, and ends when the feed is closed and every structure has finished (the index is
    the position :meth:`Feed.put` returned).

    ``devices`` as for :func:`relax` (default every local device): every device streams its own
    batches from one shared queue of waiting structures, and results are yielded in the order
    they finish on any device.

    ``layout_sizes``: atom counts representative of the stream (e.g. of its first few hundred
    structures) to plan the shared batch from, instead of the structures that happen to be
    read first: the same sizes give the same slots, so a stream whose first structures vary
    (a Dask worker's tasks) reuses its compiled programs from run to run.

    ``dtype`` as for :func:`relax` (``None``: the potential's default precision).

    ``fix_symmetry``, ``symprec`` as for :func:`relax`; a stream does not look ahead, so a
    structure with its own ``FixSymmetry`` constraint needs ``fix_symmetry=True`` here (without
    it, such a structure comes back invalid, saying so).
    """
    dtype = _chosen_dtype(dtype, potential)
    cell_filter = resolve_cell_filter(cell_filter)
    reach = float("inf") if max_displacement is None else float(max_displacement)

    def jobs():
        i = 0
        for item in structures:
            if item is PENDING:  # a Feed with nothing queued yet
                yield item
                continue
            name, atoms = item if isinstance(item, tuple) else (f"structure-{i}", item)
            yield Job(index=i, name=name, atoms=atoms, fmax=float(fmax), max_steps=int(max_steps),
                      cell_filter=cell_filter, max_displacement=reach)
            i += 1

    chosen = resolve_devices(devices)
    settings = RunSettings(potential=potential, optimizer=resolve_optimizer(optimizer),
                           atoms_per_batch=atoms_per_batch or atoms_budget(chosen[0]), dtype=dtype, skin=skin,
                           chunk_steps=chunk_steps, trajectory=trajectory, variable_cell=cell_filter is not None,
                           symmetry=fix_symmetry, symprec=float(symprec) if fix_symmetry else None)
    live = {"input_wait": structures.wait} if isinstance(structures, Feed) else {}
    if layout_sizes:
        live["layout_sizes"] = [int(n) for n in layout_sizes]
    with contextlib.closing(_stream(jobs(), settings, chosen, **live)) as stream:
        for job, result in stream:
            yield job.index, result

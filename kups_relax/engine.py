"""The host driver: validate, pack into slots, run the jitted loop chunk by chunk, refill, unpack.

Structures stream through fixed batches of slots, one batch per size class.
The host touches the device only between chunks of steps: to collect the
per-step records and the systems that stopped, to put the next structures
into the freed slots (in-flight refill, no recompilation), and to grow the
neighbor list after an overflow.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import collections
import collections.abc
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from . import neighbors as nl
from .batch import (DTYPES, PER_ATOM_FIELDS, PER_SYSTEM_FIELDS, Geometry, device_geometry, empty_arrays,
                    pack_structure, with_results)
from .buckets import bucket
from .layout import SlotLayout, atoms_budget, plan_layout, shares_batch, slot_size
from .compile_stats import compile_stats
from .executables import cached_jit
from .filters import (CellFilter, check_variable_cell, device_cell_params, empty_cell_table, pack_cell,
                      resolve_cell_filter, resolve_cell_filters)
from .loop import (BLEW_APART, RUNNING, STATUS_NAMES, Targets, admit, compact, current_geometry, initial_state,
                   run_chunk, system_cutoffs, with_neighbors)
from .transforms import Transform, ase_fire, ase_lbfgs, is_optax_spec, optax_optimizer
from .transforms.optax_adapter import OPTIMIZERS as OPTAX_OPTIMIZERS
from .validate import InvalidStructure, check_structure

logger = logging.getLogger(__name__)

#: Default step limit per system. ASE's is effectively unlimited (10**8); in a batch one
#: structure that never converges would hold the batch forever, so ours is finite.
DEFAULT_MAX_STEPS = 10_000

#: Default Verlet skin, Å. Every evaluation pays for the pairs out to cutoff + skin, every
#: rebuild for the candidates: on the 64-metal EMT set 0.3/0.5/1.0 Å took 7.7/9.1/11.4 s warm,
#: on a 256-structure stream 0.3 and 1.0 Å tied, and SevenNet-0 ran 2x faster at 0.3 than 1.0.
DEFAULT_SKIN = 0.5

#: When nothing waits for its slots, a batch whose running systems fit a batch this many times
#: smaller is compacted into one (every compacted shape is a set of programs to compile once).
COMPACTION_FACTOR = 4
#: Batches are compacted down to this many atom rows; below it a step costs little more than its
#: fixed overhead.
MIN_COMPACTED_ROWS = 256

#: Default limit on how far any atom may move from its starting position, Å: a relaxation
#: that takes an atom further has almost surely blown apart (atoms evaporating, a cell
#: collapsing), and stops as ``"diverged"`` instead of running to the step limit.
DEFAULT_MAX_DISPLACEMENT = 20.0


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
            energy/forces, or an atom moved further than ``max_displacement``; the geometry is
            the last good one) or ``"invalid"``.
        reason: why, for any status but ``"converged"``.
        energies: ``(steps + 1,)`` energy after every step, eV (index 0 = input geometry).
        fmaxes: ``(steps + 1,)`` largest force after every step, eV/Å.
        trajectory: every frame (a :class:`Trajectory`: a sequence of ``Atoms`` with energy and
            forces, backed by arrays), when requested.
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
    trajectory: "Trajectory | list[Atoms] | None" = None


class Trajectory(collections.abc.Sequence):
    """Every frame of one relaxation (frame 0 = the input geometry) as arrays; indexing gives
    ``Atoms`` with energy and forces (made when asked for: a stream of millions of frames
    should not build an ``Atoms`` object per frame just to write them to disk).

    Attributes:
        atoms: the input structure (``info``, ``arrays`` and constraints are kept in every frame).
        positions: ``(T, N, 3)`` Å.
        forces: ``(T, N, 3)`` eV/Å, before constraints.
        energies: ``(T,)`` eV.
        cells: ``(T, 3, 3)`` Å for variable-cell runs, else ``None`` (the input cell throughout).
    """

    def __init__(self, atoms: Atoms, positions: np.ndarray, forces: np.ndarray, energies: np.ndarray,
                 cells: np.ndarray | None = None):
        self.atoms, self.positions, self.forces, self.energies, self.cells = atoms, positions, forces, energies, cells

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        return with_results(self.atoms, self.positions[index], energy=self.energies[index], forces=self.forces[index],
                            cell=None if self.cells is None else self.cells[index])


#: Optimizer names and the factories of their transforms (ASE's defaults).
OPTIMIZERS: dict[str, Callable[[], Transform]] = {"lbfgs": ase_lbfgs, "fire": ase_fire}


def resolve_optimizer(optimizer: str | Mapping | Transform | None) -> Transform:
    """An optimizer transform from a name or a transform; default ASE's LBFGS.

    Names: ``"lbfgs"``, ``"fire"``, or an optax optimizer ``"optax:adam(learning_rate=0.01)"``
    (also as a mapping ``{"name": "optax:adam", ...}``; see
    :mod:`kups_relax.transforms.optax_adapter`), chained with ASE's 0.2 Å max step.
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
    atoms_per_batch: int | None = None,
    on_result: Callable[[int, RelaxResult], None] | None = None,
    cell_filter: "str | CellFilter | Sequence[str | CellFilter | None] | None" = None,
    max_displacement: float | Sequence[float] | None = DEFAULT_MAX_DISPLACEMENT,
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
        dtype: ``"float64"`` (default) or ``"float32"``.
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
    cell_filters = resolve_cell_filters(cell_filter, n)
    reach_all = _per_system(np.inf if max_displacement is None else max_displacement, n, "max_displacement",
                            np.float64)
    jobs = (Job(index=i, name=names[i], atoms=structures[i], fmax=float(fmax_all[i]),
                max_steps=int(max_steps_all[i]), cell_filter=cell_filters[i],
                max_displacement=float(reach_all[i])) for i in range(n))
    budget = atoms_per_batch or atoms_budget()
    sizes = [len(a) for a in structures if isinstance(a, Atoms)]
    results: list[RelaxResult | None] = [None] * n
    for job, result in _stream(jobs, potential, resolve_optimizer(optimizer), dtype, skin, chunk_steps,
                               trajectory, budget, total=n, known_sizes=sizes,
                               variable_cell=any(f is not None for f in cell_filters)):
        results[job.index] = result
        if on_result is not None:
            on_result(job.index, result)
    return results  # type: ignore[return-value]


def relax_iter(
    structures: Iterable[Atoms | tuple[str, Atoms]],
    potential,
    fmax: float = 0.05,
    max_steps: int = DEFAULT_MAX_STEPS,
    optimizer: str | Transform | None = None,
    *,
    dtype: str = "float64",
    skin: float = DEFAULT_SKIN,
    chunk_steps: int = 64,
    trajectory: bool = False,
    atoms_per_batch: int | None = None,
    cell_filter: "str | CellFilter | None" = None,
    max_displacement: float | None = DEFAULT_MAX_DISPLACEMENT,
) -> Iterator[tuple[int, RelaxResult]]:
    """Stream structures of any number through fixed slots; yield ``(input index, result)`` as each finishes.

    Structures wait for a slot of their size (atoms rounded up to a capacity bucket) in one
    batch of mixed slot sizes planned from the first structures read and the
    ``atoms_per_batch`` budget (:mod:`kups_relax.layout`); a structure larger than an eighth
    of the budget gets a batch of its own size. When systems finish (converged, step limit,
    diverged), their slots take the next structures between chunks, with fresh optimizer
    state, without recompiling. Memory holds only the structures in flight and a short
    read-ahead, whatever the length of the stream.
    Items are ``Atoms`` (named ``structure-<i>``) or ``(name, Atoms)`` pairs.
    """
    cell_filter = resolve_cell_filter(cell_filter)
    reach = float("inf") if max_displacement is None else float(max_displacement)

    def jobs():
        for i, item in enumerate(structures):
            name, atoms = item if isinstance(item, tuple) else (f"structure-{i}", item)
            yield Job(index=i, name=name, atoms=atoms, fmax=float(fmax), max_steps=int(max_steps),
                      cell_filter=cell_filter, max_displacement=reach)

    for job, result in _stream(jobs(), potential, resolve_optimizer(optimizer), dtype, skin, chunk_steps,
                               trajectory, atoms_per_batch or atoms_budget(), total=None,
                               variable_cell=cell_filter is not None):
        yield job.index, result


@dataclasses.dataclass
class Job:
    """One structure on its way through the engine (host side)."""

    index: int
    name: str
    atoms: Atoms
    fmax: float
    max_steps: int
    cell_filter: CellFilter | None = None
    max_displacement: float = DEFAULT_MAX_DISPLACEMENT
    energies: list = dataclasses.field(default_factory=list)
    fmaxes: list = dataclasses.field(default_factory=list)
    frames: list = dataclasses.field(default_factory=list)


def _invalid(job: Job, reason: str) -> RelaxResult:
    atoms = job.atoms.copy() if isinstance(job.atoms, Atoms) else job.atoms
    return RelaxResult(name=job.name, atoms=atoms, energy=float("nan"), initial_energy=float("nan"),
                       fmax=float("nan"), steps=0, converged=False, status="invalid", reason=reason)


class WaitingRoom:
    """Structures waiting for a slot of one batch: a queue per slot size, first come first served."""

    def __init__(self) -> None:
        self.by_size: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_size.values())

    def __bool__(self) -> bool:
        return any(self.by_size.values())

    def append(self, job: Job) -> None:
        self.by_size[slot_size(len(job.atoms))].append(job)

    def sizes(self) -> list[int]:
        """Atom counts of the waiting structures."""
        return [len(job.atoms) for q in self.by_size.values() for job in q]

    def pop_exact(self, size: int) -> Job | None:
        """The first structure whose slot size is ``size``."""
        queue = self.by_size.get(size)
        return queue.popleft() if queue else None

    def pop_fitting(self, size: int) -> Job | None:
        """The earliest structure that fits a slot of ``size`` rows."""
        heads = [(q[0].index, s) for s, q in self.by_size.items() if q and s <= size]
        return self.by_size[min(heads)[1]].popleft() if heads else None


def _stream(jobs: Iterator[Job], potential, transform, dtype, skin, chunk_steps, trajectory,
            atoms_per_batch, total, known_sizes: Sequence[int] | None = None, variable_cell: bool = False):
    """Validate, group into batches, run them round-robin; yield ``(job, result)`` as each finishes.

    Structures up to ``atoms_per_batch * SHARED_FRACTION`` atoms share one batch of mixed slot
    sizes (:func:`~kups_relax.layout.plan_layout`, from ``known_sizes`` when the whole list is
    known, else from the structures read ahead); larger ones get batches of their own size.
    """
    t0 = time.perf_counter()
    compiled_before = compile_stats()
    pending: dict[object, WaitingRoom] = collections.defaultdict(WaitingRoom)
    batches: dict[object, SlotBatch] = {}
    exhausted = False
    finished = 0
    usage = [0, 0]  # useful and executed atom-steps of the batches done so far
    read_ahead = max(64, atoms_per_batch // 8)
    shared_known = None
    if known_sizes is not None:
        shared_known = [n for n in known_sizes if shares_batch(n, atoms_per_batch)]
        own_counts = collections.Counter(slot_size(n) for n in known_sizes if not shares_batch(n, atoms_per_batch))

    def batch_key(n_atoms: int):
        return SHARED if shares_batch(n_atoms, atoms_per_batch) else slot_size(n_atoms)

    def pull():
        """Read structures until enough are waiting; invalid ones are returned at once."""
        nonlocal exhausted
        bad = []
        while not exhausted and sum(len(q) for q in pending.values()) < read_ahead:
            job = next(jobs, None)
            if job is None:
                exhausted = True
                break
            try:
                check_structure(job.atoms, job.name, potential.supported_numbers)
                if job.cell_filter is not None and (why := check_variable_cell(job.atoms)):
                    raise InvalidStructure(job.name, why)
            except InvalidStructure as err:
                logger.warning("%s", err)
                bad.append((job, _invalid(job, err.reason)))
                continue
            pending[batch_key(len(job.atoms))].append(job)
        return bad

    def new_layout(key) -> SlotLayout:
        if key == SHARED:
            if shared_known:
                return plan_layout(shared_known, atoms_per_batch, known=True)
            return plan_layout(pending[key].sizes(), atoms_per_batch, known=exhausted)
        per_batch = max(1, atoms_per_batch // key)
        if known_sizes is not None:
            per_batch = min(per_batch, own_counts[key])
        elif exhausted:
            per_batch = min(per_batch, len(pending[key]))
        return SlotLayout.uniform(key, per_batch)

    while True:
        for item in pull():
            finished += 1
            yield item
        for key, queue in pending.items():
            if queue and key not in batches:
                batches[key] = SlotBatch(new_layout(key), potential, transform, dtype, skin, trajectory,
                                         variable_cell=variable_cell)
        if not batches:
            if exhausted and not any(pending.values()):
                break
            continue
        for key in list(batches):
            batch = batches[key]
            queue = pending[key]
            for job, result in batch.refill(queue):
                finished += 1
                yield job, result
            if batch.idle:
                usage[0] += batch.useful_atom_steps
                usage[1] += batch.executed_atom_steps
                del batches[key]
                continue
            more_coming = bool(queue) or not exhausted
            if more_coming:
                refill_at = max(1, batch.n_slots // 4)
            else:
                # nothing will take the freed slots: stop when the running systems fit a batch
                # a quarter of the size, and move them there (no idle slots)
                batch.compact()
                refill_at = batch.stops_before_compaction()
            for job, result in batch.run_chunk(chunk_steps, refill_at=refill_at):
                finished += 1
                yield job, result
            in_flight = sum(b.n_running for b in batches.values()) + sum(len(q) for q in pending.values())
            logger.debug("chunk %d: %d systems running", batch.chunks,
                         (total - finished) if total is not None else in_flight)
    compiled = compile_stats().since(compiled_before)
    logger.info("relaxed %d structures in %.2f s; compiled %d programs, %d from the compilation cache (%.1f s)",
                finished, time.perf_counter() - t0, compiled.programs, compiled.cached, compiled.seconds)
    if usage[1]:
        logger.info("useful atom-steps: %d of %d executed (%.1f %%; the rest padding rows and stopped slots)",
                    usage[0], usage[1], 100 * usage[0] / usage[1])


#: The key of the batch that structures of mixed sizes share.
SHARED = "shared"


class SlotBatch:
    """A fixed batch of slots of mixed sizes (a :class:`~kups_relax.layout.SlotLayout`), refilled in flight.

    Slot ``s`` owns atom rows ``[first_atom[s], first_atom[s] + slot_atoms[s])``; a structure of
    ``n`` atoms uses the first ``n`` and the rest are padding. Shapes never change, so the
    compiled programs are reused for every structure this batch takes; only the neighbor
    list may grow (a recompile) when its capacity overflows.
    """

    def __init__(self, layout: SlotLayout, potential, transform, dtype, skin, trajectory, variable_cell=False):
        self.base_shape = (layout.n_rows, layout.n_slots)  # compaction levels halve this shape
        self.layout = layout
        self.slot_atoms = np.asarray(layout.slot_atoms, np.int64)
        self.first = layout.first_atom
        self.n_slots = layout.n_slots
        self.potential, self.transform, self.skin, self.trajectory = potential, transform, skin, trajectory
        self.float_dtype = DTYPES[dtype]
        A, S = layout.n_rows, layout.n_slots
        self.dtype = dtype
        self.host = empty_arrays(A, S, first_atom=self.first)
        self.fmax = np.zeros(S)
        self.max_steps = np.zeros(S, np.int64)
        self.max_displacement = np.full(S, np.inf)
        self.jobs: list[Job | None] = [None] * S
        self.cell_table = empty_cell_table(S) if variable_cell else None
        self.state = None
        self.geometry = None
        self.chunks = 0
        # atom rows x loop iterations the device ran, and atoms x steps of running systems within
        # them: their ratio is the batch's useful fraction (padding rows and stopped slots waste the rest)
        self.executed_atom_steps = 0
        self.useful_atom_steps = 0
        sizes = collections.Counter(int(n) for n in self.slot_atoms if n)
        logger.debug("new batch: %d atom rows, slots %s", A, dict(sorted(sizes.items())))

    @property
    def idle(self) -> bool:
        return all(job is None for job in self.jobs)

    @property
    def n_running(self) -> int:
        return sum(job is not None for job in self.jobs)

    def _device_geometry(self) -> Geometry:
        return device_geometry(self.host, self.dtype)

    def _cell_params(self):
        if self.cell_table is None:
            return None
        return device_cell_params(self.cell_table, self.float_dtype)

    def _targets(self) -> Targets:
        return Targets(fmax=jnp.asarray(self.fmax, self.float_dtype),
                       max_steps=jnp.asarray(np.minimum(self.max_steps, 2**31 - 1), jnp.int32),
                       max_displacement=jnp.asarray(self.max_displacement, self.float_dtype))

    def _place(self, slot: int, job: Job | None) -> None:
        h, first = self.host, int(self.first[slot])
        rows = slice(first, first + int(self.slot_atoms[slot]))
        h["positions"][rows] = 0.0
        h["numbers"][rows] = 0
        h["system"][rows] = self.n_slots
        h["projection"][rows] = 0.0
        h["masses"][rows] = 0.0
        h["fix_com"][slot] = False
        h["cell"][slot] = np.eye(3)
        h["wrap_cell"][slot] = np.eye(3)
        h["pbc"][slot] = False
        h["n_atoms"][slot] = 0
        self.fmax[slot], self.max_steps[slot], self.max_displacement[slot] = 0.0, 0, np.inf
        self.jobs[slot] = job
        if self.cell_table is not None:
            pack_cell(self.cell_table, slot, None if job is None else job.atoms, None if job is None else job.cell_filter)
        if job is None:
            return
        pack_structure(h, slot, first, job.atoms, job.name)
        self.fmax[slot], self.max_steps[slot], self.max_displacement[slot] = job.fmax, job.max_steps, job.max_displacement

    def refill(self, queue: WaitingRoom):
        """Put waiting structures into free slots and start them; yield any that stop at step 0.

        A free slot takes the first waiting structure of its own size; slots still free then take
        the earliest structure that fits (smallest slots first), so no slot idles while something fits.
        """
        free = [s for s, job in enumerate(self.jobs) if job is None and self.slot_atoms[s] > 0]
        if not free or (not queue and self.state is not None):
            return
        admitted = np.zeros(self.n_slots, bool)
        for slot in free:
            job = queue.pop_exact(int(self.slot_atoms[slot]))
            if job is not None:
                self._place(slot, job)
                admitted[slot] = True
        for slot in sorted((s for s in free if not admitted[s]), key=lambda s: self.slot_atoms[s]):
            job = queue.pop_fitting(int(self.slot_atoms[slot]))
            if job is not None:
                self._place(slot, job)
                admitted[slot] = True
        if not admitted.any() and self.state is not None:
            return
        self.geometry = self._device_geometry()
        targets = self._targets()
        if self.state is None:
            neighbors = nl.allocate(self.geometry, self.potential.cutoff, self.skin, block=self.layout.largest,
                                    cutoffs=_system_cutoffs(self.potential, self.geometry, cutoff=float(self.potential.cutoff)))
            self.state = initial_state(self.geometry, self.potential, neighbors, targets, optimizer=self.transform,
                                       cell_params=self._cell_params())
        else:
            while True:
                state = admit(self.state, self.geometry, self.potential, targets, jnp.asarray(admitted),
                              optimizer=self.transform, cell_params=self._cell_params())
                if not bool(state.neighbors.overflow):
                    break
                self._grow(self._current_geometry(state))
            self.state = state
        energy, fmax = np.asarray(self.state.energy), np.asarray(self.state.fmax)
        positions = forces = None
        if self.trajectory:
            positions, forces = np.asarray(self.state.positions), np.asarray(self.state.forces)
            cells = np.asarray(self.state.cell) if self.state.cell is not None else None
        for slot in np.flatnonzero(admitted) if self.state is not None else []:
            job = self.jobs[slot]
            job.energies, job.fmaxes, job.frames = [float(energy[slot])], [float(fmax[slot])], []
            if self.trajectory:
                rows = self._rows(slot)
                job.frames.append((positions[None, rows], forces[None, rows], None if cells is None else cells[None, slot]))
        yield from self._collect_finished()

    def _rows(self, slot: int) -> slice:
        start = int(self.first[slot])
        return slice(start, start + len(self.jobs[slot].atoms))

    def _current_geometry(self, state) -> Geometry:
        """The geometry the loop is at: its positions and (variable cell) its cells."""
        if state.cell is None:
            return self.geometry.replace(positions=state.positions)
        return current_geometry(state, self.geometry)

    def _grow(self, geometry: Geometry) -> None:
        old = self.state.neighbors.capacities
        grown = nl.grow(self.state.neighbors, geometry)
        self.state = with_neighbors(self.state, grown)
        changed = ", ".join(f"{k} {a} -> {b}" for k, a, b in zip(old._fields, old, grown.capacities) if a != b)
        logger.info("neighbor list overflow: %s (a new program for this batch)", changed)

    def compaction_target(self, running: int | None = None, rows: int | None = None) -> tuple[int, int] | None:
        """``(atom rows, slots)`` of the smallest compaction level that holds ``running`` systems of
        ``rows`` rows in all (default: the running ones), if smaller than the batch now.

        Levels divide the batch's first shape by :data:`COMPACTION_FACTOR` at a time (``A / 4**l``,
        ``S / 4**l``), never below :data:`MIN_COMPACTED_ROWS`: a batch shape has a fixed, short
        list of compacted shapes (two for 8192 rows), so a warm cache holds every program
        compaction can ask for.
        """
        if running is None:
            running = self.n_running
            rows = int(sum(self.slot_atoms[s] for s, job in enumerate(self.jobs) if job is not None))
        A0, S0 = self.base_shape
        A_now = self.layout.n_rows
        best = None
        level = 1
        while True:
            shrink = COMPACTION_FACTOR ** level
            A_l, S_l = A0 // shrink, max(1, S0 // shrink)
            if A_l < MIN_COMPACTED_ROWS or A_l % 8 or A_l * shrink != A0:
                break
            if rows > A_l or running > S_l:
                break
            if A_l < A_now:
                best = (A_l, S_l)
            level += 1
        return best

    def stops_before_compaction(self) -> int | None:
        """How many running systems should stop before the batch is compacted to the next level
        (``run_chunk``'s ``stop_after``), or ``None`` when it cannot be compacted further.

        Which systems stop first is not known; the estimate takes the running rows to shrink in
        proportion to the systems (if they do not fit after all, the next chunk waits for more)."""
        sizes = [int(self.slot_atoms[s]) for s, job in enumerate(self.jobs) if job is not None]
        n, rows = len(sizes), sum(sizes)
        if n == 0 or self.compaction_target(1, max(sizes)) is None:
            return None
        for stopped in range(1, n):
            left = n - stopped
            if self.compaction_target(left, int(np.ceil(rows * left / n))):
                return stopped
        return n

    def compact(self) -> bool:
        """Move the running systems into a batch of the smallest compaction level that holds them
        (:func:`~kups_relax.loop.compact`: their state carries over exactly); ``False`` if none."""
        target = self.compaction_target()
        if target is None or self.state is None:
            return False
        A_new, S_new = target
        A_old, S_old = self.layout.n_rows, self.n_slots
        running = [s for s, job in enumerate(self.jobs) if job is not None]
        layout = SlotLayout(tuple([int(self.slot_atoms[s]) for s in running] + [0] * (S_new - len(running))), A_new)
        first_new = layout.first_atom
        host = empty_arrays(A_new, S_new, first_atom=np.full(S_new, sum(layout.slot_atoms)))
        rows_map = np.full(A_new, A_old, np.int32)
        systems_map = np.full(S_new, S_old, np.int32)
        for t, s in enumerate(running):
            n = int(self.slot_atoms[s])
            old, new = slice(int(self.first[s]), int(self.first[s]) + n), slice(int(first_new[t]), int(first_new[t]) + n)
            rows_map[new] = np.arange(old.start, old.stop)
            systems_map[t] = s
            for key in PER_ATOM_FIELDS:
                host[key][new] = self.host[key][old]
            host["system"][new] = np.where(self.host["system"][old] < S_old, t, S_new)
            for key in PER_SYSTEM_FIELDS:
                host[key][t] = self.host[key][s]
            host["first_atom"][t] = first_new[t]
        self.state = compact(self.state, jnp.asarray(rows_map), jnp.asarray(systems_map), optimizer=self.transform)
        logger.debug("compacted %d running systems: %d -> %d atom rows, %d -> %d slots",
                     len(running), A_old, A_new, S_old, S_new)
        self.layout, self.host = layout, host
        self.slot_atoms = np.asarray(layout.slot_atoms, np.int64)
        self.first, self.n_slots = first_new, layout.n_slots
        pad = np.zeros(S_new - len(running), np.int64)
        self.fmax = np.concatenate([self.fmax[running], pad.astype(float)])
        self.max_steps = np.concatenate([self.max_steps[running], pad])
        self.max_displacement = np.concatenate([self.max_displacement[running], np.full(len(pad), np.inf)])
        self.jobs = [self.jobs[s] for s in running] + [None] * len(pad)
        if self.cell_table is not None:
            table = empty_cell_table(S_new)
            for key in table:
                table[key][:len(running)] = self.cell_table[key][running]
            self.cell_table = table
        self.geometry = self._device_geometry()
        return True

    def run_chunk(self, chunk_steps: int, refill_at: int | None):
        """Run one chunk of steps; yield the systems that stopped."""
        state, chunk = run_chunk(self.state, self.geometry, self.potential, self._targets(),
                                 optimizer=self.transform, n_steps=chunk_steps, record=self.trajectory,
                                 stop_after=refill_at if refill_at is not None else 2**30,
                                 cell_params=self._cell_params())
        self.state = state
        self.chunks += 1
        taken = np.asarray(chunk.taken)
        self.executed_atom_steps += int(taken.any(axis=1).sum()) * int(self.state.positions.shape[0])
        self.useful_atom_steps += sum(int(taken[:, slot].sum()) * len(job.atoms)
                                      for slot, job in enumerate(self.jobs) if job is not None)
        if taken.any():
            e, f = np.asarray(chunk.energy), np.asarray(chunk.fmax)
            if self.trajectory:
                pos, frc = np.asarray(chunk.positions), np.asarray(chunk.forces)
                cel = np.asarray(chunk.cell) if chunk.cell is not None else None
            for slot, job in enumerate(self.jobs):
                if job is None:
                    continue
                rows = np.flatnonzero(taken[:, slot])
                job.energies.extend(e[rows, slot].tolist())
                job.fmaxes.extend(f[rows, slot].tolist())
                if self.trajectory and len(rows):
                    r = self._rows(slot)  # copies: the chunk's arrays are not kept alive
                    job.frames.append((pos[rows, r], frc[rows, r], None if cel is None else cel[rows, slot]))
        if bool(state.neighbors.overflow):
            self._grow(self._current_geometry(state))
        yield from self._collect_finished()

    def _collect_finished(self):
        status = np.asarray(self.state.status)
        done = [s for s, job in enumerate(self.jobs) if job is not None and status[s] != RUNNING]
        if not done:
            return
        positions, forces = np.asarray(self.state.positions), np.asarray(self.state.forces)
        energy, fmax, steps = np.asarray(self.state.energy), np.asarray(self.state.fmax), np.asarray(self.state.steps)
        cells = None
        # the loop's stress is current for every stopped system (run_chunk evaluates it when they stop)
        stress = np.asarray(self.state.stress)
        cells = np.asarray(self.state.cell) if self.state.cell is not None else None
        for slot in done:
            job = self.jobs[slot]
            rows = self._rows(slot)
            atoms = with_results(job.atoms, positions[rows], energy=energy[slot], forces=forces[rows],
                                 stress=stress[slot], cell=None if cells is None else cells[slot])
            name = STATUS_NAMES[int(status[slot])]
            reason = {
                "converged": "",
                "unconverged": f"not converged within {job.max_steps} steps (fmax {fmax[slot]:.4g} eV/Å)",
                "diverged": "energy or forces became non-finite; stopped at the last finite geometry",
            }.get(name, name)
            if int(status[slot]) == BLEW_APART:
                reason = (f"blew apart: the next step would have moved an atom more than {job.max_displacement:g} Å "
                          f"from its start; stopped at the last geometry within that")
            trajectory = None
            if self.trajectory:
                pos, frc, cel = zip(*job.frames)
                trajectory = Trajectory(job.atoms, np.concatenate(pos), np.concatenate(frc),
                                        np.asarray(job.energies, np.float64),
                                        None if cel[0] is None else np.concatenate(cel))
            result = RelaxResult(
                name=job.name, atoms=atoms, energy=float(energy[slot]), initial_energy=float(job.energies[0]),
                fmax=float(fmax[slot]), steps=int(steps[slot]), converged=name == "converged", status=name,
                reason=reason, energies=np.asarray(job.energies, np.float64),
                fmaxes=np.asarray(job.fmaxes, np.float64), trajectory=trajectory)
            self._place(slot, None)
            yield job, result


@cached_jit(static_argnames=("cutoff",))
def _system_cutoffs(potential, geometry, cutoff):
    return system_cutoffs(potential, geometry, cutoff)

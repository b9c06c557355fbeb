"""The host scheduler: structures stream through batches of slots, chunk by chunk.

One run reads structures as it goes, validates them, and lets each wait in the waiting room of
its batch (:class:`BatchKey`: the shared batch of mixed slot sizes, or a batch of one slot size
for large structures). Every round, for every open batch, the scheduler

1. reads more structures (:meth:`Scheduler.read_more`; invalid ones finish at once),
2. opens a batch for every key that has structures waiting and none open
   (:meth:`Scheduler.open_batches`, a :class:`~kups_relax.layout.SlotLayout` planned from the
   atom budget),
3. advances each batch (:meth:`Scheduler.advance`): free slots take waiting structures
   (:meth:`SlotBatch.refill`), a batch with nothing running is retired, a batch nothing waits
   for is compacted into a smaller one, and one chunk of steps runs (:meth:`SlotBatch.run_chunk`),
4. hands over the structures that stopped, as ``(job, result)`` pairs, the moment they stop.

:meth:`Scheduler.irun` is that loop as a generator, the way ASE's ``Dynamics.irun`` reads; every
step above is a method that returns what finished (no step does its work lazily). The host touches
the device only between chunks: to collect the per-step records and the systems that stopped, to
put the next structures into freed slots (no recompilation), and to grow the neighbor list after
an overflow.

Several devices (:func:`relax_on_devices`): one :class:`Scheduler` per device, each in a thread of
its own with that device as JAX's default, all sharing one :class:`Intake` (the input, read by one
stream at a time, and the waiting rooms), so whichever device frees a slot takes the next
structure; finished structures are merged into one stream as they come.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms

from . import neighbors as nl
from .batch import (DTYPES, GEOMETRY_FIELDS, Geometry, clear_slot, device_geometry, empty_arrays, pack_structure,
                    precon_width, widen_precon, with_results)
from .precon import DENSE_LIMIT, WIDTH_STEP, exp_tables, table_width
from .compile_stats import compile_stats
from .executables import cached_jit
from .feed import PENDING
from .symmetry import MAX_CELL_STEP, MAX_POINT_OPS, find_constraint, space_group
from .filters import CellFilter, check_variable_cell, device_cell_params, empty_cell_table, pack_cell
from .layout import SlotLayout, plan_layout, shares_batch, slot_size
from .loop import Status, Targets, admit, compact, current_geometry, initial_state, run_chunk, system_cutoffs, \
    with_neighbors
from .results import RelaxResult, Trajectory
from .transforms import Transform
from .validate import InvalidStructure, check_structure

logger = logging.getLogger(__name__)

#: When nothing waits for its slots, a batch whose running systems fit a batch this many times
#: smaller is compacted into one (every compacted shape is a set of programs to compile once).
COMPACTION_FACTOR = 4
#: Batches are compacted down to this many atom rows; below it a step costs little more than its
#: fixed overhead.
MIN_COMPACTED_ROWS = 256


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What every batch of one run shares.

    Attributes:
        potential: the potential (:mod:`potentials`).
        optimizer: the optimizer transform (:mod:`kups_relax.transforms`).
        atoms_per_batch: budget of atom rows per batch (:mod:`kups_relax.layout`).
        dtype: ``"float64"`` or ``"float32"``.
        skin: neighbor-list skin, Å.
        chunk_steps: steps per device call between host checks.
        trajectory: keep every frame of every structure.
        variable_cell: the programs relax cells (some structure has a cell filter).
        symmetry: batches carry ``FixSymmetry`` tables (:mod:`kups_relax.symmetry`); without,
            a structure with that constraint is refused (invalid).
        symprec: give every structure ASE's ``FixSymmetry(symprec=...)`` when it is read
            (``fix_symmetry=True``); ``None``: only structures that have the constraint keep it.
    """

    potential: Any
    optimizer: Transform
    atoms_per_batch: int
    dtype: str = "float64"
    skin: float = 0.5
    chunk_steps: int = 64
    trajectory: bool = False
    variable_cell: bool = False
    symmetry: bool = False
    symprec: float | None = None

    def __post_init__(self):
        if getattr(self.optimizer, "line_search", False) and (self.variable_cell or self.symmetry):
            what = "cell filters" if self.variable_cell else "FixSymmetry"
            raise ValueError(f"optimizer precon_lbfgs relaxes positions only and does not take {what} (ASE's "
                             "PreconLBFGS(variable_cell=True) form is not implemented); use lbfgs or fire for them")


@dataclasses.dataclass
class Job:
    """One structure on its way through the engine (host side): its input, its stopping rules,
    and the records collected while it runs."""

    index: int
    name: str
    atoms: Atoms
    fmax: float
    max_steps: int
    max_displacement: float
    cell_filter: CellFilter | None = None
    spacegroup: str = ""  # of the input as given (runs with symmetry)
    prepared: Any = None  # a Future: its FixSymmetry and preconditioner being found on the intake's thread
    precon: Any = None  # its preconditioner tables (kups_relax.precon.exp_tables), when found early
    energies: list = dataclasses.field(default_factory=list)
    fmaxes: list = dataclasses.field(default_factory=list)
    frames: list = dataclasses.field(default_factory=list)


def invalid_result(job: Job, reason: str) -> RelaxResult:
    """The result of a structure that cannot be relaxed (``status="invalid"``, the input unchanged)."""
    atoms = job.atoms.copy() if isinstance(job.atoms, Atoms) else job.atoms
    return RelaxResult(name=job.name, atoms=atoms, energy=float("nan"), initial_energy=float("nan"),
                       fmax=float("nan"), steps=0, converged=False, status="invalid", reason=reason)


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """Which batch a structure waits for.

    Attributes:
        slot_atoms: the slot size of a batch of large structures (each larger than the budget's
            shared fraction, :func:`~kups_relax.layout.shares_batch`), or ``None`` for the one
            batch that structures of mixed sizes share.
    """

    slot_atoms: int | None = None

    @classmethod
    def of(cls, n_atoms: int, atoms_per_batch: int) -> "BatchKey":
        """The batch a structure of ``n_atoms`` atoms goes to."""
        return cls(None) if shares_batch(n_atoms, atoms_per_batch) else cls(slot_size(n_atoms))

    @property
    def shared(self) -> bool:
        return self.slot_atoms is None


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


Finished = list[tuple[Job, RelaxResult]]


class Intake:
    """What the streams of one run share: the input, read as it goes, and the structures waiting for a slot.

    One device's :class:`Scheduler` owns one; with several devices every device's scheduler
    shares it (:func:`relax_on_devices`): one stream at a time reads (``reading``), and the
    waiting rooms are touched only under ``lock``, so a structure is taken by exactly one slot.

    Args:
        jobs: the structures, read lazily (at most a read-ahead of them are held at a time).
        settings: what every batch shares.
        total: how many structures there are, when known (for progress messages).
        known_sizes: atom counts of every structure, when the whole list is known up front.
        streams: how many device streams share the intake: with the whole list known, each
            stream's batches are planned for its share of it (``1/streams`` of every size).
        input_wait: for input that arrives while the run goes on (a :class:`~kups_relax.feed.Feed`):
            ``jobs`` yields :data:`~kups_relax.feed.PENDING` when nothing is queued yet, and
            ``input_wait(timeout)`` blocks until something is (called only by a stream with
            nothing to run).
        layout_sizes: atom counts representative of the input, to plan shared batches from
            instead of the structures read ahead (so the layout, and the programs, do not depend
            on which structures happen to come first).
    """

    def __init__(self, jobs: Iterable[Job], settings: RunSettings, *, total: int | None = None,
                 known_sizes: Sequence[int] | None = None, streams: int = 1,
                 input_wait: Callable[[float], Any] | None = None, layout_sizes: Sequence[int] | None = None) -> None:
        self.jobs = iter(jobs)
        self.input_wait = input_wait
        self.layout_sizes = list(layout_sizes) if layout_sizes else None
        self.settings = settings
        self.total = total
        self.streams = streams
        self.waiting: dict[BatchKey, WaitingRoom] = collections.defaultdict(WaitingRoom)
        self.exhausted = False  # every structure has been read
        self.finished = 0
        self.read_ahead = max(64, settings.atoms_per_batch // 8) * streams  # each stream's as with one
        self.lock = threading.Lock()  # the waiting rooms, `finished`, `opened`, `live`
        self.reading = threading.Lock()  # one stream reads at a time
        self.opened = 0  # batches opened so far
        self.symmetry_seconds = 0.0  # finding symmetry (spglib) for the structures read
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # the intake's thread
        self.live: dict[BatchKey, tuple[SlotLayout, int]] = {}  # layouts of open batches, how many use each
        self.known_shared = self.known_own = None
        if known_sizes is not None:
            self._know(known_sizes)

    def _know(self, sizes: Sequence[int]) -> None:
        """Plan batches from the whole list: each stream's share of every size (all of them for one stream)."""
        budget = self.settings.atoms_per_batch
        shared = [n for n in sizes if shares_batch(n, budget)]
        own = collections.Counter(slot_size(n) for n in sizes if not shares_batch(n, budget))
        if self.streams > 1:
            share = lambda count: math.ceil(count / self.streams)  # noqa: E731
            shared = [n for n, count in collections.Counter(shared).items() for _ in range(share(count))]
            own = collections.Counter({size: share(count) for size, count in own.items()})
        self.known_shared, self.known_own = shared, own

    def any_waiting(self) -> bool:
        with self.lock:
            return any(self.waiting.values())

    def read(self, wait: bool = True) -> Finished:
        """Read structures until a read-ahead's worth wait; return the invalid ones, finished.

        Another stream reading: ``wait`` for it (a stream with nothing to run), else return at
        once (that stream fills the rooms)."""
        if not self.reading.acquire(blocking=wait):
            return []
        try:
            return self._read()
        finally:
            self.reading.release()

    def _read(self) -> Finished:
        invalid = []
        with self.lock:
            waiting = sum(len(room) for room in self.waiting.values())
        first_read = self.opened == 0
        while not self.exhausted and waiting < self.read_ahead:
            job = next(self.jobs, None)
            if job is None:
                self.exhausted = True
                break
            if job is PENDING:  # a feed with nothing queued now: run what is here
                break
            try:
                check_structure(job.atoms, job.name, self.settings.potential.supported_numbers)
                if job.cell_filter is not None and (why := check_variable_cell(job.atoms)):
                    raise InvalidStructure(job.name, why)
                self._start_preparation(job)
            except InvalidStructure as err:
                logger.warning("%s", err)
                invalid.append((job, invalid_result(job, err.reason)))
                continue
            with self.lock:
                self.waiting[BatchKey.of(len(job.atoms), self.settings.atoms_per_batch)].append(job)
            waiting += 1
        if self.streams > 1 and self.exhausted and first_read and self.known_shared is None:
            with self.lock:  # the first read took the whole input: share it as a known list
                if self.opened == 0:
                    self._know([len(job.atoms) for room in self.waiting.values() for q in room.by_size.values()
                                for job in q])
        return invalid

    def _start_preparation(self, job: Job) -> None:
        """Start what ``job`` needs before it can run on the intake's own thread (``job.prepared``),
        while the device runs: its symmetry (spglib, 10-500 ms per structure) and then, in runs of
        ``PreconLBFGS``, its preconditioner tables (~50 ms for 858 atoms). A structure with a
        FixSymmetry constraint in a run without tables is InvalidStructure at once."""
        from . import symmetry

        constraint = symmetry.find_constraint(job.atoms)
        needs_symmetry = self.settings.symprec is not None or constraint is not None
        if needs_symmetry and not self.settings.symmetry:
            raise InvalidStructure(job.name, "has a FixSymmetry constraint, but the run was started without symmetry "
                                             "(pass fix_symmetry=True)")
        precon = getattr(self.settings.optimizer, "exp_settings", None)
        if not needs_symmetry and precon is None:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kups-relax-intake")
        job.prepared = self._pool.submit(self._prepare, job, needs_symmetry, constraint, precon)

    def _prepare(self, job: Job, needs_symmetry: bool, constraint, precon) -> None:
        """The intake thread's work for ``job``: its symmetry (``constraint``: its own FixSymmetry or
        ``None``), then its preconditioner tables (``precon``: :class:`~kups_relax.precon.ExpSettings`
        or ``None``). InvalidStructure when either cannot be found. The dense inverse is left to
        :func:`~kups_relax.batch.pack_structure`, when the structure takes a slot: only batches that
        apply it densely need it, and a waiting structure would hold ``N x N`` floats (8 MB at
        1,000 atoms, for every structure read ahead)."""
        if needs_symmetry:
            self._prepare_symmetry(job, constraint)
        if precon is not None:
            try:
                job.precon = exp_tables(job.atoms, precon)
            except ValueError as err:
                raise InvalidStructure(job.name, str(err)) from None

    def _prepare_symmetry(self, job: Job, constraint) -> None:
        """``FixSymmetry`` for ``job`` (``symprec`` runs: ASE's, which refines the structure), its
        input's space group, and the time it took (``symmetry_seconds``). InvalidStructure when
        spglib finds none."""
        from . import symmetry

        t = time.perf_counter()
        try:
            if constraint is None:
                job.atoms, job.spacegroup = symmetry.prepare(job.atoms, self.settings.symprec)
            else:
                job.spacegroup = symmetry.space_group(job.atoms, constraint.symprec)
        except ValueError as err:
            raise InvalidStructure(job.name, str(err)) from None
        finally:
            self.symmetry_seconds += time.perf_counter() - t

    def wait_for_input(self, timeout: float = 0.5) -> None:
        """Block (at most ``timeout`` seconds) until queued input arrives; at once for input that is read by waiting."""
        if self.input_wait is not None and not self.exhausted:
            self.input_wait(timeout)

    def layout(self, key: BatchKey) -> SlotLayout:
        """The slots of a new batch for ``key`` (under ``lock``). While the input is being read, a
        batch opens with the layout of one another stream has open for the key (same programs)."""
        layout, users = self.live.get(key, (None, 0))
        if layout is None or self.exhausted:
            layout = self._plan(key)
        self.live[key] = (layout, users + 1)
        self.opened += 1
        return layout

    def closed(self, key: BatchKey) -> None:
        """A batch of ``key`` retired."""
        with self.lock:
            layout, users = self.live[key]
            if users > 1:
                self.live[key] = (layout, users - 1)
            else:
                del self.live[key]

    def _plan(self, key: BatchKey) -> SlotLayout:
        budget = self.settings.atoms_per_batch
        room = self.waiting[key]
        if key.shared:
            if self.known_shared:
                return plan_layout(self.known_shared, budget, known=True)
            if self.layout_sizes and not self.exhausted:
                return plan_layout(self.layout_sizes, budget, known=False)
            return plan_layout(room.sizes(), budget, known=self.exhausted)
        per_batch = max(1, budget // key.slot_atoms)
        if self.known_own is not None:
            per_batch = min(per_batch, self.known_own[key.slot_atoms])
        elif self.exhausted:
            per_batch = min(per_batch, len(room))
        return SlotLayout.uniform(key.slot_atoms, per_batch)


class Scheduler:
    """Streams structures through slot batches; :meth:`irun` yields ``(job, result)`` as each finishes.

    Structures up to ``atoms_per_batch * SHARED_FRACTION`` atoms share one batch of mixed slot
    sizes (:func:`~kups_relax.layout.plan_layout`, from ``known_sizes`` when the whole list is
    known, else from the structures read ahead); larger ones get batches of their own slot size.

    Args:
        jobs: the structures, read lazily (at most a read-ahead of them are held at a time).
        settings: what every batch shares.
        total: how many structures there are, when known (for progress messages).
        known_sizes: atom counts of every structure, when the whole list is known up front.
        intake: an :class:`Intake` shared with other devices' schedulers (then ``jobs``,
            ``total``, ``known_sizes``, ``input_wait`` and ``layout_sizes`` are the intake's, and ignored here).
        device: the device this scheduler's programs run on, for messages (the caller makes it
            JAX's default device in this thread); ``None``: JAX's default.
        stop: set by another thread to end :meth:`rounds` after the current chunk.
    """

    def __init__(self, jobs: Iterable[Job], settings: RunSettings, *, total: int | None = None,
                 known_sizes: Sequence[int] | None = None, intake: Intake | None = None,
                 device: jax.Device | None = None, stop: threading.Event | None = None,
                 input_wait: Callable[[float], Any] | None = None, layout_sizes: Sequence[int] | None = None) -> None:
        self.intake = intake or Intake(jobs, settings, total=total, known_sizes=known_sizes, input_wait=input_wait,
                                       layout_sizes=layout_sizes)
        self.settings = settings
        self.device = device
        self.stop = stop
        self.batches: dict[BatchKey, SlotBatch] = {}
        self.finished = 0  # structures this scheduler handed over
        # atom-steps of the batches retired so far: of running systems, and executed in all
        self.useful_atom_steps = 0
        self.executed_atom_steps = 0

    @property
    def waiting(self) -> dict[BatchKey, WaitingRoom]:
        return self.intake.waiting

    @property
    def exhausted(self) -> bool:
        return self.intake.exhausted

    @property
    def total(self) -> int | None:
        return self.intake.total

    @property
    def done(self) -> bool:
        """Every structure read and finished (this scheduler's batches; another stream's may still run)."""
        return self.intake.exhausted and not self.batches and not self.intake.any_waiting()

    def irun(self):
        """Relax every structure; yield ``(job, result)`` as each finishes (invalid ones at once)."""
        t0 = time.perf_counter()
        compiled_before = compile_stats()
        yield from self.rounds()
        self._log_summary(time.perf_counter() - t0, compile_stats().since(compiled_before))

    def rounds(self):
        """:meth:`irun` without its closing summary (several devices' schedulers share one)."""
        while not self.done and not self._stopped():
            yield from self._hand_over(self.read_more())
            self.open_batches()
            if not self.batches:  # nothing to run: input still to come (a feed), or another stream's to read
                self.intake.wait_for_input()
            for key in list(self.batches):
                if self._stopped():
                    return
                yield from self._hand_over(self.advance(key))

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def read_more(self) -> Finished:
        """Read structures until a read-ahead's worth wait; return the invalid ones, finished
        (:meth:`Intake.read`; while another stream reads, a scheduler with batches to run goes on)."""
        return self.intake.read(wait=not self.batches)

    def open_batches(self) -> None:
        """Open a batch for every key with structures waiting and no batch open."""
        with self.intake.lock:
            layouts = {key: self.intake.layout(key) for key, room in self.intake.waiting.items()
                       if room and key not in self.batches}
        for key, layout in layouts.items():
            self.batches[key] = SlotBatch(layout, self.settings)

    def advance(self, key: BatchKey) -> Finished:
        """Refill the batch's free slots and run one chunk of steps; return what finished.

        A batch with nothing left to run is retired. While structures may still come, a chunk
        stops once a quarter of the slots are free, to refill them; when nothing will take the
        freed slots, the batch is compacted into a smaller one instead, and the chunk stops when
        enough systems have stopped for the next compaction.
        """
        batch, room, lock = self.batches[key], self.intake.waiting[key], self.intake.lock
        finished = batch.refill(room, lock)
        if batch.idle:
            self.useful_atom_steps += batch.useful_atom_steps
            self.executed_atom_steps += batch.executed_atom_steps
            del self.batches[key]
            self.intake.closed(key)
            return finished
        with lock:
            more = bool(room) or not self.intake.exhausted
        if more:
            stop_after = max(1, batch.n_slots // 4)
        else:
            batch.compact()
            stop_after = batch.stops_before_compaction()
        finished += batch.run_chunk(stop_after)
        if logger.isEnabledFor(logging.DEBUG):
            with lock:
                if self.total is not None:
                    running = self.total - self.intake.finished - len(finished)
                else:
                    running = sum(b.n_running for b in self.batches.values()) + sum(
                        len(r) for r in self.waiting.values())
            logger.debug("%schunk %d: %d systems running", self._on, batch.chunks, running)
        return finished

    @property
    def _on(self) -> str:
        return "" if self.device is None else f"{self.device}: "

    def _hand_over(self, finished: Finished):
        for item in finished:
            self.finished += 1
            with self.intake.lock:
                self.intake.finished += 1
            yield item

    def _log_summary(self, seconds: float, compiled) -> None:
        logger.info("relaxed %d structures in %.2f s; compiled %d programs, %d from the compilation cache (%.1f s)",
                    self.finished, seconds, compiled.programs, compiled.cached, compiled.seconds)
        log_useful_fraction(self.useful_atom_steps, self.executed_atom_steps)
        log_symmetry_time(self.intake, seconds)


def log_symmetry_time(intake: Intake, seconds: float) -> None:
    if intake.symmetry_seconds:
        logger.info("finding symmetry (spglib, on the host as structures were read): %.2f s, %.1f %% of the run",
                    intake.symmetry_seconds, 100 * intake.symmetry_seconds / max(seconds, 1e-9))


def log_useful_fraction(useful: int, executed: int) -> None:
    if executed:
        logger.info("useful atom-steps: %d of %d executed (%.1f %%; the rest padding rows and stopped slots)",
                    useful, executed, 100 * useful / executed)


_STREAM_DONE = object()  # a device's scheduler finished
_WAKE = object()  # a device's thread failed (its error is in `errors`)


def relax_on_devices(jobs: Iterable[Job], settings: RunSettings, devices: Sequence[jax.Device], *,
                     total: int | None = None, known_sizes: Sequence[int] | None = None,
                     queue_size: int = 1024, input_wait: Callable[[float], Any] | None = None,
                     layout_sizes: Sequence[int] | None = None) -> Iterator[tuple[Job, RelaxResult]]:
    """Relax on every device of ``devices`` at once; yield ``(job, result)`` as each finishes.

    One :class:`Scheduler` per device, each in a thread of its own (XLA releases the GIL while a
    program runs; the host work between chunks is Python) that makes its device JAX's default
    (``jax.default_device``, thread-local: every array the scheduler makes and every program it
    runs is on that device) and enters ``jax.enable_x64(True)`` (also thread-local). The
    schedulers share one :class:`Intake`: whichever device frees a slot takes the next waiting
    structure. The potential's arrays are copied to every device once. The input is read in
    these threads too, one at a time: a caller's iterator runs there (in the caller's x64 mode
    when the entry point says so, :mod:`kups_relax.precision`, but with that device as default).

    An error in any device's thread stops the others (after their current chunk) and is
    raised here; so is closing this generator (the threads are joined before it returns).
    ``queue_size`` finished structures at most wait for the caller before the devices pause.
    """
    intake = Intake(jobs, settings, total=total, known_sizes=known_sizes, streams=len(devices), input_wait=input_wait,
                    layout_sizes=layout_sizes)
    results: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    errors: list[BaseException] = []
    summaries: list[Scheduler] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work(device: jax.Device) -> None:
        try:
            with jax.enable_x64(True), jax.default_device(device):
                placed = dataclasses.replace(settings, potential=on_device(settings.potential, device))
                scheduler = Scheduler((), placed, intake=intake, device=device, stop=stop)
                summaries.append(scheduler)
                for item in scheduler.rounds():
                    if not put(item):
                        return
            put(_STREAM_DONE)
        except BaseException as err:  # noqa: BLE001 -- handed to the caller's thread, raised there
            errors.append(err)
            stop.set()  # the other devices stop before their next chunk
            with contextlib.suppress(queue.Full):  # a full queue: the caller is reading it anyway
                results.put_nowait(_WAKE)

    logger.info("relaxing on %d devices: %s", len(devices), ", ".join(map(str, devices)))
    t0 = time.perf_counter()
    compiled_before = compile_stats()
    threads = [threading.Thread(target=work, args=(device,), name=f"kups-relax-{device}", daemon=True)
               for device in devices]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = results.get()
            if errors:
                raise errors[0]
            if item is _STREAM_DONE:
                running -= 1
            else:
                yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    compiled = compile_stats().since(compiled_before)
    logger.info("relaxed %d structures in %.2f s on %d devices (%s); compiled %d programs, %d from the compilation "
                "cache (%.1f s)", intake.finished, time.perf_counter() - t0, len(devices),
                ", ".join(f"{s.device}: {s.finished}" for s in summaries), compiled.programs, compiled.cached,
                compiled.seconds)
    log_useful_fraction(sum(s.useful_atom_steps for s in summaries), sum(s.executed_atom_steps for s in summaries))
    log_symmetry_time(intake, time.perf_counter() - t0)


def on_device(tree, device: jax.Device):
    """``tree`` with every JAX array copied to ``device`` (other leaves as they are)."""
    return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, device) if isinstance(leaf, jax.Array) else leaf,
                                  tree)


class SlotBatch:
    """A fixed batch of slots of mixed sizes (a :class:`~kups_relax.layout.SlotLayout`), refilled in flight.

    Slot ``s`` owns atom rows ``[first_atom[s], first_atom[s] + slot_atoms[s])``; a structure of
    ``n`` atoms uses the first ``n`` and the rest are padding. Shapes never change (but for
    compaction, to fixed smaller levels), so the compiled programs are reused for every structure
    this batch takes; only the neighbor list may grow (a recompile) when its capacity overflows.
    """

    def __init__(self, layout: SlotLayout, settings: RunSettings) -> None:
        self.settings = settings
        self.base_shape = (layout.n_rows, layout.n_slots)  # compaction levels divide this shape
        self.float_dtype = DTYPES[settings.dtype]
        self.point_ops = MAX_POINT_OPS if settings.symmetry else 0
        # runs with a preconditioner (kups_relax.precon) carry its pair tables, widened as needed
        self.precon_settings = getattr(settings.optimizer, "exp_settings", None)
        self._set_layout(layout, empty_arrays(layout.n_rows, layout.n_slots, first_atom=layout.first_atom,
                                              point_ops=self.point_ops,
                                              precon_pairs=0 if self.precon_settings is None else WIDTH_STEP,
                                              precon_dense=self._dense_width(layout)))
        S = layout.n_slots
        self.fmax = np.zeros(S)
        self.max_steps = np.zeros(S, np.int64)
        self.max_displacement = np.full(S, np.inf)
        self.jobs: list[Job | None] = [None] * S
        self.cell_table = empty_cell_table(S) if settings.variable_cell else None
        self.state = None
        self.geometry: Geometry | None = None
        self.chunks = 0
        # atom rows x loop iterations the device ran, and atoms x steps of running systems within
        # them: their ratio is the batch's useful fraction (padding rows and stopped slots waste the rest)
        self.executed_atom_steps = 0
        self.useful_atom_steps = 0
        sizes = collections.Counter(int(n) for n in self.slot_atoms if n)
        logger.debug("new batch: %d atom rows, slots %s", layout.n_rows, dict(sorted(sizes.items())))

    def _dense_width(self, layout: SlotLayout) -> int:
        """Width of the dense preconditioner inverses (:data:`kups_relax.precon.DENSE_LIMIT`), 0: none."""
        if self.precon_settings is None or layout.largest > DENSE_LIMIT:
            return 0
        return layout.largest

    def _set_layout(self, layout: SlotLayout, host: dict[str, np.ndarray]) -> None:
        self.layout, self.host = layout, host
        self.slot_atoms = np.asarray(layout.slot_atoms, np.int64)
        self.first = layout.first_atom
        self.n_slots = layout.n_slots

    @property
    def idle(self) -> bool:
        return all(job is None for job in self.jobs)

    @property
    def n_running(self) -> int:
        return sum(job is not None for job in self.jobs)

    def _cell_params(self):
        if self.cell_table is None:
            return None
        return device_cell_params(self.cell_table, self.float_dtype)

    def _targets(self) -> Targets:
        return Targets(fmax=jnp.asarray(self.fmax, self.float_dtype),
                       max_steps=jnp.asarray(np.minimum(self.max_steps, 2**31 - 1), jnp.int32),
                       max_displacement=jnp.asarray(self.max_displacement, self.float_dtype))

    def _slot_rows(self, slot: int) -> slice:
        """Every atom row slot ``slot`` owns."""
        first = int(self.first[slot])
        return slice(first, first + int(self.slot_atoms[slot]))

    def _rows(self, slot: int) -> slice:
        """The rows of the atoms of the structure in ``slot``."""
        start = int(self.first[slot])
        return slice(start, start + len(self.jobs[slot].atoms))

    def _place(self, slot: int, job: Job | None) -> None:
        """Put ``job`` into ``slot`` (``None``: empty the slot)."""
        clear_slot(self.host, slot, self._slot_rows(slot))
        self.fmax[slot], self.max_steps[slot], self.max_displacement[slot] = 0.0, 0, np.inf
        self.jobs[slot] = job
        if self.cell_table is not None:
            pack_cell(self.cell_table, slot, None if job is None else job.atoms, None if job is None else job.cell_filter)
        if job is None:
            return
        tables = None
        if self.precon_settings is not None:
            tables = job.precon if job.precon is not None else exp_tables(job.atoms, self.precon_settings)
            job.precon = None
            widen_precon(self.host, table_width(tables["precon_neighbors"].shape[1]))
        pack_structure(self.host, slot, int(self.first[slot]), job.atoms, job.name, precon=tables)
        self.fmax[slot], self.max_steps[slot], self.max_displacement[slot] = job.fmax, job.max_steps, job.max_displacement

    def _claim(self, room: WaitingRoom) -> dict[int, Job]:
        """Take waiting structures for the free slots: ``{slot: job}``.

        A free slot takes the first waiting structure of its own size; slots still free then take
        the earliest structure that fits (smallest slots first), so no slot idles while something fits.
        """
        claimed = {}
        free = [s for s, job in enumerate(self.jobs) if job is None and self.slot_atoms[s] > 0]
        for slot in free:
            job = room.pop_exact(int(self.slot_atoms[slot]))
            if job is not None:
                claimed[slot] = job
        for slot in sorted((s for s in free if s not in claimed), key=lambda s: self.slot_atoms[s]):
            job = room.pop_fitting(int(self.slot_atoms[slot]))
            if job is not None:
                claimed[slot] = job
        return claimed

    def refill(self, room: WaitingRoom, lock: threading.Lock | None = None) -> Finished:
        """Start waiting structures in free slots (the first call starts the batch); return any
        that stop at step 0. ``lock`` guards ``room`` when other devices' batches take from it too."""
        with lock or contextlib.nullcontext():
            if self.state is not None and not room:
                return []
            claimed = self._claim(room)
        if not claimed:  # nothing fitted (or, with several devices, another batch took it first)
            return []
        refused: Finished = []
        for slot, job in list(claimed.items()):
            if job.prepared is not None:  # its symmetry and preconditioner, found on the intake's thread
                try:
                    job.prepared.result()
                except InvalidStructure as err:
                    logger.warning("%s", err)
                    refused.append((job, invalid_result(job, err.reason)))
                    del claimed[slot]
                job.prepared = None
        if not claimed:
            return refused
        admitted = np.zeros(self.n_slots, bool)
        for slot, job in claimed.items():
            self._place(slot, job)
            admitted[slot] = True
        s = self.settings
        self.geometry = device_geometry(self.host, s.dtype)
        targets = self._targets()
        if self.state is None:
            cutoff = float(s.potential.cutoff)
            neighbors = nl.allocate(self.geometry, cutoff, s.skin, block=self.layout.largest,
                                    cutoffs=_system_cutoffs(s.potential, self.geometry, cutoff=cutoff))
            self.state = initial_state(self.geometry, s.potential, neighbors, targets, optimizer=s.optimizer,
                                       cell_params=self._cell_params())
        else:
            while True:
                state = admit(self.state, self.geometry, s.potential, targets, jnp.asarray(admitted),
                              optimizer=s.optimizer, cell_params=self._cell_params())
                if not bool(state.neighbors.overflow):
                    break
                self._grow(self._current_geometry(state))
            self.state = state
        self._start_records(admitted)
        return refused + self._collect_finished()

    def _start_records(self, admitted: np.ndarray) -> None:
        """Every newly started structure's records begin with its step-0 evaluation."""
        energy, fmax = np.asarray(self.state.energy), np.asarray(self.state.fmax)
        if self.settings.trajectory:
            positions, forces = np.asarray(self.state.positions), np.asarray(self.state.forces)
            cells = np.asarray(self.state.cell) if self.state.cell is not None else None
        for slot in np.flatnonzero(admitted):
            job = self.jobs[slot]
            job.energies, job.fmaxes, job.frames = [float(energy[slot])], [float(fmax[slot])], []
            if self.settings.trajectory:
                rows = self._rows(slot)
                job.frames.append((positions[None, rows], forces[None, rows], None if cells is None else cells[None, slot]))

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
        (:meth:`run_chunk`'s ``stop_after``), or ``None`` when it cannot be compacted further.

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
        host = empty_arrays(A_new, S_new, first_atom=np.full(S_new, sum(layout.slot_atoms)), point_ops=self.point_ops,
                            precon_pairs=precon_width(self.host), precon_dense=self.host["precon_inverse"].shape[1])
        rows_map = np.full(A_new, A_old, np.int32)
        systems_map = np.full(S_new, S_old, np.int32)
        for t, s in enumerate(running):
            n = int(self.slot_atoms[s])
            old, new = slice(int(self.first[s]), int(self.first[s]) + n), slice(int(first_new[t]), int(first_new[t]) + n)
            rows_map[new] = np.arange(old.start, old.stop)
            systems_map[t] = s
            for field in GEOMETRY_FIELDS:
                if field.per_atom:
                    host[field.name][new] = self.host[field.name][old]
                else:
                    host[field.name][t] = self.host[field.name][s]
            host["system"][new] = np.where(self.host["system"][old] < S_old, t, S_new)
            host["first_atom"][t] = first_new[t]
        self.state = compact(self.state, jnp.asarray(rows_map), jnp.asarray(systems_map),
                             optimizer=self.settings.optimizer)
        logger.debug("compacted %d running systems: %d -> %d atom rows, %d -> %d slots",
                     len(running), A_old, A_new, S_old, S_new)
        self._set_layout(layout, host)
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
        self.geometry = device_geometry(self.host, self.settings.dtype)
        return True

    def run_chunk(self, stop_after: int | None) -> Finished:
        """Run one chunk of steps, stopping early once ``stop_after`` systems have stopped
        (``None``: no such limit); return the systems that stopped."""
        s = self.settings
        state, chunk = run_chunk(self.state, self.geometry, s.potential, self._targets(),
                                 optimizer=s.optimizer, n_steps=s.chunk_steps, record=s.trajectory,
                                 stop_after=stop_after if stop_after is not None else 2**30,
                                 cell_params=self._cell_params())
        self.state = state
        self.chunks += 1
        self._record(chunk)
        if bool(state.neighbors.overflow):
            self._grow(self._current_geometry(state))
        return self._collect_finished()

    def _record(self, chunk) -> None:
        """Append the chunk's per-step records to every running structure's; count atom-steps."""
        taken = np.asarray(chunk.taken)
        self.executed_atom_steps += int(taken.any(axis=1).sum()) * int(self.state.positions.shape[0])
        self.useful_atom_steps += sum(int(taken[:, slot].sum()) * len(job.atoms)
                                      for slot, job in enumerate(self.jobs) if job is not None)
        if not taken.any():
            return
        e, f = np.asarray(chunk.energy), np.asarray(chunk.fmax)
        if self.settings.trajectory:
            pos, frc = np.asarray(chunk.positions), np.asarray(chunk.forces)
            cel = np.asarray(chunk.cell) if chunk.cell is not None else None
        for slot, job in enumerate(self.jobs):
            if job is None:
                continue
            steps = np.flatnonzero(taken[:, slot])
            job.energies.extend(e[steps, slot].tolist())
            job.fmaxes.extend(f[steps, slot].tolist())
            if self.settings.trajectory and len(steps):
                r = self._rows(slot)  # copies: the chunk's arrays are not kept alive
                job.frames.append((pos[steps, r], frc[steps, r], None if cel is None else cel[steps, slot]))

    def _collect_finished(self) -> Finished:
        """Results of the structures that stopped; their slots are emptied."""
        status = np.asarray(self.state.status)
        done = [s for s, job in enumerate(self.jobs) if job is not None and status[s] != Status.RUNNING]
        if not done:
            return []
        positions, forces = np.asarray(self.state.positions), np.asarray(self.state.forces)
        energy, fmax, steps = np.asarray(self.state.energy), np.asarray(self.state.fmax), np.asarray(self.state.steps)
        evaluations = np.asarray(self.state.evaluations)
        # the loop's stress is current for every stopped system (run_chunk evaluates it when they stop)
        stress = np.asarray(self.state.stress)
        cells = np.asarray(self.state.cell) if self.state.cell is not None else None
        finished = []
        for slot in done:
            job = self.jobs[slot]
            rows = self._rows(slot)
            atoms = with_results(job.atoms, positions[rows], energy=energy[slot], forces=forces[rows],
                                 stress=stress[slot], cell=None if cells is None else cells[slot])
            code = Status(int(status[slot]))
            trajectory = None
            if self.settings.trajectory:
                pos, frc, cel = zip(*job.frames)
                trajectory = Trajectory(job.atoms, np.concatenate(pos), np.concatenate(frc),
                                        np.asarray(job.energies, np.float64),
                                        None if cel[0] is None else np.concatenate(cel))
            groups = {}
            if (constraint := find_constraint(job.atoms)) is not None:
                groups = dict(spacegroup_initial=job.spacegroup,
                              spacegroup_final=space_group(atoms, constraint.symprec))
            result = RelaxResult(
                name=job.name, atoms=atoms, energy=float(energy[slot]), initial_energy=float(job.energies[0]),
                fmax=float(fmax[slot]), steps=int(steps[slot]), n_evaluations=int(evaluations[slot]),
                converged=code == Status.CONVERGED,
                status=code.label, reason=stop_reason(code, job, float(fmax[slot])),
                energies=np.asarray(job.energies, np.float64),
                fmaxes=np.asarray(job.fmaxes, np.float64), trajectory=trajectory, **groups)
            self._place(slot, None)
            finished.append((job, result))
        return finished


def stop_reason(status: Status, job: Job, fmax: float) -> str:
    """Why a structure stopped where it did (``""`` when it converged)."""
    if status == Status.CONVERGED:
        return ""
    if status == Status.UNCONVERGED:
        return f"not converged within {job.max_steps} steps (fmax {fmax:.4g} eV/Å)"
    if status == Status.DIVERGED:
        return "energy or forces became non-finite; stopped at the last finite geometry"
    if status == Status.LINE_SEARCH_FAILED:
        return ("the Armijo line search failed right after a history reset (no downhill step longer than a_min; "
                f"ASE's PreconLBFGS raises); stopped at fmax {fmax:.4g} eV/Å")
    if status == Status.BLEW_APART:
        reason = (f"blew apart: the next step would have moved an atom more than {job.max_displacement:g} Å "
                  f"from its start; stopped at the last geometry within that")
        if job.cell_filter is not None and find_constraint(job.atoms) is not None:
            reason += (f", or FixSymmetry refused a cell step (deformation gradient step > {MAX_CELL_STEP}, "
                       "where ASE raises)")
        return reason
    return status.label


@cached_jit(static_argnames=("cutoff",))
def _system_cutoffs(potential, geometry, cutoff):
    return system_cutoffs(potential, geometry, cutoff)

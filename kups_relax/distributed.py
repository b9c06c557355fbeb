"""A campaign on a Dask cluster: shards of structures go to workers as tasks, rows come back.

    relax-batch inputs/ --workers 2                        # a LocalCluster of 2 worker processes
    relax-batch inputs/ --dask-scheduler tcp://host:8786   # a running cluster (SLURM, PBS, ...)

The client (the ``relax-batch`` process, or :func:`relax_campaign` in a program) reads the
inputs as it goes and cuts them into *shards* of ``--task-size`` structures, each one Dask task
(:func:`relax_shard`). Every worker process keeps one warm engine per run setting
(:func:`worker_run`: the potential built and the compiled programs loaded once, then reused by
every shard it runs) and writes each finished system's ``<name>.h5`` atomically into the shared
output folder. A task returns one small row per system (:class:`SystemRow`: the summary fields,
the relaxed structure, the fmax series; never frames), and the client writes ``summary.csv``
and ``relaxed.extxyz`` as the shards come back.

Faults. Dask reschedules the tasks of a worker that dies (up to
``distributed.scheduler.allowed-failures`` times). A retried shard first looks at the output
folder: a system whose complete ``.h5`` was written by *this* campaign (its id is in the file's
``parameters/campaign``), or by an earlier one with ``--resume``, with the same settings and
input, is not relaxed again; its row is read back from the file. So a killed worker's finished
systems are kept and the others run elsewhere, and the client keeps one row per system (a
shard's rows arrive once: a failed task returns nothing). A shard that fails with an error of
its own (not a setup problem) is split and its structures retried one by one, so one bad
structure becomes one ``failed`` row instead of stopping the campaign.

Setup problems are found before the first shard runs and named (:class:`SetupError`, exit
status 2 on the command line): a scheduler that cannot be reached (its address), a worker
without kups-relax or with another version of it (the worker), a potential file a worker cannot
read (the worker and the file).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Campaign", "CampaignReport", "DEFAULT_SHARD_SIZE", "SetupError", "ShardReport", "SystemRow",
           "WorkerSetup", "check_workers", "connect", "relax_campaign", "relax_shard", "run_on_dask",
           "worker_environment", "worker_run"]

#: Structures per task. Large enough that Dask's per-task cost (~ms) and the shard's tail (its
#: last, slowest systems running in a batch that no longer fills) stay small; small enough
#: that a killed worker's shard is redone quickly and shards spread evenly over the workers.
DEFAULT_SHARD_SIZE = 128

#: Task threads a worker should have (``dask worker --nthreads 2``): its tasks share one stream
#: and only wait for it, so two of them keep it fed from one task to the next.
TASKS_PER_WORKER = 2

#: Structures the client reads ahead to plan the workers' batch layouts from (:attr:`Campaign.layout_sizes`).
LAYOUT_SAMPLE = 512

#: Name of the distribution that must be importable on every worker.
DISTRIBUTION = "kups-relax"

#: ``parameters/`` attribute of an ``.h5`` that names the campaign that wrote it.
CAMPAIGN_ATTRIBUTE = "campaign"


class SetupError(RuntimeError):
    """The cluster cannot run this campaign (unreachable scheduler, worker without the package or
    without the potential's file); the message names the address, worker or file."""


# --- what travels with every task ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Campaign:
    """What a shard task needs besides its structures (small; pickled with every task).

    Attributes:
        out: the shared output folder (the same path on every worker).
        settings: ``relax-batch``'s resolved settings (:func:`kups_relax.cli.resolve_settings`).
        campaign_id: written into every ``.h5`` this campaign writes, so that a retried shard
            recognises (and keeps) the outputs its killed first attempt finished.
        policy: ``"fresh"``, ``"resume"`` (keep any complete output with the same settings and
            input) or ``"overwrite"`` (relax again what an earlier campaign wrote).
        first_shard: with ``--trajectories per-shard``, the number of task 0's shard file (one
            more than the highest already in ``out``); task ``k`` writes ``shard-<first_shard + k>.h5``.
        layout_sizes: atom counts of the campaign's first :data:`LAYOUT_SAMPLE` structures: every
            worker plans its stream's batches from them (``relax_iter(layout_sizes=...)``), so
            the slots, and the compiled programs, are the same on every worker and in every run
            of the campaign, whichever shard a worker happens to get first.
    """

    out: str
    settings: Mapping[str, Any]
    campaign_id: str
    policy: str = "fresh"
    first_shard: int = 1
    layout_sizes: tuple[int, ...] = ()

    @property
    def engine_key(self) -> str:
        """The settings that decide a worker's engine (potential, optimizer, ...), as one string."""
        return json.dumps({k: v for k, v in self.settings.items() if k not in _NOT_ENGINE}, sort_keys=True,
                          default=str)


_NOT_ENGINE = frozenset({"out", "resume", "overwrite", "plot", "quiet", "verbose", "format", "dask_scheduler",
                         "workers", "shard_size", "trajectories", "from_list"})


@dataclasses.dataclass
class SystemRow:
    """One system's outcome as a worker returns it: no frames.

    Attributes:
        row: ``summary.csv``'s fields (:data:`kups_relax.io.SUMMARY_COLUMNS`).
        relaxed: the final structure (energy, forces, stress attached; ``info`` has ``name``,
            ``converged``, ``steps``, ``status``), or ``None`` when the system was not relaxed.
        fmaxes: ``(steps + 1,)`` largest force after every step, eV/Å (``None`` when not relaxed).
        kept: the row was read from an ``.h5`` already there (resume, or a retried shard).
    """

    row: dict[str, Any]
    relaxed: Any = None
    fmaxes: np.ndarray | None = None
    kept: bool = False


@dataclasses.dataclass
class ShardReport:
    """What a shard task returns: its rows, and where and how long it ran.

    Attributes:
        rows: one per structure of the shard, in its order.
        worker: the worker's address.
        seconds: the task's wall time, s (tasks of one worker overlap: they share its stream).
        relaxed, kept: systems relaxed here, and rows read back from complete outputs.
        busy_before, busy_after: the worker stream's busy time (s with structures in it, since it
            started) when the task put its structures in, and when it returned; the client takes
            a worker's busy time in the campaign as its last ``busy_after`` minus its first ``busy_before``.
        compiled_before, compiled_after: the worker's :func:`~kups_relax.compile_stats.compile_stats`
            (programs compiled, loaded from a cache, seconds) at the same two moments.
    """

    rows: list[SystemRow]
    worker: str
    seconds: float
    relaxed: int
    kept: int
    busy_before: float = 0.0
    busy_after: float = 0.0
    compiled_before: tuple[int, int, float] = (0, 0, 0.0)
    compiled_after: tuple[int, int, float] = (0, 0, 0.0)


# --- the worker side ---------------------------------------------------------------------------

_engines: dict[str, Any] = {}
_engines_lock = threading.Lock()


def worker_run(campaign: Campaign):
    """This process's :class:`kups_relax.cli.Run` for ``campaign``'s settings, built on first use and kept.

    The potential is built (its files read) once per worker and setting; the compiled
    programs live in the process (and in the compilation cache on disk), so every later
    shard with these settings starts warm.

    Raises:
        kups_relax.cli.UsageError: the potential (a file it names), optimizer or cell options are unusable here.
    """
    from .cli import make_run

    key = campaign.engine_key
    with _engines_lock:
        run = _engines.get(key)
        if run is None:
            run = make_run({**campaign.settings, "plot": False})  # the client draws the plot
            _engines[key] = run
            logger.info("worker %s: engine ready (potential %s, optimizer %s)", _worker_address(),
                        campaign.settings["potential"], campaign.settings["optimizer"])
    # settings that do not decide the engine (out, trajectories, ...) are this campaign's; the dtype is
    # the engine's resolved one (a campaign may say None: the potential's default), so that outputs
    # and the resume fingerprint name the precision the run used
    return dataclasses.replace(run, out=Path(campaign.out),
                               settings={**campaign.settings, "plot": False, "dtype": run.settings["dtype"]})


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def prepare_worker(campaign: Campaign) -> str:
    """Build this worker's engine now (``client.run``), so that a setup error shows before any shard runs."""
    from .cli import UsageError

    try:
        worker_run(campaign)
    except UsageError as err:
        raise SetupError(str(err)) from None
    return DISTRIBUTION


def _row(item, **fields) -> dict[str, Any]:
    return dict(name=item.name, source=item.source, atoms=len(item.atoms) if item.atoms is not None else None,
                **fields)


def _kept(run, campaign: Campaign, item, shard_file: Path | None = None) -> SystemRow | None:
    """The row of ``item`` from its trajectory when that output is kept (module docstring), else ``None``.

    The trajectory is ``<out>/<name>.h5``, or with ``--trajectories per-shard`` the system's group
    in ``shard_file`` (the task's own shard, or the one an earlier run wrote it to). A complete
    output with other settings or another input under ``--resume`` gives a row with status
    ``"conflict"``: the client stops the campaign, as the local ``--resume`` does.
    """
    from .cli import _read_outputs, _relaxed_from_input, existing_output
    from .h5md import system_names
    from .io import read_parameters

    if run.settings["trajectories"] == "per-shard":
        if shard_file is None or not shard_file.exists() or item.name not in system_names(shard_file):
            return None
        path, system = shard_file, item.name
    else:
        path, system = run.h5_path(item.name), None
        if not path.exists():
            return None
    state, why = existing_output(run, item, path, system)
    if state is None:
        logger.warning("%s: %s; relaxing %s again", path, why, item.name)
        return None
    ours = read_parameters(path, system=system).get(CAMPAIGN_ATTRIBUTE) == campaign.campaign_id
    if state and (ours or campaign.policy == "resume"):
        fields, relaxed, fmaxes = _read_outputs(path, system)
        return SystemRow(_row(item, **fields), _relaxed_from_input(item, relaxed), fmaxes, kept=True)
    if not state and campaign.policy == "resume" and not ours:
        return SystemRow(_row(item, converged=False, status="conflict", reason=why))
    return None  # --overwrite (or a file that appeared after the client looked): relax again


def _shard_file(campaign: Campaign, shard: int | None) -> Path:
    """The shard file of task ``shard`` (``--trajectories per-shard``): numbered after the shards already in ``out``."""
    from .outputs import SHARD_PREFIX

    if shard is None:
        raise ValueError("--trajectories per-shard: relax_shard needs the shard's number")
    return Path(campaign.out) / f"{SHARD_PREFIX}{campaign.first_shard + shard:06d}.h5"


class WorkerStream:
    """One relaxation stream per worker and setting, fed by every shard task the worker runs.

    :func:`kups_relax.relax_iter` over a :class:`~kups_relax.feed.Feed`, in a thread of its own
    that lives as long as the worker. A task puts its structures into the feed and waits for
    their results; with two tasks running on a worker (``--nthreads 2``, as :func:`connect`
    starts them), the next task's structures take the slots that the last one's finished
    systems free, so batches stay full from one task to the next instead of draining at the end
    of every task (and the programs of one slot layout serve every task). An error in the stream
    reaches every task waiting on it; the next task starts a new stream.
    """

    def __init__(self, run, layout_sizes: Sequence[int] = ()) -> None:
        from .engine import relax_iter
        from .feed import Feed

        self.layout_sizes = tuple(layout_sizes)
        self.feed = Feed()
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[queue.SimpleQueue, int]] = {}  # stream index -> (task's queue, its position)
        self.error: BaseException | None = None
        self._busy = 0.0  # seconds with structures in the stream, up to `_busy_since`
        self._busy_since: float | None = None  # when the stream last went from empty to busy
        self._results = relax_iter(self.feed, run.potential, **run.engine_kwargs(), layout_sizes=self.layout_sizes)
        self._thread = threading.Thread(target=self._work, name="kups-relax-worker-stream", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for index, result in self._results:
                with self._lock:
                    task_queue, position = self._waiting.pop(index)
                    if not self._waiting:
                        self._busy += time.perf_counter() - self._busy_since
                        self._busy_since = None
                task_queue.put((position, result))
        except BaseException as err:  # noqa: BLE001 -- handed to every waiting task
            with self._lock:
                self.error = err
                waiting = list(self._waiting.values())
                self._waiting.clear()
            for task_queue, _ in waiting:
                task_queue.put(_StreamFailed(err))

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def busy_seconds(self) -> float:
        """Wall time, s, during which the stream held structures, since it started."""
        with self._lock:
            return self._busy + (time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0)

    def relax(self, structures: Sequence[tuple[str, Any]]) -> Iterator[tuple[int, Any]]:
        """Relax ``(name, Atoms)`` pairs in the shared stream; yield ``(position, RelaxResult)`` as each finishes.

        Raises:
            RuntimeError: the stream failed (its error is the cause).
        """
        task_queue: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:  # positions in the stream follow the order of put
            if self.error is not None:
                raise RuntimeError("the worker's relaxation stream failed") from self.error
            if not self._waiting and structures:
                self._busy_since = time.perf_counter()
            for position, pair in enumerate(structures):
                self._waiting[self.feed.put_count] = (task_queue, position)
                self.feed.put(pair)
        for _ in range(len(structures)):
            item = task_queue.get()
            if isinstance(item, _StreamFailed):
                raise RuntimeError("the worker's relaxation stream failed") from item.error
            yield item


@dataclasses.dataclass
class _StreamFailed:
    error: BaseException


_streams: dict[str, WorkerStream] = {}


def worker_stream(campaign: Campaign, run) -> WorkerStream:
    """This worker's :class:`WorkerStream` for ``campaign``'s settings (a new one after a failure)."""
    key = campaign.engine_key
    with _engines_lock:
        stream = _streams.get(key)
        if stream is not None and stream.alive and stream.layout_sizes != campaign.layout_sizes:
            stream.feed.close()  # another campaign's layout: that stream ends once its structures have
            stream = None
        if stream is None or not stream.alive:
            stream = _streams[key] = WorkerStream(run, campaign.layout_sizes)
    return stream


def relax_shard(campaign: Campaign, items: Sequence[Any], shard: int | None = None,
                previous: Mapping[str, str] | None = None) -> ShardReport:
    """Relax one shard on this worker; write each system's trajectory; return one row per system.

    Args:
        campaign: the run's settings and output folder (:class:`Campaign`).
        items: :class:`kups_relax.io.InputStructure` objects (name, source, atoms, status).
        shard: the shard's number in the campaign; with ``--trajectories per-shard`` its systems'
            trajectories go to ``shard-<number>.h5`` (written when the task ends; a retried task
            writes the same file).
        previous: with ``--trajectories per-shard`` and ``--resume``, the shard file an earlier run
            wrote each system to, by name (those the client found for this shard's systems).

    Systems whose complete output is kept (:func:`_kept`) are not relaxed again. Every output
    is complete on disk before the task returns; the structures are relaxed in the worker's
    shared stream (:class:`WorkerStream`), with the settings ``relax-batch`` uses.
    """
    from .cli import UsageError, _outputs
    from .outputs import SHARD_PREFIX, TrajectoryWriter

    started = time.perf_counter()
    try:
        run = worker_run(campaign)
    except UsageError as err:
        raise SetupError(f"worker {_worker_address()}: {err}") from None
    mode = run.settings["trajectories"]
    shard_file = _shard_file(campaign, shard) if mode == "per-shard" else None
    rows: dict[int, SystemRow] = {}
    todo: list[int] = []
    for i, item in enumerate(items):
        if not item.ok:
            rows[i] = SystemRow(_row(item, converged=False, status=item.status, reason=item.reason))
        elif (row := _kept(run, campaign, item, Path(previous[item.name]) if previous and item.name in previous
                             else shard_file)) is not None:
            rows[i] = row
        else:
            todo.append(i)
    metadata = {**run.trajectory_metadata, CAMPAIGN_ATTRIBUTE: campaign.campaign_id}
    writer_options = dict(potential=run.potential_info, optimizer=run.optimizer_info, metadata=metadata)
    if shard_file is not None:  # one file per task, holding the systems it relaxes
        number = int(shard_file.stem[len(SHARD_PREFIX):])
        writer_options.update(shard_size=max(1, len(todo)), first_shard=number)
    from .compile_stats import compile_stats

    busy, compiled = [0.0, 0.0], [(0, 0, 0.0), (0, 0, 0.0)]
    if todo:
        stream = worker_stream(campaign, run)
        busy[0], compiled[0] = stream.busy_seconds(), tuple(compile_stats())
        # this thread only waits for the stream's results, so it writes the files itself
        with TrajectoryWriter(run.out, mode, **writer_options) as trajectories:
            for k, result in stream.relax([(items[i].name, items[i].atoms) for i in todo]):
                item = items[todo[k]]
                if result.status == "invalid":
                    rows[todo[k]] = SystemRow(_row(item, converged=False, status="invalid", reason=result.reason))
                    continue
                fields, relaxed, fmaxes = _outputs(result)
                rows[todo[k]] = SystemRow(_row(item, **fields), relaxed, fmaxes)
                trajectories.write(result, item.source)
                result.trajectory = None  # on disk now: memory does not grow with the shard's frames
        busy[1], compiled[1] = stream.busy_seconds(), tuple(compile_stats())
    return ShardReport(rows=[rows[i] for i in range(len(items))], worker=_worker_address(),
                       seconds=time.perf_counter() - started, relaxed=len(todo), kept=len(items) - len(todo),
                       busy_before=busy[0], busy_after=busy[1], compiled_before=compiled[0],
                       compiled_after=compiled[1])


# --- worker processes ----------------------------------------------------------------------------

try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # the module stays importable (and documented) without distributed
    _WorkerPlugin = object


class WorkerSetup(_WorkerPlugin):  # type: ignore[misc, valid-type]
    """Worker plugin: point the worker's JAX at the client's compilation cache folder.

    With it, the programs one campaign compiled load from disk in the next one (and in a
    worker that replaces a dead one). ``cache_dir=None`` leaves JAX's configuration alone (the
    engine's saved executables still go to ``~/.cache/kups-relax/jax``).
    """

    name = "kups-relax-setup"

    def __init__(self, cache_dir: str | None):
        self.cache_dir = cache_dir

    def setup(self, worker) -> None:
        if self.cache_dir:
            from .executables import enable_compilation_cache

            enable_compilation_cache(self.cache_dir)


def worker_environment(threads: int) -> dict[str, str]:
    """Environment for a worker process that may use ``threads`` CPU cores (set before JAX starts).

    The BLAS libraries (ASE's and SciPy's small linear algebra) otherwise start a thread per
    core of the machine in every worker process, and N workers on N cores fight over them; with
    one core per worker, XLA's Eigen kernels run on the calling thread too
    (``--xla_cpu_multi_thread_eigen=false``). XLA's own CPU runtime has no flag for its thread
    pool; a relaxation program runs mostly on the thread that calls it (one per worker here).
    ``XLA_FLAGS`` is part of a saved program's key (:mod:`kups_relax.executables`), so such
    workers compile their programs once and keep them apart from a one-process run's.
    """
    env = {var: str(threads) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    if flags:
        env["XLA_FLAGS"] = flags
    return env


def connect(address: str | None = None, workers: int | None = None):
    """A ``distributed.Client``: of the scheduler at ``address``, or of a new ``LocalCluster``
    of ``workers`` processes (the machine's cores shared between them), each with
    :data:`TASKS_PER_WORKER` task threads: the tasks of a worker wait on its one relaxation
    stream (:class:`WorkerStream`), so a second one keeps the stream fed while the first's last
    systems finish.

    Raises:
        SetupError: distributed is not installed, or the scheduler at ``address`` cannot be
            reached within ``distributed.comm.timeouts.connect`` (named).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SetupError("Dask is not installed: pip install 'kups-relax[distributed]'") from None
    if address:
        try:
            return Client(address)
        except (OSError, TimeoutError) as err:
            raise SetupError(f"cannot reach the Dask scheduler at {address}: {err}") from None
    n = workers or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    # silence_logs: the workers' Dask messages below CRITICAL (a heartbeat that races the
    # scheduler's shutdown prints a traceback otherwise); task errors still reach the client
    cluster = LocalCluster(n_workers=n, threads_per_worker=TASKS_PER_WORKER, processes=True, host="127.0.0.1",
                           dashboard_address=None, env=worker_environment(threads), silence_logs=logging.CRITICAL)
    return Client(cluster)


def check_workers(client, campaign: Campaign) -> list[str]:
    """Check every worker before the first shard: kups-relax importable at the client's version,
    and the engine buildable (the potential's files readable); installs :class:`WorkerSetup`.

    Returns:
        The workers' addresses.

    Raises:
        SetupError: naming the worker and what it lacks.
    """
    import jax

    from . import __version__

    workers = client.scheduler_info(n_workers=-1)["workers"]
    addresses = sorted(workers)
    if not addresses:
        raise SetupError(f"the Dask scheduler at {client.scheduler.address} has no workers")
    single = [a for a in addresses if workers[a].get("nthreads", TASKS_PER_WORKER) < TASKS_PER_WORKER]
    if single:
        logger.warning("%d worker(s) run one task at a time (e.g. %s): their relaxation stream drains at the end "
                       "of every task; start workers with --nthreads %d", len(single), single[0], TASKS_PER_WORKER)
    # importlib.metadata.version is pickled by reference to the standard library, so this runs on
    # a worker without kups-relax too (a function of ours could not even be unpickled there)
    versions = client.run(importlib.metadata.version, DISTRIBUTION, on_error="return")
    for address, version in sorted(versions.items()):
        if isinstance(version, BaseException):
            raise SetupError(f"worker {address} cannot import kups-relax ({type(version).__name__}: {version}); "
                             f"install it there (pip install kups-relax) or start the worker in its environment")
        if version != __version__:
            raise SetupError(f"worker {address} has kups-relax {version}, this client {__version__}")
    client.register_plugin(WorkerSetup(jax.config.jax_compilation_cache_dir or None))
    built = client.run(prepare_worker, campaign, on_error="return")
    for address, outcome in sorted(built.items()):
        if isinstance(outcome, BaseException):
            raise SetupError(f"worker {address}: {outcome}")
    return addresses


# --- the client side ---------------------------------------------------------------------------------

@dataclasses.dataclass
class CampaignReport:
    """What a campaign did.

    Attributes:
        systems: rows written (one per input structure).
        statuses: how many rows have each status.
        relaxed: systems the workers relaxed (a system redone after a worker died counts twice).
        kept: rows read back from outputs already there (``--resume``, retried shards).
        shards: tasks that returned; ``retried``: shards split after an error of their own.
        task_seconds: wall time summed over the tasks (inside the workers; a worker's tasks overlap).
        busy_seconds: wall time the workers' streams held structures, summed over the workers.
        wall_seconds: from the first submission to the last row written.
        workers: the workers' addresses at the start.
    """

    systems: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    relaxed: int = 0
    kept: int = 0
    shards: int = 0
    retried: int = 0
    task_seconds: float = 0.0
    wall_seconds: float = 0.0
    workers: list[str] = dataclasses.field(default_factory=list)
    #: per worker: (first, last) readings of (stream busy seconds, programs compiled, loaded, compile seconds)
    readings: dict[str, tuple[tuple, tuple]] = dataclasses.field(default_factory=dict, repr=False)

    def add_readings(self, report: "ShardReport") -> None:
        """Take a task's readings of its worker (in the campaign: the last reading minus the first)."""
        if report.relaxed:
            before = (report.busy_before, *report.compiled_before)
            after = (report.busy_after, *report.compiled_after)
            first, last = self.readings.get(report.worker, (before, after))
            self.readings[report.worker] = (tuple(map(min, first, before)), tuple(map(max, last, after)))

    def _worker_sum(self, k: int) -> float:
        return sum(last[k] - first[k] for first, last in self.readings.values())

    @property
    def busy_seconds(self) -> float:
        """Wall time the workers' streams held structures, s, summed over the workers."""
        return self._worker_sum(0)

    @property
    def compiled(self) -> tuple[int, int, float]:
        """Programs the workers compiled, loaded from a cache, and seconds of it, during the campaign."""
        return int(self._worker_sum(1)), int(self._worker_sum(2)), self._worker_sum(3)

    @property
    def overhead(self) -> float:
        """Share of the workers' wall time (workers x wall) their streams held nothing: Dask's
        scheduling and transfers, the client, starting, and the imbalance at the end."""
        total = len(self.workers) * self.wall_seconds
        return 1.0 - self.busy_seconds / total if total else 0.0

    @property
    def all_converged(self) -> bool:
        return self.systems > 0 and self.statuses.get("converged", 0) == self.systems

    def describe(self) -> str:
        """One line: systems, workers, relaxed and kept, tasks, and the workers' busy time."""
        return (f"{self.systems} systems in {self.wall_seconds:.2f} s on {len(self.workers)} Dask workers: "
                f"{self.relaxed} relaxed, {self.kept} kept from complete outputs; {self.shards} tasks; "
                f"relaxing {self.busy_seconds:.2f} s of {len(self.workers)} x {self.wall_seconds:.2f} s "
                f"({100 * self.overhead:.1f} % idle); compiled {self.compiled[0]} programs, "
                f"{self.compiled[1]} from the cache ({self.compiled[2]:.1f} s)"
                + (f"; {self.retried} split after an error" if self.retried else ""))


def _shards(items: Iterable[Any], size: int) -> Iterator[list[tuple[int, Any]]]:
    """Consecutive lists of ``size`` ``(input position, item)`` pairs, read as they are asked for."""
    iterator = enumerate(items)
    while shard := list(itertools.islice(iterator, size)):
        yield shard


def _failed_rows(items: Sequence[Any], err: BaseException) -> list[SystemRow]:
    reason = f"task failed: {type(err).__name__}: {err}".replace("\n", " ")[:500]
    return [SystemRow(_row(it, converged=False, status="failed", reason=reason)) for it in items]


def relax_campaign(items: Iterable[Any], settings: Mapping[str, Any], client, outputs, *,
                   shard_size: int = DEFAULT_SHARD_SIZE, max_in_flight: int | None = None,
                   campaign_id: str | None = None, on_report: Callable[[ShardReport], None] | None = None
                   ) -> CampaignReport:
    """Relax ``items`` on ``client``'s workers, shard by shard; hand every row to ``outputs`` as it arrives.

    Args:
        items: :class:`kups_relax.io.InputStructure` objects, read as the shards are submitted
            (a generator keeps the client's memory flat).
        settings: ``relax-batch``'s resolved settings (``out``, ``resume``, ``overwrite``, potential, ...).
            Outputs in ``out`` from another campaign are kept with ``resume`` and relaxed again
            otherwise (``relax-batch`` refuses such a folder without ``--resume``/``--overwrite``
            before calling this).
        client: a ``distributed.Client`` (:func:`connect`).
        outputs: the sink of rows: ``outputs.add(row, relaxed, fmaxes)`` per system
            (:class:`kups_relax.outputs.CampaignOutputs`); closing it is the caller's.
        shard_size: structures per task.
        max_in_flight: shards submitted and not yet returned (default: :data:`TASKS_PER_WORKER`
            + 1 per worker), so that every worker has its next shard waiting while memory stays bounded.
        campaign_id: the id written into the outputs (default: a fresh one).
        on_report: called with every :class:`ShardReport` (progress, tests).

    Raises:
        SetupError: a worker cannot run the campaign (named).
        kups_relax.cli.UsageError: outputs this run may not keep or replace (as the local run).
    """
    from distributed import as_completed

    from .cli import UsageError

    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    policy = "resume" if settings.get("resume") else "overwrite" if settings.get("overwrite") else "fresh"
    per_shard = settings.get("trajectories") == "per-shard"
    first_shard, previous = 1, {}
    if per_shard:
        from .outputs import SHARD_PREFIX, shard_index, shard_paths

        existing = shard_paths(out)
        first_shard = 1 + (int(existing[-1].stem[len(SHARD_PREFIX):]) if existing else 0)
        if policy == "resume":  # {name: shard file} of the systems earlier runs wrote (names only)
            previous = {name: str(path) for name, path in shard_index(out).items()}
    remaining = iter(items)
    head = list(itertools.islice(remaining, LAYOUT_SAMPLE))  # read anyway for the first shards
    items = itertools.chain(head, remaining)
    campaign = Campaign(out=str(out.resolve()), settings=dict(settings), campaign_id=campaign_id or uuid.uuid4().hex,
                        policy=policy, first_shard=first_shard,
                        layout_sizes=tuple(len(item.atoms) for item in head if item.ok))
    report = CampaignReport(workers=check_workers(client, campaign))
    limit = max_in_flight or (TASKS_PER_WORKER + 1) * len(report.workers)
    shards = _shards(items, shard_size)
    pending: dict[Any, list[tuple[int, Any]]] = {}
    done = as_completed()
    seen: set[tuple[str, str]] = set()
    conflicts: list[str] = []
    started = time.perf_counter()
    counter = itertools.count()

    def submit(shard: list[tuple[int, Any]], retries: int | None = None) -> None:
        number = next(counter)
        known = {item.name: previous[item.name] for _, item in shard if item.name in previous} or None
        future = client.submit(relax_shard, campaign, [item for _, item in shard], number, known, pure=False,
                               retries=retries, key=f"kups-relax-shard-{number}-{campaign.campaign_id[:8]}")
        pending[future] = shard
        done.add(future)

    def take(shard: list[tuple[int, Any]], rows: Sequence[SystemRow]) -> None:
        for (position, _), r in zip(shard, rows):
            key = (r.row["name"], r.row["source"])
            if key in seen:  # a system reported twice (a shard split after an error): one row
                continue
            seen.add(key)
            if r.row["status"] == "conflict":
                conflicts.append(f"{r.row['name']} ({r.row['reason']})")
                continue
            outputs.add(r.row, r.relaxed, r.fmaxes, order=position)
            report.systems += 1
            report.statuses[r.row["status"]] = report.statuses.get(r.row["status"], 0) + 1

    try:
        for shard in itertools.islice(shards, limit):
            submit(shard)
        for future in done:
            shard = pending.pop(future)
            try:
                result: ShardReport = future.result()
            except SetupError:
                raise
            except Exception as err:  # noqa: BLE001 - an error of this shard's own: isolate it
                if len(shard) > 1:
                    logger.warning("a shard of %d structures failed (%s: %s); retrying them one by one",
                                   len(shard), type(err).__name__, err)
                    report.retried += 1
                    for pair in shard:
                        submit([pair], retries=0)
                else:
                    logger.warning("%s failed: %s: %s", shard[0][1].name, type(err).__name__, err)
                    take(shard, _failed_rows([item for _, item in shard], err))
            else:
                report.shards += 1
                report.relaxed += result.relaxed
                report.kept += result.kept
                report.task_seconds += result.seconds
                report.add_readings(result)
                take(shard, result.rows)
                if on_report is not None:
                    on_report(result)
            if conflicts:
                listing = "; ".join(conflicts[:3]) + (" ..." if len(conflicts) > 3 else "")
                raise UsageError(f"--resume: {len(conflicts)} output(s) in {out} do not match this run: {listing}. "
                                 "Use another --out, or --overwrite to relax them again")
            if len(pending) < limit:
                for next_shard in itertools.islice(shards, limit - len(pending)):
                    submit(next_shard)
    finally:
        if pending:
            client.cancel(list(pending))
    report.wall_seconds = time.perf_counter() - started
    # every task has returned, so no worker writes here any more: a temporary left now belongs to a
    # worker that died mid-write (its pid may live on another machine, or have been reused)
    _remove_temporaries(out, suffix=".h5")
    return report


def _remove_temporaries(out: Path, suffix: str) -> None:
    from .io import _TEMP

    for p in out.iterdir():
        m = _TEMP.match(p.name)
        if m and m["final"].endswith(suffix) and p.is_file():
            p.unlink(missing_ok=True)
            logger.info("removed %s (left by a worker that died while writing it)", p)


# --- relax-batch --dask-scheduler / --workers ------------------------------------------------------

def run_on_dask(run, items: Iterable[Any]):
    """``relax-batch ... --dask-scheduler ADDRESS | --workers N``: the whole campaign of ``items``
    (:class:`kups_relax.io.InputStructure`, read as shards are submitted) with ``run``'s settings.

    Returns:
        The closed :class:`kups_relax.outputs.CampaignOutputs` (its ``table()``, ``describe()``,
        ``all_converged``), with the :class:`CampaignReport` as its ``report`` attribute.

    Raises:
        kups_relax.cli.UsageError: a setup problem of the cluster (:class:`SetupError`'s message:
            the address, worker or file), or outputs this run may not keep.
    """
    from .cli import UsageError
    from .outputs import CampaignOutputs

    s = run.settings
    if s.get("dask_scheduler") and s.get("workers"):
        raise UsageError("--dask-scheduler and --workers exclude each other (--workers starts a local cluster)")
    try:
        client = connect(s.get("dask_scheduler"), s.get("workers"))
    except SetupError as err:
        raise UsageError(str(err)) from None
    task_size = s.get("task_size") or DEFAULT_SHARD_SIZE
    try:
        with CampaignOutputs(run.out, plot=s["plot"], trajectories=s["trajectories"], fmax=s["fmax"]) as sink:
            logger.info("relaxing on %d Dask workers (scheduler %s), %d structures per task",
                        len(client.scheduler_info(n_workers=-1)["workers"]), client.scheduler.address, task_size)
            report = relax_campaign(items, s, client, sink, shard_size=task_size)
    except SetupError as err:
        raise UsageError(str(err)) from None
    finally:
        cluster = None if s.get("dask_scheduler") else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    logger.info("%s", report.describe())
    sink.report = report
    return sink

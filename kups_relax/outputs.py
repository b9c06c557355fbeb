"""A campaign's outputs as results arrive: ``summary.csv``, ``relaxed.extxyz``, ``fmax.png`` and
the trajectories, in memory that does not grow with the number of structures.

* :class:`CampaignOutputs` -- the one sink of summary rows and relaxed structures, used by
  ``relax-batch`` and by the Dask client (:mod:`kups_relax.distributed`): rows and frames are
  appended to temporaries as they arrive and renamed into place, whole, by :meth:`~CampaignOutputs.close`.
* :class:`TrajectoryWriter` -- one finished system's trajectory: a ``<name>.h5`` per system
  (the default), into the current *shard* file of many systems (:class:`~kups_relax.h5md.ShardWriter`),
  or nowhere.
* :func:`shard_index` -- which systems the complete shard files of a folder hold (``--resume``).
* :func:`result_fields`, :func:`parameter_fields` -- a result's summary fields, from a
  :class:`~kups_relax.RelaxResult` or from the ``/parameters`` of its trajectory file.

Library code: it logs, never prints.
"""

from __future__ import annotations

import array
import csv
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from ase import Atoms

from .io import SUMMARY_COLUMNS, _csv_value, _fsync, _fsync_dir, atomic_output

logger = logging.getLogger(__name__)

__all__ = ["CampaignOutputs", "DEFAULT_SHARD_SIZE", "TRAJECTORY_MODES", "TrajectoryWriter", "parameter_fields",
           "result_fields", "shard_index", "shard_paths"]

#: ``--trajectories``: a ``<name>.h5`` per system, a shard file per many systems, or none.
TRAJECTORY_MODES = ("per-system", "per-shard", "none")

#: Systems per shard file (``--shard-size``): a thousand files per million structures, and a
#: killed run loses at most this many systems' trajectories (they are relaxed again on resume).
DEFAULT_SHARD_SIZE = 1000

#: Shard files in an output folder: ``shard-000001.h5``, numbered on from the highest there.
SHARD_PREFIX = "shard-"
_SHARD = re.compile(r"^(?P<prefix>.*?)(?P<number>\d{6,})\.h5$")


def result_fields(result) -> dict[str, Any]:
    """The summary fields of a finished :class:`~kups_relax.RelaxResult` (energies eV, fmax eV/Å)."""
    return dict(converged=bool(result.converged), steps=int(result.steps),
                n_evaluations=int(getattr(result, "n_evaluations", 0)), initial_energy=float(result.initial_energy),
                final_energy=float(result.energy), final_fmax=float(result.fmax), status=result.status,
                reason=result.reason, spacegroup_initial=getattr(result, "spacegroup_initial", ""),
                spacegroup_final=getattr(result, "spacegroup_final", ""))


def parameter_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`result_fields` of a system from the ``/parameters`` of its trajectory
    (:func:`kups_relax.io.read_parameters`)."""
    return dict(converged=bool(params["converged"]), steps=int(params["steps"]),
                n_evaluations=int(params.get("n_evaluations", 0)), initial_energy=params["initial_energy"], final_energy=params["final_energy"],
                final_fmax=params["final_fmax"], status=params["status"], reason=params.get("reason", ""),
                spacegroup_initial=params.get("spacegroup_initial", ""), spacegroup_final=params.get("spacegroup_final", ""))


class _Journal:
    """Records appended to a temporary file as they arrive; written in ``order`` at the end.

    Each record's byte range and order key are kept (three ``int64`` per record): that, not the
    records, is what grows with the stream. :meth:`finish` renames the temporary into place when
    the records came in order, else copies them in order into the final file (atomically).
    """

    def __init__(self, path: Path, header: bytes = b""):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.unordered.tmp.{os.getpid()}")
        self._file = open(self.tmp, "wb")
        self._file.write(header)
        self.header = len(header)
        self.order, self.offset, self.length = array.array("q"), array.array("q"), array.array("q")
        self.in_order = True

    def __len__(self) -> int:
        return len(self.order)

    def append(self, data: bytes, order: int) -> None:
        if self.order and order < self.order[-1]:
            self.in_order = False
        self.order.append(order)
        self.offset.append(self._file.tell())
        self.length.append(len(data))
        self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> None:
        """Put the complete file at ``path`` (whole or not at all), and remove the temporary."""
        self._file.close()
        if self.in_order:
            _fsync(self.tmp)
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
            return
        ranks = np.argsort(np.frombuffer(self.order, dtype=np.int64), kind="stable")
        offsets, lengths = np.frombuffer(self.offset, np.int64), np.frombuffer(self.length, np.int64)
        with open(self.tmp, "rb") as src, atomic_output(self.path) as final:
            with open(final, "wb") as dst:
                dst.write(src.read(self.header))
                for i in ranks:
                    src.seek(int(offsets[i]))
                    dst.write(src.read(int(lengths[i])))
        self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class CampaignOutputs:
    """``summary.csv``, ``relaxed.extxyz`` and (``plot``) ``fmax.png`` of a campaign, written as rows arrive.

    :meth:`add` appends a row to a temporary ``summary.csv`` and the relaxed structure to a
    temporary ``relaxed.extxyz`` (flushed every few seconds); :meth:`close` puts both in place
    (each whole: a temporary renamed, so a killed run leaves neither or the complete file),
    and ``fmax.png``. Used as a ``with`` block, an error in the block discards the temporaries
    and a normal exit closes.

    Order: rows (and frames) are written sorted by the ``order`` given to :meth:`add` (the CLI
    passes each structure's position in the input, so ``summary.csv`` lists systems in input
    order whatever order they finish in, and a resumed run ends with the same files as an
    uninterrupted one); rows added without one keep the order they arrived in (completion
    order). Every row carries ``name`` and ``source``; every frame ``info["name"]``.

    Memory: 24 bytes per row and per frame (where each record lies in the temporary), at most
    ``2 * table_limit`` rows for :meth:`table`, and the largest-force series of at most
    ``max_plotted`` systems for the plot.

    Args:
        out: the output folder (created if needed).
        plot: also write ``fmax.png`` (needs matplotlib).
        trajectories: the ``--trajectories`` mode the trajectories were written in (for
            :meth:`describe`), one of :data:`TRAJECTORY_MODES`.
        fmax: the convergence criterion, eV/Å, drawn as a line on the plot (``None``: no line).
        table_limit: most rows :meth:`table` shows.
        max_plotted: most systems drawn on the plot (the first ones added).
        flush_seconds: push the temporaries to the operating system at least this often.
    """

    def __init__(self, out: str | Path, plot: bool = False, trajectories: str = "per-system", *,
                 fmax: float | None = None, table_limit: int = 40, max_plotted: int = 1000,
                 flush_seconds: float = 5.0):
        from .report import SummaryTally

        if trajectories not in TRAJECTORY_MODES:
            raise ValueError(f"trajectories must be one of {', '.join(TRAJECTORY_MODES)}, got {trajectories!r}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.plot, self.trajectories, self.fmax = plot, trajectories, fmax
        self.max_plotted, self.flush_seconds = max_plotted, flush_seconds
        self.tally = SummaryTally(table_limit)
        self.series: dict[str, np.ndarray] = {}
        header = io.StringIO()
        csv.writer(header).writerow(SUMMARY_COLUMNS)
        self._summary = _Journal(self.out / "summary.csv", header.getvalue().encode())
        self._relaxed = _Journal(self.out / "relaxed.extxyz")
        self._flushed = time.monotonic()
        self.closed = False

    @property
    def rows(self) -> int:
        """Rows added so far."""
        return len(self._summary)

    @property
    def frames(self) -> int:
        """Relaxed structures added so far."""
        return len(self._relaxed)

    @property
    def all_converged(self) -> bool:
        """Every row added has ``status == "converged"`` (and there is at least one)."""
        return self.tally.total > 0 and self.tally.counts.get("converged", 0) == self.tally.total

    def add(self, row: Mapping[str, Any], relaxed: Atoms | None = None, fmaxes: np.ndarray | None = None, *,
            order: int | None = None) -> None:
        """Append one system's summary row and, when it was relaxed, its final structure.

        Args:
            row: :data:`~kups_relax.io.SUMMARY_COLUMNS` values (``name`` and ``source`` at least;
                energies eV, ``final_fmax`` eV/Å; missing ones are blank).
            relaxed: the relaxed structure with a calculator holding its energy, forces (and
                stress); written to ``relaxed.extxyz`` with ``info`` ``name``, ``converged``,
                ``steps`` and ``status`` from the row (a copy: ``relaxed`` is not changed).
            fmaxes: ``(steps + 1,)`` largest force after every step, eV/Å, for the plot.
            order: where the row goes in the files (see the class docstring); default: last.
        """
        order = self.tally.total if order is None else int(order)
        text = io.StringIO()
        csv.writer(text).writerow([_csv_value(row.get(c)) for c in SUMMARY_COLUMNS])
        self._summary.append(text.getvalue().encode(), order)
        self.tally.add(row, order)
        if relaxed is not None:
            self._relaxed.append(_extxyz_frame(relaxed, row), order)
            if fmaxes is not None and self.plot and len(self.series) < self.max_plotted:
                self.series[str(row["name"])] = np.asarray(fmaxes, dtype=np.float64)
        if time.monotonic() - self._flushed > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Push the temporaries to the operating system."""
        self._summary.flush()
        self._relaxed.flush()
        self._flushed = time.monotonic()

    def table(self) -> str:
        """The summary table to print (:class:`~kups_relax.report.SummaryTally`)."""
        return self.tally.table()

    def describe(self) -> str:
        """One line naming what is in ``out`` (for the end of a run)."""
        trajectories = {"per-system": "trajectories (.h5)", "per-shard": "trajectories in shard files (shard-*.h5)",
                        "none": "trajectories"}[self.trajectories]
        count = 0 if self.trajectories == "none" else self.frames
        return (f"outputs in {self.out}/: {count} {trajectories}, relaxed.extxyz, summary.csv"
                + (", fmax.png" if self.plot else ""))

    def close(self) -> None:
        """Put ``summary.csv``, ``relaxed.extxyz`` (and ``fmax.png``) in place, each whole."""
        if self.closed:
            return
        self.closed = True
        try:
            self._summary.finish()
            self._relaxed.finish()
            if self.plot:
                from .report import plot_max_force

                with atomic_output(self.out / "fmax.png") as tmp:
                    plot_max_force(tmp, self.series, self.fmax, total=self.frames)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the temporaries; the final files are not written (those of an earlier run stay)."""
        self.closed = True
        self._summary.discard()
        self._relaxed.discard()

    def __enter__(self) -> "CampaignOutputs":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _extxyz_frame(relaxed: Atoms, row: Mapping[str, Any]) -> bytes:
    """``relaxed`` as one extended-XYZ frame with the row's name, converged, steps and status in ``info``."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = relaxed.copy()
    results = dict(relaxed.calc.results) if relaxed.calc is not None else {}
    for key in ("energy", "free_energy", "forces", "stress"):  # would clash with the results
        frame.info.pop(key, None)
        frame.arrays.pop(key, None)
    if results:
        frame.calc = SinglePointCalculator(frame, **results)
    frame.info.update({k: row[k] for k in ("name", "converged", "steps", "status") if row.get(k) is not None})
    text = io.StringIO()
    ase.io.write(text, frame, format="extxyz")
    return text.getvalue().encode()


# --- trajectories ------------------------------------------------------------------------------

def shard_paths(out: str | Path, prefix: str = SHARD_PREFIX) -> list[Path]:
    """The complete shard files in ``out`` (``<prefix>NNNNNN.h5``), by number."""
    found = []
    for p in Path(out).iterdir() if Path(out).is_dir() else ():
        m = _SHARD.match(p.name)
        if m and m["prefix"] == prefix and p.is_file():
            found.append((int(m["number"]), p))
    return [p for _, p in sorted(found)]


def shard_index(out: str | Path, prefix: str = SHARD_PREFIX) -> dict[str, Path]:
    """``{system name: shard file}`` of every system in the complete shard files of ``out``
    (a system in several shards: the highest-numbered, i.e. the latest). Shards are renamed into
    place only when complete, so every system listed is whole."""
    from .h5md import system_names

    index: dict[str, Path] = {}
    for path in shard_paths(out, prefix):
        try:
            names = system_names(path)
        except Exception as err:  # not a file we wrote
            logger.warning("%s: not a readable shard (%s: %s); its systems are not counted", path,
                           type(err).__name__, err)
            continue
        index.update(dict.fromkeys(names, path))
    return index


class TrajectoryWriter:
    """Writes each finished system's trajectory as ``--trajectories`` says.

    * ``"per-system"``: ``<out>/<name>.h5`` (:func:`kups_relax.io.write_result`), atomically;
    * ``"per-shard"``: into ``<out>/.<prefix>NNNNNN.h5.tmp.<pid>``, one
      :class:`~kups_relax.h5md.ShardWriter` group per system, renamed to ``<prefix>NNNNNN.h5``
      when it holds ``shard_size`` systems or at :meth:`close` (a killed run loses the systems
      of the shard being filled; the complete shards list every system they hold);
      numbers continue after the highest already in ``out``;
    * ``"none"``: nothing.

    Use from one thread at a time (``relax-batch`` calls it on its writer thread).

    Args:
        out: the output folder.
        mode: one of :data:`TRAJECTORY_MODES`.
        potential: ``/parameters/potential`` attributes (:func:`kups_relax.io.potential_metadata`).
        optimizer: ``/parameters/optimizer`` attributes (:func:`kups_relax.io.optimizer_metadata`).
        metadata: more ``/parameters`` attributes for every system (fmax, max_steps, dtype, settings, ...).
        shard_size: systems per shard file.
        shard_prefix: shard file names' prefix.
        first_shard: the first shard file's number (default: one more than the highest in ``out``;
            a Dask task is given its own, so that concurrent tasks never clash).
    """

    def __init__(self, out: str | Path, mode: str = "per-system", *, potential: Mapping[str, Any],
                 optimizer: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, shard_prefix: str = SHARD_PREFIX,
                 first_shard: int | None = None):
        if mode not in TRAJECTORY_MODES:
            raise ValueError(f"trajectories must be one of {', '.join(TRAJECTORY_MODES)}, got {mode!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out, self.mode = Path(out), mode
        self.potential, self.optimizer = dict(potential), dict(optimizer)
        self.metadata = dict(metadata or {})
        self.shard_size, self.shard_prefix = shard_size, shard_prefix
        self.written = 0
        self.shards: list[Path] = []  # complete shard files this writer wrote
        self._shard = None
        self._shard_path: Path | None = None
        self._failed = False
        if first_shard is not None:
            self._next = first_shard
        else:
            existing = shard_paths(self.out, shard_prefix) if mode == "per-shard" else []
            self._next = 1 + max((int(_SHARD.match(p.name)["number"]) for p in existing), default=0)

    def path(self, name: str) -> Path:
        """A system's per-system file, ``<out>/<name>.h5``."""
        return self.out / f"{name}.h5"

    def write(self, result, source: str) -> None:
        """Write a finished :class:`~kups_relax.RelaxResult` (relaxed with ``trajectory=True``) from ``source``."""
        from .io import write_result

        if self.mode == "none":
            return
        metadata = dict(source=source, **self.metadata)
        try:
            if self.mode == "per-system":
                write_result(self.path(result.name), result, potential=self.potential, optimizer=self.optimizer,
                             metadata=metadata)
            else:
                from .io import result_record

                if self._shard is None:
                    self._open_shard()
                self._shard.add(result.name, **result_record(result, potential=self.potential,
                                                             optimizer=self.optimizer, metadata=metadata))
                if len(self._shard) >= self.shard_size:
                    self._finish_shard()
        except BaseException:
            self._failed = True
            raise
        self.written += 1

    def _open_shard(self) -> None:
        from . import __version__
        from .h5md import ShardWriter

        final = self.out / f"{self.shard_prefix}{self._next:06d}.h5"
        self._next += 1
        self._shard_path = final
        self._shard = ShardWriter(final.with_name(f".{final.name}.tmp.{os.getpid()}"), creator_version=__version__)

    def _finish_shard(self) -> None:
        shard, final = self._shard, self._shard_path
        self._shard = self._shard_path = None
        shard.close()
        _fsync(shard.path)
        os.replace(shard.path, final)
        _fsync_dir(final.parent)
        self.shards.append(final)
        logger.debug("wrote %s (%d systems)", final, len(shard))

    def close(self) -> None:
        """Finish the shard being filled (if any): rename it into place."""
        if self._shard is not None:
            self._finish_shard()

    def discard(self) -> None:
        """Remove the shard being filled (a run that stops on an error: its systems were never completed)."""
        if self._shard is not None:
            shard = self._shard
            self._shard = self._shard_path = None
            shard.close()
            shard.path.unlink(missing_ok=True)

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # the systems in the shard being filled are whole unless a write of ours failed: keep them
        # (an interrupted run, or an error elsewhere), so that --resume need not relax them again
        if self._failed:
            self.discard()
        else:
            self.close()

"""Files in and out: structures from any format ASE reads, safe writes, trajectories, summaries.

Readers never touch JAX; writers write whole files or nothing (a temporary name in
the same folder, renamed over the final name once complete).

* :func:`iter_structures` -- paths (files or folders) to named structures, read as they
  are asked for (:func:`read_structures`: the same as a list); a file that cannot be read,
  or a name used twice, becomes an entry with a reason instead of an exception, so one
  bad file never stops a screening. :func:`read_path_list` reads a file of paths.
* :func:`read_trajectory` -- the frames of a ``<name>.h5`` relaxation trajectory
  (:mod:`kups_relax.h5md`) as ASE ``Atoms`` with energies and forces.
* :func:`atomic_output`, :func:`write_extxyz`, :func:`write_summary_csv`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import ase.io
import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from .h5md import read_observable, read_parameters, read_trajectory, system_names, write_relaxation

logger = logging.getLogger(__name__)

__all__ = [
    "InputStructure", "SUMMARY_COLUMNS", "STRUCTURE_SUFFIXES", "atomic_output", "find_structure_files",
    "iter_structure_files", "iter_structures", "read_path_list",
    "read_observable", "read_parameters", "read_structures", "read_trajectory", "remove_stale_temporaries",
    "system_names",
    "optimizer_metadata", "potential_metadata", "result_record", "write_extxyz", "write_result",
    "write_summary_csv",
]

#: File endings taken from a folder (case-insensitive); files named ``POSCAR*``/``CONTCAR*``
#: are taken too. Name other files explicitly, or pass ``format=`` to take every file.
STRUCTURE_SUFFIXES = frozenset({".xyz", ".extxyz", ".cif", ".traj", ".vasp", ".poscar", ".pdb",
                                ".xsf", ".gen", ".res", ".cfg", ".json"})

#: Columns of ``summary.csv``: energies in eV, ``final_fmax`` in eV/Å, ``n_evaluations`` energy-and-forces
#: evaluations (``steps + 1`` but for line-search optimizers).
SUMMARY_COLUMNS = ("name", "source", "atoms", "converged", "steps", "n_evaluations", "initial_energy", "final_energy",
                   "final_fmax", "status", "reason", "spacegroup_initial", "spacegroup_final")


@dataclasses.dataclass
class InputStructure:
    """One system found in the inputs.

    Attributes:
        name: the system's name: the file's stem, plus ``-<frame index>`` for a file
            holding several structures (each frame of an extxyz is one system).
        source: where it came from, ``path`` or ``path@index`` (ASE's notation).
        atoms: the structure; ``None`` when the file could not be read.
        status: ``""`` when it can be relaxed, else ``"unreadable"`` or ``"invalid"``.
        reason: why not, naming the problem.
    """

    name: str
    source: str
    atoms: Atoms | None
    status: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.status


def _is_structure_file(path: Path) -> bool:
    name = path.name
    upper = name.upper()
    return path.suffix.lower() in STRUCTURE_SUFFIXES or upper.startswith(("POSCAR", "CONTCAR"))


def iter_structure_files(paths: Iterable[str | Path], format: str | None = None) -> Iterator[Path]:
    """Expand ``paths`` lazily: files as given, folders to their structure files (sorted, not recursive).

    In a folder, hidden files are skipped, and without ``format`` only files whose
    names look like structures (:data:`STRUCTURE_SUFFIXES`, ``POSCAR*``, ``CONTCAR*``).
    A path that does not exist is kept (reading it reports the problem). ``paths`` is
    consumed one item at a time, so it may be a generator (e.g. :func:`read_path_list`).
    """
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith("."))
            taken = [c for c in found if format is not None or _is_structure_file(c)]
            if len(taken) < len(found):
                logger.info("%s: skipped %d file(s) that do not look like structures (name them, or pass a format)",
                            p, len(found) - len(taken))
            yield from taken
        else:
            yield p


def find_structure_files(paths: Sequence[str | Path], format: str | None = None) -> list[Path]:
    """:func:`iter_structure_files` as a list."""
    return list(iter_structure_files(paths, format))


def read_path_list(path: str | Path) -> Iterator[Path]:
    """The paths listed in a text file, one per line, read as they are needed.

    Blank lines and lines starting with ``#`` are skipped, as is whitespace around a path;
    a relative path is taken relative to the folder holding the list file (not the current
    directory), so a list travels with the files it names.

    Raises:
        OSError: the list file cannot be opened (when the first path is asked for).
    """
    path = Path(path)
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            listed = Path(text).expanduser()
            yield listed if listed.is_absolute() else base / listed


def _read_error(path: Path, err: Exception) -> str:
    if isinstance(err, FileNotFoundError) or not path.exists():
        return "no such file"
    text = str(err).strip().strip("'\"")
    kind = type(err).__name__
    if isinstance(err, KeyError):
        return f"cannot read file: unknown element or field {text!r}"
    return f"cannot read file ({kind}{': ' + text if text else ''})"


def _read_file(path: Path, format: str | None) -> Iterator[InputStructure]:
    """The systems of one file, frame by frame (``ase.io.iread``): one frame ahead is read to
    know whether the file holds one system (named ``<stem>``) or several (``<stem>-<i>``).

    A file that fails before its first frame is one ``"unreadable"`` entry named ``<stem>``;
    one that fails at frame ``i > 0`` keeps the frames before and ends with an ``"unreadable"``
    entry ``<stem>-<i>`` (source ``path@i``).
    """
    # .copy() drops the calculator results a file may carry (energies, forces of another method)
    frames = ase.io.iread(path, index=":", format=format)
    try:
        first = next(frames, None)
    except Exception as err:  # ASE raises many kinds for garbled files
        yield InputStructure(path.stem, str(path), None, "unreadable", _read_error(path, err))
        return
    if first is None:
        yield InputStructure(path.stem, str(path), None, "unreadable", "no structures in file")
        return
    try:
        second = next(frames, None)
    except Exception as err:
        yield InputStructure(f"{path.stem}-0", f"{path}@0", first.copy())
        yield InputStructure(f"{path.stem}-1", f"{path}@1", None, "unreadable", _read_error(path, err))
        return
    if second is None:
        yield InputStructure(path.stem, str(path), first.copy())
        return
    yield InputStructure(f"{path.stem}-0", f"{path}@0", first.copy())
    yield InputStructure(f"{path.stem}-1", f"{path}@1", second.copy())
    del first, second
    i = 2
    while True:
        try:
            atoms = next(frames, None)
        except Exception as err:
            yield InputStructure(f"{path.stem}-{i}", f"{path}@{i}", None, "unreadable", _read_error(path, err))
            return
        if atoms is None:
            return
        yield InputStructure(f"{path.stem}-{i}", f"{path}@{i}", atoms.copy())
        i += 1


def iter_structures(paths: Iterable[str | Path], format: str | None = None) -> Iterator[InputStructure]:
    """Read the structures in ``paths`` (files or folders) as they are asked for.

    One file is open at a time and a multi-frame file is read frame by frame, so memory
    holds one structure (and one read ahead), whatever the number of inputs. Names and
    sources are those of :func:`read_structures`; an unreadable file is an entry with
    ``status="unreadable"`` and the next file is read as usual, and a name seen before is
    ``status="invalid"`` (the first keeps it; the set of names seen is the only thing that
    grows with the number of inputs).

    Args:
        paths: files (any format ASE reads) and folders (see :func:`iter_structure_files`),
            in a sequence or any iterable (read one at a time, e.g. :func:`read_path_list`).
        format: an ASE format name to force (default: ASE guesses from the name and content).
    """
    first_source: dict[str, str] = {}
    for path in iter_structure_files(paths, format):
        for item in _read_file(path, format):
            if item.name in first_source:
                item.status = "invalid"
                item.reason = (f"duplicate system name {item.name!r} (also from {first_source[item.name]}); "
                               "outputs are named by system, so rename one of the files")
            else:
                first_source[item.name] = item.source
            yield item


def read_structures(paths: Sequence[str | Path], format: str | None = None) -> list[InputStructure]:
    """Read every structure in ``paths`` (files or folders) into a list (:func:`iter_structures`).

    Args:
        paths: files (any format ASE reads) and folders (see :func:`find_structure_files`).
        format: an ASE format name to force (default: ASE guesses from the name and content).

    Returns:
        One :class:`InputStructure` per system, in file order then frame order; an
        unreadable file gives one entry with ``status="unreadable"``, and a name seen
        before gives ``status="invalid"`` with a reason naming both sources.
    """
    return list(iter_structures(paths, format))


# --- writing -------------------------------------------------------------------------------

_TEMP = re.compile(r"^\.(?P<final>.+)\.tmp\.(?P<pid>\d+)$")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary is ``.<name>.tmp.<pid>`` in the same folder (so the rename is atomic)
    and is flushed to disk first: after a crash at any moment ``path`` is either the
    old file, absent, or the complete new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        _fsync(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporaries left by :func:`atomic_output` in processes that no longer run."""
    removed = []
    for p in Path(directory).iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_extxyz(path: str | Path, structures: Sequence[Atoms]) -> None:
    """Write ``structures`` to one extended-XYZ file, atomically."""
    with atomic_output(path) as tmp:
        ase.io.write(tmp, list(structures), format="extxyz")


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # repr: every digit, so reruns compare exactly
    return str(value)


def write_summary_csv(path: str | Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Write one row per system with :data:`SUMMARY_COLUMNS`, atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(SUMMARY_COLUMNS)
            for row in rows:
                writer.writerow([_csv_value(row.get(c)) for c in SUMMARY_COLUMNS])


# --- trajectories of results ------------------------------------------------------------------

def _plain_value(value):
    """A value an HDF5 attribute holds: numbers, text, small numeric lists; big arrays by their shape."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (dict, list, tuple)):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind in "biuf":
        return arr.item() if arr.ndim == 0 else (arr.tolist() if arr.size <= 32 else f"<array {arr.shape}>")
    return str(value)


def potential_metadata(potential, name: str | None = None) -> dict[str, Any]:
    """``{"name", "class", "cutoff" (Å), <every field of the potential>}`` for a trajectory file."""
    out: dict[str, Any] = {"name": name or type(potential).__name__, "class": type(potential).__name__,
                           "cutoff": float(potential.cutoff)}
    if dataclasses.is_dataclass(potential):
        for field in dataclasses.fields(potential):
            out[field.name] = _plain_value(getattr(potential, field.name))
    return out


def optimizer_metadata(transform, name: str | None = None) -> dict[str, Any]:
    """``{"name", <every field of every chained transform>, "transform": repr}`` for a trajectory file."""
    out: dict[str, Any] = {"name": name or type(transform).__name__}
    for part in getattr(transform, "transforms", (transform,)):
        if dataclasses.is_dataclass(part):
            for field in dataclasses.fields(part):
                out[field.name] = _plain_value(getattr(part, field.name))
    out["transform"] = repr(transform)
    return out


def result_record(result, *, potential=None, optimizer=None, metadata: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """What one system's trajectory file holds, as the keyword arguments of
    :func:`kups_relax.h5md.write_relaxation` (``trajectory``, ``energies``, ``fmaxes``, ``parameters``,
    ``potential``, ``optimizer``, ``stress``); arguments as :func:`write_result`."""
    from . import __version__
    from .engine import resolve_optimizer

    if not result.trajectory:
        raise ValueError(f"structure {result.name!r}: no trajectory to write (relax with trajectory=True); "
                         f"status {result.status}")
    if potential is not None and not isinstance(potential, Mapping):
        potential = potential_metadata(potential)
    if optimizer is None or isinstance(optimizer, str):
        optimizer = optimizer_metadata(resolve_optimizer(optimizer), optimizer or "lbfgs")
    elif not isinstance(optimizer, Mapping):
        optimizer = optimizer_metadata(optimizer)
    calc_results = result.atoms.calc.results if result.atoms.calc is not None else {}
    stress = voigt_6_to_full_3x3_stress(calc_results["stress"]) if "stress" in calc_results else None
    parameters = dict(
        name=result.name, status=result.status, reason=result.reason, converged=bool(result.converged),
        steps=int(result.steps), n_evaluations=int(getattr(result, "n_evaluations", 0)), n_atoms=len(result.atoms),
        initial_energy=float(result.initial_energy),
        final_energy=float(result.energy), final_fmax=float(result.fmax), package="kups-relax",
        version=__version__, spacegroup_initial=getattr(result, "spacegroup_initial", ""),
        spacegroup_final=getattr(result, "spacegroup_final", ""),
        **(metadata or {}))
    return dict(trajectory=result.trajectory, energies=result.energies, fmaxes=result.fmaxes, parameters=parameters,
                potential=potential or {}, optimizer=optimizer, stress=stress)


def write_result(path: str | Path, result, *, potential=None, optimizer=None,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a :class:`~kups_relax.RelaxResult` (relaxed with ``trajectory=True``) to one H5MD file, atomically.

    Args:
        path: the ``.h5`` file.
        result: the result; its trajectory, energies, forces and largest forces are written.
        potential: the potential object (described by :func:`potential_metadata`) or a mapping.
        optimizer: an optimizer name (``"lbfgs"``), a transform, or a mapping.
        metadata: more attributes for ``/parameters`` (e.g. ``fmax``, ``source``).

    Returns:
        ``path``. Read it back with :func:`read_trajectory` or plain ``h5py``.
    """
    from . import __version__

    record = result_record(result, potential=potential, optimizer=optimizer, metadata=metadata)
    with atomic_output(path) as tmp:
        write_relaxation(tmp, **record, creator_version=__version__)
    return Path(path)

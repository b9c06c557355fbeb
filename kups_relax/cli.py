"""``relax-batch PATHS...``: relax every structure in files or folders, write trajectories and a summary.

Inputs are read as the relaxation goes (one file at a time, a multi-frame file frame by
frame), so memory does not grow with their number; ``--from-list FILE`` names them in a file.

Outputs in ``--out DIR``:

* ``<name>.h5`` -- one H5MD trajectory per relaxed system (:mod:`kups_relax.h5md`); with
  ``--trajectories per-shard`` instead ``shard-NNNNNN.h5`` files of ``--shard-size`` systems
  each, with ``none`` no trajectories;
* ``relaxed.extxyz`` -- every final structure with energy, forces, ``converged``, ``steps``;
* ``summary.csv`` -- one row per system, including the ones that could not be relaxed, in
  input order;
* ``fmax.png`` -- with ``--plot``: largest force against step (of the first 1000 systems).

Every file is written under a temporary name and renamed when complete (``summary.csv`` and
``relaxed.extxyz`` grow as temporaries while systems finish), so after an interruption
(Ctrl-C, ``kill -9``) ``--resume`` relaxes only the systems without a complete trajectory
(a ``.h5``, or a group in a complete shard) and rebuilds ``relaxed.extxyz`` and ``summary.csv``
from all of them. A run into a folder holding outputs needs ``--resume`` or ``--overwrite``.

Settings come from built-in defaults, then ``--config FILE.yaml`` (keys = long flag
names, ``-`` or ``_``), then the flags given on the command line.

Exit status: 0 every system converged; 1 some did not (not converged within their
step limit, diverged, or bad input; their rows say why); 2 bad usage, a bad config,
or no readable input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import __version__
from .engine import DEFAULT_MAX_DISPLACEMENT, DEFAULT_MAX_STEPS
from .executables import enable_compilation_cache
from .precision import x64

logger = logging.getLogger("kups_relax.cli")

#: The potential used when none is named.
DEFAULT_POTENTIAL = "emt"


class UsageError(Exception):
    """Bad flags, config or inputs: reported on one line, exit status 2."""


# --- options: one table for flags, config keys, types and defaults ---------------------------

def _number(kind: type) -> Callable[[Any], Any]:
    def convert(value):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        return float(value)
    return convert


def _length_or_none(value) -> float:
    """A length in Å, or ``none`` (also ``off``, ``inf``) for no limit: ``inf``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "inf")):
        return float("inf")
    value = _number(float)(value)
    if not value > 0:
        raise ValueError(f"must be > 0 (or none), got {value!r}")
    return value


def _devices(value) -> int | str:
    """``all`` (every local device) or how many of them (the first ``N``)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        number = _number(int)(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise ValueError(f"expected a number of devices (> 0) or 'all', got {value!r}")
    return number


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


def _optimizer(value) -> str:
    """An optimizer name; a config mapping (``{name: optax:adam, learning_rate: ...}``) becomes its one-line form."""
    if isinstance(value, Mapping):
        from .transforms.optax_spec import canonical_spec, is_optax_spec

        if not is_optax_spec(value):
            raise ValueError(f"only optax optimizers take the mapping form (name: optax:<name>), got {dict(value)!r}")
        return canonical_spec(value)
    return _text(value)


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _params(value) -> dict[str, Any]:
    """``{"sigma": 3.4}`` from a mapping (config) or ``"sigma=3.4,epsilon=0.01"`` (flag); values parsed as YAML."""
    import yaml

    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # repeated flag
        out: dict[str, Any] = {}
        for item in value:
            out.update(_params(item))
        return out
    if not isinstance(value, str):
        raise ValueError(f"expected KEY=VALUE pairs, got {value!r}")
    out = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(text)
    return out


@dataclasses.dataclass(frozen=True)
class Option:
    """A setting that is both a flag (``--max-steps``) and a config key (``max_steps``)."""

    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # inclusive lower bound
    positive: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            value = self.convert(value)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err)) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
        if self.positive and not value > 0:
            raise ValueError(f"must be > 0, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be >= {self.minimum}, got {value!r}")
        return value


OPTIONS: tuple[Option, ...] = (
    Option("potential", _text, DEFAULT_POTENTIAL,
           "energy model: lj, morse, emt, eam:<file>, sevennet-0, sevennet-0-22may2024, sevennet-l3i5 or "
           "sevennet-mf-0:<PBE|R2SCAN> (default: %(default)s)"),
    Option("potential_params", _params, {},
           "potential parameters KEY=VALUE[,KEY=VALUE...], repeatable (e.g. sigma=3.4,epsilon=0.0104,rc=8.5)"),
    Option("optimizer", _optimizer, "lbfgs",
           "optimizer: lbfgs, fire, precon_lbfgs (ASE's PreconLBFGS: Exp preconditioner, Armijo line search) "
           "or optax:<name>[(key=value,...)], e.g. 'optax:adam(learning_rate=0.01)' "
           "(default: %(default)s, ASE's LBFGS defaults)"),
    Option("fmax", _number(float), 0.05,
           "converged when every atom's force is below FMAX, eV/Å (default: %(default)s)", positive=True),
    Option("max_steps", _number(int), DEFAULT_MAX_STEPS, "step limit per system, ASE's 'steps' (default: %(default)s)",
           aliases=("--steps",), minimum=0),
    Option("maxstep", _number(float), None,
           "largest move of any atom in one step, Å (default: the optimizer's, 0.2 for lbfgs, 0.04 for "
           "precon_lbfgs's first trial step)", positive=True),
    Option("cell", _text, None,
           "also relax the cell, as ASE's filters: frechet (FrechetCellFilter) or unit (UnitCellFilter); "
           "systems without a periodic direction keep relaxing positions only (default: positions only)",
           choices=("frechet", "unit")),
    Option("pressure", _number(float), 0.0,
           "external pressure for --cell, eV/Å³ (ASE's scalar_pressure; 1 GPa = 0.00624 eV/Å³) (default: %(default)s)"),
    Option("hydrostatic_strain", _flag, False, "with --cell: only hydrostatic cell deformation"),
    Option("constant_volume", _flag, False, "with --cell: keep the volume (approximately) constant"),
    Option("fix_symmetry", _flag, False,
           "keep each structure's space group, as ASE's FixSymmetry: the input is refined to the symmetry spglib "
           "finds at --symprec, then forces, stress and steps are symmetrized; summary.csv gains the space group "
           "before and after"),
    Option("symprec", _number(float), 0.01, "spglib's tolerance for --fix-symmetry, Å (default: %(default)s)",
           positive=True),
    Option("max_displacement", _length_or_none, DEFAULT_MAX_DISPLACEMENT,
           "a system whose step would move an atom further than this from its start, Å, stops as diverged "
           "(blew apart); 'none' for no limit (default: %(default)s)"),
    Option("atoms_per_batch", _number(int), None,
           "atom rows per batch of slots: larger batches keep the device busier and use more memory "
           "(default: 8192 on a CPU, from the memory of a GPU)", positive=True),
    Option("devices", _devices, "all",
           "JAX devices to relax on: all local devices of the default backend, or the first N; each runs its "
           "own batches, fed from one queue (default: %(default)s)"),
    Option("dtype", _text, None, "floating point precision (default: the potential's: float32 for learned "
           "potentials, sevennet-*, as their reference implementations run; float64 for the others)",
           choices=("float64", "float32")),
    Option("chunk_steps", _number(int), 64, "steps per device call between progress updates (default: %(default)s)",
           minimum=1),
    Option("out", _text, "relax_out", "output folder (default: %(default)s)"),
    Option("format", _text, None, "ASE reader format for every input (default: guess from each file)"),
    Option("resume", _flag, False, "keep complete outputs in --out and relax only the systems without one"),
    Option("overwrite", _flag, False, "relax everything again, replacing outputs already in --out"),
    Option("plot", _flag, False, "also write fmax.png (largest force against step; needs matplotlib)"),
    Option("trajectories", _text, "per-system",
           "where each system's trajectory goes: per-system (<name>.h5, the default), per-shard (shard-NNNNNN.h5 "
           "files of --shard-size systems each -- on Dask, of one task's systems --, one H5MD particles group per "
           "system: far fewer files for a cluster file system) or none (only relaxed.extxyz and summary.csv; such a run cannot be resumed)",
           choices=("per-system", "per-shard", "none")),
    Option("shard_size", _number(int), 1000,
           "systems per shard file with --trajectories per-shard; a killed run relaxes the systems of the "
           "unfinished shard again on --resume (default: %(default)s)", positive=True),
    Option("dask_scheduler", _text, None,
           "relax on the Dask cluster whose scheduler is at this address (e.g. tcp://host:8786): structures go to its "
           "workers in tasks of --task-size, each worker writes its systems' .h5 into --out (a folder every "
           "worker sees) and this process writes summary.csv and relaxed.extxyz; needs kups-relax[distributed]"),
    Option("workers", _number(int), None,
           "relax on a new local Dask cluster of this many worker processes (sharing this machine's cores; two task "
           "threads each, feeding the worker's one relaxation stream); see --dask-scheduler", positive=True),
    Option("task_size", _number(int), 128,
           "structures per Dask task with --dask-scheduler/--workers: a task that dies with its worker is "
           "rerun elsewhere, keeping the systems it had finished (with --trajectories per-shard: none of them; "
           "its shard file is written when it ends) (default: %(default)s)", positive=True),
    Option("quiet", _flag, False, "print only warnings and errors", aliases=("-q",)),
    Option("verbose", _flag, False, "print debug messages", aliases=("-v",)),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relax-batch",
        description="Relax many structures at once (batched, on JAX) with ASE's optimizers' answers. "
                    "Writes <name>.h5 trajectories (H5MD), relaxed.extxyz and summary.csv to --out.",
        epilog="Exit status: 0 all converged, 1 some did not (see summary.csv), 2 bad usage or no readable "
               "input. Config keys are the long flag names; flags given here override the config.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="structure files (any format ASE reads; every frame of a multi-frame file is "
                             "one system) or folders of them; read as the relaxation goes")
    parser.add_argument("--from-list", action="append", metavar="FILE",
                        help="also read the paths listed in FILE, one per line (blank lines and lines starting "
                             "with # are skipped; relative paths are relative to FILE's folder); repeatable")
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file, e.g. configs/tight.yaml")
    for option in OPTIONS:
        names = [option.flag, *option.aliases]
        kwargs: dict[str, Any] = dict(dest=option.name, default=argparse.SUPPRESS, help=option.help)
        if option.convert is _flag:  # --plot / --no-plot, so that a flag can undo a config's "plot: true"
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["default"] = argparse.SUPPRESS
        if option.name == "potential_params":
            kwargs.update(action="append", metavar="KEY=VALUE")
        else:
            kwargs.update(metavar=option.name.upper() if option.choices is None else None,
                          choices=option.choices)
        kwargs["help"] = option.help.replace("%(default)s", str(option.default))
        parser.add_argument(*names, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def load_config(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML mapping whose keys are long flag names (``max-steps`` or ``max_steps``).

    Raises:
        UsageError: unreadable file, not a mapping, an unknown key (named), or a bad value.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise UsageError(f"config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config {path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"config {path}: expected a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_BY_NAME:
            known = ", ".join(sorted(OPTION_BY_NAME))
            raise UsageError(f"config {path}: unknown key {key!r} (known keys: {known})")
        out[name] = _checked(OPTION_BY_NAME[name], value, f"config {path}: {key}")
    return out


def _checked(option: Option, value: Any, where: str) -> Any:
    try:
        return option.check(value)
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from None


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then ``--config``, then the flags given: one dict keyed by option name."""
    settings = {o.name: o.default for o in OPTIONS}
    config = load_config(args.config) if getattr(args, "config", None) else {}
    settings.update(config)
    given = {k: v for k, v in vars(args).items() if k in OPTION_BY_NAME}
    for name, value in given.items():
        value = _checked(OPTION_BY_NAME[name], value, OPTION_BY_NAME[name].flag)
        if name == "potential_params":
            value = {**config.get(name, {}), **value}  # flags add to and override the config's parameters
        settings[name] = value
    if settings["quiet"] and settings["verbose"]:
        raise UsageError("--quiet and --verbose exclude each other")
    if settings["resume"] and settings["overwrite"]:
        raise UsageError("--resume and --overwrite exclude each other")
    return settings


# --- potential and optimizer ----------------------------------------------------------------

def make_potential(name: str, params: Mapping[str, Any]):
    """The potential object for ``--potential NAME`` and its parameters (UsageError on a bad name/parameter)."""
    from potentials import get_potential

    try:
        return get_potential(name, **params)
    except (TypeError, ValueError, KeyError, OSError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if not message.startswith(("potential", "unknown potential")):
            message = f"potential {name!r}: {message}"
        raise UsageError(message) from None


def make_cell_filter(settings: Mapping[str, Any]):
    """The :class:`~kups_relax.filters.CellFilter` of ``--cell``/``--pressure``/... (``None``: positions only)."""
    from .filters import CellFilter

    kind = settings.get("cell")
    cell_options = {k: settings.get(k) for k in ("hydrostatic_strain", "constant_volume")}
    if kind is None:
        used = [f"--{k.replace('_', '-')}" for k, v in cell_options.items() if v]
        if settings.get("pressure"):
            used.append("--pressure")
        if used:
            raise UsageError(f"{', '.join(used)} need(s) --cell frechet or --cell unit")
        return None
    return CellFilter(kind=kind, scalar_pressure=float(settings.get("pressure") or 0.0), **cell_options)


def make_optimizer(name: str, maxstep: float | None):
    """``(what relax() gets, the transform)`` for ``--optimizer NAME`` and ``--maxstep``.

    Without ``--maxstep`` the name itself goes to :func:`kups_relax.relax`; with it, the
    name's ``kups_relax.transforms.ase_<name>(maxstep=...)`` factory builds the transform.
    """
    from . import transforms
    from .engine import resolve_optimizer

    try:
        transform = resolve_optimizer(name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if maxstep is None:
        return name, transform
    if transforms.is_optax_spec(name):
        transform = transforms.optax_optimizer(name, maxstep=maxstep)
        return transform, transform
    factory = getattr(transforms, name.lower() if name.lower() == "precon_lbfgs" else f"ase_{name.lower()}", None)
    if factory is None:
        raise UsageError(f"--maxstep is not available for optimizer {name!r}")
    transform = factory(maxstep=maxstep)
    return transform, transform


# --- one run ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything one invocation needs to relax, write, and rebuild the outputs."""

    out: Path
    settings: dict[str, Any]
    potential: Any
    optimizer: Any
    potential_info: dict[str, Any]
    optimizer_info: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        """JSON of every setting that decides a system's result (compared on ``--resume``)."""
        s = self.settings
        # the neighbor-list radius of a potential is an upper bound that does not decide results
        potential = {k: v for k, v in self.potential_info.items() if k != "cutoff"}
        cell = make_cell_filter(s)
        extra = {} if cell is None else dict(cell_filter=dataclasses.asdict(cell))
        if s["max_displacement"] != DEFAULT_MAX_DISPLACEMENT:  # decides which systems stop as diverged
            extra["max_displacement"] = s["max_displacement"]
        if s["fix_symmetry"]:
            extra["fix_symmetry"] = dict(symprec=s["symprec"])
        return json.dumps(dict(potential=potential, optimizer=self.optimizer_info, fmax=s["fmax"],
                               max_steps=s["max_steps"], dtype=s["dtype"], **extra), sort_keys=True, default=str)

    def h5_path(self, name: str) -> Path:
        return self.out / f"{name}.h5"

    @property
    def trajectory_metadata(self) -> dict[str, Any]:
        """The ``/parameters`` every system's trajectory records besides its result and source."""
        s = self.settings
        return dict(fmax=float(s["fmax"]), max_steps=int(s["max_steps"]), dtype=s["dtype"], settings=self.fingerprint)

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kups_relax.relax_iter` (after the structures and the
        potential) that these settings ask for: the one place settings become an engine call."""
        s = self.settings
        return dict(fmax=s["fmax"], max_steps=s["max_steps"], optimizer=self.optimizer, dtype=s["dtype"],
                    chunk_steps=s["chunk_steps"], trajectory=s["trajectories"] != "none",
                    cell_filter=make_cell_filter(s), max_displacement=s["max_displacement"],
                    atoms_per_batch=s["atoms_per_batch"], devices=None if s["devices"] == "all" else s["devices"],
                    fix_symmetry=s["fix_symmetry"], symprec=s["symprec"])

    def trajectory_writer(self):
        """The :class:`~kups_relax.outputs.TrajectoryWriter` of ``--trajectories``/``--shard-size``."""
        from .outputs import TrajectoryWriter

        return TrajectoryWriter(self.out, self.settings["trajectories"], potential=self.potential_info,
                                optimizer=self.optimizer_info, metadata=self.trajectory_metadata,
                                shard_size=self.settings["shard_size"])


def relax_stream(run: Run, structures):
    """:func:`kups_relax.relax_iter` of ``(name, Atoms)`` pairs with the run's settings:
    ``(index in the stream, RelaxResult)`` as each finishes."""
    from .engine import relax_iter

    return relax_iter(structures, run.potential, **run.engine_kwargs())


def write_system(run: Run, result, source: str) -> Path:
    """Write one finished system's trajectory (atomically) to ``<out>/<name>.h5``."""
    from .io import write_result

    path = run.h5_path(result.name)
    write_result(path, result, potential=run.potential_info, optimizer=run.optimizer_info,
                 metadata=dict(source=source, **run.trajectory_metadata))
    return path


def _flatten(value, prefix=""):
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _settings_difference(old: str, new: str) -> str:
    """``"fmax: 0.05 there, 0.02 here"`` for the first setting that differs between two fingerprints."""
    try:
        a, b = _flatten(json.loads(old)), _flatten(json.loads(new))
    except (TypeError, ValueError):
        return "settings not recorded"
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} there, {b.get(key)!r} now"
    return "same settings"


def existing_output(run: Run, item, path: Path | None = None, system: str | None = None) -> tuple[bool | None, str]:
    """Is the trajectory at ``path`` (default ``<out>/<name>.h5``; ``system``: its group in a
    shard) this system relaxed with this run's settings?

    Returns ``(True, "")``; ``(False, why)`` when it holds other settings or another
    input structure; ``(None, why)`` when it is absent or not a file we can read.
    """
    from .io import read_parameters, read_trajectory

    path = run.h5_path(item.name) if path is None else path
    if not path.exists():
        return None, "absent"
    try:
        params = read_parameters(path, system=system)
        first = read_trajectory(path, 0, system=system)
    except Exception as err:  # not an HDF5 file we wrote
        return None, f"unreadable ({type(err).__name__}: {err})"
    if params.get("settings") != run.fingerprint:
        return False, _settings_difference(params.get("settings"), run.fingerprint)
    atol = 1e-4 if run.settings["dtype"] == "float32" else 1e-9  # frame 0 holds the input at run precision
    same_input = (len(first) == len(item.atoms) and np.array_equal(first.numbers, item.atoms.numbers)
                  and np.allclose(first.positions, item.atoms.positions, rtol=0, atol=atol)
                  and np.allclose(first.cell.array, item.atoms.cell.array, rtol=0, atol=atol)
                  and np.array_equal(first.pbc, item.atoms.pbc))
    return (True, "") if same_input else (False, f"input structure {item.source} changed")


#: Files in ``--out`` that a run would replace: summary, relaxed structures, trajectories (and shards).
def _existing_outputs(out: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` names of outputs already in ``out`` (a cheap scan that stops early)."""
    found: list[str] = []
    if not out.is_dir():
        return found
    with os.scandir(out) as entries:
        for entry in entries:
            name = entry.name
            if not name.startswith(".") and (name.endswith(".h5") or name in ("summary.csv", "relaxed.extxyz")):
                found.append(name)
                if len(found) >= limit:
                    break
    return sorted(found)


class ResumeIndex:
    """What ``--resume`` keeps: systems whose complete trajectory (``<name>.h5``, or a group in a
    complete shard file) holds this run's settings and input structure.

    :meth:`check_settings` compares one existing output with the run's settings before anything
    runs (a changed ``--fmax`` is found at once); :meth:`kept` decides each structure as it is read.
    """

    def __init__(self, run: Run):
        from .outputs import shard_index

        self.run = run
        self.shards = shard_index(run.out)  # {name: shard file}: the names, not the trajectories
        self.kept_count = 0

    def check_settings(self) -> None:
        """UsageError when the first readable output in ``--out`` was relaxed with other settings."""
        from .io import read_parameters

        samples = [(next(iter(self.shards.values())), next(iter(self.shards)))] if self.shards else []
        shard_files = {p.name for p in set(self.shards.values())}
        with os.scandir(self.run.out) as entries:
            for entry in entries:
                if len(samples) >= 4:
                    break
                if entry.name.endswith(".h5") and not entry.name.startswith(".") and entry.name not in shard_files:
                    samples.append((Path(entry.path), None))
        for path, system in samples:
            try:
                recorded = read_parameters(path, system=system).get("settings")
            except Exception:  # not ours, or not a per-system file: the per-structure check decides
                continue
            if recorded != self.run.fingerprint:
                what = f"{path.name}" + (f" ({system})" if system else "")
                raise UsageError(f"--resume: outputs in {self.run.out} do not match this run: {what} "
                                 f"({_settings_difference(recorded, self.run.fingerprint)}). "
                                 "Use another --out, or --overwrite to relax them again")
            return

    def kept(self, item) -> tuple[dict[str, Any], Any, np.ndarray] | None:
        """The summary fields, relaxed structure and fmax series (:func:`_read_outputs`) of a system a
        complete output already holds; ``None`` to relax it. UsageError: an output of that name holds
        another relaxation (other settings, or the input changed)."""
        path, system = self.run.h5_path(item.name), None
        if not path.exists():
            if item.name not in self.shards:
                return None
            path, system = self.shards[item.name], item.name
        state, why = existing_output(self.run, item, path, system)
        if state is None:
            logger.warning("%s: %s; relaxing %s again", path, why, item.name)
            return None
        if state is False:
            raise UsageError(f"--resume: {path.name}{f' ({system})' if system else ''} in {self.run.out} does not "
                             f"match this run: {item.name} ({why}). Outputs written so far are complete and kept; "
                             "use another --out, or --overwrite to relax them again")
        self.kept_count += 1
        return _read_outputs(path, system)


class BackgroundWriter:
    """Writes finished systems' files on one thread while the main thread waits for the device.

    Writing a system's ``.h5`` is milliseconds of Python and HDF5 calls; on the main thread that
    time would sit between device calls. Here it overlaps them. ``submit`` blocks when ``backlog``
    writes wait (so memory holds at most that many trajectories); leaving the ``with`` block
    finishes every submitted write — also when the block raises — and then re-raises the first
    error a write raised.
    """

    def __init__(self, backlog: int = 64):
        self._queue: queue.Queue = queue.Queue(maxsize=backlog)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="kups-relax-writer", daemon=True)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            result, write = job
            if self._error is None:  # after a failure, skip the rest: the run is going to stop
                try:
                    write()
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._error = err
            # the frames are on disk now: drop them, so that memory does not grow with the
            # number of systems times their steps
            if result is not None:
                result.trajectory = None

    def submit(self, result, write: Callable[[], Any]) -> None:
        """Call ``write()`` on the writer thread, then drop ``result``'s trajectory (``result`` may be ``None``)."""
        if self._error is not None:
            raise self._error
        self._queue.put((result, write))

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error


def _outputs(result) -> tuple[dict[str, Any], Any, np.ndarray]:
    """A finished system's summary fields, relaxed structure and fmax series."""
    from .outputs import result_fields

    return result_fields(result), result.atoms, np.asarray(result.fmaxes, np.float64)


def _read_outputs(path: Path, system: str | None = None) -> tuple[dict[str, Any], Any, np.ndarray]:
    """:func:`_outputs` of a system from the complete ``.h5`` (or shard, ``system``) an earlier run wrote."""
    from .io import read_observable, read_parameters, read_trajectory
    from .outputs import parameter_fields

    fields = parameter_fields(read_parameters(path, system=system))
    return fields, read_trajectory(path, -1, system=system), read_observable(path, "max_force", system=system)[1]


def _relaxed_from_input(item, relaxed):
    """The input structure (its ``info``, ``arrays``, constraints) at the relaxed cell and positions,
    with the relaxed results: what ``relaxed.extxyz`` holds for a system kept by ``--resume``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    final = item.atoms.copy()
    final.cell = relaxed.cell  # a variable-cell run (--cell) ends in another cell
    final.positions = relaxed.positions
    final.calc = SinglePointCalculator(final, **relaxed.calc.results)
    return final


def relax_and_write(run: Run, items, sink, trajectories, progress_enabled: bool) -> dict[str, int]:
    """Relax ``items`` (:class:`~kups_relax.io.InputStructure`, read as the engine asks for them) and
    hand every system's row to ``sink`` (:class:`~kups_relax.outputs.CampaignOutputs`, ordered by input
    position) and its trajectory to ``trajectories`` (:class:`~kups_relax.outputs.TrajectoryWriter`) as
    it finishes; with ``--resume``, systems with a complete output are not relaxed and their rows come
    from it. Returns counts: ``read`` (relaxable inputs), ``kept``, ``relaxed``.

    Memory holds the structures in flight and the engine's read-ahead, whatever the number of inputs;
    files are written on a writer thread while the device runs.
    """
    from .compile_stats import compile_stats
    from .report import Progress

    resume = ResumeIndex(run) if run.settings["resume"] else None
    in_flight: dict[int, tuple[int, str, str, int]] = {}  # stream index -> (input position, name, source, atoms)
    counts = dict(read=0, kept=0, relaxed=0)

    def to_relax():
        stream_index = 0
        for position, it in enumerate(items):
            row = dict(name=it.name, source=it.source, atoms=len(it.atoms) if it.atoms is not None else None)
            if not it.ok:
                writer.submit(None, lambda row=row, it=it, position=position: sink.add(
                    {**row, "converged": False, "status": it.status, "reason": it.reason}, order=position))
                continue
            counts["read"] += 1
            kept = resume.kept(it) if resume is not None else None
            if kept is not None:
                fields, relaxed, fmaxes = kept
                counts["kept"] += 1
                frame = _relaxed_from_input(it, relaxed)
                writer.submit(None, lambda row=row, fields=fields, frame=frame, fmaxes=fmaxes, position=position:
                              sink.add({**row, **fields}, frame, fmaxes, order=position))
                continue
            in_flight[stream_index] = (position, it.name, it.source, len(it.atoms))
            stream_index += 1
            yield it.name, it.atoms

    def write(result, position: int, row: dict, source: str) -> None:
        trajectories.write(result, source)
        sink.add({**row, **_outputs(result)[0]}, result.atoms, result.fmaxes, order=position)

    chunk_steps = run.settings["chunk_steps"]
    s = run.settings
    from .engine import resolve_devices

    devices = resolve_devices(None if s["devices"] == "all" else s["devices"])
    logger.info("relaxing as inputs are read: potential %s, optimizer %s, fmax %g eV/Å, max %d steps, %s, "
                "trajectories %s, on %s", s["potential"], s["optimizer"], s["fmax"], s["max_steps"], s["dtype"],
                s["trajectories"], ", ".join(map(str, devices)))
    t0 = time.perf_counter()
    compiled_before = compile_stats()
    with BackgroundWriter() as writer, Progress(None, chunk_steps, enabled=progress_enabled) as progress:
        for index, result in relax_stream(run, to_relax()):
            position, name, source, n_atoms = in_flight.pop(index)
            row = dict(name=name, source=source, atoms=n_atoms)
            if result.status == "invalid":
                writer.submit(None, lambda row=row, result=result, position=position: sink.add(
                    {**row, "converged": False, "status": "invalid", "reason": result.reason}, order=position))
            else:
                counts["relaxed"] += 1
                writer.submit(result, lambda result=result, position=position, row=row, source=source:
                              write(result, position, row, source))
            progress.finished()
    compiled = compile_stats().since(compiled_before)
    logger.info("relaxed %d systems in %.1f s; compiled %d programs, %d more from the compilation cache (%.1f s)",
                counts["relaxed"], time.perf_counter() - t0, compiled.programs, compiled.cached, compiled.seconds)
    if resume is not None:
        logger.info("resume: %d of %d systems already complete, relaxed %d", counts["kept"], counts["read"],
                    counts["read"] - counts["kept"])
    return counts


def input_paths(args: argparse.Namespace):
    """The PATHs given, then those of every ``--from-list`` file (read as they are needed)."""
    from .io import read_path_list

    lists = [Path(p) for p in (getattr(args, "from_list", None) or [])]
    for path in lists:
        try:
            with open(path, encoding="utf-8"):
                pass
        except OSError as err:
            raise UsageError(f"--from-list {path}: {err.strerror or err}") from None
    return itertools.chain(args.paths, *(read_path_list(p) for p in lists)), [*args.paths, *map(str, lists)]


def _logged(items):
    """``items``, with a warning for each that cannot be relaxed."""
    for it in items:
        if not it.ok:
            logger.warning("%s: %s", it.source, it.reason)
        yield it


def _first_readable(items) -> tuple[list, bool]:
    """Read up to the first relaxable input: ``(those read, whether one was found)``."""
    read = []
    for it in items:
        read.append(it)
        if it.ok:
            return read, True
    return read, False


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, relax, write; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.paths and not getattr(args, "from_list", None):
        parser.error("give structure files or folders (PATH), or --from-list FILE")
    settings = resolve_settings(args)
    restore_logging = _configure_logging(settings)
    try:
        return _run(args, settings)
    finally:
        restore_logging()


def make_run(settings: dict[str, Any]) -> Run:
    """The :class:`Run` of resolved settings: potential, optimizer and their metadata (UsageError on bad ones)."""
    from .io import optimizer_metadata, potential_metadata
    from .precision import resolve_dtype

    if settings["plot"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'kups-relax[plot]'") from None
    if settings["trajectories"] == "none" and settings["resume"]:
        raise UsageError("--resume needs the finished systems' trajectories on disk, and --trajectories none "
                         "keeps none (summary.csv is written only when a run ends); use --trajectories "
                         "per-system or per-shard for a run you may want to resume")
    potential = make_potential(settings["potential"], settings["potential_params"])
    settings["dtype"] = resolve_dtype(settings["dtype"], potential)  # None: the potential's default
    optimizer, transform = make_optimizer(settings["optimizer"], settings["maxstep"])
    make_cell_filter(settings)  # bad --cell combinations are usage errors before anything is read
    if settings["devices"] != "all":
        from .engine import resolve_devices

        try:
            resolve_devices(settings["devices"])
        except ValueError as err:
            raise UsageError(f"--devices: {err}") from None
    return Run(out=Path(settings["out"]), settings=settings, potential=potential, optimizer=optimizer,
               potential_info=potential_metadata(potential, settings["potential"]),
               optimizer_info=optimizer_metadata(transform, settings["optimizer"]))


def check_out(run: Run) -> list[str]:
    """UsageError when ``--out`` holds outputs this run may neither keep (no ``--resume``) nor replace
    (no ``--overwrite``), found before anything is read or written. Returns the few outputs seen.

    UsageError too when ``--out`` (or the nearest of its parent folders that exists) is a file:
    the folder could not be created, and the run would stop only after reading its inputs."""
    for folder in (run.out, *run.out.parents):
        if folder.is_dir():
            break
        if folder.exists():  # a file (or anything else that is not a folder): no folder can be made here
            what = "is a file, not a folder" if folder == run.out else f"cannot be created: {folder} is a file"
            raise UsageError(f"--out {run.out}: {what}")
    existing = _existing_outputs(run.out)
    if existing and not (run.settings["resume"] or run.settings["overwrite"]):
        listing = ", ".join(existing) + (" ..." if len(existing) >= 3 else "")
        raise UsageError(f"{run.out} already holds outputs ({listing}); pass --resume to keep them and relax the "
                         "rest, or --overwrite to relax all again (or choose another --out)")
    return existing


def prepare_out(run: Run, existing: Sequence[str]) -> None:
    """Create ``--out`` and remove temporaries of killed runs; with ``--resume``, UsageError when the
    outputs there were relaxed with other settings (before anything is written)."""
    from .io import remove_stale_temporaries

    try:
        run.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. no permission; a file in the way is found earlier, by check_out
        raise UsageError(f"--out {run.out}: cannot create the folder ({err.strerror or err})") from None
    for stale in remove_stale_temporaries(run.out):
        logger.info("removed %s (left by an interrupted run)", stale)
    if existing and run.settings["resume"]:
        ResumeIndex(run).check_settings()


def _run(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """Read as we go, relax, write every output as systems finish; the exit status."""
    from .io import iter_structures
    from .outputs import CampaignOutputs

    run = make_run(settings)
    existing = check_out(run)
    paths, named = input_paths(args)
    items = _logged(iter_structures(paths, format=settings["format"]))
    read, found = _first_readable(items)  # "no readable input" is a usage error before anything is written
    if not found:
        raise UsageError("no readable input" + ("" if read else f" in {', '.join(named)}"))
    prepare_out(run, existing)
    if settings["dask_scheduler"] or settings["workers"]:
        from .distributed import run_on_dask

        sink = run_on_dask(run, itertools.chain(read, items))
        if not settings["quiet"]:
            print(sink.table())
            print(sink.report.describe())
            print(sink.describe())
        return 0 if sink.all_converged else 1

    with CampaignOutputs(run.out, plot=settings["plot"], trajectories=settings["trajectories"],
                         fmax=settings["fmax"]) as sink, run.trajectory_writer() as trajectories:
        counts = relax_and_write(run, itertools.chain(read, items), sink, trajectories,
                                 progress_enabled=not settings["quiet"])
        trajectories.close()  # the last shard is complete before summary.csv names its systems
    logger.info("read %d systems (%d relaxable) from %s", sink.rows, counts["read"], ", ".join(named))
    if not settings["quiet"]:
        print(sink.table())
        print(sink.describe())
    return 0 if sink.all_converged else 1


class _Filter(logging.Filter):
    """The CLI's messages at ``level``; libraries' from WARNING (verbose: ours from DEBUG, others from INFO)."""

    def __init__(self, level: int, verbose: bool):
        super().__init__()
        self.level, self.verbose = level, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("kups_relax.cli"):
            return record.levelno >= self.level
        if self.verbose:  # our library's debug records, other libraries' from INFO
            ours = record.name.startswith(("kups_relax", "potentials"))
            return record.levelno >= (self.level if ours else logging.INFO)
        return record.levelno >= max(self.level, logging.WARNING)


def _configure_logging(settings: Mapping[str, Any]) -> Callable[[], None]:
    """Send log records to stderr at the level the flags ask for; returns a function that undoes it."""
    level = logging.DEBUG if settings["verbose"] else logging.WARNING if settings["quiet"] else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if settings["verbose"]
                                           else "%(message)s"))
    handler.addFilter(_Filter(level, settings["verbose"]))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if settings["verbose"] else logging.INFO)

    def restore() -> None:
        root.handlers[:], level = saved
        root.setLevel(level)

    return restore


@x64
def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``relax-batch``).

    A program that owns its process, so it switches on JAX's persistent compilation cache
    (:func:`kups_relax.enable_compilation_cache`: ``JAX_COMPILATION_CACHE_DIR`` or
    ``~/.cache/kups-relax/jax``, every program) unless ``KUPS_RELAX_COMPILATION_CACHE=0``.
    """
    if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
        enable_compilation_cache()
    try:
        return run_cli(argv)
    except UsageError as err:
        print(f"relax-batch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrelax-batch: interrupted; complete outputs are kept, run again with --resume to finish",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

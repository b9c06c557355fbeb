"""``relax-batch PATHS...``: relax every structure in files or folders, write trajectories and a summary.

Outputs in ``--out DIR``:

* ``<name>.h5`` -- one H5MD trajectory per relaxed system (:mod:`kups_relax.h5md`);
* ``relaxed.extxyz`` -- every final structure with energy, forces, ``converged``, ``steps``;
* ``summary.csv`` -- one row per system, including the ones that could not be relaxed;
* ``fmax.png`` -- with ``--plot``: largest force against step for every system.

Every file is written under a temporary name and renamed when complete, so after an
interruption (Ctrl-C, ``kill -9``) ``--resume`` relaxes only the systems without a
``.h5`` and rebuilds ``relaxed.extxyz`` and ``summary.csv`` from all of them.

Settings come from built-in defaults, then ``--config FILE.yaml`` (keys = long flag
names, ``-`` or ``_``), then the flags given on the command line.

Exit status: 0 every system converged; 1 some did not (not converged within their
step limit, diverged, or bad input; their rows say why); 2 bad usage, a bad config,
or no readable input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
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
           "energy model: lj, morse, emt, eam:<file> or sevennet-0 (default: %(default)s)"),
    Option("potential_params", _params, {},
           "potential parameters KEY=VALUE[,KEY=VALUE...], repeatable (e.g. sigma=3.4,epsilon=0.0104,rc=8.5)"),
    Option("optimizer", _optimizer, "lbfgs",
           "optimizer: lbfgs, fire or optax:<name>[(key=value,...)], e.g. 'optax:adam(learning_rate=0.01)' "
           "(default: %(default)s, ASE's LBFGS defaults)"),
    Option("fmax", _number(float), 0.05,
           "converged when every atom's force is below FMAX, eV/Å (default: %(default)s)", positive=True),
    Option("max_steps", _number(int), DEFAULT_MAX_STEPS, "step limit per system, ASE's 'steps' (default: %(default)s)",
           aliases=("--steps",), minimum=0),
    Option("maxstep", _number(float), None,
           "largest move of any atom in one step, Å (default: the optimizer's, 0.2 for lbfgs)", positive=True),
    Option("cell", _text, None,
           "also relax the cell, as ASE's filters: frechet (FrechetCellFilter) or unit (UnitCellFilter); "
           "systems without a periodic direction keep relaxing positions only (default: positions only)",
           choices=("frechet", "unit")),
    Option("pressure", _number(float), 0.0,
           "external pressure for --cell, eV/Å³ (ASE's scalar_pressure; 1 GPa = 0.00624 eV/Å³) (default: %(default)s)"),
    Option("hydrostatic_strain", _flag, False, "with --cell: only hydrostatic cell deformation"),
    Option("constant_volume", _flag, False, "with --cell: keep the volume (approximately) constant"),
    Option("max_displacement", _length_or_none, DEFAULT_MAX_DISPLACEMENT,
           "a system whose step would move an atom further than this from its start, Å, stops as diverged "
           "(blew apart); 'none' for no limit (default: %(default)s)"),
    Option("atoms_per_batch", _number(int), None,
           "atom rows per batch of slots: larger batches keep the device busier and use more memory "
           "(default: 8192 on a CPU, from the memory of a GPU)", positive=True),
    Option("dtype", _text, "float64", "floating point precision (default: %(default)s)",
           choices=("float64", "float32")),
    Option("chunk_steps", _number(int), 64, "steps per device call between progress updates (default: %(default)s)",
           minimum=1),
    Option("out", _text, "relax_out", "output folder (default: %(default)s)"),
    Option("format", _text, None, "ASE reader format for every input (default: guess from each file)"),
    Option("resume", _flag, False, "keep complete outputs in --out and relax only the systems without one"),
    Option("overwrite", _flag, False, "relax everything again, replacing outputs already in --out"),
    Option("plot", _flag, False, "also write fmax.png (largest force against step; needs matplotlib)"),
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
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="structure files (any format ASE reads; every frame of a multi-frame file is "
                             "one system) or folders of them")
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
    factory = getattr(transforms, f"ase_{name.lower()}", None)
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
        return json.dumps(dict(potential=potential, optimizer=self.optimizer_info, fmax=s["fmax"],
                               max_steps=s["max_steps"], dtype=s["dtype"], **extra), sort_keys=True, default=str)

    def h5_path(self, name: str) -> Path:
        return self.out / f"{name}.h5"


def write_system(run: Run, result, source: str) -> Path:
    """Write one finished system's trajectory (atomically) to ``<out>/<name>.h5``."""
    from .io import write_result

    path = run.h5_path(result.name)
    metadata = dict(source=source, fmax=float(run.settings["fmax"]), max_steps=int(run.settings["max_steps"]),
                    dtype=run.settings["dtype"], settings=run.fingerprint)
    write_result(path, result, potential=run.potential_info, optimizer=run.optimizer_info, metadata=metadata)
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


def existing_output(run: Run, item) -> tuple[bool | None, str]:
    """Is ``<name>.h5`` this system relaxed with this run's settings?

    Returns ``(True, "")``; ``(False, why)`` when it holds other settings or another
    input structure; ``(None, why)`` when it is absent or not a file we can read.
    """
    from .io import read_parameters, read_trajectory

    path = run.h5_path(item.name)
    if not path.exists():
        return None, "absent"
    try:
        params = read_parameters(path)
        first = read_trajectory(path, 0)
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


def plan(run: Run, items) -> list:
    """The inputs still to relax; raises UsageError when ``--out`` holds outputs this run may not keep or replace."""
    relaxable = [it for it in items if it.ok]
    existing = [it for it in relaxable if run.h5_path(it.name).exists()]
    if not existing or run.settings["overwrite"]:
        return relaxable
    if not run.settings["resume"]:
        names = ", ".join(f"{it.name}.h5" for it in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise UsageError(f"{run.out} already holds outputs for {len(existing)} of these systems ({names}); "
                         "pass --resume to keep them and relax the rest, or --overwrite to relax all again")
    done, differ = [], []
    for it in existing:
        state, why = existing_output(run, it)
        if state:
            done.append(it)
        elif state is False:
            differ.append(f"{it.name} ({why})")
        else:
            logger.warning("%s: %s; relaxing %s again", run.h5_path(it.name), why, it.name)
    if differ:
        listing = "; ".join(differ[:3]) + (" ..." if len(differ) > 3 else "")
        raise UsageError(f"--resume: {len(differ)} output(s) in {run.out} do not match this run: {listing}. "
                         "Use another --out, or --overwrite to relax them again")
    done_names = {it.name for it in done}
    logger.info("resume: %d of %d systems already complete, relaxing %d", len(done), len(relaxable),
                len(relaxable) - len(done))
    return [it for it in relaxable if it.name not in done_names]


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
            # number of systems times their steps (relax() keeps every result until it returns)
            result.trajectory = None

    def submit(self, result, write: Callable[[], Any]) -> None:
        """Call ``write()`` on the writer thread, then drop ``result``'s trajectory."""
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


def relax_and_write(run: Run, todo, progress_enabled: bool) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Relax ``todo`` in one batch; write every result as it arrives. Returns the results of invalid
    ones by name, and for the others what :func:`collect_outputs` needs (so it need not read back
    the files this run wrote)."""
    from .engine import relax
    from .report import Progress

    if not todo:
        return {}, {}
    chunk_steps = run.settings["chunk_steps"]
    logger.info("relaxing %d systems: potential %s, optimizer %s, fmax %g eV/Å, max %d steps, %s",
                len(todo), run.settings["potential"], run.settings["optimizer"], run.settings["fmax"],
                run.settings["max_steps"], run.settings["dtype"])
    t0 = time.perf_counter()
    invalid, written = {}, {}

    def write_as_it_finishes(index: int, result) -> None:
        # each system's outputs are complete on disk soon after it stops (the writer thread is at
        # most a few files behind), so a killed run loses only the systems still in flight
        if result.status == "invalid":
            invalid[todo[index].name] = result
        else:
            written[todo[index].name] = _outputs(result)
            source = todo[index].source
            writer.submit(result, lambda: write_system(run, result, source))

    from .compile_stats import compile_stats

    compiled_before = compile_stats()
    with BackgroundWriter() as writer, Progress(len(todo), chunk_steps, enabled=progress_enabled):
        relax([it.atoms for it in todo], run.potential, fmax=run.settings["fmax"],
              max_steps=run.settings["max_steps"], optimizer=run.optimizer,
              names=[it.name for it in todo], dtype=run.settings["dtype"], chunk_steps=chunk_steps,
              trajectory=True, on_result=write_as_it_finishes, cell_filter=make_cell_filter(run.settings),
              max_displacement=run.settings["max_displacement"], atoms_per_batch=run.settings["atoms_per_batch"])
    compiled = compile_stats().since(compiled_before)
    logger.info("relaxed %d systems in %.1f s; compiled %d programs, %d more from the compilation cache (%.1f s)",
                len(todo), time.perf_counter() - t0, compiled.programs, compiled.cached, compiled.seconds)
    return invalid, written


def _outputs(result) -> tuple[dict[str, Any], Any, np.ndarray]:
    """A finished system's summary fields, relaxed structure and fmax series, as
    :func:`collect_outputs` would read them back from its ``.h5``."""
    fields = dict(converged=bool(result.converged), steps=int(result.steps), initial_energy=float(result.initial_energy),
                  final_energy=float(result.energy), final_fmax=float(result.fmax), status=result.status,
                  reason=result.reason)
    return fields, result.atoms, np.asarray(result.fmaxes, np.float64)


def _read_outputs(path: Path) -> tuple[dict[str, Any], Any, np.ndarray]:
    """:func:`_outputs` of a system from the complete ``.h5`` an earlier run wrote."""
    from .io import read_observable, read_parameters, read_trajectory

    p = read_parameters(path)
    fields = dict(converged=bool(p["converged"]), steps=int(p["steps"]), initial_energy=p["initial_energy"],
                  final_energy=p["final_energy"], final_fmax=p["final_fmax"], status=p["status"],
                  reason=p.get("reason", ""))
    return fields, read_trajectory(path, -1), read_observable(path, "max_force")[1]


def collect_outputs(run: Run, items, invalid: Mapping[str, Any], written: Mapping[str, tuple] | None = None
                    ) -> tuple[list[dict], list, dict[str, np.ndarray]]:
    """Summary rows (input order), final structures and fmax series: of the systems this run
    relaxed from ``written`` (:func:`relax_and_write`), of the others (kept by ``--resume``) from
    their complete ``.h5``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rows, finals, series = [], [], {}
    for it in items:
        row: dict[str, Any] = dict(name=it.name, source=it.source,
                                   atoms=len(it.atoms) if it.atoms is not None else None)
        path = run.h5_path(it.name)
        outputs = None
        if it.ok and written and it.name in written:
            outputs = written[it.name]
        elif it.ok and it.name not in invalid and path.exists():
            outputs = _read_outputs(path)
        if outputs is not None:
            fields, relaxed, fmaxes = outputs
            row.update(fields)
            final = it.atoms.copy()
            final.cell = relaxed.cell  # a variable-cell run (--cell) ends in another cell
            final.positions = relaxed.positions
            final.calc = SinglePointCalculator(final, **relaxed.calc.results)
            for key in ("energy", "free_energy", "forces", "stress"):  # would clash with the results
                final.info.pop(key, None)
                final.arrays.pop(key, None)
            final.info.update(name=it.name, converged=fields["converged"], steps=fields["steps"],
                              status=fields["status"])
            finals.append(final)
            series[it.name] = fmaxes
        elif it.name in invalid:
            row.update(converged=False, status="invalid", reason=invalid[it.name].reason)
        else:
            row.update(converged=False, status=it.status or "missing", reason=it.reason)
        rows.append(row)
    return rows, finals, series


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, relax, write; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = resolve_settings(args)
    restore_logging = _configure_logging(settings)
    try:
        return _run(args, settings)
    finally:
        restore_logging()


def _run(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """Read, plan (resume), relax and write every output; the exit status."""
    from .io import (optimizer_metadata, potential_metadata, read_structures, remove_stale_temporaries,
                     write_extxyz, write_summary_csv)
    from .report import plot_max_force, summary_table

    if settings["plot"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'kups-relax[plot]'") from None
    potential = make_potential(settings["potential"], settings["potential_params"])
    optimizer, transform = make_optimizer(settings["optimizer"], settings["maxstep"])
    make_cell_filter(settings)  # bad --cell combinations are usage errors before anything is read
    run = Run(out=Path(settings["out"]), settings=settings, potential=potential, optimizer=optimizer,
              potential_info=potential_metadata(potential, settings["potential"]),
              optimizer_info=optimizer_metadata(transform, settings["optimizer"]))

    items = read_structures(args.paths, format=settings["format"])
    for it in items:
        if not it.ok:
            logger.warning("%s: %s", it.source, it.reason)
    if not any(it.ok for it in items):
        raise UsageError("no readable input" + ("" if items else f" in {', '.join(args.paths)}"))
    logger.info("read %d systems from %s", sum(it.ok for it in items), ", ".join(args.paths))

    run.out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(run.out):
        logger.info("removed %s (left by an interrupted run)", stale)
    todo = plan(run, items)
    invalid, written = relax_and_write(run, todo, progress_enabled=not settings["quiet"])

    rows, finals, series = collect_outputs(run, items, invalid, written)
    write_extxyz(run.out / "relaxed.extxyz", finals)
    write_summary_csv(run.out / "summary.csv", rows)
    if settings["plot"]:
        from .io import atomic_output

        with atomic_output(run.out / "fmax.png") as tmp:
            plot_max_force(tmp, series, settings["fmax"])
    if not settings["quiet"]:
        print(summary_table(rows))
        print(f"outputs in {run.out}/: {len(finals)} trajectories (.h5), relaxed.extxyz, summary.csv"
              + (", fmax.png" if settings["plot"] else ""))
    return 0 if all(r.get("status") == "converged" for r in rows) else 1


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

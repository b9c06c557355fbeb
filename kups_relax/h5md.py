"""Relaxation trajectories in HDF5 files, in the H5MD 1.1 layout ("HDF5 for molecular data").

A file written by :func:`write_relaxation` reads with plain ``h5py``::

    /h5md                        version = [1, 1]
        author/                  name
        creator/                 name = "kups-relax", version
    /particles/all/
        species      (N,) int    atomic numbers Z
        fixed        (N, 3) bool True where a Cartesian component is held fixed (only with constraints)
        box/                     dimension = 3, boundary = ["periodic" | "none"] * 3
            edges/   step, time, value (T, 3, 3) Å     lattice vectors as rows (ASE's cell)
        position/    step (T,), time (T,), value (T, N, 3) Å
        force/       step, time, value (T, N, 3) eV/Å  raw forces (before constraints), as ASE stores them
    /observables/
        potential_energy/  step, time, value (T,) eV
        max_force/         step, time, value (T,) eV/Å  largest per-atom force norm after constraints (ASE's fmax)
    /parameters/                 attrs: name, source, status, reason, converged, steps, fmax,
                                 max_steps, dtype, initial_energy, final_energy, final_fmax,
                                 n_atoms, package, version, settings (JSON of everything that
                                 decides the result), constraints (JSON of ASE's
                                 ``todict()`` of every constraint, when there are any)
        stress       (3, 3) eV/Å³  final stress, 3-D periodic systems only; attrs unit, step
        potential/               attrs: name and every parameter of the potential
        optimizer/               attrs: name and its settings (maxstep, ...)

Several systems can share one file, a *shard* (:class:`ShardWriter`): the same groups one
level down, ``/particles/<name>``, ``/observables/<name>``, ``/parameters/<name>``, and the
root attribute ``layout = "shard"``; the readers take ``system=<name>``.

Row ``t`` of every time series is optimizer step ``step[t]`` (``0`` = the input geometry). A
relaxation has no physical time: ``time`` is the step number again, as a float, without a
``unit`` (H5MD gives a unit only to quantities with a physical dimension). Every element of a
system shares one ``step`` and one ``time`` dataset (HDF5 hard links), as H5MD asks of ``box``
and ``position``. Units (:data:`UNITS`) are H5MD unit strings.

MDAnalysis (its H5MD reader, tested with 2.11) opens a per-system file, and the
:func:`write_system_link` file of one system of a shard, without a topology file as::

    with h5py.File(path, "r") as f:
        n_atoms = len(f["particles/all/species"])
    u = MDAnalysis.Universe(path, format="H5MD", topology_format="MINIMAL", n_atoms=n_atoms,
                            convert_units=False)

(or ``Universe(topology, path, format="H5MD", convert_units=False)`` with a topology file):

* ``convert_units=False``: with unit conversion on, MDAnalysis needs a time unit it knows,
  and a relaxation has none (positions and boxes are in Å, MDAnalysis' own length unit, so
  nothing needs converting; forces stay eV/Å);
* ``topology_format="MINIMAL", n_atoms=...``: MDAnalysis takes the atom count from a file
  without topology only when it is named ``*.h5md``, from ``/particles/trajectory``, and not
  at all with ``convert_units=False`` (its ``parse_n_atoms`` takes no other argument);
* ``force/value`` has no ``unit`` attribute (its description says eV/Å): MDAnalysis refuses
  to open a file whose force unit it cannot convert, and it has no force unit built on eV;
* the final stress is in ``/parameters``, not ``/observables``: MDAnalysis reads row ``frame``
  of every observable at every frame (files of the previous layout had it at
  ``/observables/stress``; they still read here, not in MDAnalysis, which also needs ``time``);
* MDAnalysis reads the first particle group of a file only, and a shard's observables are
  grouped by system (``/observables/<name>/...``, as H5MD allows), which it cannot iterate:
  open one system of a shard through :func:`write_system_link`;
* boxes: MDAnalysis treats every box as periodic in all three directions (a slab's vacuum
  direction too), and the zero cell of a system without one as no box.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixCartesian

H5MD_VERSION = (1, 1)

#: H5MD unit strings (the ``unit`` attribute: unit symbols separated by spaces, each with an
#: optional power) of the ``value`` datasets; ``None``: no ``unit`` attribute (forces, eV/Å:
#: MDAnalysis refuses a force unit it cannot convert, see the module docstring). Files of the
#: previous layout said ``"angstrom"``, ``"eV/angstrom"`` and ``"eV/angstrom^3"``.
UNITS = {"position": "Angstrom", "force": None, "edges": "Angstrom",
         "potential_energy": "eV", "max_force": "eV Angstrom-1", "stress": "eV Angstrom-3"}

#: The particle group of a per-system file.
PARTICLES = "all"


def _time_series(group: h5py.Group, name: str, clock: tuple[h5py.Dataset, h5py.Dataset] | np.ndarray,
                 value: np.ndarray, description: str) -> tuple[h5py.Dataset, h5py.Dataset]:
    """An H5MD time-dependent element ``name/{step, time, value}``; ``clock`` is the steps, or an
    existing ``(step, time)`` pair of datasets to share (HDF5 hard links). Returns ``(step, time)``."""
    element = group.create_group(name)
    if isinstance(clock, tuple):  # one step and one time table shared by every element
        element["step"], element["time"] = clock
    else:
        steps = np.asarray(clock, dtype=np.int64)
        element.create_dataset("step", data=steps)
        time = element.create_dataset("time", data=steps.astype(np.float64))
        time.attrs["description"] = "optimizer step number (a relaxation has no physical time; no unit)"
    data = element.create_dataset("value", data=value)
    if UNITS[name] is not None:
        data.attrs["unit"] = UNITS[name]
    data.attrs["description"] = description
    return element["step"], element["time"]


def _attrs(target: h5py.AttributeManager, values: Mapping[str, Any]) -> None:
    """Write scalars/strings/small sequences as attributes; ``None`` is skipped, anything else becomes JSON text."""
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_, int, np.integer, float, np.floating, str)):
            target[key] = value
        elif isinstance(value, (list, tuple, np.ndarray)) and np.asarray(value).dtype.kind in "biuf":
            target[key] = np.asarray(value)
        else:
            target[key] = json.dumps(value, default=str)


def write_relaxation(
    path: str | Path,
    trajectory: Sequence[Atoms],
    energies: np.ndarray,
    fmaxes: np.ndarray,
    *,
    parameters: Mapping[str, Any],
    potential: Mapping[str, Any],
    optimizer: Mapping[str, Any],
    stress: np.ndarray | None = None,
    creator_version: str = "",
) -> None:
    """Write one system's relaxation to ``path`` (H5MD 1.1; see the module docstring).

    Args:
        path: the file to create (overwritten if it exists; write to a temporary name
            and rename for atomicity, see :func:`kups_relax.io.atomic_output`).
        trajectory: ``T`` frames as ``Atoms`` with a calculator holding forces (eV/Å), or a
            :class:`kups_relax.engine.Trajectory` (its arrays are written as they are);
            frame 0 is the input geometry.
        energies: ``(T,)`` potential energy per frame, eV.
        fmaxes: ``(T,)`` largest per-atom force norm after constraints, eV/Å.
        parameters: run facts for ``/parameters`` (status, steps, fmax, ...).
        potential: ``{"name": ..., <parameter>: value}`` for ``/parameters/potential``.
        optimizer: ``{"name": ..., <setting>: value}`` for ``/parameters/optimizer``.
        stress: final ``(3, 3)`` stress, eV/Å³, for 3-D periodic systems (else ``None``).
        creator_version: the package version written to ``/h5md/creator``.
    """
    arrays = _system_arrays(trajectory, energies, fmaxes)
    with h5py.File(path, "w", libver=("earliest", "latest")) as f:
        _write_header(f, creator_version)
        _write_system(f.create_group(f"particles/{PARTICLES}"), f.create_group("observables"),
                      f.create_group("parameters"), trajectory[0], arrays, parameters=parameters,
                      potential=potential, optimizer=optimizer, stress=stress)


class ShardWriter:
    """Several systems' relaxations in one H5MD file: a *shard* (one file per thousand systems
    instead of a thousand files, which a cluster file system handles much better).

    Layout: the per-system file's groups, one level down, keyed by the system's name::

        /particles/<name>/      species, fixed, box/edges, position, force   (as particles/all)
        /observables/<name>/    potential_energy, max_force
        /parameters/<name>/     attrs as /parameters; stress, potential/, optimizer/

    and the root attribute ``layout = "shard"``. H5MD allows any number of particle groups;
    plain ``h5py`` reads a system as ``f["particles"][name]``. :func:`read_trajectory`,
    :func:`read_parameters` and :func:`read_observable` take ``system=name``;
    :func:`system_names` lists the systems. Systems are written as they are added, so memory
    holds one trajectory at a time; the file is complete once :meth:`close` returns (write to a
    temporary name and rename it then, for atomicity). Use from one thread at a time.

    Args:
        path: the file to create (overwritten if it exists).
        creator_version: the package version written to ``/h5md/creator``.
    """

    def __init__(self, path: str | Path, creator_version: str = ""):
        self.path = Path(path)
        self._file = h5py.File(path, "w", libver=("earliest", "latest"))
        self._file.attrs["layout"] = SHARD_LAYOUT
        _write_header(self._file, creator_version)
        for group in ("particles", "observables", "parameters"):
            self._file.create_group(group)
        self.names: list[str] = []
        self._shared: dict[str, tuple[Mapping[str, Any], h5py.Group]] = {}

    def add(self, name: str, trajectory: Sequence[Atoms], energies: np.ndarray, fmaxes: np.ndarray, *,
            parameters: Mapping[str, Any], potential: Mapping[str, Any], optimizer: Mapping[str, Any],
            stress: np.ndarray | None = None) -> None:
        """Add one system (arguments as :func:`write_relaxation`); ``name`` must be new in this file
        and must not contain ``/``."""
        if "/" in name or name in (".", ""):
            raise ValueError(f"system name {name!r} cannot name an HDF5 group")
        if name in self._file["particles"]:
            raise ValueError(f"{self.path}: system {name!r} is already in this shard")
        arrays = _system_arrays(trajectory, energies, fmaxes)
        f = self._file
        params = f["parameters"].create_group(name)
        settings = {"potential": potential, "optimizer": optimizer}
        linked = {}
        for kind, values in settings.items():  # the same settings as the system before: a hard link to its group
            previous = self._shared.get(kind)
            if previous is not None and previous[0] == dict(values):
                params[kind] = previous[1]
                linked[kind] = True
        _write_system(f["particles"].create_group(name), f["observables"].create_group(name), params,
                      trajectory[0], arrays, parameters=parameters, stress=stress,
                      potential=None if linked.get("potential") else potential,
                      optimizer=None if linked.get("optimizer") else optimizer)
        for kind, values in settings.items():
            if not linked.get(kind):
                self._shared[kind] = (dict(values), params[kind])
        self.names.append(name)

    def flush(self) -> None:
        """Push what was written to the operating system (the file is still incomplete until closed)."""
        self._file.flush()

    def close(self) -> None:
        """Record the order the systems were written in and close the file."""
        if self._file:
            self._file["parameters"].attrs["systems_order"] = json.dumps(self.names)
            self._file.close()

    def __len__(self) -> int:
        return len(self.names)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_relaxations(path: str | Path, systems: Sequence[Mapping[str, Any]], creator_version: str = "") -> None:
    """Write several systems' relaxations into one H5MD shard file (:class:`ShardWriter`).

    Args:
        path: the file to create.
        systems: one mapping per system with the keyword arguments of :meth:`ShardWriter.add`
            (``name``, ``trajectory``, ``energies``, ``fmaxes``, ``parameters``, ``potential``,
            ``optimizer`` and optionally ``stress``).
        creator_version: the package version written to ``/h5md/creator``.
    """
    with ShardWriter(path, creator_version) as shard:
        for system in systems:
            shard.add(**system)


#: The root attribute ``layout`` of a file holding several systems (:class:`ShardWriter`).
SHARD_LAYOUT = "shard"


def write_system_link(shard: str | Path, name: str, path: str | Path) -> Path:
    """Write ``path``: a per-system file (the layout of :func:`write_relaxation`) whose groups are
    HDF5 external links to system ``name`` of ``shard``, for programs that read one particle group
    per file (MDAnalysis, see the module docstring).

    The file holds links only (a few kB): it reads the shard's data as long as the shard stays
    where it is, relative to ``path`` when both are in one folder (else by absolute path).

    Raises:
        KeyError: no system ``name`` in ``shard``.
        ValueError: ``shard`` is not a shard file.
    """
    shard, path = Path(shard), Path(path)
    target = (shard.name if shard.resolve().parent == path.resolve().parent else str(shard.resolve()))
    with h5py.File(shard, "r") as src:
        if src.attrs.get("layout") != SHARD_LAYOUT:
            raise ValueError(f"{shard} is not a shard file (root attribute layout = {SHARD_LAYOUT!r})")
        if name not in src["particles"]:
            raise KeyError(f"{shard}: no system {name!r} in this file")
        observables = list(src["observables"][name])
        with h5py.File(path, "w", libver=("earliest", "latest")) as f:
            src.copy(src["h5md"], f, "h5md")
            f.attrs["shard"] = target
            f.attrs["system"] = name
            f.create_group("particles")
            f["particles"][PARTICLES] = h5py.ExternalLink(target, f"/particles/{name}")
            f.create_group("observables")
            for observable in observables:
                f["observables"][observable] = h5py.ExternalLink(target, f"/observables/{name}/{observable}")
            f["parameters"] = h5py.ExternalLink(target, f"/parameters/{name}")
    return path


def _system_arrays(trajectory, energies, fmaxes) -> dict[str, np.ndarray]:
    """Positions, forces, edges, energies and fmaxes of one relaxation as float64 arrays, checked."""
    if not trajectory:
        raise ValueError("a trajectory needs at least one frame (the input geometry)")
    first = trajectory[0]
    T = len(trajectory)
    energies = np.asarray(energies, dtype=np.float64)
    fmaxes = np.asarray(fmaxes, dtype=np.float64)
    if energies.shape != (T,) or fmaxes.shape != (T,):
        raise ValueError(f"energies {energies.shape} and fmaxes {fmaxes.shape} must have one entry per frame ({T})")
    if hasattr(trajectory, "positions") and hasattr(trajectory, "forces"):  # kups_relax.engine.Trajectory
        positions = np.asarray(trajectory.positions, np.float64)
        forces = np.asarray(trajectory.forces, np.float64)
        cells = getattr(trajectory, "cells", None)
        edges = (np.broadcast_to(first.cell.array, (T, 3, 3)) if cells is None else np.asarray(cells)).astype(np.float64)
    else:
        positions = np.stack([a.positions for a in trajectory]).astype(np.float64)
        forces = np.stack([a.calc.get_property("forces", a, allow_calculation=False)
                           for a in trajectory]).astype(np.float64)
        edges = np.stack([a.cell.array for a in trajectory]).astype(np.float64)
    return dict(positions=positions, forces=forces, edges=edges, energies=energies, fmaxes=fmaxes)


def _write_header(f: h5py.File, creator_version: str) -> None:
    h5md = f.create_group("h5md")
    h5md.attrs["version"] = np.asarray(H5MD_VERSION, dtype=np.int32)
    try:
        author = getpass.getuser()
    except Exception:  # no user name in this environment (containers)
        author = "unknown"
    f.create_group("h5md/author").attrs["name"] = author
    creator = f.create_group("h5md/creator")
    creator.attrs["name"] = "kups-relax"
    creator.attrs["version"] = creator_version


def _write_system(particles: h5py.Group, observables: h5py.Group, params: h5py.Group, first: Atoms,
                  arrays: Mapping[str, np.ndarray], *, parameters: Mapping[str, Any],
                  potential: Mapping[str, Any] | None, optimizer: Mapping[str, Any] | None,
                  stress: np.ndarray | None) -> None:
    """One system's groups (``potential``/``optimizer`` ``None``: already linked into ``params``)."""
    T = len(arrays["energies"])
    steps = np.arange(T, dtype=np.int64)
    particles.create_dataset("species", data=first.numbers.astype(np.int32))
    particles["species"].attrs["description"] = "atomic numbers Z"
    fixed = _fixed_components(first)
    if fixed.any():
        particles.create_dataset("fixed", data=fixed)
        particles["fixed"].attrs["description"] = "True where a Cartesian component is held fixed"
    box = particles.create_group("box")
    box.attrs["dimension"] = np.int32(3)
    box.attrs["boundary"] = np.array([b"periodic" if p else b"none" for p in first.pbc])
    clock = _time_series(particles, "position", steps, arrays["positions"], "atom positions, row t = after step t")
    _time_series(particles, "force", clock, arrays["forces"], "forces on atoms (before constraints), eV/Å")
    _time_series(box, "edges", clock, arrays["edges"], "lattice vectors as rows (ASE cell)")

    _time_series(observables, "potential_energy", clock, arrays["energies"], "potential energy")
    _time_series(observables, "max_force", clock, arrays["fmaxes"],
                 "largest per-atom force norm after constraints (the fmax criterion)")

    _attrs(params.attrs, parameters)
    if stress is not None:  # one value, of the last step: not a time series (see the module docstring)
        data = params.create_dataset("stress", data=np.asarray(stress, np.float64))
        data.attrs["unit"] = UNITS["stress"]
        data.attrs["step"] = np.int64(T - 1)
        data.attrs["description"] = "stress of the final geometry (3x3, ASE sign convention)"
    if first.constraints:  # every constraint, exactly (``fixed`` above covers only the fixed components)
        params.attrs["constraints"] = json.dumps([_constraint_record(c) for c in first.constraints], default=_plain)
    if potential is not None:
        _attrs(params.create_group("potential").attrs, potential)
    if optimizer is not None:
        _attrs(params.create_group("optimizer").attrs, optimizer)


def _fixed_components(atoms: Atoms) -> np.ndarray:
    fixed = np.zeros((len(atoms), 3), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
        elif isinstance(constraint, FixCartesian):
            fixed[constraint.index] |= np.asarray(constraint.mask, dtype=bool)
    return fixed


def _constraint_record(constraint) -> dict:
    """ASE's ``todict()`` of a constraint; for ``FixSymmetry`` its settings only (its ``atoms``
    is the input structure, frame 0, and its operations follow from it)."""
    record = constraint.todict()
    if record["name"] == "FixSymmetry":
        record = dict(name="FixSymmetry", kwargs={k: v for k, v in record["kwargs"].items() if k != "atoms"})
    return record


def _constraints(fixed: np.ndarray) -> list:
    if not fixed.any():
        return []
    whole = np.flatnonzero(fixed.all(axis=1))
    out = [FixAtoms(indices=whole)] if len(whole) else []
    for i in np.flatnonzero(fixed.any(axis=1) & ~fixed.all(axis=1)):
        out.append(FixCartesian(int(i), mask=fixed[i]))
    return out


def system_names(path: str | Path) -> list[str]:
    """The systems a file holds: a shard's (:class:`ShardWriter`, in the order written), or the
    one of a per-system file (its ``/parameters`` ``name``, else the file's stem)."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("layout") == SHARD_LAYOUT:
            return _shard_names(f)
        name = f["parameters"].attrs.get("name") if "parameters" in f else None
        return [_plain(name) if name is not None else Path(path).stem]


def _shard_names(f: h5py.File) -> list[str]:
    """A shard's system names in the order written (HDF5 lists groups alphabetically)."""
    order = f["parameters"].attrs.get("systems_order")
    names = list(f["particles"])
    if order is None:
        return names
    return [n for n in json.loads(_plain(order)) if n in f["particles"]]


def _system_groups(f: h5py.File, system: str | None) -> tuple[h5py.Group, h5py.Group, h5py.Group | None]:
    """``(particles, observables, parameters)`` of one system of a per-system file or a shard."""
    if f.attrs.get("layout") != SHARD_LAYOUT:
        params = f["parameters"] if "parameters" in f else None
        if system is not None and params is not None and "name" in params.attrs \
                and _plain(params.attrs["name"]) != system:
            raise KeyError(f"{f.filename}: holds system {_plain(params.attrs['name'])!r}, not {system!r}")
        return f[f"particles/{PARTICLES}"], f["observables"], params
    if system is None:
        names = list(f["particles"])
        if len(names) != 1:
            listing = ", ".join(map(repr, names[:5])) + (" ..." if len(names) > 5 else "")
            raise ValueError(f"{f.filename} holds {len(names)} systems ({listing}); pass system=<name>")
        system = names[0]
    if system not in f["particles"]:
        raise KeyError(f"{f.filename}: no system {system!r} in this file")
    return f["particles"][system], f["observables"][system], f["parameters"][system]


def read_trajectory(path: str | Path, index: int | slice = slice(None), system: str | None = None
                    ) -> list[Atoms] | Atoms:
    """The frames of a relaxation written by :func:`write_relaxation` or in a :class:`ShardWriter`
    file, as ASE ``Atoms``.

    Every frame carries a ``SinglePointCalculator`` with its energy (eV) and forces
    (eV/Å, before constraints; ``get_forces()`` applies the constraints as usual), the
    constraints of the input, and ``info["step"]``. The last frame also has the stress
    (eV/Å³) when one was written.

    Args:
        path: an ``.h5`` file.
        index: which frames: a slice (default all) gives a list, an int (``-1`` = the
            relaxed structure) gives one ``Atoms``, as with ``ase.io.read``.
        system: the system's name, needed for a shard holding several systems
            (:func:`system_names` lists them); for a per-system file it may be left out.

    Raises:
        KeyError: no system of that name in the file.
        ValueError: a shard of several systems and no ``system``.
    """
    with h5py.File(path, "r") as f:
        particles, observables, params = _system_groups(f, system)
        numbers = particles["species"][()]
        fixed = particles["fixed"][()] if "fixed" in particles else np.zeros((len(numbers), 3), bool)
        pbc = [b == "periodic" for b in _strings(particles["box"].attrs["boundary"])]
        steps = particles["position/step"][()]
        rows = np.arange(len(steps))[index]
        single = np.ndim(rows) == 0
        rows = np.atleast_1d(rows)
        positions = particles["position/value"][()][rows]
        forces = particles["force/value"][()][rows]
        edges = particles["box/edges/value"][()][rows]
        energies = observables["potential_energy/value"][()][rows]
        constraints_json = params.attrs.get("constraints") if params is not None else None
        stress_at, stress = _final_stress(observables, params)
    frames = []
    for k, t in enumerate(rows):
        atoms = Atoms(numbers=numbers, positions=positions[k], cell=edges[k], pbc=pbc)
        if constraints_json is not None:
            from ase.constraints import dict2constraint

            records = json.loads(constraints_json)
            # FixSymmetry is not rebuilt per frame (making one runs spglib and refines the
            # structure it is given); its settings are in info["fix_symmetry"]
            for d in records:
                if d["name"] == "FixSymmetry":
                    atoms.info["fix_symmetry"] = d["kwargs"]
            atoms.set_constraint([dict2constraint(d) for d in records if d["name"] != "FixSymmetry"])
        else:
            atoms.set_constraint(_constraints(fixed))
        atoms.info["step"] = int(steps[t])
        results = dict(energy=float(energies[k]), free_energy=float(energies[k]), forces=forces[k])
        if stress is not None and int(steps[t]) == stress_at:
            from .batch import full_3x3_to_voigt

            results["stress"] = full_3x3_to_voigt(stress)
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames[0] if single else frames


def _final_stress(observables: h5py.Group, params: h5py.Group | None) -> tuple[int | None, np.ndarray | None]:
    """``(step, (3, 3) stress)`` of the final geometry, or ``(None, None)``: ``/parameters/stress``,
    or ``/observables/stress`` in files of the previous layout."""
    if params is not None and isinstance(params.get("stress"), h5py.Dataset):
        data = params["stress"]
        return int(data.attrs["step"]), data[()]
    if "stress" in observables:
        return int(observables["stress/step"][-1]), observables["stress/value"][-1]
    return None, None


def read_observable(path: str | Path, name: str, system: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(step, value)`` of ``/observables/<name>`` (``potential_energy`` eV, ``max_force`` eV/Å), and of
    the final ``stress`` (eV/Å³; steps ``(1,)``, value ``(1, 3, 3)``); ``system`` as in :func:`read_trajectory`."""
    with h5py.File(path, "r") as f:
        _, observables, params = _system_groups(f, system)
        if name == "stress":
            step, stress = _final_stress(observables, params)
            if step is None:
                raise KeyError(f"{path}: no stress (written for 3-D periodic systems only)")
            return np.array([step]), stress[None]
        element = observables[name]
        return element["step"][()], element["value"][()]


def read_parameters(path: str | Path, system: str | None = None) -> dict[str, Any]:
    """``/parameters`` of a file (of one of its systems, ``system`` as in :func:`read_trajectory`)
    as a dict, with ``"potential"`` and ``"optimizer"`` sub-dicts."""
    with h5py.File(path, "r") as f:
        params = _system_groups(f, system)[2]
        out = {k: _plain(v) for k, v in params.attrs.items()}
        for group in ("potential", "optimizer"):
            out[group] = {k: _plain(v) for k, v in params[group].attrs.items()}
    return out


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


def _plain(value):
    """HDF5 attribute -> plain Python (numpy scalars to int/float/bool, bytes to str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value

"""One relaxation trajectory per HDF5 file, in the H5MD 1.1 layout ("HDF5 for molecular data").

A file written by :func:`write_relaxation` reads with plain ``h5py``::

    /h5md                        version = [1, 1]
        author/                  name
        creator/                 name = "kups-relax", version
    /particles/all/
        species      (N,) int    atomic numbers Z
        fixed        (N, 3) bool True where a Cartesian component is held fixed (only with constraints)
        box/                     dimension = 3, boundary = ["periodic" | "none"] * 3
            edges/   step (T,), value (T, 3, 3) Å      lattice vectors as rows (ASE's cell)
        position/    step (T,), value (T, N, 3) Å
        force/       step (T,), value (T, N, 3) eV/Å  raw forces (before constraints), as ASE stores them
    /observables/
        potential_energy/  step (T,), value (T,) eV
        max_force/         step (T,), value (T,) eV/Å  largest per-atom force norm after constraints (ASE's fmax)
        stress/            step (1,), value (1, 3, 3) eV/Å³  final stress, 3-D periodic systems only
    /parameters/                 attrs: name, source, status, reason, converged, steps, fmax,
                                 max_steps, dtype, initial_energy, final_energy, final_fmax,
                                 n_atoms, package, version, settings (JSON of everything that
                                 decides the result), constraints (JSON of ASE's
                                 ``todict()`` of every constraint, when there are any)
        potential/               attrs: name and every parameter of the potential
        optimizer/               attrs: name and its settings (maxstep, ...)

Row ``t`` of every time series is optimizer step ``step[t]`` (``0`` = the input geometry);
a relaxation has no physical time, so the optional H5MD ``time`` datasets are left out.
Every ``value`` dataset carries a ``unit`` attribute.
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

#: Units written on every ``value`` dataset (H5MD ``unit`` attribute).
UNITS = {"position": "angstrom", "force": "eV/angstrom", "edges": "angstrom",
         "potential_energy": "eV", "max_force": "eV/angstrom", "stress": "eV/angstrom^3"}


def _time_series(group: h5py.Group, name: str, step: h5py.Dataset | np.ndarray, value: np.ndarray,
                 description: str) -> h5py.Dataset:
    """An H5MD time-dependent element ``name/{step, value}``; ``step`` may be an existing dataset (hard link)."""
    element = group.create_group(name)
    if isinstance(step, h5py.Dataset):
        element["step"] = step  # one step table shared by every element (an HDF5 hard link)
    else:
        element.create_dataset("step", data=np.asarray(step, dtype=np.int64))
    data = element.create_dataset("value", data=value)
    data.attrs["unit"] = UNITS[name]
    data.attrs["description"] = description
    return element["step"]


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
    if not trajectory:
        raise ValueError("a trajectory needs at least one frame (the input geometry)")
    first = trajectory[0]
    T, N = len(trajectory), len(first)
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
    steps = np.arange(T, dtype=np.int64)

    with h5py.File(path, "w", libver=("earliest", "latest")) as f:
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

        particles = f.create_group("particles/all")
        particles.create_dataset("species", data=first.numbers.astype(np.int32))
        particles["species"].attrs["description"] = "atomic numbers Z"
        fixed = _fixed_components(first)
        if fixed.any():
            particles.create_dataset("fixed", data=fixed)
            particles["fixed"].attrs["description"] = "True where a Cartesian component is held fixed"
        box = particles.create_group("box")
        box.attrs["dimension"] = np.int32(3)
        box.attrs["boundary"] = np.array([b"periodic" if p else b"none" for p in first.pbc])
        step = _time_series(particles, "position", steps, positions, "atom positions, row t = after step t")
        _time_series(particles, "force", step, forces, "forces on atoms (before constraints)")
        _time_series(box, "edges", step, edges, "lattice vectors as rows (ASE cell)")

        observables = f.create_group("observables")
        _time_series(observables, "potential_energy", step, energies, "potential energy")
        _time_series(observables, "max_force", step, fmaxes,
                     "largest per-atom force norm after constraints (the fmax criterion)")
        if stress is not None:
            _time_series(observables, "stress", [T - 1], np.asarray(stress, np.float64)[None],
                         "stress of the final geometry (3x3, ASE sign convention)")

        params = f.create_group("parameters")
        _attrs(params.attrs, parameters)
        if first.constraints:  # every constraint, exactly (``fixed`` above covers only the fixed components)
            params.attrs["constraints"] = json.dumps([c.todict() for c in first.constraints], default=_plain)
        _attrs(params.create_group("potential").attrs, potential)
        _attrs(params.create_group("optimizer").attrs, optimizer)


def _fixed_components(atoms: Atoms) -> np.ndarray:
    fixed = np.zeros((len(atoms), 3), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
        elif isinstance(constraint, FixCartesian):
            fixed[constraint.index] |= np.asarray(constraint.mask, dtype=bool)
    return fixed


def _constraints(fixed: np.ndarray) -> list:
    if not fixed.any():
        return []
    whole = np.flatnonzero(fixed.all(axis=1))
    out = [FixAtoms(indices=whole)] if len(whole) else []
    for i in np.flatnonzero(fixed.any(axis=1) & ~fixed.all(axis=1)):
        out.append(FixCartesian(int(i), mask=fixed[i]))
    return out


def read_trajectory(path: str | Path, index: int | slice = slice(None)) -> list[Atoms] | Atoms:
    """The frames of a relaxation written by :func:`write_relaxation`, as ASE ``Atoms``.

    Every frame carries a ``SinglePointCalculator`` with its energy (eV) and forces
    (eV/Å, before constraints; ``get_forces()`` applies the constraints as usual), the
    constraints of the input, and ``info["step"]``. The last frame also has the stress
    (eV/Å³) when one was written.

    Args:
        path: an ``.h5`` file.
        index: which frames: a slice (default all) gives a list, an int (``-1`` = the
            relaxed structure) gives one ``Atoms``, as with ``ase.io.read``.
    """
    with h5py.File(path, "r") as f:
        particles = f["particles/all"]
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
        energies = f["observables/potential_energy/value"][()][rows]
        constraints_json = f["parameters"].attrs.get("constraints") if "parameters" in f else None
        stress_at, stress = None, None
        if "observables/stress" in f:
            stress_at = int(f["observables/stress/step"][-1])
            stress = f["observables/stress/value"][-1]
    frames = []
    for k, t in enumerate(rows):
        atoms = Atoms(numbers=numbers, positions=positions[k], cell=edges[k], pbc=pbc)
        if constraints_json is not None:
            from ase.constraints import dict2constraint

            atoms.set_constraint([dict2constraint(d) for d in json.loads(constraints_json)])
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


def read_observable(path: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(step, value)`` of ``/observables/<name>`` (``potential_energy`` eV, ``max_force`` eV/Å, ``stress``)."""
    with h5py.File(path, "r") as f:
        element = f["observables"][name]
        return element["step"][()], element["value"][()]


def read_parameters(path: str | Path) -> dict[str, Any]:
    """``/parameters`` of a file as a dict, with ``"potential"`` and ``"optimizer"`` sub-dicts."""
    with h5py.File(path, "r") as f:
        params = f["parameters"]
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

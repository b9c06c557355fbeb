"""ASE's side of the preconditioned L-BFGS parity (issue 17): runs with every evaluation counted.

:func:`ase_precon_lbfgs` relaxes a copy of a structure with
``ase.optimize.precon.PreconLBFGS(atoms, precon=Exp(...), logfile=None)`` (Armijo line search,
ASE's defaults: maxstep 0.04 Å, memory 100, c1 0.23, a_min 1e-10; pyamg is not installed, so
ASE solves with scipy's direct ``spsolve``) and :func:`ase_lbfgs` with plain
``ase.optimize.LBFGS``. The calculator's ``calculate`` is wrapped to record the positions and
cell of every evaluation (one evaluation = one energy-and-forces computation: ASE's EMT and
LennardJones compute both in every call).

Why two evaluation counts. When Exp estimates mu (``mu=None``, the default), ASE evaluates
the starting geometry twice: ``Exp.estimate_mu`` gives its perturbed copy the same calculator
(``atoms_v.calc = atoms.calc``), so the calculator's cache then holds the perturbed geometry,
and the first step's ``func(r)`` (the line search's phi(0); ``e1`` is still ``None``)
recomputes the start. The engine keeps the start's energy and forces and makes no such
repeat, so its ``n_evaluations`` is compared with ``distinct_evaluations``: ASE's count less
the evaluations at a geometry (positions and cell, bit for bit) already evaluated before.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
import warnings

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.optimize import LBFGS
from ase.optimize.precon import Exp, PreconLBFGS

from structures import LJ_PARAMS


def ase_calculator(kind: str):
    """ASE's calculator for a structure's potential kind: ``"emt"``, ``"lj"`` (``LJ_PARAMS``) or
    ``"asap"`` (asap3's EMT, for speed; not ASE's EMT: another cutoff)."""
    if kind == "emt":
        return EMT()
    if kind == "lj":
        return LennardJones(**LJ_PARAMS)
    if kind == "asap":
        return AsapEMT()
    raise ValueError(f"unknown potential kind {kind!r}")


class AsapEMT(Calculator):
    """asap3's EMT behind ASE's ``Calculator`` interface (asap3's own calculator has no
    ``calculate`` to count): one asap3 evaluation per ``calculate``, on one Atoms copy that
    keeps asap3's neighbour list alive between calls."""

    implemented_properties = ["energy", "forces"]

    def __init__(self):
        super().__init__()
        self._inner = None
        self._atoms = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self._atoms is None or len(self._atoms) != len(atoms) or "numbers" in system_changes:
            from asap3 import EMT

            self._atoms = atoms.copy()
            self._atoms.set_constraint()
            self._inner = EMT()
            self._atoms.calc = self._inner
        self._atoms.set_cell(atoms.cell)
        self._atoms.set_positions(atoms.positions)
        self.results = {"energy": self._atoms.get_potential_energy(), "forces": self._atoms.get_forces()}


@dataclasses.dataclass
class AseRun:
    """One ASE relaxation.

    Attributes:
        atoms: the relaxed copy (positions in Å).
        steps: ``opt.nsteps``.
        converged: what ``opt.run`` returned.
        evaluations: calculator evaluations ASE made (energy and forces, each one ``calculate``).
        distinct_evaluations: ``evaluations`` less those at a geometry evaluated before.
        repeated: the indices (0-based, in evaluation order) of those repeats.
        energy: final energy, eV.
        seconds: wall time of ``opt.run`` (optimizer and calculator), s.
        hessian_resets: PreconLBFGS only: Armijo line searches that failed (ASE resets the
            history, takes no step, and counts the step).
        long_steps: PreconLBFGS only: steps that moved an atom further than ``maxstep``
            (Armijo's first trial ``a1`` rounded to 1.0 after the maxstep clip, accepted).
        precon_builds: PreconLBFGS only: assemblies of P used for steps (not counting the one
            inside estimate_mu).
        mu, r_nn, r_cut: PreconLBFGS only: the Exp preconditioner's parameters as ASE ended.
        mu_estimate: PreconLBFGS only: estimate_mu's ratio before ASE raised it to 1.0 (equal
            to ``mu`` when not capped; ``None`` when mu was given).
    """

    atoms: Atoms
    steps: int
    converged: bool
    evaluations: int
    distinct_evaluations: int
    repeated: list[int]
    energy: float
    seconds: float
    hessian_resets: int = 0
    long_steps: int = 0
    precon_builds: int = 0
    mu: float | None = None
    r_nn: float | None = None
    r_cut: float | None = None
    mu_estimate: float | None = None


def count_evaluations(calc) -> list[tuple[np.ndarray, np.ndarray]]:
    """Wrap ``calc.calculate`` in place; the returned list gets (positions, cell) of every call."""
    geometries: list[tuple[np.ndarray, np.ndarray]] = []
    inner = calc.calculate

    def calculate(atoms=None, *args, **kwargs):
        geometries.append((atoms.positions.copy(), atoms.cell.array.copy()))
        return inner(atoms, *args, **kwargs)

    calc.calculate = calculate
    return geometries


def repeated_evaluations(geometries) -> list[int]:
    """Indices of evaluations whose positions and cell equal, bit for bit, an earlier one's."""
    seen: set[bytes] = set()
    out = []
    for k, (positions, cell) in enumerate(geometries):
        key = positions.tobytes() + cell.tobytes()
        if key in seen:
            out.append(k)
        seen.add(key)
    return out


def ase_precon_lbfgs(atoms: Atoms, kind: str, fmax: float = 0.05, steps: int = 1000, maxstep: float | None = None,
                     calc=None, **exp_kwargs) -> AseRun:
    """Relax a copy of ``atoms`` with ASE's ``PreconLBFGS(precon=Exp(**exp_kwargs))``."""
    atoms = atoms.copy()
    atoms.calc = calc if calc is not None else ase_calculator(kind)
    geometries = count_evaluations(atoms.calc)
    log = io.StringIO()
    precon = Exp(logfile=log, **exp_kwargs)
    builds = []
    assemble = precon._make_sparse_precon

    def counted_assembly(a, initial_assembly=False, force_stab=False):
        builds.append(initial_assembly)
        return assemble(a, initial_assembly=initial_assembly, force_stab=force_stab)

    precon._make_sparse_precon = counted_assembly
    frames = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = PreconLBFGS(atoms, precon=precon, logfile=None, maxstep=maxstep)
        opt.attach(lambda: frames.append(atoms.positions.copy()))
        run = _run(atoms, opt, geometries, fmax, steps)
    resets = sum("Armijo linesearch failed" in str(w.message) for w in caught)
    step_lengths = [np.linalg.norm(b - a, axis=1).max() for a, b in zip(frames, frames[1:])]
    long_steps = sum(s > opt.maxstep * (1 + 1e-12) for s in step_lengths)
    return dataclasses.replace(run, hessian_resets=resets, long_steps=long_steps, precon_builds=builds.count(False),
                               mu=precon.mu, r_nn=precon.r_NN, r_cut=precon.r_cut,
                               mu_estimate=_mu_estimate(log.getvalue()))


def _run(atoms: Atoms, opt, geometries, fmax: float, steps: int) -> AseRun:
    """Run ``opt`` on ``atoms`` (whose calculator records ``geometries``), timed and counted."""
    t = time.perf_counter()
    converged = bool(opt.run(fmax=fmax, steps=steps))
    seconds = time.perf_counter() - t
    repeated = repeated_evaluations(geometries)
    return AseRun(atoms=atoms, steps=opt.nsteps, converged=converged, evaluations=len(geometries),
                  distinct_evaluations=len(geometries) - len(repeated), repeated=repeated,
                  energy=atoms.get_potential_energy(),  # the last evaluation's (cached)
                  seconds=seconds)


def _mu_estimate(log: str) -> float | None:
    capped = re.search(r"mu \(([-+.\deE]+)\) < 1\.0", log)
    if capped:
        return float(capped.group(1))
    found = re.search(r"estimate_mu\(\): mu=([-+.\deE]+)", log)
    return float(found.group(1)) if found else None


def ase_lbfgs(atoms: Atoms, kind: str, fmax: float = 0.05, steps: int = 1000, calc=None, **kwargs) -> AseRun:
    """Relax a copy of ``atoms`` with plain ``ase.optimize.LBFGS`` (ASE's defaults unless given)."""
    atoms = atoms.copy()
    atoms.calc = calc if calc is not None else ase_calculator(kind)
    geometries = count_evaluations(atoms.calc)
    return _run(atoms, LBFGS(atoms, logfile=None, **kwargs), geometries, fmax, steps)

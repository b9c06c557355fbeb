"""kups_relax.ase against ASE itself (issue 5 acceptance).

Every structure is relaxed twice: by ``ase.optimize.LBFGS`` with ASE's calculators and by
our drop-in; then the step counts, every trajectory frame (read back from the files), the
log lines (clock times removed) and ``todict()`` are compared.

* host path: ASE's EMT on both sides (same forces), so only the step differs: to 1e-10 Å.
* fast path: our :class:`Calculator` (LennardJones, EMT) against ASE's LennardJones/EMT:
  to 1e-8 Å (forces from another implementation; round-off grows along the path).

Compiling is what costs time here, so the fast-path and calculator tests share a few
structures (one LJ cluster, one LJ crystal, ASE's own gold test crystal) and hence a few
compiled programs.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.calculator import Calculator as AseCalculatorBase
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT as AseEMT
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.constraints import FixAtoms, FixCartesian
from ase.filters import FrechetCellFilter, UnitCellFilter
from ase.io import read
from ase.md.verlet import VelocityVerlet
from ase.mep import NEB
from ase.optimize import LBFGS as AseLBFGS
from ase.vibrations import Vibrations

import kups_relax.ase.many as many_module
from kups_relax.ase import LBFGS, Calculator, relax_many
from kups_relax.ase.steps import HostSteps
from potentials import LennardJones
from potentials.emt import EMT
from structures import LJ_PARAMS, lj_structures

FMAX = 0.01
HOST_TOL = 1e-10  # Å
FAST_TOL = 1e-8  # Å


# -- helpers ----------------------------------------------------------------------------


def strip_times(log: str) -> list[str]:
    return [re.sub(r"\d\d:\d\d:\d\d", "hh:mm:ss", line) for line in log.splitlines()]


def relax_once(optimizer, atoms: Atoms, calc, path, *, wrap=None, fmax=FMAX, steps=300, **kwargs) -> dict:
    """Relax a copy of ``atoms`` with ``calc``; return what a user would look at."""
    atoms = atoms.copy()
    atoms.calc = calc
    log = io.StringIO()
    target = wrap(atoms) if wrap is not None else atoms
    with optimizer(target, logfile=log, trajectory=str(path), **kwargs) as opt:
        converged = opt.run(fmax=fmax, steps=steps)
    return dict(converged=bool(converged), nsteps=opt.nsteps, atoms=atoms, frames=read(str(path), ":"),
                log=strip_times(log.getvalue()), todict=opt.todict(), max_steps=opt.max_steps)


def assert_same_relaxation(ours: dict, ref: dict, tol: float):
    assert ours["converged"] == ref["converged"]
    assert ours["nsteps"] == ref["nsteps"]
    assert ours["max_steps"] == ref["max_steps"]
    assert len(ours["frames"]) == len(ref["frames"]) == ref["nsteps"] + 1
    for k, (a, b) in enumerate(zip(ours["frames"], ref["frames"])):
        assert np.abs(a.positions - b.positions).max() <= tol, k
        assert np.abs(a.cell.array - b.cell.array).max() <= tol, k
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=100 * tol)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1000 * tol)
        assert ("stress" in a.calc.results) == ("stress" in b.calc.results), k
        if "stress" in b.calc.results:
            np.testing.assert_allclose(a.get_stress(), b.get_stress(), atol=100 * tol)
    assert np.abs(ours["atoms"].positions - ref["atoms"].positions).max() <= tol
    assert ours["log"] == ref["log"]
    assert ours["todict"] == ref["todict"]


@pytest.fixture
def host_step_calls(monkeypatch):
    """How often the host path computed a step (0 when the jitted loop did all the work)."""
    calls = []
    original = HostSteps.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HostSteps, "step", counting)
    return calls


# -- structures -------------------------------------------------------------------------


def emt_structures() -> dict[str, tuple[Atoms, dict]]:
    """Small EMT structures: (atoms, extra arguments for relax_once)."""
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    cu.rattle(0.1, seed=1)
    cluster = Icosahedron("Cu", 2)
    cluster.rattle(0.1, seed=2)
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 3]))
    slab.rattle(0.1, seed=3)
    cart = bulk("Au", cubic=True)
    cart.rattle(0.1, seed=4)
    cart.set_constraint(FixCartesian([0, 2], mask=(True, False, True)))
    cell = bulk("Cu", "fcc", a=3.7)  # strained primitive cell: the filter relaxes the lattice too
    cell.set_cell(cell.cell.array @ (np.eye(3) + 0.02 * np.arange(9).reshape(3, 3) / 8), scale_atoms=True)
    return {
        "bulk": (cu, {}),
        "cluster": (cluster, {}),
        "slab-fixatoms": (slab, {}),
        "fixcartesian": (cart, {}),
        "unit-cell-filter": (cell, dict(wrap=UnitCellFilter, fmax=0.02)),
        "options": (cu, dict(maxstep=0.05, memory=4, damping=0.8, alpha=50.0)),
    }


def gold() -> Atoms:
    """The structure of ASE's own optimizer tests (ase/test/optimize/test_optimizers.py)."""
    atoms = bulk("Au") * (2, 2, 2)
    atoms.rattle(stdev=0.1, seed=7)
    return atoms


def lj_cluster(constrained: bool = False) -> Atoms:
    """A rattled 13-atom argon icosahedron; the LJ fast-path tests share its compiled loop."""
    atoms = dict(lj_structures())["icosahedron-0"].copy()
    if constrained:
        atoms.set_constraint([FixAtoms(indices=[0, 1]), FixCartesian([2, 3], mask=(False, True, True))])
    return atoms


def lj_crystal() -> Atoms:
    """A rattled, sheared 8-atom argon crystal (3-D periodic)."""
    return dict(lj_structures())["triclinic-0"].copy()


@pytest.fixture(scope="module")
def lj():
    return LennardJones(**LJ_PARAMS)


@pytest.fixture(scope="module")
def emt():
    return EMT()


# -- host path: any ASE calculator ----------------------------------------------------


@pytest.mark.parametrize("name", list(emt_structures()))
def test_host_path_follows_ase_lbfgs(name, tmp_path, host_step_calls):
    atoms, kwargs = emt_structures()[name]
    ref = relax_once(AseLBFGS, atoms, AseEMT(), tmp_path / "ase.traj", **kwargs)
    ours = relax_once(LBFGS, atoms, AseEMT(), tmp_path / "ours.traj", **kwargs)
    assert ref["converged"] and ref["nsteps"] > 5
    assert len(host_step_calls) == ref["nsteps"]
    assert_same_relaxation(ours, ref, HOST_TOL)


def test_host_path_irun_and_attach_follow_ase():
    atoms, _ = emt_structures()["bulk"]
    seen = {}
    for cls in (AseLBFGS, LBFGS):
        a = atoms.copy()
        a.calc = AseEMT()
        opt = cls(a, logfile=None)
        record = []
        opt.attach(lambda: record.append((opt.nsteps, a.positions.copy())), interval=2)
        flags = [bool(c) for c in opt.irun(fmax=FMAX, steps=7)]
        seen[cls] = (flags, record, opt.nsteps, bool(opt.converged()))
    (f0, r0, n0, c0), (f1, r1, n1, c1) = seen[AseLBFGS], seen[LBFGS]
    assert (f0, n0, c0) == (f1, n1, c1) and n0 == 7
    assert [n for n, _ in r0] == [n for n, _ in r1] == [0, 2, 4, 6]
    assert max(np.abs(p - q).max() for (_, p), (_, q) in zip(r0, r1)) <= HOST_TOL


def test_restart_continues_exactly(tmp_path):
    """Break after 3 steps, restart from the file: the path is the uninterrupted one (ASE's).

    Restart files are ASE's LBFGS layout, so they also pass between ASE's LBFGS and ours.
    """
    atoms, _ = emt_structures()["cluster"]
    ref = atoms.copy()
    ref.calc = AseEMT()
    ref_opt = AseLBFGS(ref, logfile=None)
    ref_opt.run(fmax=FMAX)

    for first, second in [(LBFGS, LBFGS), (AseLBFGS, LBFGS), (LBFGS, AseLBFGS)]:
        restart = tmp_path / f"{first.__module__}-{second.__module__}.json"
        a = atoms.copy()
        a.calc = AseEMT()
        opt = first(a, logfile=None, restart=str(restart))
        for k, _ in enumerate(opt.irun(fmax=FMAX)):
            if k == 3:
                break
        again = second(a, logfile=None, restart=str(restart))
        assert again.run(fmax=FMAX)
        assert opt.nsteps + again.nsteps == ref_opt.nsteps, (first, second)
        assert np.abs(a.positions - ref.positions).max() <= HOST_TOL, (first, second)


def test_replay_trajectory_follows_ase(tmp_path):
    atoms, _ = emt_structures()["bulk"]
    finals = {}
    for cls in (AseLBFGS, LBFGS):
        a = atoms.copy()
        a.calc = AseEMT()
        traj = tmp_path / f"{cls.__module__}.traj"
        cls(a, logfile=None, trajectory=str(traj)).run(fmax=FMAX, steps=6)
        opt = cls(a, logfile=None)
        opt.replay_trajectory(str(traj))
        opt.run(fmax=FMAX)
        finals[cls] = (opt.nsteps, a.positions.copy())
    assert finals[AseLBFGS][0] == finals[LBFGS][0]
    assert np.abs(finals[AseLBFGS][1] - finals[LBFGS][1]).max() <= HOST_TOL


# -- fast path: our calculator, the jitted loop ---------------------------------------------


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "fixatoms-fixcartesian"])
def test_fast_path_follows_ase_lbfgs_lj(constrained, lj, tmp_path, host_step_calls):
    atoms = lj_cluster(constrained)
    ref = relax_once(AseLBFGS, atoms, AseLJ(**LJ_PARAMS), tmp_path / "ase.traj")
    ours = relax_once(LBFGS, atoms, Calculator(lj), tmp_path / "ours.traj")
    assert ref["converged"] and ref["nsteps"] > 5
    assert host_step_calls == []  # every step was taken inside the jitted loop
    assert_same_relaxation(ours, ref, FAST_TOL)


def test_fast_path_follows_ase_lbfgs_emt(emt, tmp_path, host_step_calls):
    """Periodic, with the stress in every trajectory frame (ASE's EMT writes it too)."""
    ref = relax_once(AseLBFGS, gold(), AseEMT(), tmp_path / "ase.traj")
    ours = relax_once(LBFGS, gold(), Calculator(emt), tmp_path / "ours.traj")
    assert ref["converged"] and ref["nsteps"] > 5
    assert host_step_calls == []
    assert "stress" in ours["frames"][-1].calc.results
    assert_same_relaxation(ours, ref, FAST_TOL)


def test_fast_and_host_paths_share_one_state(lj, tmp_path, host_step_calls):
    """run(3 steps, fast) + irun(2 steps, host) + restart file + run(fast) walks ASE's single path."""
    ref = lj_cluster()
    ref.calc = AseLJ(**LJ_PARAMS)
    ref_opt = AseLBFGS(ref, logfile=None)
    assert ref_opt.run(fmax=FMAX)

    ours = lj_cluster()
    ours.calc = Calculator(lj)
    restart = str(tmp_path / "restart.json")
    opt = LBFGS(ours, logfile=io.StringIO(), restart=restart)
    assert not opt.run(fmax=FMAX, steps=3)
    for _ in opt.irun(fmax=FMAX, steps=2):
        pass
    assert len(host_step_calls) == 2
    again = LBFGS(ours, logfile=io.StringIO(), restart=restart)
    assert again.run(fmax=FMAX)
    assert opt.nsteps + again.nsteps == ref_opt.nsteps
    assert np.abs(ours.positions - ref.positions).max() <= FAST_TOL
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-9)


def test_fast_path_observers_see_every_step(lj):
    seen = {}
    for cls, calc in ((AseLBFGS, AseLJ(**LJ_PARAMS)), (LBFGS, Calculator(lj))):
        a = lj_cluster()
        a.calc = calc
        opt = cls(a, logfile=None)
        record = []
        opt.attach(lambda: record.append((opt.nsteps, a.get_potential_energy(), a.positions.copy())), interval=3)
        opt.attach(lambda: record.append(("once", opt.nsteps)), interval=-5)
        opt.run(fmax=FMAX)
        seen[cls] = record
    ref, ours = seen[AseLBFGS], seen[LBFGS]
    assert [r[:1] for r in ours] == [r[:1] for r in ref]
    assert ("once", 5) in ours
    for r, o in zip(ref, ours):
        if r[0] != "once":
            assert o[1] == pytest.approx(r[1], abs=1e-9)
            assert np.abs(o[2] - r[2]).max() <= FAST_TOL


# -- the calculator ------------------------------------------------------------------------


def test_calculator_matches_ase_lennard_jones(lj):
    for atoms in (lj_crystal(), lj_cluster()):
        ours, ref = atoms.copy(), atoms.copy()
        ours.calc, ref.calc = Calculator(lj), AseLJ(**LJ_PARAMS)
        assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        assert ours.get_potential_energy(force_consistent=True) == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), atol=1e-10)
        if atoms.cell.rank == 3:
            np.testing.assert_allclose(ours.get_stress(), ref.get_stress(), atol=1e-10)
        else:
            with pytest.raises(PropertyNotImplementedError):
                ref.get_stress()
            with pytest.raises(PropertyNotImplementedError):
                ours.get_stress()


def test_calculator_reuses_its_neighbor_list(lj):
    atoms = lj_crystal()
    ref = atoms.copy()
    atoms.calc, ref.calc = Calculator(lj), AseLJ(**LJ_PARAMS)
    atoms.get_forces()
    builds = int(atoms.calc._neighbors.n_builds)
    for shift, rebuilt in ((0.05, False), (0.6, True)):
        atoms.positions[0] += shift
        ref.positions[0] += shift
        np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-10)
        assert (int(atoms.calc._neighbors.n_builds) > builds) == rebuilt
        builds = int(atoms.calc._neighbors.n_builds)
    atoms.set_cell(atoms.cell.array * 1.03, scale_atoms=True)  # a new cell always rebuilds
    ref.set_cell(ref.cell.array * 1.03, scale_atoms=True)
    np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), atol=1e-10)
    assert int(atoms.calc._neighbors.n_builds) > builds


def test_calculator_drives_md(lj):
    final = []
    for calc in (AseLJ(**LJ_PARAMS), Calculator(lj)):
        a = lj_cluster()
        a.calc = calc
        VelocityVerlet(a, timestep=5.0, logfile=None).run(20)
        final.append((a.positions.copy(), a.get_momenta()))
    (p0, m0), (p1, m1) = final
    assert np.abs(p0 - p1).max() <= 1e-10
    assert np.abs(m0 - m1).max() <= 1e-10


def test_calculator_with_cell_filter(lj, tmp_path, host_step_calls):
    ref = relax_once(AseLBFGS, lj_crystal(), AseLJ(**LJ_PARAMS), tmp_path / "ase.traj", wrap=FrechetCellFilter)
    ours = relax_once(LBFGS, lj_crystal(), Calculator(lj), tmp_path / "ours.traj", wrap=FrechetCellFilter)
    assert ref["converged"] and ref["nsteps"] > 5
    assert len(host_step_calls) == ref["nsteps"]  # filters take the host path
    assert_same_relaxation(ours, ref, FAST_TOL)


def test_calculator_with_vibrations_and_neb(lj, tmp_path):
    freqs = []
    for calc in (AseLJ(**LJ_PARAMS), Calculator(lj)):
        a = lj_cluster()
        a.calc = calc
        vib = Vibrations(a, name=str(tmp_path / type(calc).__module__))
        vib.run()
        freqs.append(np.real(vib.get_frequencies()))
    np.testing.assert_allclose(*freqs, atol=1e-6)

    start = lj_cluster()
    end = start.copy()
    end.positions[0] += (0.4, 0.3, -0.2)
    neb_forces = []
    for make in (lambda: AseLJ(**LJ_PARAMS), lambda: Calculator(lj)):
        images = [start.copy() for _ in range(4)] + [end.copy()]
        for image in images:
            image.calc = make()
        neb = NEB(images, method="improvedtangent")
        neb.interpolate()
        neb_forces.append(neb.get_forces())
    np.testing.assert_allclose(*neb_forces, atol=1e-10)


# -- many structures, one call --------------------------------------------------------------


def test_relax_many_matches_ase_per_structure(lj, monkeypatch):
    engine_calls = []
    original = many_module.relax
    monkeypatch.setattr(many_module, "relax", lambda *a, **k: engine_calls.append(1) or original(*a, **k))

    emt_atoms = emt_structures()
    items = [  # (atoms, our calculator or ASE's, the reference calculator, a filter)
        (lj_cluster(), lambda: Calculator(lj), lambda: AseLJ(**LJ_PARAMS), None),
        (emt_atoms["bulk"][0], AseEMT, AseEMT, None),
        (lj_cluster(True), lambda: Calculator(LennardJones(**LJ_PARAMS)), lambda: AseLJ(**LJ_PARAMS), None),
        (emt_atoms["cluster"][0], AseEMT, AseEMT, None),
        (lj_crystal(), lambda: Calculator(lj), lambda: AseLJ(**LJ_PARAMS), FrechetCellFilter),
    ]
    structures, relaxed, references = [], [], []
    for atoms, ours, theirs, wrap in items:
        a = atoms.copy()
        a.calc = ours()
        structures.append(wrap(a) if wrap else a)
        relaxed.append(a)
        r = atoms.copy()
        r.calc = theirs()
        opt = AseLBFGS(wrap(r) if wrap else r, logfile=None)
        references.append((bool(opt.run(fmax=FMAX, steps=300)), r))

    converged = relax_many(structures, fmax=FMAX, steps=300)
    assert engine_calls == [1]  # both LJ calculators (equal potentials) went in one batch
    assert converged == [c for c, _ in references] == [True] * len(items)
    for a, (_, r) in zip(relaxed, references):  # updated in place, as ASE would have
        assert np.abs(a.positions - r.positions).max() <= FAST_TOL
        assert np.abs(a.cell.array - r.cell.array).max() <= FAST_TOL
        assert a.get_potential_energy() == pytest.approx(r.get_potential_energy(), abs=1e-9)

    unconverged = []
    for atoms, ours, _, _ in items[:3]:  # the same batch shapes as above: no new compile
        a = atoms.copy()
        a.calc = ours()
        unconverged.append(a)
    assert relax_many(unconverged, fmax=FMAX, steps=2) == [False, False, False]
    assert engine_calls == [1, 1]


# -- what an ASE user runs into ----------------------------------------------------------------


class Exploding(AseCalculatorBase):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        raise RuntimeError("the calculator broke")


def error_of(action) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        action()
    return info.type, str(info.value)


def test_errors_surface_as_in_ase():
    atoms = lj_cluster()
    for calc in (None, Exploding()):
        outcomes = []
        for cls in (AseLBFGS, LBFGS):
            a = atoms.copy()
            a.calc = calc
            outcomes.append(error_of(lambda: cls(a, logfile=None).run(fmax=FMAX)))
            outcomes.append(error_of(lambda: next(cls(a, logfile=None).irun(fmax=FMAX))))
        a = atoms.copy()
        a.calc = calc
        outcomes.append(error_of(lambda: relax_many([a], fmax=FMAX)))
        assert len(set(outcomes)) == 1, outcomes

    a = atoms.copy()
    a.calc = Calculator(EMT())
    kind, message = error_of(lambda: LBFGS(a, logfile=None).run(fmax=FMAX))
    assert kind is ValueError and "Ar" in message and "Ar13" in message
    assert error_of(lambda: AseLBFGS(atoms, maxstep=1.5)) == error_of(lambda: LBFGS(atoms, maxstep=1.5))
    with pytest.raises(ValueError, match="line search"):
        LBFGS(atoms, use_line_search=True)

"""ASE's own optimizer tests (they ship inside the ``ase`` wheel), run against ``kups_relax.ase``.

The test functions and fixtures are imported from ``ase.test.optimize``; we only
supply our optimizer class where ASE's tests pick theirs:

Both drop-ins, :class:`kups_relax.ase.LBFGS` and :class:`kups_relax.ase.FIRE`, run them
(``OUR_OPTIMIZERS``), except where noted:

* ``test_optimizers.py`` (``test_optimize``, ``test_unconverged``, ``test_run_twice``,
  ``test_path``) take the class from the ``optcls`` fixture, which we define. Their
  ``atoms`` fixture (Au, EMT) is ASE's; we run it twice: with ASE's EMT attached
  (host path) and with our ``Calculator(potentials.emt.EMT())`` attached (fast path).
  (ASE runs LBFGS and FIRE here.)
* ``test_pure.py``'s ``test_booth`` relaxes a generic 2-dof ``Optimizable`` (ASE runs FIRE
  there); FIRE only: the LBFGS drop-in needs rows of 3 (it caps the longest row of 3 at
  ``maxstep``, where ASE's LBFGS asks the Optimizable's ``gradient_norm``, here the whole vector).
* ``test_nsteps.py`` builds its optimizer from the module-level name ``BFGS`` inside
  its ``opt`` fixture; we point that name at our class and use ASE's fixture.
* ``test_optimizer_restart.py``: we call ASE's ``test_optimizers_restart`` with our class
  (FrechetCellFilter + EMT, break after 2 steps, restart from file and trajectory).
  LBFGS only: ASE's own FIRE fails it (ASE runs only the BFGS family there). Its restart
  file holds ``(vel, dt)`` only: not the filter's ``orig_cell`` (ASE warns so when it loads
  it: the restarted filter measures the cell from the restored cell), nor ``a`` / ``Nsteps``;
  and ``FIRE.__init__`` overwrites the ``dt`` it has just read with its ``dt`` argument.
  Our FIRE keeps ASE's restart behaviour, which ``test_fire_restart_like_ase`` checks instead.
* ``test_maxstep.py`` builds ``MDMin(atoms, dt=1.0)`` to force a huge first step and
  checks that no atom moved more than 0.2 Å; we supply our class under that name
  (``dt``, MDMin's time step, has no meaning for L-BFGS and is dropped; for FIRE it is
  FIRE's initial time step, so it is passed on and forces the same huge first step).

Their markers (``optimize``) are registered by ASE's conftest, which is not ours, so the
unknown-marker warnings raised while importing them are silenced here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from kups_relax.ase import FIRE, LBFGS, Calculator
from potentials.emt import EMT

with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from ase.test.conftest import testdir  # noqa: F401  (ASE's fixture: a clean working directory)
    from ase.test.optimize import test_maxstep as ase_maxstep
    from ase.test.optimize import test_nsteps as ase_nsteps
    from ase.test.optimize import test_optimizer_restart as ase_restart
    from ase.test.optimize import test_optimizers as ase_optimizers
    from ase.test.optimize import test_pure as ase_pure
    from ase.test.optimize.test_optimizers import (  # noqa: F401  (collected by pytest)
        fixture_kwargs,
        fixture_ref_atoms,
        test_optimize,
        test_path,
        test_run_twice,
        test_unconverged,
    )

test_nsteps = ase_nsteps.test_nsteps

#: ASE's tests run with warnings as errors; so do they here.
pytestmark = pytest.mark.filterwarnings("error")

OUR_OPTIMIZERS = [LBFGS, FIRE]


@pytest.fixture(name="optcls", params=OUR_OPTIMIZERS, ids=lambda cls: f"kups_relax.ase.{cls.__name__}")
def fixture_optcls(request):
    return request.param


@pytest.fixture(scope="module")
def kups_emt():
    return EMT()


@pytest.fixture(params=["ase-emt", "kups-emt"])
def calculator_kind(request):
    return request.param


@pytest.fixture(name="atoms")
def fixture_atoms(ref_atoms, calculator_kind, kups_emt):
    """ASE's ``atoms`` fixture, with our calculator swapped in for the fast path."""
    atoms = ase_optimizers.fixture_atoms.__wrapped__(ref_atoms)
    if calculator_kind == "kups-emt":
        atoms.calc = Calculator(kups_emt)
    return atoms


@pytest.fixture(name="opt")
def fixture_opt(monkeypatch, optcls):
    """ASE's ``opt`` fixture of test_nsteps.py, building our optimizer."""
    monkeypatch.setattr(ase_nsteps, "BFGS", optcls)
    yield from ase_nsteps.opt.__wrapped__()


def test_optimizers_restart(testdir):  # noqa: F811
    ase_restart.test_optimizers_restart(testdir, LBFGS)


def test_maxstep(monkeypatch, optcls):
    monkeypatch.setattr(ase_maxstep, "MDMin", lambda atoms, dt: optcls(atoms, dt=dt) if optcls is FIRE else optcls(atoms))
    ase_maxstep.test_mdmin_maxstep()


def test_booth():
    """ASE's test_pure.py::test_booth (a 2-dof Optimizable, no atoms) with our FIRE; and the same
    path as ASE's FIRE on it."""
    ase_pure.test_booth(FIRE)
    from ase.optimize import FIRE as AseFIRE

    paths = []
    for cls in (AseFIRE, FIRE):
        target = ase_pure.BoothFunctionOptimizable([1.234, 2.345])
        opt = cls(target, logfile=None)
        path = [target.get_x() for _ in opt.irun(fmax=1e-8)]
        paths.append((opt.nsteps, np.array(path)))
    (n_ase, ase_path), (n_ours, our_path) = paths
    assert n_ours == n_ase > 10
    np.testing.assert_allclose(our_path, ase_path, rtol=0, atol=1e-12)


def test_fire_restart_like_ase(testdir):  # noqa: F811
    """ASE's restart scenario of test_optimizer_restart.py (FrechetCellFilter, break after 2 steps,
    restart from the restart file and the trajectory), run with ASE's FIRE and with ours: the same
    step counts and the same trajectories (ASE's FIRE restart included, see the module docstring).
    ASE's uninterrupted run is there only to show why ASE's own test fails for FIRE: once ASE
    restores FIRE fully, that assertion fails and FIRE can join ``test_optimizers_restart``."""
    from ase.optimize import FIRE as AseFIRE

    results = []
    for cls in (AseFIRE, FIRE):
        class Fire(cls):
            def __init__(self, atoms, alpha=None, **kwargs):  # the scenario's ``alpha=70`` is BFGS's
                super().__init__(atoms, logfile=None, **kwargs)

        name = cls.__module__
        with warnings.catch_warnings():  # ASE's own warning on loading a filter's restart file
            warnings.filterwarnings("ignore", "WARNING: restart function is untested", UserWarning)
            init, restart = ase_restart.fragile_optimizer(Fire, f"fragile-{name}.traj", f"fragile-{name}.dat",
                                                          {"fmax": 0.005}, {})
        # the restarted run rewrites the trajectory; ASE's scenario kept the first part as ``.orig``
        trajs = [ase_restart.read_traj(f"fragile-{name}.traj{end}") for end in (".orig", "")]
        results.append(((init.nsteps, restart.nsteps), trajs))
        if cls is AseFIRE:
            with ase_restart.opt_filter_atoms(Fire, "single.traj", "single.dat", {}) as single:
                single.run(fmax=0.005)
            assert single.nsteps != init.nsteps + restart.nsteps  # why ASE's own test fails for FIRE
    (ase_steps, ase_trajs), (our_steps, our_trajs) = results
    assert our_steps == ase_steps
    for steps, our_traj, ase_traj in zip(ase_steps, our_trajs, ase_trajs):
        assert len(our_traj) == len(ase_traj) == 1 + steps
        for a, b in zip(our_traj, ase_traj):
            np.testing.assert_allclose(a["position"], b["position"], rtol=0, atol=1e-8)
            assert abs(a["energy"] - b["energy"]) < 1e-8

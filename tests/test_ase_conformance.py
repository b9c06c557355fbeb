"""ASE's own optimizer tests (they ship inside the ``ase`` wheel), run against ``kups_relax.ase``.

The test functions and fixtures are imported from ``ase.test.optimize``; we only
supply our optimizer class where ASE's tests pick theirs:

* ``test_optimizers.py`` (``test_optimize``, ``test_unconverged``, ``test_run_twice``,
  ``test_path``) take the class from the ``optcls`` fixture, which we define. Their
  ``atoms`` fixture (Au, EMT) is ASE's; we run it twice: with ASE's EMT attached
  (host path) and with our ``Calculator(potentials.emt.EMT())`` attached (fast path).
* ``test_nsteps.py`` builds its optimizer from the module-level name ``BFGS`` inside
  its ``opt`` fixture; we point that name at our class and use ASE's fixture.
* ``test_optimizer_restart.py``: we call ASE's ``test_optimizers_restart`` with our class
  (FrechetCellFilter + EMT, break after 2 steps, restart from file and trajectory).
* ``test_maxstep.py`` builds ``MDMin(atoms, dt=1.0)`` to force a huge first step and
  checks that no atom moved more than 0.2 Å; we supply our class under that name
  (``dt``, MDMin's time step, has no meaning for L-BFGS and is dropped).

Their markers (``optimize``) are registered by ASE's conftest, which is not ours, so the
unknown-marker warnings raised while importing them are silenced here.
"""

from __future__ import annotations

import warnings

import pytest

from kups_relax.ase import LBFGS, Calculator
from potentials.emt import EMT

with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from ase.test.conftest import testdir  # noqa: F401  (ASE's fixture: a clean working directory)
    from ase.test.optimize import test_maxstep as ase_maxstep
    from ase.test.optimize import test_nsteps as ase_nsteps
    from ase.test.optimize import test_optimizer_restart as ase_restart
    from ase.test.optimize import test_optimizers as ase_optimizers
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

OUR_OPTIMIZERS = [LBFGS]


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


def test_optimizers_restart(testdir, optcls):  # noqa: F811
    ase_restart.test_optimizers_restart(testdir, optcls)


def test_maxstep(monkeypatch, optcls):
    monkeypatch.setattr(ase_maxstep, "MDMin", lambda atoms, dt: optcls(atoms))
    ase_maxstep.test_mdmin_maxstep()

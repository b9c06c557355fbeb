"""FIRE per system against ``ase.optimize.FIRE`` (issue 7, deliverable 1).

Every structure is also relaxed on its own by ASE's FIRE with ASE's own calculator
(EMT or LennardJones); our batched FIRE must take the same number of steps and end at
the same positions and energies.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.calculators.emt import EMT as AseEMT
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.optimize import FIRE as AseFIRE

from kups_relax import relax, relax_iter
from kups_relax.engine import resolve_optimizer
from kups_relax.transforms import Fire, ase_fire
from potentials import EMT, LennardJones
from structures import LJ_PARAMS, lj_structures

FMAX = 0.02
MAX_STEPS = 400
EMT_POTENTIAL = EMT()
LJ_POTENTIAL = LennardJones(**LJ_PARAMS)


def emt_structures() -> list[tuple[str, Atoms]]:
    """Eight metal structures (<= 64 atoms): bulk with vacancy, slabs, clusters, alloys."""
    out = []
    a = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    del a[5]
    a.rattle(0.05, seed=1)
    out.append(("cu-vacancy", a))
    a = fcc111("Pt", size=(2, 2, 4), vacuum=6.0)
    a.rattle(0.05, seed=2)
    out.append(("pt111-slab", a))
    a = fcc100("Al", size=(3, 3, 3), vacuum=5.0)
    a.rattle(0.05, seed=3)
    out.append(("al100-slab", a))
    a = Icosahedron("Au", 2)
    a.rattle(0.1, seed=4)
    out.append(("au-icosahedron", a))
    a = Icosahedron("Ni", 3)
    a.rattle(0.05, seed=5)
    out.append(("ni-icosahedron-55", a))
    a = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 2, 1)
    symbols = a.get_chemical_symbols()
    for i in range(0, len(a), 3):
        symbols[i] = "Au"
    a.set_chemical_symbols(symbols)
    a.rattle(0.08, seed=6)
    out.append(("cuau-alloy", a))
    a = bulk("Ag", "fcc", a=4.1) * (2, 2, 2)
    a.set_chemical_symbols(["Ag", "Pd"] * 4)
    a.rattle(0.1, seed=7)
    out.append(("agpd-primitive", a))
    a = bulk("Ni", "fcc", a=3.52, cubic=True) * (2, 2, 2)
    a.rattle(0.15, seed=8)
    out.append(("ni-rattled", a))
    return out


def ase_fire_relax(atoms: Atoms, calc) -> tuple[Atoms, int, float]:
    atoms = atoms.copy()
    atoms.calc = calc
    opt = AseFIRE(atoms, logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    return atoms, opt.nsteps, atoms.get_potential_energy()


def assert_same_as_ase(named, results, calc_factory):
    assert len(results) == len(named)
    for (name, atoms), res in zip(named, results):
        ref, steps, energy = ase_fire_relax(atoms, calc_factory())
        assert res.status == "converged", (name, res.status, res.reason)
        assert res.steps == steps, (name, res.steps, steps)
        np.testing.assert_allclose(res.atoms.positions, ref.positions, rtol=0, atol=1e-8, err_msg=name)
        assert abs(res.energy - energy) <= 1e-9, (name, res.energy, energy)


@pytest.fixture(scope="module")
def emt_named():
    return emt_structures()


@pytest.fixture(scope="module")
def emt_results(emt_named):
    return relax([a for _, a in emt_named], EMT_POTENTIAL, fmax=FMAX, max_steps=MAX_STEPS, optimizer="fire",
                 names=[n for n, _ in emt_named])


@pytest.fixture(scope="module")
def lj_named():
    wanted = {"icosahedron-0", "cluster-13", "bulk-1", "triclinic-0", "slab-0", "molecule-CH4"}
    return [(n, a) for n, a in lj_structures() if n in wanted]


def test_resolve_optimizer_names():
    assert resolve_optimizer("fire") == ase_fire() == Fire()
    assert resolve_optimizer("FIRE") == Fire()
    assert ase_fire(maxstep=0.1).maxstep == 0.1
    with pytest.raises(ValueError, match="fire"):
        resolve_optimizer("nonsense")


def test_emt_batch_matches_ase_fire(emt_named, emt_results):
    assert_same_as_ase(emt_named, emt_results, AseEMT)
    # the batch is interesting: systems take different step counts and some hit maxstep
    assert len({r.steps for r in emt_results}) > 3


def test_lj_batch_matches_ase_fire(lj_named):
    results = relax([a for _, a in lj_named], LJ_POTENTIAL, fmax=FMAX, max_steps=MAX_STEPS, optimizer="fire",
                    names=[n for n, _ in lj_named])
    assert_same_as_ase(lj_named, results, lambda: AseLJ(**LJ_PARAMS))


def test_non_default_parameters_match_ase(emt_named):
    name, atoms = emt_named[3]
    kwargs = dict(dt=0.05, maxstep=0.1, dtmax=0.5, Nmin=3, finc=1.2, fdec=0.4, astart=0.2, fa=0.95)
    (res,) = relax([atoms], EMT_POTENTIAL, fmax=FMAX, max_steps=MAX_STEPS, optimizer=ase_fire(a=0.2, **kwargs))
    ref = atoms.copy()
    ref.calc = AseEMT()
    opt = AseFIRE(ref, logfile=None, a=0.2, **kwargs)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    assert res.steps == opt.nsteps
    np.testing.assert_allclose(res.atoms.positions, ref.positions, rtol=0, atol=1e-8)


def test_batch_invariance(emt_named, emt_results):
    """A structure alone follows the same path as in the mixed batch."""
    for k in (1,):
        name, atoms = emt_named[k]
        (alone,) = relax([atoms], EMT_POTENTIAL, fmax=FMAX, max_steps=MAX_STEPS, optimizer="fire")
        in_batch = emt_results[k]
        assert alone.steps == in_batch.steps, name
        np.testing.assert_allclose(alone.atoms.positions, in_batch.atoms.positions, rtol=0, atol=1e-10,
                                   err_msg=name)
        np.testing.assert_allclose(alone.energies, in_batch.energies, rtol=0, atol=1e-10, err_msg=name)


def test_streaming_reset(emt_named, emt_results):
    """More structures than slots: refilled slots start FIRE afresh (dt, a, velocity, counter)."""
    wanted = ("pt111-slab", "au-icosahedron", "cuau-alloy")  # one size class: 4 slots of 16 rows
    small = [(n, a) for n, a in emt_named if n in wanted] * 2
    assert len(small) == 6
    by_name = {n: r for (n, _), r in zip(emt_named, emt_results)}
    seen = 0
    for index, res in relax_iter(small, EMT_POTENTIAL, fmax=FMAX, max_steps=MAX_STEPS, optimizer="fire",
                                 atoms_per_batch=64):
        ref = by_name[small[index][0]]
        assert res.steps == ref.steps, res.name
        np.testing.assert_allclose(res.atoms.positions, ref.atoms.positions, rtol=0, atol=1e-10, err_msg=res.name)
        seen += 1
    assert seen == len(small)


def test_ase_drop_in_matches_ase_fire(emt_named):
    """kups_relax.ase.FIRE follows ase.optimize.FIRE, with and without the downhill check."""
    from kups_relax.ase import FIRE as KupsFIRE

    atoms = emt_named[3][1]
    for downhill_check in (False, True):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = AseEMT(), AseEMT()
        ref = AseFIRE(a, logfile=None, downhill_check=downhill_check)
        ref.run(fmax=FMAX, steps=MAX_STEPS)
        ours = KupsFIRE(b, logfile=None, downhill_check=downhill_check)
        ours.run(fmax=FMAX, steps=MAX_STEPS)
        assert ours.nsteps == ref.nsteps
        assert (ours.dt, ours.Nsteps) == pytest.approx((ref.dt, ref.Nsteps), abs=1e-12)
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-8)


def test_ase_own_fire_test_with_drop_in(monkeypatch):
    """ASE's ase/test/optimize/test_fire.py (it names ase.optimize.FIRE) run with our class in its place."""
    from ase.build import bulk

    import kups_relax.ase
    ase_test = pytest.importorskip("ase.test.optimize.test_fire")
    monkeypatch.setattr(ase_test, "FIRE", kups_relax.ase.FIRE)
    gold = bulk("Au") * (2, 2, 2)  # ASE's distorted_bulk_gold fixture
    gold[0].x += 0.5
    ase_test.test_fire(gold)

"""Variable-cell relaxation against ASE's ``FrechetCellFilter`` / ``UnitCellFilter`` (issue 7, item 2).

Every structure is relaxed by ASE's own optimizer on ASE's own filter with ASE's EMT; ours
relaxes all of them in one batch (one ``relax`` call per optimizer, each structure with its
own filter settings) and must take the same steps to the same cells, positions, energies
and stresses. A cluster in the same batch has no cell degrees of freedom.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT as AseEMT
from ase.cluster import Icosahedron, Octahedron
from ase.constraints import FixAtoms, FixCartesian, FixCom, FixedLine, FixedPlane
from ase.filters import FrechetCellFilter, UnitCellFilter
from ase.optimize import FIRE as AseFIRE
from ase.optimize import LBFGS as AseLBFGS

from kups_relax import CellFilter, relax
from kups_relax.filters import CellFilter as _CF, check_variable_cell, resolve_cell_filters
from potentials import get_potential

FMAX = 0.01
MAX_STEPS = 300
EMT = get_potential("emt")
TOL = 1e-8


def cases(seed: int = 0) -> list[tuple[str, Atoms, CellFilter | None]]:
    """Strained, sheared and rattled metals, each with the filter option it exercises."""
    out = []

    def rattle(atoms, stdev, seed_):  # another seed, another starting geometry of the same case
        atoms.rattle(stdev, seed=seed_ + seed)
    a = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    rattle(a, 0.05, 1)
    a.cell[0, 1] += 0.1
    out.append(("cu-frechet", a, CellFilter()))
    a = bulk("Al", "fcc", a=4.2) * 2
    rattle(a, 0.03, 2)
    out.append(("al-pressure", a, CellFilter(scalar_pressure=0.01)))
    a = bulk("Ni", "fcc", a=3.45, cubic=True)
    a.set_chemical_symbols(["Ni", "Cu", "Ni", "Cu"])
    rattle(a, 0.05, 3)
    out.append(("nicu-hydrostatic", a, CellFilter(hydrostatic_strain=True)))
    a = bulk("Ag", "fcc", a=4.0, cubic=True)
    a.cell[2] *= 1.05
    rattle(a, 0.04, 4)
    out.append(("ag-constant-volume", a, CellFilter(constant_volume=True)))
    a = bulk("Au", "fcc", a=4.2, cubic=True)
    a.cell[1, 2] += 0.15
    a.cell[0, 1] += 0.1
    rattle(a, 0.04, 5)
    # yz held: expm does not keep this mask's zeros, so the cell rows are read back through logm
    out.append(("au-mask", a, CellFilter(mask=[1, 1, 1, 0, 1, 1])))
    a = bulk("Cu", "fcc", a=3.5, cubic=True) * (1, 1, 2)
    rattle(a, 0.05, 6)
    a.cell[2, 0] += 0.1
    out.append(("cu-unit", a, CellFilter(kind="unit")))
    a = bulk("Cu", "fcc", a=3.5, cubic=True) * (1, 1, 2)
    rattle(a, 0.05, 9)
    out.append(("cu-unit-pressure-mask", a, CellFilter(kind="unit", scalar_pressure=0.005, mask=[1, 1, 1, 0, 0, 0])))
    a = bulk("Pd", "fcc", a=3.8, cubic=True)
    rattle(a, 0.05, 7)
    a.set_constraint(FixAtoms(indices=[0]))
    out.append(("pd-fixatoms", a, CellFilter()))
    a = bulk("Cu", "fcc", a=3.7, cubic=True)
    rattle(a, 0.05, 10)
    a.set_constraint([FixedLine([1], direction=[1, 1, 0]), FixCartesian([2], mask=(False, True, False))])
    out.append(("cu-line-cartesian", a, CellFilter()))
    a = bulk("Ni", "fcc", a=3.6, cubic=True) * (1, 2, 1)
    rattle(a, 0.06, 11)
    a.set_constraint([FixedPlane([0, 3], direction=[1, 0, 1]), FixCom()])
    out.append(("ni-plane-com-unit", a, CellFilter(kind="unit")))
    a = Icosahedron("Au", 2)
    rattle(a, 0.05, 8)
    out.append(("au-cluster", a, CellFilter()))
    a = fcc111("Cu", size=(2, 2, 3), vacuum=4.0, a=3.7)
    rattle(a, 0.03, 13)
    # a slab is treated as ASE treats it in the filter (its cell has a volume); here z is held
    out.append(("cu111-slab-mask", a, CellFilter(mask=[1, 1, 0, 0, 0, 1])))
    a = bulk("Al", "fcc", a=4.05, cubic=True)
    rattle(a, 0.05, 12)
    a.set_constraint(FixedPlane([1], direction=[0, 0, 1]))
    out.append(("al-fixed-cell", a, None))  # keeps its cell in a variable-cell batch
    return out


def ase_relax(atoms: Atoms, cell_filter: CellFilter, optimizer) -> tuple[Atoms, int]:
    atoms = atoms.copy()
    atoms.calc = AseEMT()
    target = atoms
    if atoms.pbc.any() and cell_filter is not None:
        kw = dict(scalar_pressure=cell_filter.scalar_pressure, hydrostatic_strain=cell_filter.hydrostatic_strain,
                  constant_volume=cell_filter.constant_volume, mask=cell_filter.mask)
        target = FrechetCellFilter(atoms, **kw) if cell_filter.kind == "frechet" else UnitCellFilter(atoms, **kw)
    opt = optimizer(target, logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    return atoms, opt.nsteps


def assert_same_as_ase(named, results, optimizer):
    for (name, atoms, cell_filter), res in zip(named, results):
        ref, steps = ase_relax(atoms, cell_filter, optimizer)
        assert res.status == "converged", (name, res.status, res.reason)
        assert res.steps == steps, (name, res.steps, steps)
        np.testing.assert_allclose(res.atoms.cell.array, ref.cell.array, rtol=0, atol=TOL, err_msg=name)
        np.testing.assert_allclose(res.atoms.positions, ref.positions, rtol=0, atol=TOL, err_msg=name)
        assert abs(res.energy - ref.get_potential_energy()) < TOL, name
        if atoms.pbc.all():
            np.testing.assert_allclose(res.atoms.get_stress(), ref.get_stress(), rtol=0, atol=TOL, err_msg=name)
        elif atoms.pbc.any() and cell_filter is not None:
            assert not np.allclose(res.atoms.cell.array, atoms.cell.array), name  # the slab's cell did relax
        if not atoms.pbc.any() or cell_filter is None:
            np.testing.assert_allclose(res.atoms.cell.array, atoms.cell.array, rtol=0, atol=0, err_msg=name)
        assert len(res.energies) == steps + 1


@pytest.fixture(scope="module")
def lbfgs_run():
    named = cases()
    results = relax([a for _, a, _ in named], EMT, fmax=FMAX, max_steps=MAX_STEPS, optimizer="lbfgs",
                    names=[n for n, _, _ in named], cell_filter=[f for _, _, f in named])
    return named, results


def test_lbfgs_filters_match_ase(lbfgs_run):
    named, results = lbfgs_run
    assert_same_as_ase(named, results, AseLBFGS)


def small_mixed_cases() -> list[tuple[str, Atoms, CellFilter | None]]:
    """A cluster (no periodic direction: positions only, ASE's plain FIRE) and a slab with a mask,
    both of at most 8 atoms, so that they fit the FIRE test's 8-row slots."""
    cluster = Octahedron("Cu", 2)  # 6 atoms
    cluster.rattle(0.05, seed=14)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0, a=3.7)  # 8 atoms, pbc (T, T, F)
    slab.rattle(0.03, seed=15)
    return [("cu6-cluster", cluster, CellFilter()), ("cu111-slab8-mask", slab, CellFilter(mask=[1, 1, 0, 0, 0, 1]))]


def test_fire_filters_match_ase_through_refilled_slots():
    """FIRE, and the slots refilled in flight: 8-row slots in a 64-row batch for 14 structures,
    so most structures start in a slot another one has left (``admit``, variable cell); bulk,
    slab and cluster systems in the same batches."""
    named = [c for c in cases() if len(c[1]) <= 8] + [(n + "-2", a, f) for n, a, f in cases(100)[:1]]
    named[3:3] = small_mixed_cases()  # in the first batch, next to variable-cell bulk systems
    results = relax([a for _, a, _ in named], EMT, fmax=FMAX, max_steps=MAX_STEPS, optimizer="fire",
                    names=[n for n, _, _ in named], cell_filter=[f for _, _, f in named], atoms_per_batch=64)
    assert_same_as_ase(named, results, AseFIRE)


def test_batch_invariance_variable_cell(lbfgs_run):
    """A system's path (every energy, the final cell and positions) does not depend on its slot or
    on the other systems of its batch: same shapes (one compiled program), other order, one
    neighbour replaced."""
    named, first = lbfgs_run
    other = list(reversed(named))
    a = bulk("Al", "fcc", a=4.1) * 2
    a.rattle(0.05, seed=42)
    other[[n for n, _, _ in other].index("al-pressure")] = ("al-other", a, CellFilter())
    second = relax([a for _, a, _ in other], EMT, fmax=FMAX, max_steps=MAX_STEPS, optimizer="lbfgs",
                   names=[n for n, _, _ in other], cell_filter=[f for _, _, f in other])
    by_name = {r.name: r for r in second}
    for res in first:
        if res.name not in by_name:
            continue
        twin = by_name[res.name]
        np.testing.assert_array_equal(res.energies, twin.energies, err_msg=res.name)
        np.testing.assert_array_equal(res.atoms.positions, twin.atoms.positions, err_msg=res.name)
        np.testing.assert_array_equal(res.atoms.cell.array, twin.atoms.cell.array, err_msg=res.name)


def test_relax_many_runs_ase_filters_in_the_engine(lbfgs_run):
    """``kups_relax.ase.relax_many`` on ASE filter objects (our calculator attached) relaxes them in
    the engine with each filter's settings: the same program and numbers as ``relax`` above."""
    from kups_relax.ase import Calculator, relax_many

    named, results = lbfgs_run
    objects, atoms_list = [], []
    for _, atoms, cell_filter in named:
        a = atoms.copy()
        a.calc = Calculator(EMT)
        atoms_list.append(a)
        if cell_filter is None or not a.pbc.any():
            objects.append(a)
            continue
        kw = dict(scalar_pressure=cell_filter.scalar_pressure, hydrostatic_strain=cell_filter.hydrostatic_strain,
                  constant_volume=cell_filter.constant_volume, mask=cell_filter.mask)
        objects.append(FrechetCellFilter(a, **kw) if cell_filter.kind == "frechet" else UnitCellFilter(a, **kw))
    assert relax_many(objects, fmax=FMAX, steps=MAX_STEPS) == [True] * len(named)
    for a, res in zip(atoms_list, results):
        np.testing.assert_array_equal(a.positions, res.atoms.positions, err_msg=res.name)
        np.testing.assert_array_equal(a.cell.array, res.atoms.cell.array, err_msg=res.name)
        assert a.get_potential_energy() == res.energy


def test_options_and_errors():
    assert CellFilter(mask=[1, 1, 1, 0, 0, 0]).mask == ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    with pytest.raises(ValueError, match="kind"):
        _CF(kind="exp")
    with pytest.raises(ValueError, match="mask"):
        CellFilter(mask=[1, 0])
    with pytest.raises(ValueError, match="3 structures"):
        resolve_cell_filters(["frechet", None], 3)
    assert resolve_cell_filters("unit", 2) == [CellFilter(kind="unit")] * 2
    slab = bulk("Cu", "fcc", a=3.6, cubic=True)
    slab.pbc = [True, True, False]
    slab.cell[2] = 0.0
    assert "volume" in check_variable_cell(slab)
    res = relax([slab], EMT, cell_filter="frechet", max_steps=0)[0]
    assert res.status == "invalid" and "volume" in res.reason


def test_matrix_functions_match_scipy():
    """The small expm / Fréchet derivative / logm the loop uses, against scipy's (ASE's) to round-off."""
    import jax.numpy as jnp
    import scipy.linalg as sl

    from kups_relax.filters import _expm, _expm_frechet, _logm_near_identity

    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 3, 3)) * np.array([1e-3, 0.05, 0.2, 0.4])[:, None, None]
    E = rng.normal(size=(4, 3, 3)) * 50.0
    for i, (ours, ref) in enumerate(zip(_expm(jnp.asarray(A)), [sl.expm(a) for a in A])):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-14, err_msg=str(i))
    L = _expm_frechet(jnp.asarray(A), jnp.asarray(E))
    for i in range(4):
        np.testing.assert_allclose(L[i], sl.expm_frechet(A[i], E[i], compute_expm=False), rtol=1e-13, atol=1e-12)
    F = np.stack([sl.expm(a) for a in A])
    np.testing.assert_allclose(_logm_near_identity(jnp.asarray(F)), A, rtol=0, atol=1e-13)


def test_settings_from_an_ase_filter():
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    f = FrechetCellFilter(a, mask=[1, 1, 1, 0, 0, 0], scalar_pressure=0.01, exp_cell_factor=2.0)
    assert CellFilter.from_ase(f) == CellFilter(scalar_pressure=0.01, mask=[1, 1, 1, 0, 0, 0], exp_cell_factor=2.0)
    u = UnitCellFilter(a, hydrostatic_strain=True)
    assert CellFilter.from_ase(u) == CellFilter(kind="unit", hydrostatic_strain=True, cell_factor=4.0)


def test_cli_cell_settings():
    from kups_relax.cli import UsageError, build_parser, make_cell_filter, resolve_settings

    settings = resolve_settings(build_parser().parse_args(
        ["x.xyz", "--cell", "unit", "--pressure", "0.002", "--hydrostatic-strain"]))
    assert make_cell_filter(settings) == CellFilter(kind="unit", scalar_pressure=0.002, hydrostatic_strain=True)
    assert make_cell_filter(resolve_settings(build_parser().parse_args(["x.xyz"]))) is None
    with pytest.raises(UsageError, match="--constant-volume"):
        make_cell_filter(resolve_settings(build_parser().parse_args(["x.xyz", "--constant-volume"])))


# --- ASE's own filter tests (ase/test/filter/test_cellfilter.py) with our LBFGS drop-in -----------
# They build ``LBFGS(filter)`` from their module-level name; we point it at kups_relax.ase.LBFGS.
# Their calculator comes from ASE's ``asap3`` fixture (``pytest.importorskip("asap3")``), of which
# they use only ``asap3.EMT()``. asap3 is not installed here (its PyPI release is a C++ sdist), so
# the fixture is overridden with a stand-in whose ``EMT`` is ASE's own EMT: the tests then run
# (instead of skipping) and our optimizer steps on ASE's filter rows (the host path).

with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from ase.test.conftest import testdir  # noqa: F401  (ASE's fixture: a clean working directory)
    from ase.test.filter import test_cellfilter as ase_cellfilter


@pytest.fixture(name="asap3")
def fixture_asap3():
    """ASE's ``asap3`` fixture, standing in: an object whose ``EMT`` is ``ase.calculators.emt.EMT``."""
    import types

    return types.SimpleNamespace(EMT=AseEMT)


@pytest.fixture(name="ase_atoms")
def fixture_ase_atoms(asap3):
    return ase_cellfilter.atoms.__wrapped__(asap3)


@pytest.fixture(name="our_lbfgs")
def fixture_our_lbfgs(monkeypatch):
    from kups_relax.ase import LBFGS

    monkeypatch.setattr(ase_cellfilter, "LBFGS", LBFGS)
    return LBFGS


@pytest.mark.parametrize("cellfilter", [UnitCellFilter, FrechetCellFilter])
def test_ase_pressure(our_lbfgs, ase_atoms, cellfilter):
    ase_cellfilter.test_pressure(ase_atoms, cellfilter)


@pytest.mark.parametrize("cellfilter", [UnitCellFilter, FrechetCellFilter])
def test_ase_constant_volume(our_lbfgs, ase_atoms, cellfilter):
    ase_cellfilter.test_constant_volume(ase_atoms, cellfilter)


def test_ase_unitcellfilter(our_lbfgs, asap3, testdir, monkeypatch):  # noqa: F811  (testdir)
    """ASE's test has no assertions (its own comment says so); ours adds one: the trajectory it
    writes with our LBFGS holds the same frames as the one ASE's LBFGS writes. (The start is
    already below its fmax=5 here, so both stop after the first evaluation: one frame.)"""
    from ase.io import read

    ase_cellfilter.test_unitcellfilter(asap3, testdir)
    ours = read("Cu-fcc.traj", index=":")
    monkeypatch.setattr(ase_cellfilter, "LBFGS", AseLBFGS)
    ase_cellfilter.test_unitcellfilter(asap3, testdir)
    theirs = read("Cu-fcc.traj", index=":")
    assert len(ours) == len(theirs) >= 1
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=TOL)
        np.testing.assert_allclose(a.cell.array, b.cell.array, rtol=0, atol=TOL)
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < TOL

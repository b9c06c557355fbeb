"""ASE's FixSymmetry in the batched loop (issue 16, items 1-3), against ASE itself.

Every structure is relaxed by ASE's ``LBFGS(FrechetCellFilter(atoms))`` (and a few by
``UnitCellFilter``, by FIRE, or positions only) with ASE's EMT and
``atoms.set_constraint(FixSymmetry(atoms, symprec))``; ours relaxes all of a kind in one batch
with ``relax(..., fix_symmetry=True)``: systems of different space groups, and (one test)
systems without symmetry in the same batch. Same step counts, positions and cells within
1e-8 Å, the same space group before and after.

The set: cubic, hexagonal, tetragonal, orthorhombic, monoclinic and triclinic cells; ordered
alloys; inputs broken slightly within ``symprec`` (refined back) and beyond it (a lower group);
supercells with vacancies (thousands of operations with the translations); a slab.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT as AseEMT
from ase.constraints import FixSymmetry
from ase.filters import FrechetCellFilter, UnitCellFilter
from ase.optimize import FIRE as AseFIRE
from ase.optimize import LBFGS as AseLBFGS
from ase.spacegroup.symmetrize import check_symmetry

from kups_relax import relax
from kups_relax.symmetry import fix_symmetry, space_group, tables_of
from potentials import get_potential

FMAX = 0.01
MAX_STEPS = 400
SYMPREC = 0.01
EMT = get_potential("emt")
TOL = 1e-8


def _ordered(symbols, atoms):
    atoms.set_chemical_symbols(symbols)
    return atoms


def parity_set() -> list[tuple[str, Atoms]]:
    """At least 20 structures of many crystal systems, each away from its minimum."""
    out = []
    a = bulk("Cu", "fcc", a=3.7)
    out.append(("cu-fcc-primitive", a))
    a = bulk("Cu", "fcc", a=3.5, cubic=True)
    out.append(("cu-fcc-cubic", a))
    a = bulk("Cu", "fcc", a=3.6, cubic=True) * 2
    del a[5]
    out.append(("cu-vacancy-2x2x2", a))  # Pm-3m with 8 translations: 384 operations
    a = bulk("Cu", "fcc", a=3.65) * 3
    a.rattle(0.002, seed=1)
    out.append(("cu-3x3x3-within-symprec", a))  # refined back to Fm-3m: 48 x 27 operations
    out.append(("cu-hcp", bulk("Cu", "hcp", a=2.5, c=4.3)))
    a = bulk("Ni", "hcp", a=2.45, c=4.2) * (2, 2, 1)
    del a[3]
    out.append(("ni-hcp-vacancy", a))
    a = bulk("Ag", "fcc", a=4.1, cubic=True)
    a.cell[2] *= 1.06
    a.positions[:] = a.cell.cartesian_positions(a.get_scaled_positions())
    out.append(("ag-tetragonal", a))
    a = _ordered(["Cu", "Au", "Cu", "Au"], bulk("Cu", "fcc", a=3.8, cubic=True))
    out.append(("cuau-l10", a))  # P4/mmm
    a = _ordered(["Au", "Cu", "Cu", "Cu"], bulk("Cu", "fcc", a=3.75, cubic=True))
    out.append(("cu3au-l12", a))  # Pm-3m
    out.append(("cuau-b2", Atoms("CuAu", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.eye(3) * 3.1,
                                 pbc=True)))
    out.append(("cuau-b1", bulk("CuAu", "rocksalt", a=5.2)))
    out.append(("cu-bcc", bulk("Cu", "bcc", a=2.95)))
    out.append(("pd-diamond", bulk("Pd", "diamond", a=5.4)))
    a = bulk("Pt", "fcc", a=4.0, cubic=True)
    a.set_cell(np.diag([3.9, 4.05, 4.15]), scale_atoms=True)
    out.append(("pt-orthorhombic", a))
    a = bulk("Al", "fcc", a=4.1, cubic=True)
    cell = a.cell.array.copy()
    cell[2, 0] += 0.4
    a.set_cell(cell, scale_atoms=True)
    out.append(("al-monoclinic", a))
    a = bulk("Au", "fcc", a=4.15, cubic=True)
    cell = a.cell.array.copy()
    cell[1, 0] += 0.2
    cell[2, 0] += 0.3
    cell[2, 1] -= 0.25
    a.set_cell(cell, scale_atoms=True)
    a.rattle(0.05, seed=3)
    out.append(("au-triclinic", a))  # P1: FixSymmetry with the identity only
    a = bulk("Ni", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    a.rattle(0.003, seed=5)
    out.append(("ni-broken-within-symprec", a))
    a = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 1, 1)
    a.positions[0] += [0.06, 0.03, 0.0]
    out.append(("cu-broken-beyond-symprec", a))  # a lower group, kept
    a = _ordered(["Ni", "Cu", "Ni", "Cu"], bulk("Ni", "fcc", a=3.55, cubic=True))
    a.positions[1] += [0.0, 0.0, 0.05]
    out.append(("nicu-distorted", a))
    a = bulk("Pd", "fcc", a=3.95)
    cell = a.cell.array.copy() * [[1.0], [1.0], [1.04]]
    a.set_cell(cell, scale_atoms=True)
    out.append(("pd-rhombohedral", a))
    a = _ordered(["Ag", "Au"], bulk("Ag", "hcp", a=2.95, c=4.9))
    out.append(("agau-hcp-ordered", a))
    return out


def slab() -> Atoms:
    a = fcc111("Cu", size=(2, 2, 3), vacuum=5.0, a=3.7)
    a.pbc = True  # spglib treats the cell as periodic; positions-only relaxation
    return a


def ase_relax(atoms: Atoms, *, cell: str | None = "frechet", optimizer=AseLBFGS, symprec=SYMPREC):
    """ASE's answer: FixSymmetry (refining the structure), then the optimizer on the filter."""
    atoms = atoms.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = check_symmetry(atoms, symprec)
        atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))
    atoms.calc = AseEMT()
    target = {"frechet": FrechetCellFilter, "unit": UnitCellFilter, None: lambda a: a}[cell](atoms)
    opt = optimizer(target, logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = check_symmetry(atoms, symprec)
    return atoms, opt.nsteps, before, after


def _group(dataset) -> str:
    return f"{dataset.international} ({dataset.number})"


def check_same(result, reference, steps, before, after, name):
    assert result.status == "converged", (name, result.status, result.reason)
    assert result.steps == steps, (name, result.steps, steps)
    assert np.abs(result.atoms.positions - reference.positions).max() <= TOL, name
    assert np.abs(result.atoms.cell.array - reference.cell.array).max() <= TOL, name
    assert result.spacegroup_initial == _group(before), (name, result.spacegroup_initial, _group(before))
    assert result.spacegroup_final == _group(after), (name, result.spacegroup_final, _group(after))


@pytest.fixture(scope="module")
def frechet_lbfgs():
    structures = parity_set()
    results = relax([a for _, a in structures], EMT, fmax=FMAX, max_steps=MAX_STEPS, cell_filter="frechet",
                    fix_symmetry=True, symprec=SYMPREC, names=[n for n, _ in structures])
    return structures, results


def test_parity_set_is_varied():
    structures = parity_set()
    assert len(structures) >= 20
    groups = set()
    for _, atoms in structures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups.add(check_symmetry(atoms, SYMPREC).number)
    assert len(groups) >= 10 and 1 in groups  # triclinic P1 among many others


@pytest.mark.parametrize("k", range(len(parity_set())))
def test_frechet_lbfgs_matches_ase(frechet_lbfgs, k):
    structures, results = frechet_lbfgs
    name, atoms = structures[k]
    reference, steps, before, after = ase_relax(atoms)
    check_same(results[k], reference, steps, before, after, name)


def test_unit_cell_filter_and_fire_and_positions_only():
    """UnitCellFilter with LBFGS, FrechetCellFilter with FIRE, positions only (a slab among them)."""
    structures = parity_set()
    picks = [structures[i] for i in (2, 4, 7, 15)]
    for cell, optimizer, ase_optimizer in (("unit", "lbfgs", AseLBFGS), ("frechet", "fire", AseFIRE)):
        results = relax([a for _, a in picks], EMT, fmax=FMAX, max_steps=MAX_STEPS, cell_filter=cell,
                        optimizer=optimizer, fix_symmetry=True, names=[n for n, _ in picks])
        for (name, atoms), result in zip(picks, results):
            check_same(result, *ase_relax(atoms, cell=cell, optimizer=ase_optimizer), f"{name}/{cell}/{optimizer}")
    positions_only = picks[:2] + [("cu-slab", slab())]
    results = relax([a for _, a in positions_only], EMT, fmax=FMAX, max_steps=MAX_STEPS, fix_symmetry=True)
    for (name, atoms), result in zip(positions_only, results):
        check_same(result, *ase_relax(atoms, cell=None), f"{name}/positions")


def test_with_and_without_symmetry_in_one_batch():
    """The atoms' own FixSymmetry constraint decides: constrained systems keep their group,
    the others relax freely, in one batch, each as ASE."""
    structures = parity_set()
    constrained = structures[5][1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        constrained.set_constraint(FixSymmetry(constrained, symprec=SYMPREC))
    free = structures[16][1].copy()
    results = relax([constrained, free], EMT, fmax=FMAX, max_steps=MAX_STEPS, cell_filter="frechet")
    check_same(results[0], *ase_relax(structures[5][1]), "constrained")
    reference = free.copy()
    reference.calc = AseEMT()
    opt = AseLBFGS(FrechetCellFilter(reference), logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    assert results[1].steps == opt.nsteps and results[1].spacegroup_initial == ""
    assert np.abs(results[1].atoms.positions - reference.positions).max() <= TOL


def test_tables_factor_the_group_of_a_supercell():
    """A 3x3x3 fcc supercell: 1296 operations become 48 point operations and 27-atom-free classes."""
    atoms = bulk("Cu", "fcc", a=3.6) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        constraint = FixSymmetry(atoms)
    tables = tables_of(constraint, len(atoms))
    assert tables.operations == 48 * 27 and len(tables.rotations) == 48
    assert (tables.class_size == 27).all() and set(tables.klass.tolist()) == {0}
    assert space_group(atoms) == "Fm-3m (225)"


def test_structure_without_symmetry_dataset_is_invalid_alone():
    """spglib finds nothing for a cell of zero volume: that structure is invalid, the others relax."""
    molecule = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]])  # no cell at all
    good = bulk("Cu", "fcc", a=3.7)
    results = relax([molecule, good], EMT, fmax=FMAX, fix_symmetry=True)
    assert results[0].status == "invalid" and "symmetry" in results[0].reason
    assert results[1].status == "converged"


def test_symmetrized_forces_and_stress_equal_ase_on_a_supercell_with_a_vacancy():
    """The factored average (point operations, then translation classes) against ASE's sum over
    all 384 operations, on arbitrary vectors and tensors, in a batch with a system without symmetry."""
    import jax.numpy as jnp

    from kups_relax.batch import Batch
    from kups_relax.symmetry import symmetrize_rank2, symmetrize_vectors
    from ase.spacegroup.symmetrize import symmetrize_rank1, symmetrize_rank2 as ase_rank2

    crystal = bulk("Cu", "fcc", a=3.6, cubic=True) * 2
    del crystal[5]
    crystal.set_cell(crystal.cell.array @ np.array([[1.0, 0.02, 0], [0, 1, 0], [0, 0, 1]]), scale_atoms=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crystal.set_constraint(FixSymmetry(crystal))
    other = bulk("Au", "fcc", a=4.1) * (2, 1, 1)
    batch = Batch.from_atoms([other, crystal])
    g = batch.geometry
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=g.positions.shape) * np.asarray(g.atom_mask)[:, None]
    tensor = rng.normal(size=(g.n_systems, 3, 3))
    out = np.asarray(symmetrize_vectors(jnp.asarray(vectors), g, g.cell, jnp.ones(g.n_systems, bool)))
    rows = batch.atom_slice(1)
    c = crystal.constraints[0]
    cell = crystal.cell.array
    expected = symmetrize_rank1(cell, np.linalg.inv(cell), vectors[rows], c.rotations, c.translations, c.symm_map)
    assert np.abs(out[rows] - expected).max() <= 1e-12
    assert np.array_equal(out[batch.atom_slice(0)], vectors[batch.atom_slice(0)])  # no symmetry: unchanged
    sym = np.asarray(symmetrize_rank2(jnp.asarray(tensor), g, g.cell, jnp.ones(g.n_systems, bool)))
    assert np.abs(sym[1] - ase_rank2(cell, np.linalg.inv(cell), tensor[1], c.rotations)).max() <= 1e-12
    assert np.array_equal(sym[0], tensor[0])


# --- ASE's own FixSymmetry tests (ase.test.constraints.test_fix_symmetry), on the engine -------------

def _ase_fix_symmetry_tests():
    import importlib

    return importlib.import_module("ase.test.constraints.test_fix_symmetry")


@pytest.mark.parametrize("cell", ["unit", "frechet"])
def test_ase_sym_adj_cell_and_rotated_on_the_engine(cell):
    """ASE's test_sym_adj_cell / test_no_symmetrization on ASE's own cells (bcc Al, upright and
    rotated; ``setup_cell`` imported from ase.test), with our LJ and L-BFGS instead of ASE's noisy
    LJ and PreconLBFGS: symmetry noise comes from a 1e-3 Å rattle instead (within symprec).
    With FixSymmetry the final group (at 1e-6) contains the initial Im-3m; without, it does not."""
    from ase.spacegroup.symmetrize import is_subgroup

    from potentials import LennardJones

    ase_tests = _ase_fix_symmetry_tests()
    at_init, at_rot = ase_tests.setup_cell()
    lj = LennardJones(sigma=1.0, epsilon=1.0)  # ASE's LennardJones() defaults
    starts, groups = [], []
    for start in (at_init, at_rot):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert check_symmetry(start, 1.0e-6).number == 229
        noisy = start.copy()
        noisy.rattle(1e-3, seed=7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the rattle moves the origin of the refined structure: compare with the group there
            groups.append(check_symmetry(fix_symmetry(noisy), 1.0e-6))
        assert groups[-1].number == 229
        starts.append(noisy)
    with_sym = relax(starts, lj, fmax=0.001, max_steps=300, cell_filter=cell, fix_symmetry=True)
    without = relax(starts, lj, fmax=0.001, max_steps=300, cell_filter=cell)
    for di, kept, free in zip(groups, with_sym, without):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert is_subgroup(sub_data=di, sup_data=check_symmetry(kept.atoms, 1.0e-6))
            assert not is_subgroup(sub_data=di, sup_data=check_symmetry(free.atoms, 1.0e-6))
        assert kept.spacegroup_final.endswith("(229)")


def test_ase_as_dict_constraint_survives_relaxation():
    """ASE's test_as_dict: the relaxed structure keeps the FixSymmetry constraint with its settings."""
    atoms = bulk("Cu", a=3.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atoms.set_constraint(FixSymmetry(atoms))
    result = relax([atoms], EMT, fmax=FMAX, cell_filter="frechet")[0]
    kwargs = result.atoms.constraints[0].todict()["kwargs"]
    assert kwargs["symprec"] == 0.01 and kwargs["adjust_positions"] and kwargs["adjust_cell"]


# --- the ways in: relax_iter, the ASE drop-ins, relax-batch --------------------------------------------

def test_relax_iter_needs_fix_symmetry_for_constrained_inputs():
    atoms = bulk("Cu", a=3.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atoms.set_constraint(FixSymmetry(atoms))
    from kups_relax import relax_iter

    [(_, refused)] = list(relax_iter([atoms], EMT, fmax=FMAX))
    assert refused.status == "invalid" and "fix_symmetry=True" in refused.reason
    [(_, result)] = list(relax_iter([atoms], EMT, fmax=FMAX, fix_symmetry=True, cell_filter="frechet"))
    reference, steps, before, after = ase_relax(bulk("Cu", a=3.7))
    check_same(result, reference, steps, before, after, "relax_iter")


def test_ase_drop_ins_honour_fix_symmetry():
    """``kups_relax.ase.LBFGS`` on Atoms with FixSymmetry (positions, in the jitted loop) and
    ``relax_many`` on FrechetCellFilters: ASE's steps and geometry."""
    from kups_relax.ase import LBFGS, Calculator, relax_many

    structures = parity_set()
    atoms = structures[2][1].copy()  # Cu vacancy supercell
    atoms.rattle(0.02, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atoms.set_constraint(FixSymmetry(atoms))
    ours = atoms.copy()
    ours.calc = Calculator(EMT)
    opt = LBFGS(ours, logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    ref = atoms.copy()
    ref.calc = AseEMT()
    ase_opt = AseLBFGS(ref, logfile=None)
    ase_opt.run(fmax=FMAX, steps=MAX_STEPS)
    assert opt.nsteps == ase_opt.nsteps
    assert np.abs(ours.positions - ref.positions).max() <= TOL

    picks = [structures[i][1].copy() for i in (4, 7)]
    filters = []
    for a in picks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a.set_constraint(FixSymmetry(a))
        a.calc = Calculator(EMT)
        filters.append(FrechetCellFilter(a))
    assert relax_many(filters, fmax=FMAX, steps=MAX_STEPS) == [True, True]
    for a, (name, original) in zip(picks, [structures[4], structures[7]]):
        reference, _, _, _ = ase_relax(original)
        assert np.abs(a.cell.array - reference.cell.array).max() <= TOL, name
        assert np.abs(a.positions - reference.positions).max() <= TOL, name


def test_relax_batch_fix_symmetry_writes_space_groups(tmp_path):
    import csv
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ase.io import write

    from kups_relax.io import read_parameters

    structures = parity_set()
    for k in (4, 7, 15):
        write(tmp_path / f"{structures[k][0]}.xyz", structures[k][1], format="extxyz")
    script = shutil.which("relax-batch") or str(Path(sys.executable).parent / "relax-batch")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([script, *sorted(tmp_path.glob("*.xyz")), "--potential", "emt", "--fix-symmetry",
                           "--cell", "frechet", "--fmax", str(FMAX), "--out", tmp_path / "out"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    for k in (4, 7, 15):
        name, atoms = structures[k]
        reference, steps, before, after = ase_relax(atoms)
        assert int(rows[name]["steps"]) == steps
        assert rows[name]["spacegroup_initial"] == _group(before)
        assert rows[name]["spacegroup_final"] == _group(after)
        params = read_parameters(tmp_path / "out" / f"{name}.h5")
        assert params["spacegroup_final"] == _group(after)
        assert "fix_symmetry" in params["settings"]


def test_optax_optimizer_keeps_the_space_group():
    """An optax optimizer (no ASE counterpart to match step by step) with FixSymmetry on a broken
    input: it converges, and the relaxed crystal has the space group ASE's FixSymmetry run ends in."""
    structures = parity_set()
    picks = [structures[i] for i in (7, 17)]  # L1_0 CuAu; Cu broken beyond symprec (Pm)
    results = relax([a for _, a in picks], EMT, fmax=0.05, max_steps=2000, optimizer="optax:adam(learning_rate=0.005)",
                    fix_symmetry=True, names=[n for n, _ in picks])
    for (name, atoms), result in zip(picks, results):
        _, _, before, after = ase_relax(atoms, cell=None)  # positions only, as here
        assert result.status == "converged", (name, result.reason)
        assert result.spacegroup_initial == _group(before), name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refined = check_symmetry(fix_symmetry(atoms), SYMPREC)
            final = check_symmetry(result.atoms, SYMPREC)
        # every operation of the refined input survives (Adam may end in another, higher group than
        # ASE's LBFGS path: the broken Cu ends in Pmn2_1 here, in Fm-3m with LBFGS)
        assert len(final.rotations) >= len(refined.rotations) and final.number >= refined.number, name
        if name == "cuau-l10":
            assert result.spacegroup_final == _group(after), name

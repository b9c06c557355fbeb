"""Constraints read from the input Atoms, applied as ASE applies them, written back out (issue 7, item 3).

ASE's own ``adjust_forces``/``adjust_positions`` are the reference for the projections;
ASE's LBFGS with ASE's EMT on the constrained structures is the reference for whole
relaxations (all cases in one ``relax`` call). Variable-cell runs with constraints are in
``test_cell_filter.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT as AseEMT
from ase.cluster import Icosahedron
from ase.constraints import FixAtoms, FixBondLengths, FixCartesian, FixCom, FixedLine, FixedPlane
from ase.optimize import LBFGS as AseLBFGS

from kups_relax import relax
from kups_relax.batch import Batch
from kups_relax.constraints import adjust_forces, adjust_step, constraint_arrays
from potentials import get_potential

FMAX = 0.01
EMT = get_potential("emt")


def constrained() -> list[tuple[str, Atoms]]:
    out = []
    a = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    a.rattle(0.05, seed=1)
    a.set_constraint(FixAtoms(mask=a.positions[:, 2] < a.positions[:, 2].min() + 0.5))
    out.append(("slab-fixatoms", a))
    a = Icosahedron("Au", 2)
    a.rattle(0.08, seed=2)
    a.set_constraint(FixCartesian([0, 3, 5], mask=(True, False, True)))
    out.append(("cluster-fixcartesian", a))
    a = Icosahedron("Ni", 2)
    a.rattle(0.08, seed=3)
    a.set_constraint([FixedLine([1, 2], direction=[1, 1, 0]), FixedPlane([4, 7], direction=[0, 1, 2])])
    out.append(("cluster-line-plane", a))
    a = bulk("Ag", "fcc", a=4.0, cubic=True) * (2, 1, 1)
    a.set_chemical_symbols(["Ag", "Pd"] * 4)
    a.rattle(0.1, seed=4)
    a.set_constraint(FixCom())
    out.append(("agpd-fixcom", a))
    a = bulk("Cu", "fcc", a=3.65, cubic=True) * (2, 1, 1)
    a.rattle(0.1, seed=5)
    # two constraints on one atom compose in order, FixCom acts after them (as in ASE)
    a.set_constraint([FixedPlane([0, 1], direction=[0, 0, 1]), FixCartesian([1], mask=(True, False, False)),
                      FixCom()])
    out.append(("cluster-combined", a))
    a = Icosahedron("Pt", 2)
    a.rattle(0.05, seed=6)
    out.append(("free-cluster", a))
    return out


@pytest.mark.parametrize("index", range(5))
def test_projections_match_ase(index):
    """Our force and step adjustments equal ASE's adjust_forces/adjust_positions, to rounding."""
    name, atoms = constrained()[index]
    rng = np.random.default_rng(index)
    forces = rng.normal(size=(len(atoms), 3))
    new = atoms.positions + 0.1 * rng.normal(size=(len(atoms), 3))
    ref_forces = forces.copy()
    ref_new = new.copy()
    for c in atoms.constraints:
        c.adjust_forces(atoms, ref_forces)
        c.adjust_positions(atoms, ref_new)
    g = Batch.from_atoms([atoms]).geometry
    A = g.n_atom_rows
    pad = lambda x: jnp.zeros((A, 3)).at[: len(atoms)].set(x)  # noqa: E731
    ours_f = np.asarray(adjust_forces(pad(forces), g))[: len(atoms)]
    ours_step = np.asarray(adjust_step(pad(new - atoms.positions), g))[: len(atoms)]
    np.testing.assert_allclose(ours_f, ref_forces, rtol=0, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(atoms.positions + ours_step, ref_new, rtol=0, atol=1e-13, err_msg=name)


def test_lbfgs_with_constraints_matches_ase():
    named = constrained()
    results = relax([a for _, a in named], EMT, fmax=FMAX, max_steps=300, names=[n for n, _ in named])
    for (name, atoms), res in zip(named, results):
        ref = atoms.copy()
        ref.calc = AseEMT()
        opt = AseLBFGS(ref, logfile=None)
        opt.run(fmax=FMAX, steps=300)
        assert res.status == "converged", (name, res.reason)
        assert res.steps == opt.nsteps, (name, res.steps, opt.nsteps)
        np.testing.assert_allclose(res.atoms.positions, ref.positions, rtol=0, atol=1e-8, err_msg=name)
        assert abs(res.energy - ref.get_potential_energy()) < 1e-8, name
        # fixed degrees of freedom did not move; constraints are written back out
        assert [type(c) for c in res.atoms.constraints] == [type(c) for c in atoms.constraints], name
        projection, fix_com = constraint_arrays(atoms, name)
        step = res.atoms.positions - atoms.positions
        if not fix_com:
            np.testing.assert_allclose(np.einsum("aij,aj->ai", projection, step), step, atol=1e-12, err_msg=name)
        else:
            masses = atoms.get_masses()
            np.testing.assert_allclose(masses @ step, 0.0, atol=1e-10, err_msg=name)
        assert res.fmax < FMAX


def test_unsupported_constraints_are_refused_by_name():
    a = Icosahedron("Cu", 2)
    a.set_constraint(FixBondLengths([[0, 1]]))
    b = Icosahedron("Cu", 2)
    b.set_constraint([FixCom(), FixAtoms([0])])
    with pytest.raises(ValueError, match="'bonded'.*FixBondLengths"):
        constraint_arrays(a, "bonded")
    results = relax([a, b], EMT, names=["bonded", "com-first"], max_steps=0)
    assert results[0].status == "invalid" and "FixBondLengths" in results[0].reason
    assert results[1].status == "invalid" and "FixCom must be the last" in results[1].reason

"""ASE's PreconLBFGS (Exp preconditioner, Armijo line search) in the batched loop (issue 17), against ASE.

Every structure of the parity set (tests/precon_structures.py: 25 structures of 55 to 1,370
atoms; bulk with vacancies, an interstitial, ordered and random alloys, slabs with and
without FixAtoms, clusters; EMT and LJ) is relaxed by ASE's
``PreconLBFGS(atoms, precon=Exp(), logfile=None)`` one at a time, and by the engine with all
structures of a potential in one ``relax(..., optimizer=precon_lbfgs(precon="Exp"))`` batch:
the same number of steps, the same number of force evaluations, positions within 1e-6 Å.

Evaluations: ASE's count less the ones it repeats (tests/ase_precon.py explains why: when Exp
estimates mu, ASE evaluates the starting geometry twice, the engine once).

ASE's own precon tests (ase.test.precon.*, ase.test.test_linesearch_maxstep,
ase.test.optimize.test_optimizers), where they exercise positions-only Exp + Armijo and
FixAtoms, run at the end against the engine (variable cell, FF/C1/Pfrommer preconditioners,
FixBondLength and the Wolfe line search are not claimed).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT as AseEMT
from ase.constraints import FixAtoms

from ase_precon import ase_lbfgs, ase_precon_lbfgs
from kups_relax import relax
from potentials import LennardJones, get_potential
from precon_structures import parity_structures
from structures import LJ_PARAMS

MAX_STEPS = 1000
TOL = 1e-6  # Å, the issue's bound
STRUCTURES = parity_structures()
NAMES = [s.name for s in STRUCTURES]


def engine_potential(kind: str):
    return {"emt": get_potential("emt"), "lj": LennardJones(**LJ_PARAMS)}[kind]


def exp_lbfgs(**kwargs):
    from kups_relax.transforms import precon_lbfgs

    return precon_lbfgs(**{"precon": "Exp", **kwargs})


@pytest.fixture(scope="module")
def ase_reference():
    """ASE's PreconLBFGS(precon=Exp()) on every structure, one at a time (~30-40 s on 2 cores)."""
    return {s.name: ase_precon_lbfgs(s.atoms, s.kind, fmax=s.fmax, steps=MAX_STEPS) for s in STRUCTURES}


def au_rattled():
    """ase.test.optimize.test_optimizers' structure: Au bulk x (2, 2, 2) rattled by 0.1 Å (seed 7)."""
    atoms = bulk("Au") * (2, 2, 2)
    atoms.rattle(stdev=0.1, seed=7)
    return atoms


@pytest.fixture(scope="module")
def engine_results():
    """One relax() per potential kind, every structure of that kind in the batch (the EMT batch
    also holds ASE's test_optimizers structure, "au-rattled-2x2x2", to share its programs)."""
    out = {}
    for kind in ("emt", "lj"):
        picks = [(s.name, s.atoms, s.fmax) for s in STRUCTURES if s.kind == kind]
        if kind == "emt":
            picks.append(("au-rattled-2x2x2", au_rattled(), 0.01))
        results = relax([a for _, a, _ in picks], engine_potential(kind), fmax=[f for _, _, f in picks],
                        max_steps=MAX_STEPS, optimizer=exp_lbfgs(), names=[n for n, _, _ in picks])
        out.update({name: r for (name, _, _), r in zip(picks, results)})
    return out


def cu_squeezed():
    """ase.test.precon.test_lbfgs' 4-atom cubic Cu cell, squeezed 0.5 % along x."""
    atoms = bulk("Cu", cubic=True)
    s = atoms.get_scaled_positions()
    s[:, 0] *= 0.995
    atoms.set_scaled_positions(s)
    return atoms


def cu_fixed():
    """ase.test.precon.test_lbfgs' constrained case with FixAtoms only: a rattled 8-atom Cu cell
    (rattle's default seed, 42), one bond stretched by 20 %, atoms 2 and 3 fixed; and the cell
    before the stretch."""
    cu0 = bulk("Cu") * (2, 2, 2)
    cu0.rattle(0.01)
    cu = cu0.copy()
    cu.set_distance(0, 1, cu0.get_distance(0, 1) * 1.2)
    cu.set_constraint(FixAtoms([2, 3]))
    return cu, cu0


GIVEN_MU = ("pd-compressed-vacancies-4x4x4", "au-fcc111-fixed")


@pytest.fixture(scope="module")
def given_mu_results():
    """``mu = 1.0`` given (ASE's own precon tests use it): their two structures (fmax 1e-4 and
    1e-3, as there) and two of the parity set, in one batch."""
    picks = [("cu-squeezed", cu_squeezed(), 1e-4), ("cu-fixed", cu_fixed()[0], 1e-3)]
    picks += [(s.name, s.atoms, 0.01) for s in STRUCTURES if s.name in GIVEN_MU]
    results = relax([a for _, a, _ in picks], engine_potential("emt"), fmax=[f for _, _, f in picks],
                    max_steps=MAX_STEPS, optimizer=exp_lbfgs(mu=1.0), names=[n for n, _, _ in picks])
    return {name: (atoms, fmax, r) for (name, atoms, fmax), r in zip(picks, results)}


def test_parity_set_spans_the_issue(ase_reference):
    """>= 20 structures of 50-2,000 atoms, bulk/slab/cluster/alloy kinds, EMT and LJ, FixAtoms,
    mu estimated both below 1 (ASE takes 1) and above; ASE converges on all of them."""
    assert len(STRUCTURES) >= 20
    assert all(50 <= len(s.atoms) <= 2000 for s in STRUCTURES)
    assert {s.kind for s in STRUCTURES} == {"emt", "lj"}
    for word in ("vacancy", "vacancies", "interstitial", "fcc111", "fcc100", "icosahedron", "octahedron", "random",
                 "l12"):
        assert any(word in s.name for s in STRUCTURES), word
    assert sum(any(isinstance(c, FixAtoms) for c in s.atoms.constraints) for s in STRUCTURES) >= 3
    assert sum(not s.atoms.pbc.any() for s in STRUCTURES) >= 4
    assert all(run.converged for run in ase_reference.values())
    estimates = [run.mu_estimate for run in ase_reference.values()]
    assert min(estimates) < 1.0 < max(estimates)


def test_ase_evaluates_the_start_twice_and_nothing_else(ase_reference):
    """What the evaluation parity rests on: with mu estimated, ASE's only repeat is its third
    evaluation (the start again, after the perturbed geometry of estimate_mu); every other
    evaluation is at a new geometry: the start, the perturbed start, then one per line-search
    trial. The Exp matrix is assembled once, at the start (no step moves an atom r_NN / 2)."""
    for name, run in ase_reference.items():
        assert run.repeated == [2], (name, run.repeated)
        assert run.precon_builds == 1, name
        assert run.distinct_evaluations >= run.steps + 2, name  # + backtracking trials
        assert run.hessian_resets == 0, name


@pytest.mark.parametrize("name", NAMES)
def test_precon_lbfgs_matches_ase(ase_reference, engine_results, name):
    ref, result = ase_reference[name], engine_results[name]
    assert result.status == "converged", (name, result.status, result.reason)
    assert result.steps == ref.steps, (name, result.steps, ref.steps)
    assert result.n_evaluations == ref.distinct_evaluations, (name, result.n_evaluations, ref.distinct_evaluations,
                                                              ref.evaluations)
    dpos = np.abs(result.atoms.positions - ref.atoms.positions).max()
    assert dpos <= TOL, (name, dpos)
    assert abs(result.energy - ref.energy) <= 1e-6 * max(1.0, len(ref.atoms)), name


def test_fewer_evaluations_than_plain_lbfgs_on_the_metals(ase_reference, engine_results):
    """Not parity, the point of it: on the EMT bulk, slabs and clusters (bar the interstitial,
    where ASE's PreconLBFGS also needs more), the engine's precon_lbfgs needs fewer force
    evaluations than ASE's plain LBFGS: at least 1.4x fewer on every one, ~2x in all."""
    ours = theirs = 0
    for s in STRUCTURES:
        if s.kind != "emt" or "interstitial" in s.name:
            continue
        plain = ase_lbfgs(s.atoms, s.kind, fmax=s.fmax, steps=MAX_STEPS)
        n = engine_results[s.name].n_evaluations
        assert plain.evaluations >= 1.4 * n, (s.name, plain.evaluations, n)
        ours, theirs = ours + n, theirs + plain.evaluations
    assert theirs >= 1.8 * ours, (theirs, ours)


# --- ASE's default precon="auto" and a given mu ------------------------------------------------------


def test_auto_precon_is_exp_from_100_atoms_as_ase():
    """ASE's default ``precon="auto"``: Exp for >= 100 atoms, none below. Below, ASE's
    ``make_precon(None)`` gives an ``IdentityPrecon``, so the two-loop's initial inverse Hessian
    is the identity (1 Å²/eV), not ``1/alpha``: ASE's ``alpha`` never takes effect (its
    ``H0 = 1/alpha`` branch needs ``self.precon is None``, which make_precon never returns).
    A batch of both sizes against ``PreconLBFGS(atoms)`` with ASE's default."""
    from ase.optimize.precon import PreconLBFGS

    from kups_relax.transforms import precon_lbfgs

    emt = [s for s in STRUCTURES if s.kind == "emt"]
    picks = [min((s for s in emt if len(s.atoms) >= 100), key=lambda s: len(s.atoms)),
             min((s for s in emt if len(s.atoms) < 100), key=lambda s: len(s.atoms))]
    results = relax([s.atoms for s in picks], engine_potential("emt"), fmax=0.01, max_steps=MAX_STEPS,
                    optimizer=precon_lbfgs(), names=[s.name for s in picks])
    for s, result in zip(picks, results):
        atoms = s.atoms.copy()
        atoms.calc = AseEMT()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The system is likely too small ..."
            opt = PreconLBFGS(atoms, logfile=None)
        opt.run(fmax=0.01, steps=MAX_STEPS)
        assert result.steps == opt.nsteps, (s.name, len(atoms), result.steps, opt.nsteps)
        assert np.abs(result.atoms.positions - atoms.positions).max() <= TOL, s.name


def test_given_mu_needs_no_extra_evaluation(given_mu_results):
    """With ``mu`` given, neither ASE nor the engine evaluates a perturbed geometry: ASE repeats
    nothing, and the evaluation counts are equal as they stand."""
    for name in GIVEN_MU:
        atoms, fmax, result = given_mu_results[name]
        ref = ase_precon_lbfgs(atoms, "emt", fmax=fmax, steps=MAX_STEPS, mu=1.0)
        assert ref.repeated == [] and ref.mu == 1.0
        assert (result.steps, result.n_evaluations) == (ref.steps, ref.evaluations), name
        assert np.abs(result.atoms.positions - ref.atoms.positions).max() <= TOL, name


# --- ASE's own precon tests, on the engine -------------------------------------------------------------


def test_ase_preconlbfgs_cu_cubic_on_the_engine(given_mu_results):
    """ase.test.precon.test_lbfgs::test_preconlbfgs, its Exp(A=3, mu=1.0) + Armijo case: a
    4-atom cubic Cu cell (r_cut = 2 r_NN reaches several images of every atom: ASE sums them
    and drops an atom's pairs with its own images), squeezed 0.5 % along x, EMT, fmax 1e-4: the
    energy ASE's test expects, and ASE's steps and positions."""
    atoms, fmax, result = given_mu_results["cu-squeezed"]
    ref = ase_precon_lbfgs(atoms, "emt", fmax=fmax, steps=MAX_STEPS, A=3.0, mu=1.0)
    assert result.status == "converged"
    assert abs(result.energy - -0.022726045433998365) < 1e-4  # ASE's test
    assert (result.steps, result.n_evaluations) == (ref.steps, ref.evaluations)
    assert np.abs(result.atoms.positions - ref.atoms.positions).max() <= TOL


def test_ase_preconlbfgs_fixed_atoms_on_the_engine(given_mu_results):
    """ase.test.precon.test_lbfgs::test_preconlbfgs, its constrained case with FixAtoms only
    (FixBondLength is not supported by the engine), Exp(mu=1.0), fmax 1e-3: the fixed atoms
    stay (ASE's assertion) and the run is ASE's."""
    atoms, fmax, result = given_mu_results["cu-fixed"]
    cu0 = cu_fixed()[1]
    ref = ase_precon_lbfgs(atoms, "emt", fmax=fmax, steps=MAX_STEPS, mu=1.0)
    assert result.status == "converged"
    for k in (2, 3):
        assert np.all(abs(result.atoms.positions[k] - cu0.positions[k]) < 1e-3)  # ASE's test
    assert (result.steps, result.n_evaluations) == (ref.steps, ref.evaluations)
    assert np.abs(result.atoms.positions - ref.atoms.positions).max() <= TOL


def test_ase_linesearch_maxstep_on_the_engine():
    """ase.test.test_linesearch_maxstep, PreconLBFGS_Armijo: ASE's Pt13 cluster (positions
    imported from ASE's test), Exp(A=3), maxstep 0.2, one step: no atom moves further than
    maxstep, and the step is ASE's."""
    from ase import Atoms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ASE's test module's own pytest marks
        from ase.test import test_linesearch_maxstep as ase_test
    positions = ase_test.positions.__wrapped__()  # ASE's fixture, as a plain function
    atoms = Atoms("Pt13", positions=positions, cell=[15] * 3)
    result = relax([atoms], engine_potential("emt"), fmax=0.05, max_steps=1,
                   optimizer=exp_lbfgs(A=3.0, maxstep=0.2))[0]
    ref = ase_precon_lbfgs(atoms, "emt", fmax=0.05, steps=1, maxstep=0.2, A=3.0)
    assert result.steps == ref.steps == 1
    longest = np.linalg.norm(result.atoms.positions - positions, axis=1).max()
    assert longest < 0.2 + 1e-8  # ASE's test
    assert np.abs(result.atoms.positions - ref.atoms.positions).max() <= TOL


def test_ase_optimizers_test_with_exp_on_the_engine(engine_results):
    """ase.test.optimize.test_optimizers::test_optimize for PreconLBFGS (ASE runs it with
    precon=None; here with Exp, what the engine claims): Au bulk x (2, 2, 2) rattled by 0.1 Å
    (seed 7), EMT, fmax 0.01: converged, within 1.75e-5 eV/atom of the crystal's energy
    (ASE's bound), and ASE's run."""
    ref_atoms = bulk("Au")
    ref_atoms.calc = AseEMT()
    atoms = au_rattled()
    result = engine_results["au-rattled-2x2x2"]
    assert result.status == "converged"
    assert result.fmax < 0.01
    e_err = abs(result.energy * len(ref_atoms) / len(atoms) - ref_atoms.get_potential_energy())
    assert e_err < 1.75e-5
    ref = ase_precon_lbfgs(atoms, "emt", fmax=0.01, steps=MAX_STEPS)
    assert (result.steps, result.n_evaluations) == (ref.steps, ref.distinct_evaluations)
    assert np.abs(result.atoms.positions - ref.atoms.positions).max() <= TOL


def test_ase_drop_in_preconlbfgs():
    """``kups_relax.ase.PreconLBFGS(atoms, precon="Exp")`` with the engine's calculator: ASE's
    nsteps and positions (on a slab with FixAtoms)."""
    from kups_relax.ase import Calculator, PreconLBFGS

    for s in [s for s in STRUCTURES if s.name == "cu-fcc111-fixed"]:
        ours = s.atoms.copy()
        ours.calc = Calculator(engine_potential(s.kind))
        opt = PreconLBFGS(ours, precon="Exp", logfile=None)
        assert opt.run(fmax=s.fmax, steps=MAX_STEPS)
        ref = ase_precon_lbfgs(s.atoms, s.kind, fmax=s.fmax, steps=MAX_STEPS)
        assert opt.nsteps == ref.steps, s.name
        assert np.abs(ours.positions - ref.atoms.positions).max() <= TOL, s.name


# --- the stream, and what the engine refuses -------------------------------------------------------


def test_stream_with_refills_and_compaction_follows_ase(ase_reference):
    """``relax_iter`` through slots that are refilled (the Exp tables and mu of each newcomer,
    its evaluation counter from 1) and compacted: ASE's steps, evaluations and positions for
    each of five structures, two of which share a slot one after the other."""
    from kups_relax import relax_iter

    picks = sorted([s for s in STRUCTURES if s.kind == "emt"], key=lambda s: len(s.atoms))[:5]
    stream = relax_iter([(s.name, s.atoms) for s in picks], engine_potential("emt"), fmax=0.01, max_steps=MAX_STEPS,
                        optimizer=exp_lbfgs(), atoms_per_batch=256, chunk_steps=4)
    got = {picks[i].name: r for i, r in stream}
    for s in picks:
        ref = ase_reference[s.name]  # ASE's run of this structure at its fmax
        assert s.fmax == 0.01
        result = got[s.name]
        assert (result.steps, result.n_evaluations) == (ref.steps, ref.distinct_evaluations), s.name
        assert np.abs(result.atoms.positions - ref.atoms.positions).max() <= TOL, s.name


def test_what_precon_lbfgs_refuses():
    """Cell filters and FixSymmetry: a clear error before anything runs (positions only, as
    claimed). A structure whose atoms ``maxstep`` could move by r_NN / 2 in one step (where ASE
    would rebuild its matrix), or without a cell to estimate r_NN in: that structure is
    invalid, named, with the reason; the others relax."""
    from ase import Atoms

    emt = engine_potential("emt")
    atoms = bulk("Cu", cubic=True)
    with pytest.raises(ValueError, match="positions only.*cell filters"):
        relax([atoms], emt, optimizer=exp_lbfgs(), cell_filter="frechet")
    with pytest.raises(ValueError, match="FixSymmetry"):
        relax([atoms], emt, optimizer=exp_lbfgs(), fix_symmetry=True)
    no_cell = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    results = relax([atoms, no_cell], emt, optimizer=exp_lbfgs(maxstep=0.7), names=["cu", "no-cell"])
    assert [r.status for r in results] == ["invalid", "invalid"]
    # r_NN 2.55 Å: a step of up to 2 x 0.7 Å can reach r_NN / 2
    assert "maxstep 0.7" in results[0].reason and "rebuilds the Exp preconditioner" in results[0].reason
    assert "cell" in results[1].reason and "r_NN" in results[1].reason

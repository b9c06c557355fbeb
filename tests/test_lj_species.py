"""Per-species-pair Lennard-Jones: one species equals ASE's scalar LJ; mixtures equal a numpy pair sum."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.calculators.lj import LennardJones as AseLJ
from ase.data import chemical_symbols

from kups_relax import InvalidStructure, check_structure
from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from pairsum import assert_matches, pair_sum
from potentials import LennardJones
from structures import LJ_PARAMS, lj_structures

SIGMA = {"Ar": 3.40, "Kr": 3.65, "Ne": 2.75}
EPSILON = {"Ar": 0.0104, "Kr": 0.0140, "Ne": 0.0031}
EXPLICIT = {("Kr", "Ar"): dict(sigma=3.55, epsilon=0.0118, rc=9.0)}

_evaluate = jax.jit(evaluate)


@pytest.fixture(scope="module")
def structures():
    return [a for _, a in lj_structures()][::2]


@pytest.fixture(scope="module")
def alloys(structures):
    rng = np.random.default_rng(5)
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.set_chemical_symbols(rng.choice(list(SIGMA), size=len(atoms)).tolist())
        out.append(atoms)
    return out


def _evaluate_all(potential, structures):
    batch = Batch.from_atoms(structures)
    ev = _evaluate(potential, batch.geometry, nl.allocate(batch.geometry, potential.cutoff, 0.3))
    return batch, [np.asarray(x) for x in ev]


def _ase(atoms, **params):
    atoms = atoms.copy()
    atoms.calc = AseLJ(**params)
    stress = atoms.get_stress(voigt=False) if atoms.cell.rank == 3 else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def _pair_parameters(za, zb, mixing):
    a, b = chemical_symbols[za], chemical_symbols[zb]
    if mixing == "lorentz-berthelot":
        p = dict(sigma=0.5 * (SIGMA[a] + SIGMA[b]), epsilon=np.sqrt(EPSILON[a] * EPSILON[b]))
    else:
        p = dict(sigma=np.sqrt(SIGMA[a] * SIGMA[b]), epsilon=np.sqrt(EPSILON[a] * EPSILON[b]))
    p.update(EXPLICIT.get((a, b), EXPLICIT.get((b, a), {})))
    p.setdefault("rc", 3 * p["sigma"])  # ASE's default, per pair
    p.setdefault("ro", 0.66 * p["rc"])
    return p


def _numpy_lj(mixing, smooth):
    def pair(d, zi, zj):
        table = {(a, b): _pair_parameters(a, b, mixing) for a in set(zi) for b in set(zj)}
        p = {name: np.array([table[(a, b)][name] for a, b in zip(zi, zj)]) for name in ("sigma", "epsilon", "rc", "ro")}
        sigma, epsilon, rc, ro = p["sigma"], p["epsilon"], p["rc"], p["ro"]
        inside = d <= rc
        u = 4 * epsilon * ((sigma / d) ** 12 - (sigma / d) ** 6)
        du = 4 * epsilon * (-12 * sigma ** 12 / d ** 13 + 6 * sigma ** 6 / d ** 7)
        if smooth:
            r2, rc2, ro2 = d * d, rc * rc, ro * ro
            between = (r2 > ro2) & (r2 < rc2)
            fc = np.where(r2 <= ro2, 1.0, np.where(between, (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3, 0))
            dfc_dr2 = np.where(between, 6 * (rc2 - r2) * (ro2 - r2) / (rc2 - ro2) ** 3, 0.0)
            u, du = u * fc, du * fc + u * dfc_dr2 * 2 * d
        else:
            u = u - 4 * epsilon * ((sigma / rc) ** 12 - (sigma / rc) ** 6)
        return np.where(inside, u, 0.0), np.where(inside, du, 0.0)

    return pair


@pytest.mark.parametrize("smooth", [False, True])
def test_one_species_table_equals_ase_scalar(structures, smooth):
    params = dict(LJ_PARAMS, smooth=smooth)
    potential = LennardJones.per_species(sigma={"Ar": LJ_PARAMS["sigma"]}, epsilon={"Ar": LJ_PARAMS["epsilon"]},
                                         rc=LJ_PARAMS["rc"], smooth=smooth)
    assert potential.supported_numbers == {18} and potential.cutoff == LJ_PARAMS["rc"]
    batch, results = _evaluate_all(potential, structures)
    assert_matches(batch, results, [_ase(a, **params) for a in structures], f"smooth={smooth}")


@pytest.mark.parametrize("mixing,smooth", [("lorentz-berthelot", False), ("lorentz-berthelot", True),
                                           ("geometric", False)])
def test_mixtures_match_numpy_pair_sum(alloys, mixing, smooth):
    potential = LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, pairs=EXPLICIT, mixing=mixing, smooth=smooth)
    assert potential.supported_numbers == {10, 18, 36}
    cutoff = max(3 * max(SIGMA.values()), EXPLICIT[("Kr", "Ar")]["rc"])
    assert potential.cutoff == pytest.approx(cutoff)
    batch, results = _evaluate_all(potential, alloys)
    assert np.abs(results[1]).max() > 1e-3
    assert_matches(batch, results, [pair_sum(a, cutoff, _numpy_lj(mixing, smooth)) for a in alloys], f"{mixing} {smooth}")


def test_uncovered_element_is_rejected(alloys):
    potential = LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON)
    xe = alloys[0].copy()
    xe.symbols[0] = "Xe"
    with pytest.raises(InvalidStructure, match="'with-Xe'.*Xe not covered"):
        check_structure(xe, "with-Xe", potential.supported_numbers)
    check_structure(alloys[0], "fine", potential.supported_numbers)


def test_scalar_potential_keeps_ase_semantics():
    lj = LennardJones(sigma=2.0)
    assert lj.pairs is None and lj.supported_numbers is None
    assert lj.rc == 6.0 and lj.ro == pytest.approx(0.66 * 6.0)


def test_per_species_errors():
    with pytest.raises(ValueError, match="unknown mixing rule"):
        LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, mixing="waldman-hagler")
    with pytest.raises(ValueError, match=r"no epsilon for the pair \(Ar, Kr\)"):
        LennardJones.per_species(sigma={"Ar": 3.4, "Kr": 3.6},
                                 pairs={("Ar", "Ar"): {"epsilon": 0.01}, ("Kr", "Kr"): {"epsilon": 0.01}})
    with pytest.raises(ValueError, match="given twice"):
        LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, pairs={("Ar", "Kr"): {"sigma": 3.5},
                                                                      ("Kr", "Ar"): {"sigma": 3.6}})
    with pytest.raises(ValueError, match="'Qq' is not a chemical symbol"):
        LennardJones.per_species(sigma={"Qq": 1.0}, epsilon=1.0)
    with pytest.raises(ValueError, match="at least one element"):
        LennardJones.per_species(sigma=3.4, epsilon=0.01)
    # configuration files write pairs as "A-B"
    from_config = LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, pairs={"Kr-Ar": EXPLICIT[("Kr", "Ar")]})
    np.testing.assert_array_equal(from_config.pairs.host("sigma"),
                                  LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, pairs=EXPLICIT).pairs.host("sigma"))

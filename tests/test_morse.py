"""Morse against ase.calculators.morse.MorsePotential, and per-species-pair Morse against a numpy pair sum."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.calculators.morse import MorsePotential as AseMorse

from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from pairsum import assert_matches, pair_sum
from potentials import MorsePotential
from structures import lj_structures

#: Argon-like Morse parameters: minimum near the LJ one, cutoff 2.7 * 3.8 = 10.26 Å.
AR = dict(epsilon=0.0104, r0=3.8, rho0=6.0)
SCALE = 1.0 / AR["r0"]  # structures scaled by this sit in the same places of ASE's default Morse (r0 = 1)

_evaluate = jax.jit(evaluate)


def _evaluate_all(potential, structures):
    batch = Batch.from_atoms(structures)
    ev = _evaluate(potential, batch.geometry, nl.allocate(batch.geometry, potential.cutoff, 0.3))
    return batch, [np.asarray(x) for x in ev]


def _ase(atoms, **params):
    atoms = atoms.copy()
    atoms.calc = AseMorse(**params)
    stress = atoms.get_stress(voigt=False) if atoms.cell.rank == 3 else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


@pytest.fixture(scope="module")
def structures():
    return [a for _, a in lj_structures()]


def _scaled(atoms, factor):
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell.array * factor)
    atoms.positions *= factor
    return atoms


def test_matches_ase_on_mixed_structures(structures):
    potential = MorsePotential(**AR)
    assert potential.cutoff == pytest.approx(2.7 * 3.8) and potential.supported_numbers is None
    batch, results = _evaluate_all(potential, structures)
    assert_matches(batch, results, [_ase(a, **AR) for a in structures], "Ar-like")
    assert np.abs(results[1]).max() > 1e-3  # non-trivial forces


def test_matches_ase_with_its_defaults(structures):
    """ASE's defaults (epsilon 1, r0 1, rho0 6, rcut 1.9..2.7) on the structures scaled to r0 = 1 Å."""
    scaled = [_scaled(a, SCALE) for a in structures]
    batch, results = _evaluate_all(MorsePotential(), scaled)
    assert_matches(batch, results, [_ase(a) for a in scaled], "defaults")


def test_matches_ase_with_other_parameters(structures):
    # same cutoff (a static of the neighbor list) and shapes as above: the compiled program is reused
    params = dict(epsilon=0.02, r0=3.6, rho0=4.5, rcut1=1.3, rcut2=2.7 * 3.8 / 3.6)
    batch, results = _evaluate_all(MorsePotential(**params), structures)
    assert_matches(batch, results, [_ase(a, **params) for a in structures], "other parameters")


# ----------------------------------------------------------------------------- per species

PER_ELEMENT = dict(epsilon={"Ar": 0.0104, "Kr": 0.0140, "Ne": 0.0031},
                   r0={"Ar": 3.8, "Kr": 4.0, "Ne": 3.1},
                   rho0={"Ar": 6.0, "Kr": 6.5, "Ne": 5.5},
                   rcut1={"Ar": 1.9, "Kr": 1.8, "Ne": 2.0},
                   rcut2=2.7)
EXPLICIT = {("Kr", "Ar"): dict(epsilon=0.012, r0=3.95, rcut1=1.7)}


def _pair_parameters(za, zb):
    """Lorentz-Berthelot as documented: epsilon geometric, the rest arithmetic; explicit pairs override."""
    from ase.data import chemical_symbols

    a, b = chemical_symbols[za], chemical_symbols[zb]
    p = {}
    for name, values in PER_ELEMENT.items():
        if isinstance(values, dict):
            p[name] = np.sqrt(values[a] * values[b]) if name == "epsilon" else 0.5 * (values[a] + values[b])
        else:
            p[name] = values
    p.update(EXPLICIT.get((a, b), EXPLICIT.get((b, a), {})))
    return p


def _numpy_morse(d, zi, zj):
    table = {(a, b): _pair_parameters(a, b) for a in set(zi) for b in set(zj)}
    p = {name: np.array([table[(a, b)][name] for a, b in zip(zi, zj)]) for name in PER_ELEMENT}
    r_on, r_off = p["rcut1"] * p["r0"], p["rcut2"] * p["r0"]
    x = np.exp(p["rho0"] * (1 - d / p["r0"]))
    v = p["epsilon"] * (x * x - 2 * x)
    dv = p["epsilon"] * (2 * x * x - 2 * x) * (-p["rho0"] / p["r0"])
    s = (r_off - d) / (r_off - r_on)
    middle = (s > 0) & (s < 1)
    fc = np.where(s >= 1, 1.0, np.where(middle, 10 * s ** 3 - 15 * s ** 4 + 6 * s ** 5, 0.0))
    dfc = np.where(middle, (30 * s ** 2 - 60 * s ** 3 + 30 * s ** 4) * (-1 / (r_off - r_on)), 0.0)
    return v * fc, dv * fc + v * dfc


def _alloyed(structures, symbols, seed):
    rng = np.random.default_rng(seed)
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.set_chemical_symbols(rng.choice(symbols, size=len(atoms)).tolist())
        out.append(atoms)
    return out


def test_per_species_pairs_match_numpy_pair_sum(structures):
    alloys = _alloyed(structures[::2], ["Ar", "Kr", "Ne"], seed=3)
    potential = MorsePotential.per_species(**PER_ELEMENT, pairs=EXPLICIT)
    assert potential.supported_numbers == {10, 18, 36}
    cutoff = max(2.7 * 4.0, 2.7 * 3.95)
    assert potential.cutoff == pytest.approx(cutoff)
    batch, results = _evaluate_all(potential, alloys)
    assert_matches(batch, results, [pair_sum(a, cutoff, _numpy_morse) for a in alloys], "per species")


def test_one_species_table_equals_ase_scalar(structures):
    params = {name: {"Ar": value} for name, value in dict(AR, rcut1=1.9, rcut2=2.7).items()}
    potential = MorsePotential.per_species(**params)
    batch, results = _evaluate_all(potential, structures)
    assert_matches(batch, results, [_ase(a, **AR) for a in structures], "one species")


def test_per_species_errors():
    with pytest.raises(ValueError, match="unknown mixing rule"):
        MorsePotential.per_species(epsilon={"Ar": 1.0}, mixing="harmonic")
    with pytest.raises(ValueError, match=r"no r0 for the pair \(Ar, Kr\)"):
        MorsePotential.per_species(epsilon={"Ar": 1.0, "Kr": 2.0}, r0=None, pairs={("Ar", "Ar"): {"r0": 3.0},
                                                                                  ("Kr", "Kr"): {"r0": 3.0}})
    with pytest.raises(ValueError, match="unknown parameter"):
        MorsePotential.per_species(epsilon={"Ar": 1.0}, pairs={("Ar", "Ar"): {"sigma": 3.0}})

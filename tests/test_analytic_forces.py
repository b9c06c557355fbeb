"""Analytic forces and stresses (``energy_forces``) against autodiff of the same ``energy``.

Every potential with an ``energy_forces`` method is evaluated both ways on one mixed batch
(clusters, a slab, a triclinic bulk cell, bulk cells smaller than the cutoff, a molecule-like
cluster without a cell; all rattled, species mixed where the potential has several) in
float64: forces and stresses agree to 1e-12 of every system's largest value, energies exactly
(both ways run the same code for them).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.cluster import Icosahedron, Octahedron

from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate, evaluate_autodiff
from potentials import EAM, LennardJones, MorsePotential
from potentials.emt import EMT
from test_eam import CUTOFF as EAM_CUTOFF
from test_eam import write_eam

#: Relative agreement required of forces and stresses (float64).
RTOL = 1e-12

EVALUATE = jax.jit(evaluate, static_argnames=("compute_stress",))
EVALUATE_AUTODIFF = jax.jit(evaluate_autodiff, static_argnames=("compute_stress",))


def mixed_structures(a: float, seed: int):
    """Every kind of structure, from the fcc lattice constant ``a`` (Å), rattled; all copper atoms
    (:func:`with_species` draws the species)."""
    rng = np.random.default_rng(seed)
    out = []

    def add(atoms, rattle=0.04 * a):
        atoms.rattle(rattle, seed=int(rng.integers(1 << 30)))
        out.append(atoms)

    add(Icosahedron("Cu", 3, latticeconstant=a))  # 55 atoms, no cell
    cluster = Octahedron("Cu", 3, latticeconstant=a)  # in a periodic box larger than the cutoff
    cluster.center(vacuum=1.5 * a)
    cluster.pbc = True
    add(cluster)
    add(fcc111("Cu", size=(2, 2, 3), a=a, vacuum=1.5 * a))  # pbc (True, True, False)
    triclinic = bulk("Cu", "fcc", a=a) * (2, 2, 2)
    triclinic.set_cell(triclinic.cell.array @ (np.eye(3) + rng.uniform(-0.06, 0.06, (3, 3))), scale_atoms=True)
    add(triclinic)
    one = bulk("Cu", "fcc", a=a)  # one atom in a cell far smaller than the cutoff
    one.set_cell(one.cell.array @ (np.eye(3) + rng.uniform(-0.04, 0.04, (3, 3))), scale_atoms=True)
    add(one, rattle=0.0)
    add(bulk("Cu", "hcp", a=a / np.sqrt(2.0)))  # two atoms, likewise
    benzene = molecule("C6H6")  # a molecule-like cluster, no cell at all
    benzene.positions *= a / np.sqrt(2.0) / 1.4
    add(benzene)
    return out


def with_species(structures, symbols: list[str], seed: int = 0) -> Batch:
    """A batch of ``structures`` with every atom's element drawn from ``symbols`` (positions kept)."""
    rng = np.random.default_rng(seed)
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.set_chemical_symbols(rng.choice(symbols, size=len(atoms)).tolist())
        out.append(atoms)
    return Batch.from_atoms(out)


def neighbor_list(structures, cutoff: float, skin: float = 0.3):
    """One list for every batch made of ``structures`` (species do not change the list)."""
    return nl.allocate(Batch.from_atoms(structures).geometry, cutoff, skin)


def assert_analytic_equals_autodiff(potential, batch: Batch, neighbors, label: str) -> dict[str, float]:
    """Both evaluations of ``potential`` on ``batch``: equal energies, and forces and stresses
    equal to :data:`RTOL` of every system's largest component (of the batch's, for systems
    whose forces or stress vanish by symmetry). Returns the largest relative differences."""
    assert hasattr(potential, "energy_forces"), label
    analytic = jax.device_get(EVALUATE(potential, batch.geometry, neighbors))
    reference = jax.device_get(EVALUATE_AUTODIFF(potential, batch.geometry, neighbors))
    assert not bool(neighbors.overflow), label
    np.testing.assert_array_equal(analytic.energy, reference.energy, err_msg=label)
    assert np.all(np.isfinite(analytic.energy)), label
    found = {}
    for name in ("forces", "stress"):
        ours, theirs = np.asarray(getattr(analytic, name)), np.asarray(getattr(reference, name))
        assert np.abs(theirs).max() > 1e-4, (label, name)  # the comparison is not of zeros
        floor = 1e-3 * np.abs(theirs).max()
        parts = [batch.atom_slice(s) for s in range(batch.n_structures)] if name == "forces" else range(len(theirs))
        found[name] = max(float(np.abs(ours[p] - theirs[p]).max() / max(np.abs(theirs[p]).max(), floor))
                          for p in parts)
        assert found[name] <= RTOL, (label, name, found[name])
    return found


# ----------------------------------------------------------------------------- metals: EMT, EAM

#: name -> (elements, form) of test_eam's analytic tables
EAM_FILES = {
    "funcfl-Cu": (("Cu",), "eam"),
    "setfl-Cu": (("Cu",), "alloy"),
    "setfl-CuAgNi": (("Cu", "Ag", "Ni"), "alloy"),
    "fs-Cu": (("Cu",), "fs"),
    "fs-CuAg": (("Cu", "Ag"), "fs"),
}


@pytest.fixture(scope="module")
def metals():
    """Metal structures and one neighbor list for all their batches, out to EMT's radius (beyond
    the EAM cutoff: a list only needs to reach far enough; EMT's default mode bounds its ASAP mode)."""
    structures = mixed_structures(a=3.61, seed=1)
    return structures, neighbor_list(structures, max(EMT().cutoff, EAM_CUTOFF))


@pytest.mark.parametrize("asap_cutoff", [False, True])
def test_emt(metals, asap_cutoff):
    structures, neighbors = metals
    batch = with_species(structures, ["Cu", "Au", "Ni", "Al"])
    assert_analytic_equals_autodiff(EMT(asap_cutoff=asap_cutoff), batch, neighbors, f"EMT asap={asap_cutoff}")


@pytest.fixture(scope="module")
def eam_potentials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eam")
    suffix = {"eam": ".eam", "alloy": ".eam.alloy", "fs": ".eam.fs"}
    return {name: EAM.from_file(write_eam(folder / f"{name}{suffix[form]}", elements, form))
            for name, (elements, form) in EAM_FILES.items()}


@pytest.mark.parametrize("name", list(EAM_FILES))
def test_eam(eam_potentials, metals, name):
    structures, neighbors = metals
    batch = with_species(structures, list(EAM_FILES[name][0]))
    assert_analytic_equals_autodiff(eam_potentials[name], batch, neighbors, f"EAM {name}")


# ----------------------------------------------------------------------------- noble gases: LJ, Morse

SIGMA = {"Ar": 3.40, "Kr": 3.65, "Ne": 2.75}
EPSILON = {"Ar": 0.0104, "Kr": 0.0140, "Ne": 0.0031}

LENNARD_JONES = {
    "scalar": LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5),
    "scalar-smooth": LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5, smooth=True),
    "species": LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, pairs={("Kr", "Ar"): dict(sigma=3.55, rc=9.0)}),
    "species-smooth": LennardJones.per_species(sigma=SIGMA, epsilon=EPSILON, smooth=True, mixing="geometric"),
}

MORSE = {
    "scalar": MorsePotential(epsilon=0.0104, r0=3.8, rho0=6.0),
    "species": MorsePotential.per_species(epsilon=EPSILON, r0={"Ar": 3.8, "Kr": 4.0, "Ne": 3.1},
                                          rho0={"Ar": 6.0, "Kr": 5.5, "Ne": 6.5}, rcut1=1.6, rcut2=2.4,
                                          pairs={("Ar", "Ne"): dict(r0=3.5)}),
}


@pytest.fixture(scope="module")
def noble_gases():
    """Noble-gas structures and one neighbor list for all their batches (every LJ and Morse here)."""
    structures = mixed_structures(a=5.26, seed=2)
    cutoff = max(p.cutoff for p in list(LENNARD_JONES.values()) + list(MORSE.values()))
    return structures, neighbor_list(structures, cutoff)


@pytest.mark.parametrize("name", list(LENNARD_JONES))
def test_lennard_jones(noble_gases, name):
    structures, neighbors = noble_gases
    assert_analytic_equals_autodiff(LENNARD_JONES[name], with_species(structures, list(SIGMA)), neighbors,
                                    f"LJ {name}")


def test_forces_without_stress_are_the_same(noble_gases):
    structures, neighbors = noble_gases
    batch = with_species(structures, list(SIGMA))
    potential = LENNARD_JONES["species-smooth"]
    with_stress = EVALUATE(potential, batch.geometry, neighbors)
    without = EVALUATE(potential, batch.geometry, neighbors, compute_stress=False)
    np.testing.assert_array_equal(np.asarray(without.forces), np.asarray(with_stress.forces))
    np.testing.assert_array_equal(np.asarray(without.energy), np.asarray(with_stress.energy))
    assert not np.asarray(without.stress).any()


@pytest.mark.parametrize("name", list(MORSE))
def test_morse(noble_gases, name):
    structures, neighbors = noble_gases
    assert_analytic_equals_autodiff(MORSE[name], with_species(structures, ["Ar", "Kr", "Ne"], seed=1), neighbors,
                                    f"Morse {name}")

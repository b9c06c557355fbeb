"""EMT against ``ase.calculators.emt.EMT``: energies, forces, stresses and relaxations (issue 3, items 2 and 6)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc100, fcc110, fcc111
from ase.calculators import emt as ase_emt
from ase.calculators.emt import EMT as AseEMT
from ase.cluster import Icosahedron, Octahedron
from ase.data import atomic_numbers
from ase.optimize import LBFGS
from ase.units import Bohr

from kups_relax import neighbors as nl
from kups_relax import relax
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from potentials.emt import BETA, EMT, EMT_NUMBERS, PARAMETERS

METALS = ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"]
ALL_ELEMENTS = METALS + ["H", "C", "N", "O"]

#: One jitted evaluation shared by every test (compiled once per batch shape and cutoff mode).
EVALUATE = jax.jit(evaluate)


def fcc_a(symbol: str) -> float:
    """EMT's equilibrium-ish FCC lattice constant, Å (nearest neighbours at ``beta s0``)."""
    return np.sqrt(2.0) * BETA * ASE_PARAMETERS[symbol][1] * Bohr


ASE_PARAMETERS = ase_emt.parameters


def random_symbols(n: int, pool: list[str], rng) -> list[str]:
    return list(rng.choice(pool, size=n))


def emt_structures() -> list[tuple[str, Atoms]]:
    """At least 50 named structures of every kind EMT users relax (deterministic)."""
    rng = np.random.default_rng(2024)
    out: list[tuple[str, Atoms]] = []
    for k, symbol in enumerate(ALL_ELEMENTS):  # every supported element, pure
        a = bulk(symbol, "fcc", a=fcc_a(symbol) * 1.01, cubic=True) * (2, 1, 1)
        a.rattle(0.05, seed=k)
        out.append((f"pure-{symbol}", a))
    for k in range(8):  # random alloys; the last two use every element
        pool = ALL_ELEMENTS if k >= 6 else list(rng.choice(METALS, size=2 + k % 3, replace=False))
        a = bulk("Cu", "fcc", a=3.75, cubic=True) * (2, 2, 1 + k % 2)
        a.symbols = random_symbols(len(a), pool, rng)
        a.rattle(0.08, seed=100 + k)
        out.append((f"alloy-{k}", a))
    builders = [fcc111, fcc100, fcc110]
    for k, symbol in enumerate(METALS):  # slabs, some alloyed, one with an adsorbed O
        slab = builders[k % 3](symbol, size=(2, 2, 3), a=fcc_a(symbol), vacuum=5.0)
        if k % 2:
            slab.symbols = random_symbols(len(slab), [symbol, METALS[(k + 1) % 7]], rng)
        if k == 0:
            slab.append("O")
            slab.positions[-1] = slab.positions[-2] + (0.0, 0.0, 1.8)
        slab.rattle(0.05, seed=200 + k)
        out.append((f"slab-{k}", slab))
    noc = fcc111("Pt", size=(2, 2, 2), vacuum=None, periodic=False)
    noc.pbc = (True, True, False)
    noc.cell[2] = 0.0  # slab without a third lattice vector
    noc.rattle(0.05, seed=210)
    out.append(("slab-no-c", noc))
    clusters = [Icosahedron("Cu", 2), Icosahedron("Au", 3), Octahedron("Pd", 3), Icosahedron("Ni", 2),
                Octahedron("Ag", 4, 1)]
    for k, c in enumerate(clusters):  # clusters, no cell; two alloyed, one in a periodic box
        if k in (1, 3):
            c.symbols = random_symbols(len(c), METALS, rng)
        c.rattle(0.05, seed=300 + k)
        if k == 4:
            c.center(vacuum=6.0)
            c.pbc = True
        out.append((f"cluster-{k}", c))
    dimer = Atoms("AuCu", positions=[(0, 0, 0), (2.6, 0.1, 0.0)])
    out.append(("dimer", dimer))
    out.append(("single-atom", Atoms("Pt", positions=[(1.0, 2.0, 3.0)])))
    lone = Icosahedron("Cu", 2)
    lone.append("Ag")
    lone.positions[-1] = (15.0, 0.0, 0.0)  # an atom with no neighbour at all
    out.append(("cluster-and-lone-atom", lone))
    boxed = Atoms("Al", positions=[(0, 0, 0)], cell=[8, 8, 8], pbc=True)  # no neighbour, periodic
    out.append(("isolated-periodic", boxed))
    for k, symbol in enumerate(["Cu", "Pt", "Al", "Ni"]):  # vacancies
        a = bulk(symbol, "fcc", a=fcc_a(symbol), cubic=True) * (2, 2, 2)
        del a[[0, 5 + k][: 1 + k % 2]]
        a.rattle(0.05, seed=400 + k)
        out.append((f"vacancy-{k}", a))
    for k in range(6):  # strained triclinic cells
        symbol = METALS[k]
        a = bulk(symbol, "fcc", a=fcc_a(symbol), cubic=True) * (1, 2, 1)
        if k % 2:
            a.symbols = random_symbols(len(a), METALS, rng)
        strain = np.eye(3) + rng.uniform(-0.08, 0.08, size=(3, 3))
        a.set_cell(a.cell.array @ strain, scale_atoms=True)
        a.rattle(0.05, seed=500 + k)
        out.append((f"triclinic-{k}", a))
    for k, symbol in enumerate(["Cu", "Au", "Ni", "Ag", "O", "H"]):  # cells smaller than the cutoff
        a = bulk(symbol, "fcc", a=fcc_a(symbol))
        if k % 2:
            a = a * (1, 1, 2)
            a.set_cell(a.cell.array @ (np.eye(3) + 0.04 * rng.uniform(-1, 1, size=(3, 3))), scale_atoms=True)
        a.rattle(0.04, seed=600 + k)
        out.append((f"small-cell-{k}", a))
    hcp = bulk("Pt", "hcp", a=fcc_a("Pt") / np.sqrt(2.0))
    hcp.symbols = ["Pt", "Cu"]
    hcp.rattle(0.05, seed=610)
    out.append(("small-cell-hcp", hcp))
    wire = bulk("Au", "fcc", a=fcc_a("Au"), cubic=True) * (1, 1, 2)
    wire.pbc = (False, False, True)
    wire.rattle(0.05, seed=620)
    out.append(("wire", wire))
    compressed = bulk("Cu", "fcc", a=3.2, cubic=True)  # neighbours well inside the 1st shell
    compressed.rattle(0.05, seed=630)
    out.append(("compressed", compressed))
    return out


@pytest.fixture(scope="module")
def named_structures():
    return emt_structures()


@pytest.fixture(scope="module")
def ase_results(named_structures):
    """ASE's EMT, structure by structure, in both cutoff modes."""
    out = {}
    for asap in (False, True):
        for name, atoms in named_structures:
            atoms = atoms.copy()
            atoms.calc = AseEMT(asap_cutoff=asap)
            out[asap, name] = dict(
                energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                stress=atoms.get_stress(voigt=False) if atoms.cell.rank == 3 else None)
    return out


@pytest.fixture(scope="module")
def engine_results(named_structures):
    """Our EMT on the whole set in one batch per cutoff mode, sharing one neighbor list.

    The default mode's radius bounds both modes' (a list only needs an upper bound).
    """
    iron = ("has-iron", bulk("Fe", "bcc", a=2.87, cubic=True))  # EMT has no Fe: nan for this system only
    named = named_structures + [iron]
    batch = Batch.from_atoms([a for _, a in named], names=[n for n, _ in named])
    neighbors = nl.allocate(batch.geometry, EMT().cutoff, skin=0.0)
    out = {}
    for asap in (False, True):
        ev = jax.device_get(EVALUATE(EMT(asap_cutoff=asap), batch.geometry, neighbors))
        for s, (name, atoms) in enumerate(named):
            out[asap, name] = dict(energy=float(ev.energy[s]), forces=np.asarray(ev.forces[batch.atom_slice(s)]),
                                   stress=np.asarray(ev.stress[s]))
    return out


def test_parameter_table_is_ase_s():
    assert PARAMETERS == ASE_PARAMETERS
    assert BETA == ase_emt.beta
    assert EMT().supported_numbers == EMT_NUMBERS == frozenset(atomic_numbers[s] for s in ASE_PARAMETERS)


def test_structure_set_is_varied(named_structures):
    assert len(named_structures) >= 50
    kinds = {name.split("-")[0] for name, _ in named_structures}
    assert {"pure", "alloy", "slab", "cluster", "vacancy", "triclinic", "small"} <= kinds
    present = set().union(*(set(a.numbers.tolist()) for _, a in named_structures))
    assert present == set(EMT_NUMBERS)
    # some cells are smaller than the cutoff (an atom sees several images of itself)
    assert any(a.pbc.all() and min(a.cell.lengths()) < EMT().cutoff / 2 for _, a in named_structures)


@pytest.mark.parametrize("asap", [False, True], ids=["default-cutoff", "asap-cutoff"])
def test_energy_forces_stress_match_ase(named_structures, ase_results, engine_results, asap):
    for name, atoms in named_structures:
        ref, got = ase_results[asap, name], engine_results[asap, name]
        assert abs(got["energy"] - ref["energy"]) / len(atoms) <= 1e-9, (name, got["energy"], ref["energy"])
        np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-8, err_msg=name)
        if ref["stress"] is not None:
            np.testing.assert_allclose(got["stress"], ref["stress"], rtol=0, atol=1e-8, err_msg=name)
        else:
            assert np.all(got["stress"] == 0.0), name


def test_cutoff_modes_differ(named_structures, engine_results):
    """The two modes are really different potentials (the comparison above is not vacuous)."""
    differ = [name for name, _ in named_structures
              if abs(engine_results[False, name]["energy"] - engine_results[True, name]["energy"]) > 1e-6]
    assert len(differ) > len(named_structures) // 2


def test_cutoffs_are_ase_s():
    """Neighbor-list radius: ASE's ``rc_list`` of the largest atom that can appear."""
    def ase_rc_list(symbols, asap):
        calc = AseEMT(asap_cutoff=asap)
        return calc._calc_cutoff(Atoms(symbols))[1]

    assert EMT().cutoff == pytest.approx(ase_rc_list("Cu", False), abs=1e-12)
    assert EMT(asap_cutoff=True).cutoff == pytest.approx(ase_rc_list("Ag", True), abs=1e-12)
    cu = EMT.for_numbers([29, 29], asap_cutoff=True)
    assert cu.supported_numbers == {29}
    assert cu.cutoff == pytest.approx(ase_rc_list("Cu", True), abs=1e-12)
    assert cu.cutoff < EMT(asap_cutoff=True).cutoff
    assert EMT.for_numbers(Atoms("CuAu").numbers).cutoff == EMT().cutoff  # default mode: whole table
    with pytest.raises(ValueError, match="Fe"):
        EMT.for_numbers([26, 29])


def test_list_radius_from_for_numbers_is_enough():
    """A Cu/Ni batch evaluated with the short list of ``for_numbers`` still gives ASE's numbers."""
    structures = []
    for k in range(3):
        a = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
        a.symbols = ["Ni" if (i + k) % 3 == 0 else "Cu" for i in range(len(a))]
        a.rattle(0.05, seed=700 + k)
        structures.append(a)
    potential = EMT.for_numbers([28, 29], asap_cutoff=True)
    batch = Batch.from_atoms(structures)
    neighbors = nl.allocate(batch.geometry, potential.cutoff, skin=0.0)
    ev = EVALUATE(potential, batch.geometry, neighbors)
    for s, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = AseEMT(asap_cutoff=True)
        assert abs(float(ev.energy[s]) - atoms.get_potential_energy()) <= 1e-9 * len(atoms)
        np.testing.assert_allclose(np.asarray(ev.forces[batch.atom_slice(s)]), atoms.get_forces(), atol=1e-8)


# --- relaxation parity -------------------------------------------------------------------

RELAX_FMAX = 0.05


def relax_structures() -> list[tuple[str, Atoms]]:
    """Mixed metal structures of 13 to 253 atoms."""
    rng = np.random.default_rng(7)
    out = []
    big = bulk("Cu", "fcc", a=3.6, cubic=True) * (4, 4, 4)
    del big[[0, 100, 200]]
    big.symbols = ["Au" if x < 0.15 else "Cu" for x in rng.uniform(size=len(big))]
    big.rattle(0.05, seed=9)
    out.append(("bulk-vacancies-CuAu-253", big))
    a = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)
    del a[[0, 40]]
    a.rattle(0.05, seed=1)
    out.append(("bulk-vacancies-Cu", a))
    slab = fcc111("Pt", size=(3, 3, 3), vacuum=6.0)
    slab.symbols = random_symbols(len(slab), ["Pt", "Au"], rng)
    slab.rattle(0.05, seed=2)
    out.append(("slab-PtAu", slab))
    ico = Icosahedron("Ag", 2)
    ico.rattle(0.1, seed=3)
    out.append(("cluster-Ag13", ico))
    octa = Octahedron("Pd", 4, 1)  # 38 atoms
    octa.symbols = random_symbols(len(octa), ["Pd", "Ni"], rng)
    octa.rattle(0.05, seed=4)
    out.append(("cluster-PdNi", octa))
    alloy = bulk("Cu", "fcc", a=3.8, cubic=True) * (2, 2, 2)
    alloy.symbols = random_symbols(len(alloy), ["Cu", "Au", "Al"], rng)
    alloy.rattle(0.05, seed=5)
    out.append(("alloy-CuAuAl", alloy))
    return out


@pytest.fixture(scope="module")
def relax_set():
    return relax_structures()


@pytest.fixture(scope="module")
def ase_relaxed(relax_set):
    out = {}
    for name, atoms in relax_set:
        atoms = atoms.copy()
        atoms.calc = AseEMT()
        opt = LBFGS(atoms, logfile=None)
        converged = opt.run(fmax=RELAX_FMAX, steps=500)
        out[name] = dict(steps=opt.nsteps, converged=converged, positions=atoms.positions.copy(),
                         energy=atoms.get_potential_energy())
    return out


@pytest.fixture(scope="module")
def engine_relaxed(relax_set):
    """Our engine on the parity set plus one structure with an element EMT lacks, all in one call."""
    iron = bulk("Fe", "bcc", a=2.87, cubic=True)
    iron.symbols = ["Fe", "Cu"]
    structures = [a for _, a in relax_set] + [iron]
    names = [n for n, _ in relax_set] + ["has-iron"]
    return relax(structures, EMT(), fmax=RELAX_FMAX, max_steps=500, names=names)


def test_relaxation_matches_ase_lbfgs(relax_set, ase_relaxed, engine_relaxed):
    for (name, atoms), result in zip(relax_set, engine_relaxed):
        ref = ase_relaxed[name]
        assert 13 <= len(atoms) <= 256
        assert ref["converged"] and result.status == "converged", (name, result.reason)
        assert result.steps == ref["steps"], (name, result.steps, ref["steps"])
        assert abs(result.energy - ref["energy"]) <= 1e-8, name
        assert np.abs(result.atoms.positions - ref["positions"]).max() <= 1e-8, name


def test_element_without_parameters_is_invalid(engine_relaxed):
    result = engine_relaxed[-1]
    assert result.name == "has-iron"
    assert result.status == "invalid"
    assert "Fe" in result.reason and "Cu" not in result.reason
    assert all(r.status == "converged" for r in engine_relaxed[:-1])


def test_unknown_element_gives_nan_energy(engine_results):
    """Bypassing relax()'s check, a system with an element EMT lacks gets nan; its batch mates are unaffected."""
    for asap in (False, True):
        assert np.isnan(engine_results[asap, "has-iron"]["energy"])
        assert np.all(np.isfinite(engine_results[asap, "has-iron"]["forces"]))

"""EAM against ase.calculators.eam.EAM on the same files (funcfl, setfl, Finnis-Sinclair).

The tests write their own files: analytic functions (exponential densities,
Morse-like pair terms, a square-root embedding) tabulated on fine grids, in
each format, for one and several elements. The density grid covers every
density the structures reach: beyond the table ASE extrapolates with FITPACK,
whose evaluation far outside the knots is only good to ~1e-10 eV (measured),
so parity to 1e-8 is only defined inside the tables.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.eam import EAM as AseEAM
from ase.cluster import Icosahedron
from ase.data import atomic_numbers
from ase.optimize import LBFGS
from ase.units import Bohr, Hartree
from scipy.interpolate import InterpolatedUnivariateSpline

from kups_relax import neighbors as nl
from kups_relax import relax
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from potentials import EAM, splines
from potentials.eam_file import read_eam

CUTOFF = 5.3
NR, NRHO = 1500, 1500
DR = 5.5 / (NR - 1)  # the r grid reaches past the cutoff, as in real files
DRHO = 0.05  # densities up to 75: above anything the structures reach

#: per element: lattice constant (fcc), density prefactor and decay, embedding strength, Morse pair terms
ELEMENTS = {
    "Cu": dict(a=3.61, f=1.0, beta=2.1, E=2.2, D=0.35, alpha=1.5, re=2.60),
    "Ag": dict(a=4.09, f=1.2, beta=2.4, E=2.0, D=0.30, alpha=1.4, re=2.95),
    "Ni": dict(a=3.52, f=0.9, beta=2.0, E=2.4, D=0.40, alpha=1.6, re=2.52),
}

_evaluate = jax.jit(evaluate)


# ----------------------------------------------------------------------------- analytic tables


def _taper(r):
    """Mishin's cutoff (x^4 / (1 + x^4), x = (rc - r) / 1 Å): smooth to zero at CUTOFF."""
    x = np.clip(CUTOFF - r, 0.0, None)
    return x ** 4 / (1.0 + x ** 4)


def _density(el, r, scale=1.0):
    p = ELEMENTS[el]
    return scale * p["f"] * np.exp(-p["beta"] * (r / (p["a"] / np.sqrt(2)) - 1.0)) * _taper(r)


def _embedding(el, rho):
    return -ELEMENTS[el]["E"] * np.sqrt(rho) + 1e-3 * rho ** 2


def _pair(a, b, r):
    pa, pb = ELEMENTS[a], ELEMENTS[b]
    D, alpha, re = np.sqrt(pa["D"] * pb["D"]), 0.5 * (pa["alpha"] + pb["alpha"]), 0.5 * (pa["re"] + pb["re"])
    return D * (np.exp(-2 * alpha * (r - re)) - 2 * np.exp(-alpha * (r - re))) * _taper(r)


def _fs_scale(source, target):
    """Finnis-Sinclair: the density an atom gives depends on who receives it (not symmetric)."""
    return 1.0 + 0.15 * list(ELEMENTS).index(target) - 0.05 * list(ELEMENTS).index(source)


def _block(values):
    return "".join(" ".join(f"{v:.17e}" for v in values[i:i + 5]) + "\n" for i in range(0, len(values), 5))


def write_eam(path, elements, form):
    """Tabulate the analytic functions of ``elements`` into a LAMMPS file of ``form`` (eam, alloy, fs)."""
    r = np.arange(NR) * DR
    rho = np.arange(NRHO) * DRHO
    grid = f"{NRHO} {DRHO:.17e} {NR} {DR:.17e} {CUTOFF:.17e}\n"
    with open(path, "w") as fd:
        if form == "eam":
            (el,) = elements
            fd.write(f"funcfl test file for {el}\n")
            fd.write(f"{atomic_numbers[el]} 63.546 {ELEMENTS[el]['a']} fcc\n" + grid)
            # funcfl stores the effective charge Z(r), r phi = Hartree Bohr Z^2: a repulsive pair
            charge = np.sqrt(0.4 * np.exp(-1.2 * r) * _taper(r) * r / (Hartree * Bohr))
            fd.write(_block(_embedding(el, rho)) + _block(charge) + _block(_density(el, r)))
            return path
        fd.write(f"{form} test file\nanalytic functions on a fine grid\nkups-relax tests\n")
        fd.write(f"{len(elements)} {' '.join(elements)}\n" + grid)
        for el in elements:
            fd.write(f"{atomic_numbers[el]} 1.0 {ELEMENTS[el]['a']} fcc\n")
            fd.write(_block(_embedding(el, rho)))
            if form == "fs":
                for target in elements:
                    fd.write(_block(_density(el, r, _fs_scale(el, target))))
            else:
                fd.write(_block(_density(el, r)))
        for i, a in enumerate(elements):
            for b in elements[:i + 1]:
                fd.write(_block(r * _pair(a, b, r)))
    return path


FILES = {
    "funcfl-Cu": (("Cu",), "eam", "Cu.eam"),
    "setfl-Cu": (("Cu",), "alloy", "Cu.eam.alloy"),
    "fs-Cu": (("Cu",), "fs", "Cu.eam.fs"),
    "setfl-CuAgNi": (("Cu", "Ag", "Ni"), "alloy", "CuAgNi.eam.alloy"),
    "fs-CuAg": (("Cu", "Ag"), "fs", "CuAg.eam.fs"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eam")
    return {key: str(write_eam(folder / name, elements, form)) for key, (elements, form, name) in FILES.items()}


# ----------------------------------------------------------------------------- structures


def _structures(elements, seed):
    """Periodic, triclinic, cells below the cutoff, slab, wire, cluster, vacancy; random alloys."""
    rng = np.random.default_rng(seed)
    a = ELEMENTS[elements[0]]["a"]
    out = []

    def add(name, atoms, rattle=0.08):
        atoms = atoms.copy()
        atoms.set_chemical_symbols(rng.choice(elements, size=len(atoms)).tolist())
        atoms.rattle(rattle, seed=int(rng.integers(1 << 30)))
        out.append((name, atoms))

    add("bulk", bulk("Cu", "fcc", a=a, cubic=True) * (2, 2, 2))
    tri = bulk("Cu", "fcc", a=a) * (2, 2, 2)
    tri.set_cell(tri.cell.array @ (np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3))), scale_atoms=True)
    add("triclinic", tri)
    one = bulk("Cu", "fcc", a=a)  # one atom, a cell far below the cutoff
    one.set_cell(one.cell.array @ (np.eye(3) + 0.03 * np.ones((3, 3))), scale_atoms=True)
    add("small-cell-1", one, rattle=0.0)
    add("small-cell-hcp", bulk("Cu", "hcp", a=a / np.sqrt(2)))
    vacancy = bulk("Cu", "fcc", a=a, cubic=True) * (2, 2, 2)
    del vacancy[5]
    add("vacancy", vacancy)
    add("slab", fcc111("Cu", size=(2, 2, 3), a=a, vacuum=6.0))
    wire = bulk("Cu", "fcc", a=a, cubic=True) * (1, 1, 2)
    wire.pbc = (False, False, True)
    add("wire", wire)
    add("cluster", Icosahedron("Cu", 2, latticeconstant=a))
    boxed = Icosahedron("Cu", 2, latticeconstant=a)
    boxed.center(vacuum=5.0)  # a cell with volume but no periodicity: ASE still reports a stress
    add("cluster-in-box", boxed)
    return out


@pytest.fixture(scope="module")
def structure_sets():
    return {elements: _structures(elements, seed=len(elements)) for elements, _, _ in FILES.values()}


def _ours(potential, structures):
    batch = Batch.from_atoms(structures)
    neighbors = nl.allocate(batch.geometry, potential.cutoff, 0.5)
    ev = _evaluate(potential, batch.geometry, neighbors)
    return batch, ev


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("key", list(FILES))
def test_energy_forces_stress_match_ase(key, files, structure_sets):
    elements = FILES[key][0]
    named = structure_sets[elements]
    potential = EAM.from_file(files[key])
    batch, ev = _ours(potential, [a for _, a in named])
    energy, forces, stress = np.asarray(ev.energy), np.asarray(ev.forces), np.asarray(ev.stress)
    reference = AseEAM(potential=files[key])
    for s, (name, atoms) in enumerate(named):
        atoms = atoms.copy()
        atoms.calc = reference
        rows = batch.atom_slice(s)
        assert abs(energy[s] - atoms.get_potential_energy()) / len(atoms) <= 1e-8, (key, name)
        np.testing.assert_allclose(forces[rows], atoms.get_forces(), rtol=0, atol=1e-8, err_msg=f"{key} {name}")
        if atoms.cell.rank == 3:
            np.testing.assert_allclose(stress[s], atoms.get_stress(voigt=False), rtol=0, atol=1e-8,
                                       err_msg=f"{key} {name}")
        # the test is not trivial: every structure has forces (one atom: stress), densities stay in the table
        if len(atoms) > 1:
            assert np.abs(atoms.get_forces()).max() > 1e-2, (key, name)
        else:
            assert np.abs(atoms.get_stress()).max() > 1e-3, (key, name)
        assert reference.total_density.max() < (NRHO - 1) * DRHO, (key, name)


def test_tables_read_as_ase_reads_them(files):
    for key, path in files.items():
        ours = read_eam(path)
        ase = AseEAM(potential=path)
        assert list(ours.elements) == list(ase.elements), key
        assert ours.cutoff == ase.cutoff and ours.dr == ase.dr and ours.drho == ase.drho, key
        np.testing.assert_array_equal(ours.embedding, ase.embedded_data, err_msg=key)
        upper = np.triu_indices(len(ours.elements))  # ASE fills rphi_data[j, i] for j <= i only
        np.testing.assert_array_equal(ours.rphi[upper], ase.rphi_data[upper], err_msg=key)
        np.testing.assert_array_equal(ours.rphi, np.swapaxes(ours.rphi, 0, 1), err_msg=key)
        if ours.form == "fs":
            np.testing.assert_array_equal(ours.density, ase.density_data, err_msg=key)
        else:
            for b in range(len(ours.elements)):
                np.testing.assert_array_equal(ours.density[:, b], ase.density_data, err_msg=key)


def test_spline_is_ases_interpolant_with_its_derivative():
    dx = 0.01
    x = np.arange(400) * dx
    y = np.stack([np.exp(-1.3 * x) * np.cos(4 * x), np.sin(3 * x) + x ** 2])
    coefficients = jax.numpy.asarray(splines.cubic_coefficients(x[1:], y[:, 1:]))
    t = np.random.default_rng(0).uniform(dx, x[-1], 2000)
    which = np.arange(2000) % 2
    value = jax.vmap(lambda tt, w: splines.evaluate(coefficients, (w,), tt, dx, offset=1))
    slope = jax.vmap(jax.grad(lambda tt, w: splines.evaluate(coefficients, (w,), tt, dx, offset=1)))
    ours, dours = np.asarray(value(t, which)), np.asarray(slope(t, which))
    for k in range(2):
        reference = InterpolatedUnivariateSpline(x[1:], y[k, 1:], k=3)
        rows = which == k
        np.testing.assert_allclose(ours[rows], reference(t[rows]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(dours[rows], reference(t[rows], 1), rtol=0, atol=1e-10)


def test_elements_come_from_the_file(files):
    assert EAM.from_file(files["setfl-CuAgNi"]).supported_numbers == {29, 47, 28}
    assert EAM.from_file(files["funcfl-Cu"]).supported_numbers == {29}
    assert EAM.from_file(files["fs-CuAg"]).elements == ("Cu", "Ag")


def test_bad_files_get_clear_errors(tmp_path, files):
    with pytest.raises(ValueError, match="ADP"):
        EAM.from_file(tmp_path / "x.adp")
    with pytest.raises(ValueError, match="suffix"):
        EAM.from_file(tmp_path / "x.txt")
    truncated = tmp_path / "cut.eam.alloy"
    truncated.write_text("".join(open(files["setfl-Cu"]).readlines()[:40]))
    with pytest.raises(ValueError, match="cut.eam.alloy.*file ends"):
        EAM.from_file(truncated)
    bad_symbol = tmp_path / "bad.eam.alloy"
    lines = open(files["setfl-Cu"]).readlines()
    lines[3] = "1 Qq\n"
    bad_symbol.write_text("".join(lines))
    with pytest.raises(ValueError, match="'Qq' is not a chemical symbol"):
        EAM.from_file(bad_symbol)
    # form= overrides the suffix, as ASE's form=
    renamed = tmp_path / "setfl.txt"
    renamed.write_text(open(files["setfl-Cu"]).read())
    assert EAM.from_file(renamed, form="alloy").elements == ("Cu",)


def test_float32_on_request(files, structure_sets):
    structures = [a for _, a in structure_sets[("Cu", "Ag")]]
    potential = EAM.from_file(files["fs-CuAg"])
    _, ev64 = _ours(potential, structures)  # the program of the parity test: no new compile
    batch = Batch.from_atoms(structures, dtype="float32")
    ev32 = _evaluate(potential, batch.geometry, nl.allocate(batch.geometry, potential.cutoff, 0.5))
    assert ev32.energy.dtype == np.float32 and ev32.forces.dtype == np.float32
    np.testing.assert_allclose(np.asarray(ev32.energy), np.asarray(ev64.energy), rtol=1e-5)


@pytest.fixture(scope="module")
def relaxation(files):
    """ASE's LBFGS test structures plus one with an element the file lacks, relaxed in one batch."""
    path = files["setfl-CuAgNi"]
    rng = np.random.default_rng(11)
    cluster = Icosahedron("Cu", 2, latticeconstant=3.61)
    cluster.set_chemical_symbols(rng.choice(["Cu", "Ag", "Ni"], size=len(cluster)).tolist())
    cluster.rattle(0.1, seed=1)
    vacancy = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    del vacancy[3]
    vacancy.rattle(0.1, seed=2)
    slab = fcc111("Cu", size=(2, 2, 2), a=3.61, vacuum=5.0)
    slab.symbols[[0, 5]] = "Ag"
    slab.rattle(0.1, seed=3)
    with_fe = vacancy.copy()
    with_fe.symbols[2] = "Fe"
    structures = {"cluster": cluster, "vacancy": vacancy, "with-Fe": with_fe, "slab": slab}
    results = relax(list(structures.values()), EAM.from_file(path), fmax=0.02, max_steps=300,
                    names=list(structures))
    return path, structures, {r.name: r for r in results}


def test_relaxation_matches_ase_lbfgs(relaxation):
    """kups_relax.relax with EAM against ase.optimize.LBFGS with ASE's EAM, structure by structure."""
    path, structures, results = relaxation
    for name in ("cluster", "vacancy", "slab"):
        atoms = structures[name].copy()
        atoms.calc = AseEAM(potential=path)
        opt = LBFGS(atoms, logfile=None)
        assert opt.run(fmax=0.02, steps=300)
        result = results[name]
        assert result.converged, (name, result.reason)
        assert result.steps == opt.nsteps, (name, result.steps, opt.nsteps)
        assert result.steps > 5, name
        assert abs(result.energy - atoms.get_potential_energy()) <= 1e-8, name
        assert np.abs(result.atoms.positions - atoms.positions).max() <= 1e-7, name


def test_structure_with_an_element_not_in_the_file_is_invalid(relaxation):
    _, structures, results = relaxation
    result = results["with-Fe"]
    assert result.status == "invalid" and result.steps == 0
    assert "Fe" in result.reason and "not covered" in result.reason
    assert result.atoms.get_chemical_formula() == structures["with-Fe"].get_chemical_formula()

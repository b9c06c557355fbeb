"""Potentials by name: get_potential for the CLI, configuration files and the API."""

from __future__ import annotations

import numpy as np
import pytest

import potentials
from potentials import EAM, LennardJones, MorsePotential, available_potentials, get_potential, register_potential


def test_lennard_jones_by_name():
    lj = get_potential("lj", sigma=3.4, epsilon=0.0104, rc=8.5)
    assert lj == LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5)
    assert get_potential("LJ") == LennardJones()  # names are case-insensitive; ASE's defaults


def test_morse_by_name():
    assert get_potential("morse", epsilon=0.5, r0=2.5, rho0=4.0) == MorsePotential(epsilon=0.5, r0=2.5, rho0=4.0)
    assert get_potential("morse").cutoff == pytest.approx(2.7)  # ASE's defaults: r0 = 1, rcut2 = 2.7


def test_per_species_parameters_by_name():
    """Configuration files give per-element mappings and 'A-B' pair keys."""
    lj = get_potential("lj", sigma={"Ar": 3.4, "Kr": 3.65}, epsilon={"Ar": 0.0104, "Kr": 0.014},
                       pairs={"Ar-Kr": {"epsilon": 0.012}})
    assert lj.pairs is not None and lj.supported_numbers == {18, 36}
    np.testing.assert_allclose(lj.pairs.host("epsilon"), [[0.0104, 0.012], [0.012, 0.014]])
    morse = get_potential("morse", r0={"Cu": 2.5, "Ag": 2.9}, mixing="geometric")
    assert morse.supported_numbers == {29, 47}
    np.testing.assert_allclose(morse.pairs.host("r0")[0, 1], np.sqrt(2.5 * 2.9))


def test_eam_by_path(tmp_path):
    from test_eam import write_eam

    path = write_eam(tmp_path / "CuAg.eam.alloy", ("Cu", "Ag"), "alloy")
    eam = get_potential(f"eam:{path}")
    reference = EAM.from_file(path)
    assert isinstance(eam, EAM) and eam.elements == ("Cu", "Ag") and eam.supported_numbers == {29, 47}
    np.testing.assert_array_equal(np.asarray(eam.pair), np.asarray(reference.pair))
    renamed = tmp_path / "CuAg.table"
    renamed.write_text(path.read_text())
    assert get_potential(f"eam:{renamed}", form="alloy").elements == ("Cu", "Ag")
    with pytest.raises(ValueError, match="needs a file"):
        get_potential("eam")
    with pytest.raises(FileNotFoundError):
        get_potential(f"eam:{tmp_path / 'missing.eam.alloy'}")


def test_emt_by_name():
    from potentials.emt import EMT

    assert isinstance(get_potential("emt"), EMT)
    emt = get_potential("emt", asap_cutoff=True)
    assert isinstance(emt, EMT) and emt.asap_cutoff
    assert potentials.EMT is EMT


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown potential 'mace'") as err:
        get_potential("mace")
    for kind in ("lj", "morse", "eam", "emt"):
        assert kind in str(err.value)
    assert set(available_potentials()) >= {"lj", "morse", "eam", "emt"}


def test_bad_parameters_and_arguments():
    with pytest.raises(ValueError, match="potential 'lj'.*sigmaa"):
        get_potential("lj", sigmaa=3.4)
    with pytest.raises(ValueError, match="takes no ':<argument>'"):
        get_potential("morse:fast")
    with pytest.raises(ValueError, match="non-empty"):
        get_potential("")


def test_register_a_new_potential(monkeypatch):
    from potentials import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the global registry as it was
    register_potential("lj-argon", lambda argument, **params: LennardJones(sigma=3.4, epsilon=0.0104, **params))
    assert get_potential("lj-argon", rc=8.5) == LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5)
    with pytest.raises(ValueError, match="without ':'"):
        register_potential("a:b", lambda argument: None)

"""Failure isolation: a system that diverges or blows apart stops alone; its neighbours in the batch never notice."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.cluster import Icosahedron

from kups_relax import relax
from kups_relax.segments import segment_sum
from potentials import LennardJones
from structures import LJ_PARAMS

PUSHED = 2  # helium atoms feel a constant push along +x on top of Lennard-Jones


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PushedLJ:
    """Lennard-Jones plus a constant force ``push`` (eV/Å) along +x on every He atom.

    The energy becomes NaN once a He atom passes ``x > wall`` (Å): a model that breaks
    down far from where it was fitted, as machine-learned potentials do.
    """

    inner: LennardJones
    push: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    wall: float = dataclasses.field(default=float("inf"), metadata=dict(static=True))

    @property
    def cutoff(self) -> float:
        return self.inner.cutoff

    @property
    def supported_numbers(self):
        return None

    def energy(self, geometry, neighbors):
        x = geometry.positions[:, 0]
        pushed = (geometry.numbers == PUSHED) & geometry.atom_mask
        term = jnp.where(pushed, jnp.where(x > self.wall, jnp.nan, -self.push * x), 0.0)
        return self.inner.energy(geometry, neighbors) + segment_sum(term, geometry.system, geometry.n_systems)


def dimer(symbol: str) -> Atoms:
    return Atoms(f"{symbol}2", positions=[[5.0, 5.0, 5.0], [5.0, 5.0, 8.8]], cell=[20, 20, 20], pbc=False)


def neighbours() -> list[Atoms]:
    a = Icosahedron("Ar", 2)
    a.rattle(0.1, seed=1)
    b = Icosahedron("Ar", 2)
    b.rattle(0.2, seed=2)
    return [a, b]


def run(middle: Atoms, potential, **kwargs):
    a, b = neighbours()
    return relax([a, middle, b], potential, fmax=0.01, max_steps=200, trajectory=True,
                 names=["a", "middle", "b"], **kwargs)


@pytest.fixture(scope="module")
def potential():
    return LennardJones(**LJ_PARAMS)


@pytest.fixture(scope="module")
def calm(potential):
    """The reference: the middle slot holds an Ar dimer of the same size, which relaxes quietly."""
    return run(dimer("Ar"), PushedLJ(potential, wall=12.0))


def assert_identical(x, y):
    assert x.status == y.status and x.steps == y.steps
    assert np.array_equal(x.atoms.positions, y.atoms.positions)
    assert x.energy == y.energy and np.array_equal(x.energies, y.energies)


def test_non_finite_energy_stops_one_system_at_its_last_good_frame(potential, calm):
    results = run(dimer("He"), PushedLJ(potential, wall=12.0))
    bad = results[1]
    assert bad.status == "diverged" and not bad.converged
    assert "non-finite" in bad.reason
    assert np.isfinite(bad.energy) and np.all(np.isfinite(bad.atoms.positions))
    assert bad.atoms.positions[:, 0].max() <= 12.0  # the last geometry the potential could evaluate
    assert bad.steps > 5  # it moved (0.2 Å per step) before the model broke down
    assert np.array_equal(bad.trajectory[-1].positions, bad.atoms.positions)
    assert len(bad.trajectory) == bad.steps + 1
    for got, ref in zip([results[0], results[2]], [calm[0], calm[2]]):
        assert got.converged
        assert_identical(got, ref)


def test_a_system_that_blows_apart_stops_as_diverged(potential, calm):
    results = run(dimer("He"), PushedLJ(potential), max_displacement=3.0)
    bad = results[1]
    assert bad.status == "diverged" and "blew apart" in bad.reason and "more than 3 Å" in bad.reason
    displacement = np.linalg.norm(bad.atoms.positions - dimer("He").positions, axis=1).max()
    assert 2.5 < displacement <= 3.0  # stopped at the last frame inside the limit
    assert np.array_equal(bad.trajectory[-1].positions, bad.atoms.positions)
    for got, ref in zip([results[0], results[2]], [calm[0], calm[2]]):
        assert_identical(got, ref)


def test_max_displacement_is_off_for_none(potential):
    result, = relax([dimer("He")], PushedLJ(potential), fmax=0.01, max_steps=30, max_displacement=None)
    assert result.status == "unconverged" and result.steps == 30

"""Energies, forces and stresses of a batch from any potential.

A potential with an ``energy_forces`` method (:class:`EnergyForces`: energies, forces and the
virial computed analytically in one pass, as :mod:`kups_relax.pairs` describes) is evaluated
through it. Any other potential is differentiated automatically: every atom and the cell of
its system are deformed by a per-system strain ``eps`` (``r -> r (I + eps)``,
``cell -> cell (I + eps)``); one backward pass of the summed energies gives the forces
``-dE/dr`` and the virial ``dE/d eps`` of every system. Either way the stress is
``virial / V`` (ASE's sign convention: positive = tensile). Systems are independent, so the
gradient of the sum is every system's own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .batch import Geometry
from .neighbors import NeighborList, matvec_rows
from .segments import per_atom


class EnergyForces(NamedTuple):
    """What a potential's optional ``energy_forces(geometry, neighbors, compute_virial)`` returns.

    Attributes:
        energy: ``(S,)`` eV.
        forces: ``(A, 3)`` eV/Å.
        virial: ``(S, 3, 3)`` eV, the derivative of each system's energy by a homogeneous
            strain (``None`` unless ``compute_virial``).
    """

    energy: jax.Array
    forces: jax.Array
    virial: jax.Array | None = None


class Evaluation(NamedTuple):
    """Results of one potential evaluation.

    Attributes:
        energy: ``(S,)`` eV.
        forces: ``(A, 3)`` eV/Å (zero on padding rows).
        stress: ``(S, 3, 3)`` eV/Å³; zero for systems whose cell has no volume.
    """

    energy: jax.Array
    forces: jax.Array
    stress: jax.Array


def evaluate(potential, geometry: Geometry, neighbors: NeighborList, compute_stress: bool = True) -> Evaluation:
    """Energy, forces and (if ``compute_stress``, else zeros) stress of every system (jit-compatible).

    Uses the potential's analytic ``energy_forces`` when it has one, else automatic
    differentiation of its ``energy`` (:func:`evaluate_autodiff`).
    """
    analytic = getattr(potential, "energy_forces", None)
    if analytic is None:
        return evaluate_autodiff(potential, geometry, neighbors, compute_stress)
    out = analytic(geometry, neighbors, compute_virial=compute_stress)
    forces = jnp.where(geometry.atom_mask[:, None], out.forces, 0.0)
    S = geometry.n_systems
    if not compute_stress:
        return Evaluation(energy=out.energy, forces=forces, stress=jnp.zeros((S, 3, 3), forces.dtype))
    return Evaluation(energy=out.energy, forces=forces, stress=_stress(out.virial, geometry))


def _stress(virial: jax.Array, geometry: Geometry) -> jax.Array:
    """``virial / V``, symmetrized; zero for systems whose cell has no volume."""
    volume = jnp.abs(jnp.linalg.det(geometry.cell))
    has_volume = volume > 1e-12
    stress = jnp.where(has_volume[:, None, None], virial / jnp.where(has_volume, volume, 1.0)[:, None, None], 0.0)
    return 0.5 * (stress + jnp.swapaxes(stress, -1, -2))


def evaluate_autodiff(potential, geometry: Geometry, neighbors: NeighborList, compute_stress: bool = True) -> Evaluation:
    """:func:`evaluate` by automatic differentiation of ``potential.energy`` (whatever else it has)."""
    S = geometry.n_systems
    strain = jnp.zeros((S, 3, 3), geometry.positions.dtype)

    def total_energy(positions, strain):
        if compute_stress:
            deformation = jnp.eye(3, dtype=positions.dtype) + strain
            geometry_ = geometry.replace(
                positions=positions + matvec_rows(positions, per_atom(strain, geometry.system)),
                cell=jnp.einsum("sdk,skl->sdl", geometry.cell, deformation),
            )
        else:
            geometry_ = geometry.replace(positions=positions)
        energies = potential.energy(geometry_, neighbors)
        return jnp.sum(energies), energies

    (_, energies), (grad_positions, grad_strain) = jax.value_and_grad(
        total_energy, argnums=(0, 1), has_aux=True)(geometry.positions, strain)
    forces = jnp.where(geometry.atom_mask[:, None], -grad_positions, 0.0)
    if not compute_stress:
        return Evaluation(energy=energies, forces=forces, stress=jnp.zeros((S, 3, 3), forces.dtype))
    return Evaluation(energy=energies, forces=forces, stress=_stress(grad_strain, geometry))

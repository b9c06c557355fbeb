"""Energies, forces and stresses of a batch from any potential, by automatic differentiation.

Every atom and the cell of its system are deformed by a per-system strain
``eps`` (``r -> r (I + eps)``, ``cell -> cell (I + eps)``); one backward pass of
the summed energies gives the forces ``-dE/dr`` and the stress
``(1/V) dE/d eps`` of every system (ASE's sign convention: positive = tensile).
Systems are independent, so the gradient of the sum is every system's own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .batch import Geometry
from .neighbors import NeighborList, matvec_rows
from .segments import per_atom


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
    """Energy, forces and (if ``compute_stress``, else zeros) stress of every system (jit-compatible)."""
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
    volume = jnp.abs(jnp.linalg.det(geometry.cell))
    has_volume = volume > 1e-12
    stress = jnp.where(has_volume[:, None, None], grad_strain / jnp.where(has_volume, volume, 1.0)[:, None, None], 0.0)
    stress = 0.5 * (stress + jnp.swapaxes(stress, -1, -2))
    return Evaluation(energy=energies, forces=forces, stress=stress)

"""Lennard-Jones with the semantics of ``ase.calculators.lj.LennardJones``.

Pair energy ``u(r) = 4 epsilon ((sigma/r)**12 - (sigma/r)**6)`` for ``r < rc``.
With ``smooth=False`` (ASE's default) every pair inside the cutoff is shifted
by ``u(rc)`` so the energy is continuous at ``rc`` (the forces are not); with
``smooth=True`` the pair energy is multiplied by ASE's (jax-md's) cutoff
function going from 1 at ``ro`` to 0 at ``rc``. Every pair is counted from both
ends with weight 1/2, as ASE does with its ``bothways`` neighbor list.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kups_relax.batch import Geometry
from kups_relax.neighbors import NeighborList, pair_vectors
from kups_relax.segments import segment_sum


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LennardJones:
    """Lennard-Jones potential (ASE's ``LennardJones`` parameters and defaults).

    Attributes:
        sigma: length scale, Å (ASE default 1.0).
        epsilon: well depth, eV (ASE default 1.0).
        rc: cutoff, Å; ``None`` -> ``3 * sigma`` as in ASE.
        ro: onset of the smooth cutoff, Å; ``None`` -> ``0.66 * rc`` as in ASE.
        smooth: multiply by a smooth cutoff function instead of shifting the energy.
    """

    sigma: float = 1.0
    epsilon: float = 1.0
    rc: float | None = None
    ro: float | None = None
    smooth: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        # resolve ASE's defaults once, on the host (leaves may be tracers under jit: leave them)
        if self.rc is None:
            object.__setattr__(self, "rc", 3.0 * self.sigma)
        if self.ro is None:
            object.__setattr__(self, "ro", 0.66 * self.rc)

    @property
    def cutoff(self) -> float:
        return float(self.rc)

    @property
    def supported_numbers(self) -> None:
        return None

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        vec = pair_vectors(neighbors, geometry.positions, geometry.cell, geometry.system)
        r2 = jnp.sum(vec * vec, axis=-1)
        rc2 = self.rc ** 2
        inside = neighbors.mask & (r2 <= rc2)
        r2_safe = jnp.where(inside, r2, rc2)  # keeps padding pairs away from 1/0
        c6 = jnp.where(inside, (self.sigma ** 2 / r2_safe) ** 3, 0.0)
        c12 = c6 ** 2
        pair = 4.0 * self.epsilon * (c12 - c6)
        if self.smooth:
            pair = pair * _cutoff_function(r2_safe, rc2, self.ro ** 2)
        else:
            e0 = 4.0 * self.epsilon * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
            pair = pair - jnp.where(c6 != 0.0, e0, 0.0)
        pair = jnp.where(inside, pair, 0.0)
        S = geometry.n_systems
        owner = jnp.where(neighbors.mask, geometry.system[neighbors.senders], S)  # padding pairs dropped
        return segment_sum(0.5 * pair, owner, S)


def _cutoff_function(r2, rc2, ro2):
    """ASE's smooth cutoff in squared distances: 1 below ``ro``, 0 above ``rc``, C^1 between."""
    between = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, jnp.where(r2 < rc2, between, 0.0))
